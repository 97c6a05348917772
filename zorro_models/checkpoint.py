"""Checkpoints: safetensors weights plus the state that makes ``--resume`` continue exactly.

A checkpoint is a folder ``<run>/checkpoints/step_00000300/`` holding

- ``model.safetensors`` — every trainable tensor of the task module (backbone, heads, loss temperature), loadable
  without pickle (``safetensors.torch.load_file``);
- ``state.pt`` — optimizer and LR-scheduler state, the step, the RNG states (Python, NumPy, torch CPU and CUDA) and
  the data position; loaded with ``weights_only=True``;
- ``config.yaml`` — the run's configuration.

Writes are atomic: the folder is assembled under a temporary name and renamed into place, and ``latest`` (a one-line
file naming the newest checkpoint) is replaced with ``os.replace``. A crash mid-write leaves the previous checkpoint
and pointer intact, never a half-written one.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_weights", "rng_state", "set_rng_state"]

WEIGHTS = "model.safetensors"
STATE = "state.pt"


def rng_state() -> dict:
    """Every RNG the training loop may draw from, as tensors and plain Python values (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def save_checkpoint(run_dir: Union[str, Path], step: int, module: nn.Module, optimizer=None, scheduler=None,
                    extra: Optional[dict] = None, config_yaml: Optional[str] = None, keep: int = 2) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` atomically, point ``latest`` at it, and delete all but the newest
    ``keep`` step checkpoints (``keep <= 0`` keeps every one). Returns the checkpoint folder."""
    from safetensors.torch import save_model

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # save_model de-duplicates shared tensors (tied weights) instead of failing on them
    save_model(_unwrap(module), str(tmp / WEIGHTS))
    state = {"step": int(step), "rng": rng_state(), "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, tmp / STATE)
    if config_yaml is not None:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if final.exists():  # re-saving a step (e.g. a resumed run ending where a checkpoint already stands)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".latest-{os.getpid()}"
    pointer_tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer_tmp, root / "latest")
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Union[str, Path]) -> Optional[Path]:
    """The checkpoint ``latest`` points at in ``<run_dir>/checkpoints``, or None if there is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    return path if (path / WEIGHTS).is_file() and (path / STATE).is_file() else None


def _weights_file(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint weights at {path}")
    return path


def load_weights(module: nn.Module, path: Union[str, Path], *, prefix: str = "", strict: bool = True) -> list:
    """Load ``model.safetensors`` (or a checkpoint folder) into ``module``. With ``prefix``, only keys starting with it
    are read, prefix stripped (e.g. ``prefix="model."`` loads a task checkpoint's backbone into a bare model).
    Returns the keys of ``module`` that the file did not provide (an error when ``strict``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(_weights_file(path)))
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{path} holds no tensor whose name starts with {prefix!r}")
    target = _unwrap(module)
    own = target.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    # shared tensors are stored once by save_model; any alias of a stored tensor counts as provided
    missing = sorted(k for k in own if k not in tensors and not _is_alias(own, k, tensors))
    shapes = sorted(f"{k}: {tuple(v.shape)} in file, {tuple(own[k].shape)} in module"
                    for k, v in tensors.items() if k in own and v.shape != own[k].shape)
    if shapes:
        raise ValueError(f"{path} does not match the module's shapes: {shapes[:8]}")
    if strict and (missing or unexpected):
        raise ValueError(f"{path} does not match the module: missing {missing[:8]}, unexpected {unexpected[:8]}")
    target.load_state_dict(tensors, strict=False)
    return missing


def _is_alias(own: dict, key: str, provided: dict) -> bool:
    t = own[key]
    return any(k in provided and own[k].data_ptr() == t.data_ptr() for k in own if k != key)


def load_checkpoint(path: Union[str, Path], module: nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint folder into ``module`` (strictly), ``optimizer`` and ``scheduler``; restore the RNG states.
    Returns the state dict (``step``, ``extra``, ...)."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE})")
    load_weights(module, path)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if "scheduler" not in state:
            raise ValueError(f"{path} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
