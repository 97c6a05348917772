"""The Triton backend as PyTorch sees it: two ``torch.library`` custom ops inside an autograd Function.

``torch.compile`` cannot trace a :class:`ZorroMask` (a Python object whose tile maps are built with numpy), so the ops
take the mask's *description* instead — segment sizes (ints), the rule table and per-sample lengths (CPU tensors),
``causal`` — and find the mask again at run time in a small registry keyed by that content. Eager calls register the
caller's own mask object first, so its cached tile maps are the ones used; under compilation a mask seen for the first
time is rebuilt from the description (and cached). With fake implementations for both ops,
``torch.compile(fullgraph=True)`` sees one opaque node for the forward and one for the backward. (Plain eager
calls skip the dispatcher and run the ops' implementation directly.)

``impl`` says what the ops run: ``"triton"`` — the kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
or another backend's name, which is how :func:`attention` keeps ``torch.compile`` graphs whole when the dispatcher
picks a non-Triton backend (the segment path on CPU).
"""
from __future__ import annotations

import contextlib
import importlib.util
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from ...mask import ZorroMask
from ._config import MAX_HEAD_DIM, choose_blocks, interpreting, use_fallback

__all__ = ["attention", "not_supported_reasons", "BACKEND_DESCRIPTION"]

BACKEND_DESCRIPTION = ("block-sparse Triton kernels over the tile map: full tiles without masking, partial tiles "
                       "with the element mask, empty tiles never loaded (CUDA; CPU under TRITON_INTERPRET=1)")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_MASKS = 64
_masks: "OrderedDict[tuple, ZorroMask]" = OrderedDict()
_by_allow: dict = {}  # id(mask.allow) -> mask, for the masks in _masks
_import_problem: Optional[str] = None


def _installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a stub module without __spec__ (e.g. sys.modules["triton"] = None)
        return False


_INSTALLED = _installed()


# ------------------------------------------------------------------------------------------------ mask registry
def _describe(mask: ZorroMask) -> tuple:
    """What the custom ops take instead of the mask: (allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal)."""
    return (mask.allow, mask.lengths, None if mask.is_self else mask.kv_lengths, list(mask.q_sizes),
            list(mask.kv_sizes), mask.is_self, mask.causal)


def _content_key(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal) -> tuple:
    def raw(t):
        return None if t is None else (tuple(t.shape), t.detach().to("cpu", torch.int64).numpy().tobytes())

    return (tuple(q_sizes), tuple(kv_sizes), bool(is_self), bool(causal), raw(allow), raw(lengths), raw(kv_lengths))


def _remember(mask: ZorroMask) -> None:
    key = mask.cached("triton_op_key", lambda: _content_key(*_describe(mask)))
    _masks[key] = mask
    _masks.move_to_end(key)
    _by_allow[id(mask.allow)] = mask
    while len(_masks) > _MAX_MASKS:
        _, old = _masks.popitem(last=False)
        if _by_allow.get(id(old.allow)) is old:
            del _by_allow[id(old.allow)]


def _resolve(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal) -> ZorroMask:
    # eager calls pass the registered mask's own tensors: found by identity, without hashing any content
    mask = _by_allow.get(id(allow))
    if (mask is not None and mask.allow is allow and mask.lengths is lengths
            and (None if mask.is_self else mask.kv_lengths) is kv_lengths and mask.causal == causal
            and list(mask.q_sizes) == list(q_sizes) and list(mask.kv_sizes) == list(kv_sizes)):
        return mask
    key = _content_key(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal)
    mask = _masks.get(key)
    if mask is None:
        mask = ZorroMask([(f"q{i}", n) for i, n in enumerate(q_sizes)], allow.detach().cpu().bool(),
                         kv_segments=None if is_self else [(f"k{i}", n) for i, n in enumerate(kv_sizes)],
                         lengths=lengths, kv_lengths=None if is_self else kv_lengths, causal=causal)
        mask.cached("triton_op_key", lambda: key)
        _remember(mask)
    else:
        _masks.move_to_end(key)
    return mask


