"""Checkpoints: safetensors weights plus the state that makes ``--resume`` continue exactly.

A checkpoint is a folder ``<run>/checkpoints/step_00000300/`` holding

- ``model.safetensors`` — every trainable tensor of the task module (backbone, heads, loss temperature), loadable
  without pickle (``safetensors.torch.load_file``);
- ``state.pt`` — optimizer and LR-scheduler state, the step, the RNG states (Python, NumPy, torch CPU and CUDA) and
  the data position; loaded with ``weights_only=True``;
- ``config.yaml`` — the run's configuration;
- ``manifest.json`` — each file's size and SHA-256, written last. A checkpoint is intact when its weights and state
  match their manifest entries: those alone are judged, each by its own checksum, so a damaged ``config.yaml`` copy
  never condemns intact weights (:func:`stored_config` passes over it to another copy of the run's configuration).

Saves are crash-safe (see :func:`save_checkpoint`): a crash at any point of a save leaves the run resumable, losing
at most the step being saved; an OS error (a full disk) names the checkpoint and the errno, and the failed save's
files are removed at once. Readers never follow the ``latest`` pointer (a one-line file kept for people and
tools): :func:`latest_checkpoint` takes the newest intact ``step_*`` folder and says which ones it passed over, and
a damaged file raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "check_checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "stored_config",
    "load_weights",
    "rng_state",
    "set_rng_state",
]

WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
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
    folder, a manifest of their sizes and SHA-256 checksums last; the folder is renamed into place (a checkpoint of
    the same step already there is first moved aside, and deleted only after the new one stands); ``latest`` is
    replaced atomically; older checkpoints are pruned last. Temporary folders of dead processes (killed saves) are
    removed. An OS error (a full disk, a quota, a read-only mount) raises :class:`CheckpointWriteError` naming the
    checkpoint, the file and the errno, after removing what the failed save wrote."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    state = {"step": int(step), "rng": rng_state(), "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    files = {WEIGHTS: _weights_bytes(module), STATE: lambda f: torch.save(state, f)}
    if config_yaml is not None:
        files[CONFIG] = config_yaml.encode("utf-8")
    writing = tmp.name
    try:
        tmp.mkdir()
        manifest = {"step": int(step), "files": {}}
        for f, data in files.items():
            writing = f
            manifest["files"][f] = _write_file(tmp / f, data)
        writing = MANIFEST
        _write_synced(tmp / MANIFEST, json.dumps(manifest))
        _fsync(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, writing, e) from e
    old = None
    try:
        writing = f"{name} (renaming it into place)"
        if final.exists():  # re-saving a step (a resumed run ending where a checkpoint stands): never delete it first
            old = root / f"{OLD_PREFIX}{name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
    except OSError as e:
        if old is not None and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, writing, e) from e
    pointer_tmp = root / f".latest-{os.getpid()}"
    try:
        _write_synced(pointer_tmp, name + "\n")
        os.replace(pointer_tmp, root / "latest")
        _fsync(root)
    except OSError as e:  # the checkpoint stands; only the pointer for people and tools is stale
        pointer_tmp.unlink(missing_ok=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise _write_error(final, "latest (the pointer; the checkpoint itself is complete)", e) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for stale in _step_folders(root)[keep:]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: the message names it, the file and the OS error (``errno`` is kept)."""


def _write_error(final: Path, writing: str, e: OSError) -> CheckpointWriteError:
    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    what = f"[Errno {e.errno}] {e.strerror or e}" + (f" ({name})" if name else "")
    free = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = f"; {shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free there"
    err = CheckpointWriteError(
        f"could not write checkpoint {final}: {what} while writing {writing}{free}; the partial save was "
        f"removed and the checkpoints saved before it are untouched"
    )
    err.errno = e.errno
    return err


def _weights_bytes(module: nn.Module) -> bytes:
    """The module's tensors in safetensors format, tied weights stored once (the alias is named in the metadata, and
    :func:`load_weights` accepts it). Serialised here and written by :func:`_write_file`, whose OS errors reach the
    caller: safetensors' own file writer can lose a full disk's error."""
    from safetensors.torch import save

    tensors, aliases, seen = {}, {}, {}
    for key, t in _unwrap(module).state_dict().items():
        where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if where in seen:
            aliases[key] = seen[where]
            continue
        seen[where] = key
        tensors[key] = t.detach().contiguous()
    return save(tensors, metadata=aliases or None)


class _Hashed:
    """A binary file that keeps the size and SHA-256 of what was written through it."""

    def __init__(self, f):
        self._f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        view = memoryview(data)
        try:
            self._f.write(view)
        except OSError as e:  # kept: torch's writer turns it into "RuntimeError: [enforce fail ...] unexpected pos"
            self.error = e
            raise
        self.sha.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._f.flush()


