"""The dense reference: ``mask.to_dense()`` through PyTorch attention. Slow, simple, and what every path is checked against."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import repeat

from .mask import ZorroMask

__all__ = ["reference_attention", "expand_kv_heads"]


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """GQA: ``(B, Hkv, N, D) -> (B, H, N, D)``, query head ``h`` reading kv head ``h // (H // Hkv)`` (as SDPA does)."""
    g = num_heads // x.shape[1]
    return x if g == 1 else repeat(x, "b hkv n d -> b (hkv g) n d", g=g)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ZorroMask, *,
                        scale: Optional[float] = None, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Masked attention through the dense boolean mask.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0``.
        mask: the layout; ``mask.to_dense()`` is ``(Nq, Nk)`` or ``(B, Nq, Nk)``.
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the arithmetic; default fp32 for half types (upcast), else q's dtype.

    Returns:
        ``(B, H, Nq, D)`` in q's dtype. Rows with no visible key are exactly 0 and pass no gradient.
    """
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dense = mask.to_dense().to(q.device)
    if dense.ndim == 2:
        dense = dense[None]
    live = dense.any(-1)  # (B|1, Nq)
    # a row with no visible key would be 0/0 in softmax: give it every key, then zero its output (and so its grads)
    safe = dense | ~live[..., None]
    h = q.shape[1]
    out = F.scaled_dot_product_attention(
        q.to(compute_dtype), expand_kv_heads(k, h).to(compute_dtype), expand_kv_heads(v, h).to(compute_dtype),
        attn_mask=safe[:, None], scale=scale)
    out = out.masked_fill(~live[:, None, :, None], 0.0)
    return out.to(q.dtype)