# ------------------------------------------------------------------------------------------------ kernels
def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _with_fallback(run, q: Tensor):
    """``run(blocks)`` with the table's blocks; after an out-of-resources error, once more with the fallback table."""
    from ._launch import is_out_of_resources

    d, dtype = q.shape[-1], q.dtype
    try:
        return run(choose_blocks(d, dtype))
    except Exception as err:  # noqa: BLE001 - only resource errors are retried, everything else re-raised
        if is_out_of_resources(err) and use_fallback(d, dtype):
            return run(choose_blocks(d, dtype))
        raise


def _on_device(q: Tensor):
    # Triton launches on the current device; make it q's
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        return torch.cuda.device(q.device)
    return contextlib.nullcontext()


def _triton_forward(q, k, v, mask: ZorroMask, scale: float):
    from ._fwd import attention_forward
    from ._plan import kernel_mask, tile_plan

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    km = kernel_mask(mask, q.device)

    def run(blocks):
        plan = tile_plan(mask, blocks.fwd.block_m, blocks.fwd.block_n, "kv", q.device)
        return attention_forward(q, k, v, plan, km, scale, blocks.fwd)

    with _on_device(q):
        return _with_fallback(run, q)


def _triton_backward(dout, q, k, v, out, lse, mask: ZorroMask, scale: float):
    from ._bwd import attention_backward
    from ._plan import kernel_mask, tile_plan

    q, k, v, dout = (_last_dim_contiguous(t) for t in (q, k, v, dout))
    km = kernel_mask(mask, q.device)

    def run(blocks):
        plan_dkdv = tile_plan(mask, blocks.dkdv.block_m, blocks.dkdv.block_n, "q", q.device)
        plan_dq = tile_plan(mask, blocks.dq.block_m, blocks.dq.block_n, "kv", q.device)
        return attention_backward(dout, q, k, v, out, lse, plan_dkdv, plan_dq, km, scale, blocks.dkdv,
                                  blocks.dq)

    with _on_device(q):
        return _with_fallback(run, q)


# ------------------------------------------------------------------------------------------------ other backends
def _other_forward(impl: str, q, k, v, mask: ZorroMask, scale: float):
    from .. import BACKENDS
    from ..segments import build_plan, cpu_forward

    if impl == "segments" and q.device.type == "cpu":
        # the same kernels as in eager, run as plain computations (autograd is off inside a custom op)
        out, lse = cpu_forward(q, k, v, mask.cached("segment_plan", lambda: build_plan(mask)), scale)
        return out, lse.float()
    # the other paths recompute in the backward; their LSE is not needed
    out = BACKENDS[impl].forward(q, k, v, mask, scale).contiguous()
    return out, q.new_zeros(q.shape[:3], dtype=torch.float32)


def _other_backward(impl: str, dout, q, k, v, out, lse, mask: ZorroMask, scale: float):
    from .. import BACKENDS
    from ..segments import build_plan, cpu_backward

    if impl == "segments" and q.device.type == "cpu":
        grads = cpu_backward(dout, q, k, v, out, lse.to(torch.float64) if q.dtype == torch.float64 else lse,
                             mask.cached("segment_plan", lambda: build_plan(mask)), scale)
    elif impl == "reference":
        _, vjp = torch.func.vjp(lambda a, b, c: BACKENDS[impl].forward(a, b, c, mask, scale), q, k, v)
        grads = vjp(dout)
    else:
        raise NotImplementedError(f"backend {impl!r} on {q.device.type} has no backward under torch.compile; "
                                  f"use backend='triton' (CUDA) or 'auto'")
    return tuple(g.contiguous() for g in grads)


# ------------------------------------------------------------------------------------------------ custom ops
def _forward_impl(q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale, impl):
    mask = _resolve(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal)
    if impl == "triton":
        return _triton_forward(q, k, v, mask, scale)
    return _other_forward(impl, q, k, v, mask, scale)


def _backward_impl(dout, q, k, v, out, lse, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale,
                   impl):
    mask = _resolve(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal)
    if impl == "triton":
        return _triton_backward(dout, q, k, v, out, lse, mask, scale)
    return _other_backward(impl, dout, q, k, v, out, lse, mask, scale)


