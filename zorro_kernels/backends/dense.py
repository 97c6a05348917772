"""The dense backend: attention over the whole ``Nq x Nk`` matrix in one go, for problems too small to split.

On CPU a problem of tens of tokens costs less as one computation over the whole matrix than as one fused attention
call per group of segments (the segment path). The forward is a few tensor ops for the tiniest problems (where ATen's
CPU flash kernel spends more on applying a mask and on its setup than on the product; masked scores are *selected*
away with ``masked_fill``) and that flash kernel with an additive ``-inf`` mask (cached per mask and dtype) beyond;
the backward is the flash kernel's backward. A masked key contributes exactly 0 while it is finite (``exp(-inf) = 0``,
``0 * finite = 0``), so inputs are checked (one sum per tensor); when one holds a NaN/Inf, its bad token rows are
zeroed before the kernels run and NaN is put back only where the isolation rule lets it go (the rows that may attend
a bad key or are bad themselves, and the keys those rows may attend). Clean rows come out bit for bit as from clean
inputs. Rows that see nothing are exactly 0 with zero gradients.
"""

from __future__ import annotations

import math

import torch

from ..reference import expand_kv_heads

__all__ = ["dense_forward", "dense_backward"]
# (``bias`` is in the signatures for the dispatcher's sake: the backend declares no bias support, so it is None)


_fwd_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# up to this many (query, key) pairs the forward is a few tensor ops, which beat ATen's CPU flash kernel with an
# additive mask there and lose to it beyond (BENCHMARKS.md, "Where the code's constants come from")
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


def _zero_bad_rows(x):
    """``(x with its non-finite token rows zeroed, bad (..., N) bool)`` for ``x (..., N, D)``."""
    bad = ~torch.isfinite(x).all(-1)
    return x.masked_fill(bad[..., None], 0.0), bad


def _clean_keys(k, v, blocked, h):
    """Non-finite key tokens zeroed, so that the pairs that may not read them multiply finite numbers by 0.

    Returns ``(k, v, bad_keys (B, H, Nk), hit (B, H, Nq))``: ``hit`` marks the rows that may attend a bad key, the
    only rows whose result the bad keys may change (the caller poisons them)."""
    k, bad_k = _zero_bad_rows(k)
    v, bad_v = _zero_bad_rows(v)
    bad = expand_kv_heads((bad_k | bad_v)[..., None], h)[..., 0]
    return k, v, bad, (~blocked & bad[:, :, None, :]).any(-1)


def dense_forward(q, k, v, mask, scale: float, bias=None):
    """``(out (B, H, Nq, D), lse (B, H, Nq) fp32)``; validated CPU inputs."""
    blocked, dead = mask.derived(_blocked, q.device)
    hit = None
    if not _finite(k, v):  # masked means never read: zero the bad keys, then make NaN only the rows that may see them
        k, v, _, hit = _clean_keys(k, v, blocked, q.shape[1])
    if q.shape[2] * k.shape[2] <= _MATH_MAX_PAIRS:
        out, lse = _math_forward(q, k, v, blocked, dead, scale)
    else:
        h = q.shape[1]
        out, lse = _fwd_flash(
            q,
            expand_kv_heads(k, h),
            expand_kv_heads(v, h),
            0.0,
            False,
            attn_mask=mask.derived(_additive, q.dtype, q.device),
            scale=scale,
        )
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
    if hit is not None:
        out = out.masked_fill(hit[..., None], float("nan"))
    return out, lse.float()


def dense_backward(dout, q, k, v, out, lse, mask, scale: float, bias=None):
    """``(dq, dk, dv)`` shaped as q, k, v, from the forward's ``out`` and ``lse``.

    The flash backward sums over query rows (dK, dV) and keys (dQ) with the masked pairs' P = 0, so one non-finite
    q, dO or key would reach every gradient through 0 * NaN. Clean inputs (checked with one sum each) take the kernel as
    they are; otherwise every bad token row is zeroed first and NaN is put back exactly where the rule lets it go: the
    dq of the rows that are bad or see a bad key, the dk/dv of the keys such rows may attend and of bad keys some row
    may attend."""
    blocked, dead = mask.derived(_blocked, q.device)
    h, hkv = q.shape[1], k.shape[1]
    dout = dout.contiguous()
    if dead is not None:
        dout = dout.masked_fill(dead, 0.0)
    rows = keys = None
    if not _finite(dout, q, k, v):
        k, v, bad_keys, hit = _clean_keys(k, v, blocked, h)
        q, bad_q = _zero_bad_rows(q)
        dout, bad_do = _zero_bad_rows(dout)
        live = ~blocked.all(-1)  # (Bm, 1, Nq)
        rows = (bad_q | bad_do | hit) & live
        out = out.masked_fill(rows[..., None] | ~torch.isfinite(out), 0.0)
        lse = lse.masked_fill(rows | ~live, 0.0)  # finite: a poisoned row's or dead row's exp() must not be NaN
        keys = (~blocked & rows[..., None]).any(-2) | (bad_keys & (~blocked).any(-2))  # (B, H, Nk)
    dq, dk, dv = _bwd_flash(
        dout,
        q,
        expand_kv_heads(k, h),
        expand_kv_heads(v, h),
        out,
        lse.double() if q.dtype == torch.float64 else lse,
        0.0,
        False,
        attn_mask=mask.derived(_additive, q.dtype, q.device),
        scale=scale,
    )
    if hkv != h:  # GQA: the query heads of a group all read one kv head
        dk, dv = (g.unflatten(1, (hkv, h // hkv)).sum(2) for g in (dk, dv))
        if keys is not None:
            keys = keys.unflatten(1, (hkv, h // hkv)).any(2)
    if rows is not None:
        nan = float("nan")
        dq = dq.masked_fill(rows[..., None], nan)
        dk, dv = dk.masked_fill(keys[..., None], nan), dv.masked_fill(keys[..., None], nan)
    return dq, dk, dv