def _write_file(path: Path, data) -> dict:
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``path`` and fsync it; returns its
    manifest entry ``{"size", "sha256"}``."""
    with open(path, "wb") as f:
        out = _Hashed(f)
        try:
            if callable(data):
                data(out)
            else:
                out.write(data)
        except Exception:
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"size": out.size, "sha256": out.sha.hexdigest()}


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
    _write_file(path, text.encode("utf-8"))


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


def _manifest(path: Path) -> Optional[dict]:
    """``{file: {"size", "sha256"?}}`` from a checkpoint's manifest (None: a checkpoint from before manifests)."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        entries = {f: e if isinstance(e, dict) else {"size": e} for f, e in dict(manifest["files"]).items()}
        for e in entries.values():
            int(e["size"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} cannot be read ({type(e).__name__}: {e})") from e
    return entries


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path, name: str, entry: Optional[dict]) -> None:
    """Raise :class:`CheckpointError` unless ``path/name`` exists with the size and checksum its manifest
    ``entry`` records (what the entry records: manifests before checksums hold sizes only)."""
    file = path / name
    have = file.stat().st_size if file.is_file() else None
    if have is None:
        raise CheckpointError(f"{file} is missing")
    if entry is None:
        return
    if have != entry["size"]:
        raise CheckpointError(f"{file} is {have} bytes, the manifest says {entry['size']} bytes (truncated or damaged)")
    if "sha256" in entry and _sha256(file) != entry["sha256"]:
        raise CheckpointError(f"{file} does not match its checksum in {MANIFEST} (damaged)")


def check_checkpoint(path: Union[str, Path]) -> None:
    """Raise :class:`CheckpointError` naming the damaged file unless ``path`` holds usable weights and state: both
    files there, each with the size and SHA-256 its manifest records (checkpoints from before manifests are judged
    by their presence alone, and the files when read). Only the weights and the state decide: a damaged
    ``config.yaml`` copy does not make a checkpoint damaged (:func:`stored_config` reports it and finds another)."""
    path = Path(path)
    manifest = _manifest(path)
    for f in (WEIGHTS, STATE):
        if manifest is not None and f not in manifest:
            raise CheckpointError(f"{path / MANIFEST} lists no {f}")
        _check_file(path, f, None if manifest is None else manifest[f])


#: the sections of a complete run configuration (a config.yaml copy without a checksum must hold all of them)
_SECTIONS = ("model", "data", "optim", "train", "probe")


def _read_config(file: Path, entry: Optional[dict]) -> dict:
    """The mapping in a ``config.yaml`` copy, or CheckpointError saying what is wrong with it. ``entry``: its manifest
    entry (size and checksum) when it is a checkpoint's copy; without one, a copy must hold every section."""
    try:
        if entry is not None:
            _check_file(file.parent, file.name, entry)
        elif not file.is_file():
            raise CheckpointError(f"{file} is missing")
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = " ".join(str(e).split())
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {first[:160]})") from e
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{file} holds no configuration (got {type(data).__name__})")
    missing = [k for k in _SECTIONS if not isinstance(data.get(k), dict)]
    if missing and (entry is None or "sha256" not in entry):
        raise CheckpointError(f"{file} lacks the section(s) {', '.join(missing)} (truncated?)")
    return data


def stored_config(ckpt: Union[str, Path], notes: Optional[list] = None) -> tuple[dict, Path]:
    """The configuration checkpoint ``ckpt`` was saved under, as a plain dict, and the file it was read from.

    Copies are tried in this order: the checkpoint's own ``config.yaml`` (checked against its manifest), the run's
    ``config.yaml`` (the run's current settings; it has no checksum, so it must hold every section), then the copies
    of the run's other checkpoints, newest first — every copy in a run holds the same run (a resume refuses changes
    that alter it). Each copy passed over adds a line to ``notes``. With no readable copy, raises
    :class:`CheckpointError` naming each file and what is wrong with it: a caller must then refuse, never guess."""
    ckpt = Path(ckpt)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    candidates = [(ckpt / CONFIG, ckpt)]
    if run is not None:
        candidates.append((run / CONFIG, None))
        candidates += [(p / CONFIG, p) for p in _step_folders(run / "checkpoints") if p != ckpt]
    problems = []
    for file, owner in candidates:
        if owner is not None and not file.is_file() and owner != ckpt:
            continue  # an older checkpoint without a copy: nothing to report
        try:
            entry = None
            if owner is not None:
                manifest = _manifest(owner)
                entry = None if manifest is None else manifest.get(CONFIG)
            data = _read_config(file, entry)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if notes is not None:
            notes += [f"{p}; using {file}" for p in problems]
        return data, file
    raise CheckpointError("no readable copy of the run's configuration: " + "; ".join(problems))


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
    path: Union[str, Path],
    module: nn.Module,
    optimizer=None,
    scheduler=None,
    restore_rng: bool = True,
    verified: bool = False,
) -> dict:
    """Load a checkpoint folder into ``module`` (strictly), ``optimizer`` and ``scheduler``; restore the RNG states.
    Returns the state dict (``step``, ``extra``, ...). Both files are read and checked before anything is changed: a
    damaged checkpoint raises :class:`CheckpointError` naming the file and leaves module and optimizer as they were.
    ``verified``: :func:`check_checkpoint` (checksums: a read of every byte) has just passed on ``path``; not again."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE})")
    if not verified:
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
