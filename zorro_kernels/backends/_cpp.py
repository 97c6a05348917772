"""The compiled CPU kernels (``zorro_kernels/csrc/*.cpp``): built into one library on first use, once per process.

Every ``csrc/*.cpp`` registers its own ops under the ``zorro_cpu`` namespace (``torch.ops.zorro_cpu.*``), so the
library needs no binding file. :func:`load` compiles them with ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler) and loads the shared object; torch holds a file lock on the build directory, so two processes building at
once build once. The build directory's name carries a hash of the sources and flags: a changed source builds anew and
two checkouts with different sources do not rebuild each other's library.

A failed build or load is not an error here: :func:`load` records the reason (the first line of the compiler's error)
and returns False, and :func:`unavailable_reason` gives the one line a backend refuses with. ``ZORRO_CPU_KERNEL=0``
skips the kernels altogether.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

__all__ = ["load", "loaded", "available", "unavailable_reason", "has_op", "build_seconds", "CSRC", "ENV"]

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ENV = "ZORRO_CPU_KERNEL"

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "seconds": float


def _vector_flags() -> list:
    """Vector flags for the CPU we run on, from the capability ATen detected (its kernels use the same): the library
    is named by them, so a build dir shared between machines holds one build per capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def _sources() -> list:
    return sorted(str(p) for p in CSRC.glob("*.cpp"))


def _openmp_flags() -> list:
    """``-fopenmp`` where torch runs ``at::parallel_for`` on OpenMP: that template is compiled into the kernels, and
    without the flag its ``#pragma omp parallel`` is dropped, so every task runs on one thread while MKL, outside any
    parallel region, threads each small GEMM (measured: the Gemma-3 row's backward 3x slower at 2 threads)."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def _flags() -> list:
    return ["-O3", "-fno-math-errno", *_openmp_flags(), *_vector_flags()]


def _name(sources: list, flags: list) -> str:
    digest = hashlib.sha256()
    for path in sorted(sources + [str(p) for p in CSRC.glob("*.h")]):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    return f"zorro_cpu_{digest.hexdigest()[:12]}"


def _first_error_line(text: str) -> str:
    # the compiler's own "file:line:col: error: ..." first; ninja's and torch's summary lines only when there is none
    for pattern in (r"\berror:", r"\berror\b"):
        for line in text.splitlines():
            if re.search(pattern, line, re.IGNORECASE) and not line.startswith("Error building extension"):
                return line.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _import_cpp_extension():
    # importing it on a CPU-only machine logs "No CUDA runtime is found": nothing a user of the CPU kernels needs
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _disabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def load() -> bool:
    """Builds (if needed) and loads the kernels; True when ``torch.ops.zorro_cpu`` has them. Never raises."""
    if _disabled():
        return False
    if "ok" in _state:  # loaded (or failed) before: no lock, so torch.compile traces this
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        start = time.perf_counter()
        try:
            cpp_extension = _import_cpp_extension()

            sources = _sources()
            if not sources:
                raise RuntimeError(f"no sources in {CSRC}")
            flags = _flags()
            name = _name(sources, flags)
            built = Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
            if not built.exists():  # a cold build takes tens of seconds: say so once, not silently
                print(
                    f"zorro: building the CPU kernel {name} once (about 30 s; ZORRO_CPU_KERNEL=0 skips it)",
                    file=sys.stderr,
                )
            cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=flags,
                extra_ldflags=_openmp_flags(),
                is_python_module=False,
                verbose=False,
            )
            _state.update(ok=True, reason="")
        except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a compile error: the backend refuses
            output = getattr(exc, "output", None)
            text = output.decode(errors="replace") if isinstance(output, bytes) else (output or str(exc))
            if exc.__cause__ is not None:  # torch's "Could not load this library" hides the loader's own message
                text = f"{text}: {exc.__cause__}"
            _state.update(ok=False, reason=_first_error_line(text or type(exc).__name__))
        _state["seconds"] = time.perf_counter() - start
        return _state["ok"]


def available() -> bool:
    return load()


def unavailable_reason() -> Optional[str]:
    """One line saying why the kernels cannot run, or None when they can."""
    if _disabled():
        return f"the CPU kernel is disabled ({ENV}=0)"
    if load():
        return None
    return f"the CPU kernel did not build: {_state['reason']}; set {ENV}=0 to skip it"


def loaded() -> Optional[bool]:
    """What :func:`load` found in this process (True / False), None before its first call; builds nothing."""
    return None if _disabled() else _state.get("ok")


def has_op(name: str) -> bool:
    """Whether the loaded library registers ``torch.ops.zorro_cpu.<name>``."""
    if not load():
        return False
    return hasattr(torch.ops.zorro_cpu, name)


def build_seconds() -> Optional[float]:
    """Seconds the first :func:`load` of this process took (a cold compile or a cached load), None before it."""
    return _state.get("seconds")
