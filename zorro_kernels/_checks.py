"""Input validation shared by :func:`~zorro_kernels.zorro_attention`, :func:`~zorro_kernels.explain` and the backend
choice: every refusal is one line naming the argument and the numbers."""

from __future__ import annotations

import math
import numbers

import torch

from .backends import BACKENDS
from .bias import check_bias
from .mask import ZorroMask

__all__ = ["check_inputs", "check_backend_name"]

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
        raise ValueError(
            f"k and v must have the same shape (B, Hkv, Nk, D), got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if bk != b:
        raise ValueError(f"batch size mismatch: q has B={b}, k/v have B={bk}")
    if dk != d:
        raise ValueError(f"head dim mismatch: q has D={d}, k/v have D={dk}")
    if d == 0 or b == 0 or h == 0 or hkv == 0:
        raise ValueError(f"q and k must have non-zero B, H and D, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if h % hkv != 0:
        raise ValueError(f"query heads H={h} must be a multiple of key/value heads Hkv={hkv} (GQA)")
    if nq != mask.num_q:
        raise ValueError(
            f"q has Nq={nq} tokens but the mask's query segments hold {mask.num_q} "
            f"({dict(zip(mask.q_names, mask.q_sizes))})"
        )
    if nk != mask.num_kv:
        raise ValueError(
            f"k/v have Nk={nk} tokens but the mask's key segments hold {mask.num_kv} "
            f"({dict(zip(mask.kv_names, mask.kv_sizes))})"
        )
    if mask.batch_size is not None and mask.batch_size != b:
        raise ValueError(f"the mask's lengths are for B={mask.batch_size} samples but q has B={b}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy scalars are Real too
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite positive number, got {scale}")
    check_bias(bias, q, nk)


def check_backend_name(backend) -> None:
    """Raise TypeError/ValueError unless ``backend`` is ``"auto"`` or a registered backend's name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
