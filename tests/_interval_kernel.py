"""The compiled CPU kernels for the tests: ``interval_bwd`` and why it cannot run (None when it can).

Until the library's loader (``zorro_kernels.backends._cpp``) is on this branch, the backward source is built here with
``torch.utils.cpp_extension.load``; a build failure becomes the skip reason.
"""

from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parents[1] / "zorro_kernels" / "csrc" / "interval_bwd.cpp"


def _build():
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="zorro_cpu_bwd_tests",
            sources=[str(_SRC)],
            extra_cflags=["-O3", "-fno-math-errno"],
            is_python_module=False,
        )
        return None
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler or ninja, a compile or load error: skip
        return f"the CPU kernel did not build: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


_reason = _build()


def unavailable_reason():
    return _reason


def interval_bwd(dout, q, k, v, out, lse, lo, hi, scale):
    return torch.ops.zorro_cpu.interval_bwd(dout, q, k, v, out, lse, lo, hi, scale)