@torch.library.custom_op("zorro::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, allow: Tensor, lengths: Optional[Tensor],
                   kv_lengths: Optional[Tensor], q_sizes: list[int], kv_sizes: list[int], is_self: bool, causal: bool,
                   scale: float, impl: str) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Nq, D) contiguous, lse (B, H, Nq) fp32)``; see the module docstring for the arguments."""
    return _forward_impl(q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale, impl)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale, impl):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("zorro::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, allow: Tensor,
                   lengths: Optional[Tensor], kv_lengths: Optional[Tensor], q_sizes: list[int], kv_sizes: list[int],
                   is_self: bool, causal: bool, scale: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped as q, k, v."""
    return _backward_impl(dout, q, k, v, out, lse, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal,
                          scale, impl)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal,
                        scale, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _traced(t: Tensor) -> bool:
    """Under torch.compile / export, or on fake or functional tensors: go through the custom ops. Plain eager calls
    run the same implementation directly and skip the custom-op dispatcher's Python overhead (tens of microseconds,
    as much as a small kernel takes)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale, impl):
        fwd = torch.ops.zorro.attention_fwd if _traced(q) else _forward_impl
        out, lse = fwd(q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale, impl)
        ctx.save_for_backward(q, k, v, out, lse, allow, lengths, kv_lengths)
        ctx.desc = (q_sizes, kv_sizes, is_self, causal, scale, impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, allow, lengths, kv_lengths = ctx.saved_tensors
        bwd = torch.ops.zorro.attention_bwd if _traced(q) else _backward_impl
        dq, dk, dv = bwd(dout, q, k, v, out, lse, allow, lengths, kv_lengths, *ctx.desc)
        return (dq, dk, dv) + (None,) * 9


def attention(q: Tensor, k: Tensor, v: Tensor, mask: ZorroMask, scale: float, impl: str = "triton") -> Tensor:
    """Masked attention through the custom ops (differentiable, ``torch.compile(fullgraph=True)``-safe).

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; mask, scale: as :func:`zorro_kernels.zorro_attention`
            (inputs already validated there).
        impl: ``"triton"`` for the kernels, or the name of the backend the dispatcher chose; ``zorro_attention`` calls
            this under compilation so that no backend's Python-side planning is traced.
    Returns:
        ``(B, H, Nq, D)`` in q's dtype.
    """
    if not torch.compiler.is_compiling():
        _remember(mask)
    allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal = _describe(mask)
    return _Attention.apply(q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, float(scale),
                            impl)


# ------------------------------------------------------------------------------------------------ capabilities
def _triton_problem() -> str:
    """Why Triton cannot be used here ('' if it can). The import is tried once, outside compilation."""
    global _import_problem
    if not _INSTALLED:
        return "triton is not installed (pip install 'zorro[triton]')"
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


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, mask: ZorroMask) -> list:
    """Why the Triton backend refuses these (validated) inputs; empty if it takes them."""
    reasons = []
    problem = _triton_problem()
    if problem:
        reasons.append(problem)
    interp = interpreting()
    if q.device.type == "cpu" and not interp:
        reasons.append("Triton kernels need CUDA tensors, got device cpu (TRITON_INTERPRET=1 runs them in Triton's "
                       "slow CPU interpreter, for tests)")
    elif q.device.type not in ("cuda", "cpu"):
        reasons.append(f"Triton kernels need CUDA tensors, got device {q.device.type}")
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)")
    elif q.dtype == torch.bfloat16 and interp:
        reasons.append("bfloat16 arithmetic is wrong in Triton's CPU interpreter (TRITON_INTERPRET=1)")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        reasons.append(f"head dim D={d} exceeds the maximum {MAX_HEAD_DIM}")
    b, h = q.shape[0], q.shape[1]
    if b * h > 65535:  # grid y; H >= Hkv, so the dK/dV grid fits too
        reasons.append(f"B x H = {b} x {h} = {b * h} exceeds the grid limit 65535")
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if span >= 2 ** 31:
            reasons.append(f"{name} spans {span} elements within one (batch, head), beyond 32-bit offsets")
    return reasons
