"""The dense backend: attention over the whole ``Nq x Nk`` matrix in one go, for problems too small to split.

On CPU a problem of tens of tokens costs less as one computation over the whole matrix than as one fused attention
call per group of segments (the segment path). The forward is a few tensor ops for the tiniest problems (where ATen's
CPU flash kernel spends more on applying a mask and on its setup than on the product; masked scores are *selected*
away with ``masked_fill``) and that flash kernel with an additive ``-inf`` mask (cached per mask and dtype) beyond;
the backward is the flash kernel's backward. A masked key contributes exactly 0 while it is finite (``exp(-inf) = 0``,
``0 * finite = 0``); a masked NaN/Inf can only show up as a non-finite output or gradient, so results are checked (one
sum per tensor) and anything non-finite is recomputed by the segment path, which never reads a masked key. Rows that
see nothing are exactly 0 with zero gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reference import expand_kv_heads
from .segments import build_plan, cpu_backward, cpu_forward, segment_attention

__all__ = ["dense_forward", "dense_backward", "dense_attention"]
# (``bias`` is in the signatures for the dispatcher's sake: the backend declares no bias support, so it is None)


_fwd_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# up to this many (query, key) pairs the forward is a few tensor ops; beyond, ATen's CPU flash kernel with an
# additive mask is faster (1 thread: 14 x 14 tokens 40 vs 50 us, 28 x 28 slower)
_MATH_MAX_PAIRS = 256


def _blocked(mask, device):
    """``(blocked (Bm, 1, Nq, Nk) bool, dead (Bm, 1, Nq, 1) bool or None)``: True where a row may not attend a key;
    ``dead`` marks rows that may attend nothing (None when there are none)."""
    dense = mask.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense)[:, None]
    dead = ~dense.any(-1, keepdim=True)
    return (~dense).to(device), (dead.to(device) if bool(dead.any()) else None)


def _additive(mask, dtype, device):
    """The mask as ATen's CPU flash kernels take it: ``(Bm, 1, Nq, Nk)`` of ``dtype``, 0 or -inf."""
    blocked, _ = mask.derived(_blocked, device)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, float("-inf"))


def _finite(*ts) -> bool:
    # one fp32 sum per tensor (NaN and Inf survive a sum; a finite sum that overflows only costs a recompute) is
    # several times cheaper than isfinite().all() on the tiny tensors this path serves
    return all(math.isfinite(t.sum(dtype=torch.float32).item()) for t in ts)


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _math_forward(q, k, v, blocked, dead, scale):
    cd, h = _compute_dtype(q.dtype), q.shape[1]
    qc, kc, vc = q.to(cd), expand_kv_heads(k, h).to(cd), expand_kv_heads(v, h).to(cd)
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale).masked_fill_(blocked, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if dead is not None:
        m = m.masked_fill(dead, 0.0)  # a row that sees nothing: every p is exp(-inf) = 0
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    if dead is not None:
        denom = denom.masked_fill(dead, 1.0)
    return torch.matmul(p, vc).div_(denom).to(q.dtype), (m + denom.log()).squeeze(-1)


def dense_forward(q, k, v, mask, scale: float, bias=None):
    """``(out (B, H, Nq, D), lse (B, H, Nq) fp32)``; validated CPU inputs."""
    blocked, dead = mask.derived(_blocked, q.device)
    if q.shape[2] * k.shape[2] <= _MATH_MAX_PAIRS:
        out, lse = _math_forward(q, k, v, blocked, dead, scale)
    else:
        h = q.shape[1]
        out, lse = _fwd_flash(q, expand_kv_heads(k, h), expand_kv_heads(v, h), 0.0, False,
                              attn_mask=mask.derived(_additive, q.dtype, q.device), scale=scale)
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
    if not _finite(out):  # a masked NaN/Inf may have reached a row: the segment path never reads it
        out, lse = cpu_forward(q, k, v, mask.derived(build_plan), scale)
    return out, lse.float()


def dense_backward(dout, q, k, v, out, lse, mask, scale: float, bias=None):
    """``(dq, dk, dv)`` shaped as q, k, v, from the forward's ``out`` and ``lse``."""
    _, dead = mask.derived(_blocked, q.device)
    h, hkv = q.shape[1], k.shape[1]
    dout = dout.contiguous()
    if dead is not None:
        dout = dout.masked_fill(dead, 0.0)
    dq, dk, dv = _bwd_flash(dout, q, expand_kv_heads(k, h), expand_kv_heads(v, h), out,
                            lse.double() if q.dtype == torch.float64 else lse, 0.0, False,
                            attn_mask=mask.derived(_additive, q.dtype, q.device), scale=scale)
    if hkv != h:  # GQA: the query heads of a group all read one kv head
        dk, dv = (g.unflatten(1, (hkv, h // hkv)).sum(2) for g in (dk, dv))
    if not _finite(dq, dk, dv):  # a masked NaN/Inf may have reached a gradient: redo it by the segment path
        plan = mask.derived(build_plan)
        out, lse = cpu_forward(q, k, v, plan, scale)
        return cpu_backward(dout, q, k, v, out, lse, plan, scale)
    return dq, dk, dv


def dense_attention(q, k, v, mask, scale: float, bias=None):
    """The same, differentiable by autograd through ``F.scaled_dot_product_attention`` (its C++ autograd costs less
    than a Python autograd Function on problems this small). After a finite output the backward needs no check: every
    live row read every key (so all K, V its sample shares were finite), padding rows' queries are zero-filled
    before the call and their outputs selected to 0 after it, and a sample whose rows are all dead has its K, V checked
    here. (A NaN in the *upstream gradient* of a row can reach keys it does not attend, as with masked SDPA.)"""
    _, dead = mask.derived(_blocked, q.device)
    h = q.shape[1]
    qm = q
    if dead is not None:
        if not _finite(k.detach(), v.detach()):
            return segment_attention(q, k, v, mask, scale)
        qm = q.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(qm, expand_kv_heads(k, h), expand_kv_heads(v, h),
                                         attn_mask=mask.derived(_additive, q.dtype, q.device), scale=scale)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    if not _finite(out.detach()):  # a masked NaN/Inf reached a row: the segment path never reads it
        return segment_attention(q, k, v, mask, scale)
    return out
