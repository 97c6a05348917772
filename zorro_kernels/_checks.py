"""Input validation shared by :func:`~zorro_kernels.zorro_attention`, :func:`~zorro_kernels.explain` and the backend
choice: every refusal is one line naming the argument and the numbers."""

from __future__ import annotations

import math
import numbers

import torch

from .backends import BACKENDS
from .bias import check_bias
from .mask import ZorroMask

__all__ = ["check_inputs", "check_backend_name", "check_scale_range", "SCORE_LIMIT"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Every backend computes the scaled scores q . k * scale in float32 at least and carries the log-sum-exp in float32;
# past 2**128 a score is inf and its softmax NaN (inf - inf), and the kernels' exp2 form (x log2 e) and the row-max
# subtraction need a little room below that.
SCORE_LIMIT = 2.0**126


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


def _largest_norm(x: torch.Tensor) -> float:
    # fp64 norms: a finite fp32 row's norm is finite there. Rows holding NaN/Inf are the isolation rule's business
    # (their scores are NaN whatever the scale): left out.
    n = torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float64)
    return torch.where(torch.isfinite(n), n, 0.0).amax().item() if n.numel() else 0.0


def check_scale_range(q, k, scale) -> None:
    """Raise ValueError when ``scale * q . k`` may overflow float32, where every backend computes the scores.

    ``|q_i . k_j| <= |q_i| |k_j|``, so the largest row norms of q and k bound every score: one pass over q and k,
    run only for ``scale > 1`` (at most 1, scaling cannot make a finite score overflow). Near the bound the softmax
    is already a hard argmax (scores differing by one part in 10**30), so the refusal asks for a smaller scale rather
    than computing in a wider type. Returns None.
    """
    if scale is None or scale <= 1.0:
        return
    qn, kn = _largest_norm(q), _largest_norm(k)
    bound = float(scale) * qn * kn
    if bound > SCORE_LIMIT:
        raise ValueError(
            f"scale={float(scale):g} can make the scaled scores overflow float32: q and k rows of norm up to "
            f"{qn:.3g} and {kn:.3g} give |scale * q.k| up to {bound:.3g}, past {SCORE_LIMIT:.3g} (the softmax would be "
            f"NaN); use a scale of at most {SCORE_LIMIT / max(qn * kn, 1e-300):.3g} for these inputs"
        )
