"""Checkpoints: safetensors weights plus the state that makes ``--resume`` continue exactly.

A checkpoint is a folder ``<run>/checkpoints/step_00000300/`` holding

- ``model.safetensors`` — every trainable tensor of the task module (backbone, heads, loss temperature), loadable
  without pickle (``safetensors.torch.load_file``);
- ``state.pt`` — optimizer and LR-scheduler state, the step, the RNG states (Python, NumPy, torch CPU and CUDA) and
  the data position; loaded with ``weights_only=True``;
- ``config.yaml`` — the run's configuration;
- ``manifest.json`` — each file's size, written last: a checkpoint is intact when every file has its recorded size.

Saves are crash-safe (see :func:`save_checkpoint`): a crash at any point of a save leaves the run resumable, losing
at most the step being saved. Readers never follow the ``latest`` pointer (a one-line file kept for people and
tools): :func:`latest_checkpoint` takes the newest intact ``step_*`` folder and says which ones it passed over, and
a damaged file raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "check_checkpoint",
    "CheckpointError",
    "load_weights",
    "rng_state",
    "set_rng_state",
]

WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP = re.compile(r"step_(\d+)")
# what save_checkpoint leaves behind when killed: its folders (".tmp-step_N-PID", ".old-step_N-PID") and pointer
_TEMP = re.compile(r"(?:\.tmp-step_\d+|\.old-step_\d+|\.latest)-(\d+)")


def rng_state() -> dict:
    """Every RNG the training loop may draw from, as tensors and plain Python values (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def save_checkpoint(
    run_dir: Union[str, Path],
    step: int,
    module: nn.Module,
    optimizer=None,
    scheduler=None,
    extra: Optional[dict] = None,
    config_yaml: Optional[str] = None,
    keep: int = 2,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>`` crash-safely, point ``latest`` at it, and delete all but the newest
    ``keep`` step checkpoints (``keep <= 0`` keeps every one). Returns the checkpoint folder.

    Order of work (a crash at any point loses at most this step): the files are written and fsynced in a temporary
    folder, a manifest of their sizes last; the folder is renamed into place (a checkpoint of the same step already
    there is first moved aside, and deleted only after the new one stands); ``latest`` is replaced atomically; older
    checkpoints are pruned last. Temporary folders of dead processes (killed saves) are removed."""
    from safetensors.torch import save_model

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
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
    files = sorted(p.name for p in tmp.iterdir())
    for f in files:
        _fsync(tmp / f)
    manifest = {"step": int(step), "files": {f: (tmp / f).stat().st_size for f in files}}
    _write_synced(tmp / MANIFEST, json.dumps(manifest))
    _fsync(tmp)
    old = None
    if final.exists():  # re-saving a step (a resumed run ending where a checkpoint stands): never delete it first
        old = root / f"{OLD_PREFIX}{name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)
    pointer_tmp = root / f".latest-{os.getpid()}"
    _write_synced(pointer_tmp, name + "\n")
    os.replace(pointer_tmp, root / "latest")
    _fsync(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for stale in _step_folders(root)[keep:]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk: a rename is durable only after what it names is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is then as durable as they make it
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale(root: Path) -> None:
    """Delete the temporary folders and pointer files of saves that died (their process no longer runs, or it is this
    one: saves are synchronous, so an earlier save of ours that left them raised). Those of other live processes are
    left alone. A re-saved step moved aside by a save that died before its replacement was in place is moved back."""
    for p in root.iterdir():
        m = _TEMP.fullmatch(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _pid_alive(pid):
            step_name = p.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
            if p.name.startswith(OLD_PREFIX) and not (root / step_name).exists():
                os.replace(p, root / step_name)  # killed between moving a re-saved step aside and its replacement in
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _step_folders(root: Path) -> list[Path]:
    """The ``step_<N>`` folders under ``root``, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it."""


def check_checkpoint(path: Union[str, Path]) -> None:
    """Raise :class:`CheckpointError` unless ``path`` holds a complete checkpoint: the weights and state files, and,
    when it has a manifest (every checkpoint written since manifests exist), each file at its recorded size."""
    path = Path(path)
    for f in (WEIGHTS, STATE):
        if not (path / f).is_file():
            raise CheckpointError(f"{path / f} is missing")
    if not (path / MANIFEST).is_file():
        return
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        sizes = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST} cannot be read ({type(e).__name__}: {e})") from e
    for f, size in sizes.items():
        have = (path / f).stat().st_size if (path / f).is_file() else None
        if have != size:
            raise CheckpointError(
                f"{path / f} is {'missing' if have is None else f'{have} bytes'}, the manifest "
                f"says {size} bytes (truncated or damaged)"
            )


def latest_checkpoint(run_dir: Union[str, Path], skipped: Optional[list] = None) -> Optional[Path]:
    """The newest intact checkpoint in ``<run_dir>/checkpoints`` (highest step that passes
    :func:`check_checkpoint`), or None if there is none. Damaged or incomplete ones are passed over; with
    ``skipped`` (a list), a line per passed-over checkpoint saying why is appended to it.

    Only ``step_<N>`` folders directly in ``checkpoints`` are candidates: the ``latest`` pointer is a convenience
    for people and other tools, never followed, so a pointer naming ``../..`` cannot lead outside the run."""
    root = Path(run_dir) / "checkpoints"
    for path in _step_folders(root):
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            if skipped is not None:
                skipped.append(f"skipped {path.name}: {e}")
            continue
        return path
    return None


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
    tensors = _read_weights(_weights_file(path))
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{path} holds no tensor whose name starts with {prefix!r}")
    target = _unwrap(module)
    own = target.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    # shared tensors are stored once by save_model; any alias of a stored tensor counts as provided
    missing = sorted(k for k in own if k not in tensors and not _is_alias(own, k, tensors))
    shapes = sorted(
        f"{k}: {tuple(v.shape)} in file, {tuple(own[k].shape)} in module"
        for k, v in tensors.items()
        if k in own and v.shape != own[k].shape
    )
    if shapes:
        raise ValueError(f"{path} does not match the module's shapes: {shapes[:8]}")
    if strict and (missing or unexpected):
        hint = ""
        if missing and not unexpected and all(".rel_tables." in k for k in missing):
            hint = (
                "; the checkpoint predates Zorro-Swin's relative position bias: load it into a model built with "
                "rel_pos_bias=False (setting model.kwargs.rel_pos_bias=false)"
            )
        raise ValueError(f"{path} does not match the module: missing {missing[:8]}, unexpected {unexpected[:8]}" + hint)
    target.load_state_dict(tensors, strict=False)
    return missing


def _read_weights(file: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for a torn file, OSError for others
        raise CheckpointError(
            f"{file} cannot be read ({type(e).__name__}: {e}); the file is damaged or truncated"
        ) from e


def _read_state(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn zip archive: RuntimeError, OSError [Errno 22], EOFError, UnpicklingError
        raise CheckpointError(
            f"{file} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            f"; the file is damaged or truncated"
        ) from e


def _is_alias(own: dict, key: str, provided: dict) -> bool:
    t = own[key]
    return any(k in provided and own[k].data_ptr() == t.data_ptr() for k in own if k != key)


def load_checkpoint(
    path: Union[str, Path], module: nn.Module, optimizer=None, scheduler=None, restore_rng: bool = True
) -> dict:
    """Load a checkpoint folder into ``module`` (strictly), ``optimizer`` and ``scheduler``; restore the RNG states.
    Returns the state dict (``step``, ``extra``, ...). Both files are read and checked before anything is changed: a
    damaged checkpoint raises :class:`CheckpointError` naming the file and leaves module and optimizer as they were."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE})")
    check_checkpoint(path)
    state = _read_state(path / STATE)
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and key not in state:
            raise CheckpointError(f"{path / STATE} holds no {key} state")
    load_weights(module, path)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
