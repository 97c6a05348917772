"""The dense reference: attention through ``mask.to_dense()``. Slow, simple, and what every path is checked against.

It is NaN-safe by construction: query rows that may attend the same set of keys form a group, and each group is plain
softmax attention over exactly its keys, gathered by index. A (query, key) pair the mask forbids is never part of any
arithmetic, forward or backward, so NaN/Inf in a key a row may not attend, in a padded or dead query row, or in the
upstream gradient of a row that sees nothing cannot reach another row's output or any gradient (no ``0 * NaN``).
A bias is gathered the same way, on the allowed keys only; a ``-inf`` bias masks its pair, selected out (``where``).
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import repeat

from .bias import materialize_bias
from .mask import ZorroMask

__all__ = ["reference_attention", "dense_masked_attention", "expand_kv_heads"]


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """GQA: ``(B, Hkv, N, D) -> (B, H, N, D)``, query head ``h`` reading kv head ``h // (H // Hkv)`` (as SDPA does)."""
    g = num_heads // x.shape[1]
    return x if g == 1 else repeat(x, "b hkv n d -> b (hkv g) n d", g=g)


def _by_key_sets(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One mask for the whole batch: ``q (B, H, Nq, D)``, ``k, v (B, H, Nk, D)``, ``allowed (Nq, Nk)``, ``bias``
    broadcastable to ``(B, H, Nq, Nk)`` (each dim full or 1) or None."""
    key_sets, group = torch.unique(allowed, dim=0, return_inverse=True)
    rows, outs = [], []
    for u in range(key_sets.shape[0]):
        # a row that sees nothing attends an empty key set: an empty sum, exactly 0, with zero gradients
        keys = key_sets[u].nonzero().flatten()
        r = (group == u).nonzero().flatten()
        s = q.index_select(2, r) @ k.index_select(2, keys).transpose(-1, -2) * scale
        if bias is None:
            p = s.softmax(-1)
        else:
            b = bias if bias.shape[2] == 1 else bias.index_select(2, r)
            s = s + (b if b.shape[3] == 1 else b.index_select(3, keys))
            # -inf biases mask their pairs; a row with only those attends nothing: finite scores in, 0 out
            live = (s != float("-inf")).any(-1, keepdim=True)
            p = torch.where(live, torch.where(live, s, 0).softmax(-1), 0)
        outs.append(p @ v.index_select(2, keys))
        rows.append(r)
    return q.new_empty(q.shape).index_copy(2, torch.cat(rows), torch.cat(outs, 2))


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """NaN-safe masked attention on a dense boolean mask; differentiable, twice too.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, H, Nk, D)`` (heads already expanded for GQA); one dtype, which is the dtype
            of the arithmetic.
        allowed: bool ``(Bm, Nq, Nk)``, ``Bm`` 1 or B: ``True`` where query i may attend key j.
        scale: softmax scale.
        bias: None or a 4-D float tensor broadcastable to ``(B, H, Nq, Nk)`` (each dim full or 1), in the arithmetic's
            dtype, added to the scaled scores; read only where ``allowed``.

    Returns:
        ``(B, H, Nq, D)``. A row with no allowed key is exactly 0 with zero gradients. Output row i, ``dq[i]`` and
        row i's contributions to ``dk``/``dv`` depend only on ``q[i]``, row i's upstream gradient and the keys and
        values row i may attend (see the module docstring).
    """
    allowed = allowed.to(q.device)
    if allowed.shape[0] == 1 and (bias is None or bias.shape[0] == 1):
        return _by_key_sets(q, k, v, allowed[0], scale, bias)
    allowed = allowed.expand(q.shape[0], -1, -1)
    return torch.cat(
        [
            _by_key_sets(
                q[i : i + 1],
                k[i : i + 1],
                v[i : i + 1],
                allowed[i],
                scale,
                None if bias is None else bias[i : i + 1] if bias.shape[0] > 1 else bias,
            )
            for i in range(q.shape[0])
        ]
    )


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: ZorroMask,
    *,
    scale: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
    bias=None,
) -> torch.Tensor:
    """Masked attention through the dense boolean mask.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0``.
        mask: the layout; ``mask.to_dense()`` is ``(Nq, Nk)`` or ``(B, Nq, Nk)``.
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the arithmetic; default fp32 for half types (upcast), else q's dtype.
        bias: None, a float tensor broadcastable to ``(B, H, Nq, Nk)`` or a
            :class:`~zorro_kernels.RelativePositionBias` (materialised here), added to the scaled scores where the mask
            allows; ``-inf`` counts as masked. Entries at masked positions are never read.

    Returns:
        ``(B, H, Nq, D)`` in q's dtype. Rows with no visible key are exactly 0 and pass no gradient. NaN-safe: see
        :func:`dense_masked_attention`. Supports double backward.
    """
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dense = mask.to_dense()
    if dense.ndim == 2:
        dense = dense[None]
    h = q.shape[1]
    full = materialize_bias(bias)
    out = dense_masked_attention(
        q.to(compute_dtype),
        expand_kv_heads(k, h).to(compute_dtype),
        expand_kv_heads(v, h).to(compute_dtype),
        dense,
        float(scale),
        None if full is None else full.to(compute_dtype),
    )
    return out.to(q.dtype)
