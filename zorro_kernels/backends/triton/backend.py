"""The Triton backend's Python side: launching the kernels and saying which inputs they take.

``forward`` / ``backward`` are plain functions (no autograd, no custom op): :mod:`zorro_kernels._ops` wraps them, as it
wraps every backend, so "triton" here means only the Triton kernels.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ...mask import ZorroMask
from ._config import MAX_HEAD_DIM, choose_blocks, interpreting, use_fallback

__all__ = ["forward", "backward", "KernelFailure", "extra_reasons", "devices", "DESCRIPTION", "DTYPES", "MAX_HEAD_DIM"]

DESCRIPTION = (
    "block-sparse Triton kernels over the tile map: full tiles without masking, partial tiles with the "
    "element mask, empty tiles never loaded; dense and relative score biases, sliding windows (CUDA; CPU "
    "under TRITON_INTERPRET=1)"
)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_import_problem: Optional[str] = None


def _installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a stub module without __spec__ (e.g. sys.modules["triton"] = None)
        return False


_INSTALLED = _installed()


def devices() -> tuple[str, ...]:
    """Device types the kernels run on: CUDA, and CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


# ------------------------------------------------------------------------------------------------ kernels
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class KernelFailure(RuntimeError):
    """A Triton kernel failed to compile or launch on an input the backend accepted (the cause is chained)."""


def _failure(err: BaseException, q: Tensor, what: str) -> KernelFailure:
    b, h, n, d = q.shape
    lines = str(err).strip().splitlines()
    return KernelFailure(
        f"the Triton {what} failed to compile or launch (B={b}, H={h}, Nq={n}, D={d}, "
        f"{str(q.dtype).replace('torch.', '')}): {type(err).__name__}: {lines[0] if lines else ''}"
    )


def _with_fallback(run, q: Tensor, what: str):
    """``run(blocks)`` with the table's blocks; after an out-of-resources error, once more with the fallback table.
    A kernel error comes out as :class:`KernelFailure` (our ValueError/TypeError pass through: already ours)."""
    from ._launch import is_out_of_resources

    d, dtype = q.shape[-1], q.dtype
    try:
        try:
            return run(choose_blocks(d, dtype))
        except (ValueError, TypeError):
            raise
        except Exception as err:  # noqa: BLE001 - only resource errors are retried, everything else re-raised
            if is_out_of_resources(err) and use_fallback(d, dtype):
                return run(choose_blocks(d, dtype))
            raise
    except (ValueError, TypeError):
        raise
    except Exception as err:  # noqa: BLE001 - compile errors, launch errors, out of resources after the fallback
        raise _failure(err, q, what) from err


def _on_device(q: Tensor):
    # Triton launches on the current device; make it q's
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        return torch.cuda.device(q.device)
    return contextlib.nullcontext()


def forward(q, k, v, mask: ZorroMask, scale: float, bias=None):
    """``(out (B, H, Nq, D), lse (B, H, Nq) fp32)`` for validated inputs; no autograd. ``bias``: None, a dense float
    tensor broadcastable to ``(B, H, Nq, Nk)`` or a :class:`~zorro_kernels.RelativePositionBias`."""
    from ._bias import kernel_bias
    from ._fwd import attention_forward
    from ._plan import forward_plan, kernel_mask

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    km = kernel_mask(mask, q.device)
    kb = kernel_bias(bias, q, mask)

    def run(blocks):
        plan, cfg = forward_plan(mask, blocks, q.device)
        return attention_forward(q, k, v, plan, km, kb, scale, cfg)

    with _on_device(q):
        return _with_fallback(run, q, "forward")


def backward(dout, q, k, v, out, lse, mask: ZorroMask, scale: float, bias=None, need_dbias: bool = True):
    """``(dq, dk, dv)`` shaped as q, k, v, from the forward's ``out`` and ``lse``; with a ``bias``, ``(dq, dk, dv,
    dbias)`` with ``dbias`` shaped as the dense bias or the table (None when ``need_dbias`` is False)."""
    from ._bias import bias_grad, kernel_bias
    from ._bwd import attention_backward, one_pass
    from ._plan import kernel_mask, tile_plan

    q, k, v, dout = (_last_dim_contiguous(t) for t in (q, k, v, dout))
    km = kernel_mask(mask, q.device)
    kb = kernel_bias(bias, q, mask)
    atomic = one_pass()
    want = bias is not None and need_dbias

    def run(blocks):
        plan_dkdv = tile_plan(mask, blocks.dkdv.block_m, blocks.dkdv.block_n, "q", q.device)
        plan_dq = tile_plan(mask, blocks.dq.block_m, blocks.dq.block_n, "kv", q.device)
        # a fresh gradient buffer per attempt: a launch that ran out of resources may have written into the last one
        dbias = bias_grad(bias if want else None, kb, q, k.shape[2], not atomic)
        grads = attention_backward(
            dout, q, k, v, out, lse, plan_dkdv, plan_dq, km, kb, dbias, scale, blocks.dkdv, blocks.dq, atomic
        )
        return grads if bias is None else (*grads, dbias.finish())

    with _on_device(q):
        return _with_fallback(run, q, "backward")


# ------------------------------------------------------------------------------------------------ capabilities
def _triton_problem() -> str:
    """Why Triton cannot be used here ('' if it can). The import is tried once, outside compilation."""
    global _import_problem
    if not _INSTALLED:
        return "triton is not installed (pip install 'triton>=3.1')"
    if torch.compiler.is_compiling():
        return ""  # import problems surface when the op runs
    if _import_problem is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _import_problem = ""
        except Exception as err:  # noqa: BLE001 - a broken install must not break zorro_kernels
            _import_problem = f"triton failed to import ({type(err).__name__}: {err})"
    return _import_problem


def extra_reasons(q: Tensor, k: Tensor, v: Tensor, mask: ZorroMask) -> list:
    """What the backend's declared fields cannot say: the install, the interpreter's bf16, grid and offset limits."""
    reasons = []
    problem = _triton_problem()
    if problem:
        reasons.append(problem)
    if q.device.type == "cpu" and not interpreting():
        reasons.append("TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's slow interpreter, for tests")
    if q.dtype == torch.bfloat16 and interpreting():
        reasons.append("bfloat16 arithmetic is wrong in Triton's CPU interpreter (TRITON_INTERPRET=1)")
    b, h = q.shape[0], q.shape[1]
    if b * h > 65535:  # grid y; H >= Hkv, so the dK/dV grid fits too
        reasons.append(f"B x H = {b} x {h} = {b * h} exceeds the grid limit 65535")
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if span >= 2**31:
            reasons.append(f"{name} spans {span} elements within one (batch, head), beyond 32-bit offsets")
    return reasons
