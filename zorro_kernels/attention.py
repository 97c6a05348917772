"""``zorro_attention``: the public entry point — validation, then dispatch to a backend."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _ops, auto
from .backends import BACKENDS
from .bias import check_bias, hide_dead_keys
from .mask import ZorroMask

__all__ = ["zorro_attention", "check_inputs", "select_backend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q, k, v, mask, scale=None, bias=None) -> None:
    """Raise a clear TypeError/ValueError for anything :func:`zorro_attention` cannot take. Returns None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(mask, ZorroMask):
        raise TypeError(f"mask must be a ZorroMask, got {type(mask).__name__}")
    for name, t, layout in (("q", q, "(B, H, Nq, D)"), ("k", k, "(B, Hkv, Nk, D)"), ("v", v, "(B, Hkv, Nk, D)")):
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got {t.ndim}-D with shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    (b, h, nq, d), (bk, hkv, nk, dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Nk, D), got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if bk != b:
        raise ValueError(f"batch size mismatch: q has B={b}, k/v have B={bk}")
    if dk != d:
        raise ValueError(f"head dim mismatch: q has D={d}, k/v have D={dk}")
    if d == 0 or b == 0 or h == 0 or hkv == 0:
        raise ValueError(f"q and k must have non-zero B, H and D, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if h % hkv != 0:
        raise ValueError(f"query heads H={h} must be a multiple of key/value heads Hkv={hkv} (GQA)")
    if nq != mask.num_q:
        raise ValueError(f"q has Nq={nq} tokens but the mask's query segments hold {mask.num_q} "
                         f"({dict(zip(mask.q_names, mask.q_sizes))})")
    if nk != mask.num_kv:
        raise ValueError(f"k/v have Nk={nk} tokens but the mask's key segments hold {mask.num_kv} "
                         f"({dict(zip(mask.kv_names, mask.kv_sizes))})")
    if mask.batch_size is not None and mask.batch_size != b:
        raise ValueError(f"the mask's lengths are for B={mask.batch_size} samples but q has B={b}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy scalars are Real too
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite positive number, got {scale}")
    check_bias(bias, q, nk)


def select_backend(q, k, v, mask, backend: str = "auto", bias=None, scale: Optional[float] = None,
                   grad: Optional[bool] = None) -> str:
    """Name of the backend that will run (validated inputs); raises ValueError with every refusal's reasons if none
    can. ``"auto"`` is :mod:`zorro_kernels.auto`'s choice (see :func:`zorro_kernels.explain`); ``grad`` (default: what
    autograd will do with these tensors) says whether the call will be differentiated."""
    if backend == "auto":
        return auto.choose(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale),
                           auto.wants_grad(q, k, v, bias) if grad is None else grad, bias)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    reasons = BACKENDS[backend].not_supported_reasons(q, k, v, mask, bias=bias)
    if reasons:
        raise ValueError(f"backend {backend!r} cannot run this input: " + "; ".join(reasons))
    return backend


def zorro_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ZorroMask, *, bias=None,
                    scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Attention restricted by a modality layout, computing only the parts of the matrix the mask leaves visible.

    Args:
        q: ``(B, H, Nq, D)`` queries.
        k, v: ``(B, Hkv, Nk, D)`` keys and values; ``H % Hkv == 0`` (grouped-query attention: query head ``h`` reads
            kv head ``h // (H // Hkv)``). K/V are not copied per head by the Triton backend.
        mask: a :class:`ZorroMask` with ``mask.num_q == Nq`` and ``mask.num_kv == Nk``; its lengths, if any, are for B
            samples.
        bias: added to the scaled scores before the softmax, only where the mask allows (see
            :mod:`zorro_kernels.bias`): a float tensor broadcastable to ``(B, H, Nq, Nk)`` (read only on the blocks
            the mask leaves visible; differentiable), or a :class:`~zorro_kernels.RelativePositionBias` (a table
            ``(H, T)`` indexed by coordinate offsets, computed per block, never ``Nq x Nk``; the table gets its
            gradient). A ``-inf`` bias counts as masked: a row whose every allowed key is ``-inf`` returns 0 with zero
            gradients, and keys a ``(..., 1, Nk)`` bias hides from every query (key padding, e.g. left padding) are
            zero-filled before any backend reads them, so NaN or garbage there never reaches a row.
        scale: softmax scale; default ``D ** -0.5``.
        backend: ``"auto"`` (on CUDA the faster of ``"triton"`` and ``"segments"``, timed once per problem; on CPU
            ``"dense"`` for tiny problems, else ``"segments"``; :func:`zorro_kernels.explain` says which and why), or
            force one of ``"triton"``, ``"segments"``, ``"dense"``, ``"reference"``. A forced backend that cannot take
            the input raises ValueError saying why.

    Returns:
        ``(B, H, Nq, D)`` in q's dtype. A query row that may attend no valid key (padding rows included) is exactly 0
        and passes zero gradient. Inputs may be non-contiguous. float16, bfloat16, float32 (and float64 on the
        reference and segment paths) are supported.

    Raises:
        TypeError / ValueError naming the argument and the numbers for malformed input (see :func:`check_inputs`).
    """
    check_inputs(q, k, v, mask, scale, bias)
    k, v = hide_dead_keys(k, v, bias, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    grad = auto.wants_grad(q, k, v, bias)
    name = select_backend(q, k, v, mask, backend, bias, scale, grad)
    chosen = BACKENDS[name]
    if _ops._traced(q):
        # backends plan in Python (tile maps, segment plans) where dynamo cannot follow: under torch.compile every
        # backend runs behind the zorro::attention_fwd/bwd custom ops, so graphs stay whole (fullgraph=True works)
        return _ops.attention(q, k, v, mask, scale, name, bias)
    if not grad:  # nothing to differentiate: the forward alone, without autograd's bookkeeping
        return chosen.forward(q, k, v, mask, scale, **_ops._bias_kw(bias))[0]
    if chosen.eager is not None:
        return chosen.eager(q, k, v, mask, scale, bias)
    return _ops.attention(q, k, v, mask, scale, name, bias)
