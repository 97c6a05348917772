"""The dense backend: attention over the whole ``Nq x Nk`` matrix in one go, for problems too small to split.

On CPU a problem of tens of tokens costs less as one computation over the whole matrix than as one fused attention
call per group of segments (the segment path). The forward is ATen's CPU flash kernel with an additive ``-inf`` mask
(cached per mask and dtype), the backward that kernel's backward, each called once, as one masked SDPA call would.
For the forward the keys are padded with masked zero rows to a multiple of 16: those kernels run each row's scale,
mask and exponential in 16-lane vectors and take a scalar path for a key count that leaves a remainder, several
times slower at tens of keys (BENCHMARKS.md, tiny problems). Not for a scale above 1: the backward recomputes the
scaled scores with another matrix product than the forward's, and a scale past 1 magnifies their difference in
rounding into the recomputed probabilities; unpadded, the call is exactly one masked SDPA call, rounding included.

Masked means never read: a masked key contributes exactly 0 while it is finite (``exp(-inf) = 0``, ``0 * finite =
0``), but a NaN/Inf anywhere reaches the results it may not reach through ``NaN + -inf`` or ``0 * Inf``. So the results
are checked (one sum per tensor; IEEE arithmetic cannot lose a NaN or an Inf it multiplied by 0, so a finite result
read no non-finite number); when one is not finite, the call is redone with the bad token rows zeroed and NaN put
back only where the isolation rule lets it go (the rows that may attend a bad key or are bad themselves, and the keys
those rows may attend). Clean rows come out bit for bit as from clean inputs. Rows that see nothing are exactly 0 with
zero gradients.
"""

from __future__ import annotations

import functools
import math

import torch

from ..reference import expand_kv_heads

__all__ = ["dense_forward", "dense_backward", "dense_attention"]
# (``bias`` is in the signatures for the dispatcher's sake: the backend declares no bias support, so it is None)


# the C++ binding where there is one: a call through torch.ops.aten pays Python dispatch, as much as a tiny kernel
_fwd_flash = torch._scaled_dot_product_flash_attention_for_cpu
_bwd_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_CPU = torch.device("cpu")  # the backend's only device (it declares so): no device object built per call
_KEY_MULTIPLE = 16  # fp32 lanes of an AVX-512 vector (two AVX2 vectors): the flash kernels' fast key count


def _kernel_keys(n: int, scale: float) -> int:
    """How many keys the kernels see for ``n``: padded up to a multiple of 16, except for a scale above 1."""
    return -(-n // _KEY_MULTIPLE) * _KEY_MULTIPLE if scale <= 1.0 else n


def _blocked(mask, device):
    """``(blocked (Bm, 1, Nq, Nk) bool, dead (Bm, 1, Nq, 1) bool or None)``: True where a row may not attend a key;
    ``dead`` marks rows that may attend nothing (None when there are none)."""
    dense = mask.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense)[:, None]
    dead = ~dense.any(-1, keepdim=True)
    return (~dense).to(device), (dead.to(device) if bool(dead.any()) else None)


def _additive(mask, dtype, device, p: int):
    """The mask as ATen's CPU flash kernels take it for ``P >= Nk`` keys: ``(Bm, 1, Nq, P)`` of ``dtype``, 0 or -inf;
    the padding keys past ``Nk`` are masked for every row."""
    blocked, _ = mask.derived(_blocked, device)
    bm, _, nq, nk = blocked.shape
    attn = torch.full((bm, 1, nq, p), float("-inf"), dtype=dtype, device=device)
    attn[..., :nk].masked_fill_(~blocked, 0.0)
    return attn


def _pad_keys(x, p: int):
    """``x (B, H, Nk, D)`` with zero rows appended to ``(B, H, P, D)`` (the padding keys: finite, and masked)."""
    b, h, n, d = x.shape
    return x if p == n else torch.cat((x, _zero_rows(b, h, p - n, d, x.dtype)), 2)


@functools.lru_cache(maxsize=64)
def _zero_rows(b: int, h: int, n: int, d: int, dtype) -> torch.Tensor:
    # one zero block per shape, only ever read (cat copies it): allocating one per call shows on a tiny call
    return torch.zeros(b, h, n, d, dtype=dtype)


def _total(t):
    # fp32 and fp64 sum in their own dtype (the dtype= argument takes a slower kernel); half types in fp32, whose
    # range a sum of finite values does not leave
    return t.sum() if t.dtype in (torch.float32, torch.float64) else t.sum(dtype=torch.float32)


def _finite(*ts) -> bool:
    # one sum per tensor and one read-back (NaN and Inf survive a sum; a finite sum that overflows only costs the
    # careful recompute) is several times cheaper than isfinite().all() on the tiny tensors this path serves
    total = _total(ts[0])
    for t in ts[1:]:
        total = total + _total(t)
    return math.isfinite(total.item())


def _flash_mask(mask, dtype, device, p: int):
    """``(additive mask for P keys, dead rows or None)``, the two things every call needs, under one cache lookup."""
    return mask.derived(_additive, dtype, device, p), mask.derived(_blocked, device)[1]


def _flash_forward(q, k, v, mask, scale):
    h, p = q.shape[1], _kernel_keys(k.shape[2], scale)
    k, v = _pad_keys(k, p), _pad_keys(v, p)
    if k.shape[1] != h:
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    attn, dead = mask.derived(_flash_mask, q.dtype, _CPU, p)
    out, lse = _fwd_flash(q, k, v, 0.0, False, attn_mask=attn, scale=scale)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out, lse


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


def _forward(q, k, v, mask, scale: float):
    """``(out (B, H, Nq, D), lse (B, H, Nq))``, the LSE as the kernel gives it (fp64 for fp64 inputs, else fp32)."""
    out, lse = _flash_forward(q, k, v, mask, scale)
    if _finite(out):
        return out, lse
    # a non-finite input was read: zero the bad keys, then make NaN only the rows that may see them (a bad query row
    # spoils only its own output)
    blocked, _ = mask.derived(_blocked, q.device)
    k, v, _, hit = _clean_keys(k, v, blocked, q.shape[1])
    out, lse = _flash_forward(q, k, v, mask, scale)
    return out.masked_fill(hit[..., None], float("nan")), lse


def dense_forward(q, k, v, mask, scale: float, bias=None):
    """``(out (B, H, Nq, D), lse (B, H, Nq) fp32)``; validated CPU inputs (the LSE the dispatcher carries)."""
    out, lse = _forward(q, k, v, mask, scale)
    return out, lse if lse.dtype == torch.float32 else lse.float()


def dense_backward(dout, q, k, v, out, lse, mask, scale: float, bias=None):
    """``(dq, dk, dv)`` shaped as q, k, v, from the forward's ``out`` and ``lse``.

    The flash backward sums over query rows (dK, dV) and keys (dQ) with the masked pairs' P = 0, so one non-finite
    q, dO or key would reach every gradient through 0 * NaN. The kernel runs once on the inputs as they are; when a
    gradient comes out non-finite (checked with one sum each), every bad token row is zeroed and the kernel runs again,
    and NaN is put back exactly where the rule lets it go: the dq of the rows that are bad or see a bad key, the dk/dv
    of the keys such rows may attend and of bad keys some row may attend.

    The keys are not padded here: at tens of keys the padded backward kernel costs what the unpadded one does, and its
    ``dk, dv`` would come back as views of the padded gradients, which autograd handles slower than whole tensors.

    For fp64 inputs ``lse`` must be fp64: the backward recomputes the probabilities as ``exp(s - lse)``, and an fp32
    LSE puts them ~1e-8 off, far outside fp64's tolerance. The backend's autograd Function saves the kernel's fp64 LSE;
    the dispatcher's op carries fp32, so then the LSE is recomputed here (one more forward, fp64 only)."""
    if q.dtype == torch.float64 and lse.dtype != torch.float64:
        lse = _forward(q, k, v, mask, scale)[1]
    attn, dead = mask.derived(_flash_mask, q.dtype, _CPU, k.shape[2])
    if dead is not None:
        dout = dout.masked_fill(dead, 0.0)
    grads = _flash_backward(dout, q, k, v, out, lse, attn, scale)
    # dq alone tells: every way a non-finite number reaches a gradient it may not reach passes through a NaN/Inf
    # dS = P (dP - D) of some pair (NaN P from a bad score; 0 times a bad dP or D from a bad value or upstream row;
    # a bad q row's scores), and dq_i sums row i's dS times the keys; a masked pair's 0 times a bad key makes NaN there
    # too. So a finite dq means dk and dv read nothing they may not.
    return grads if _finite(grads[0]) else _careful_backward(dout, q, k, v, out, lse, mask, scale)


def _flash_backward(dout, q, k, v, out, lse, attn, scale):
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    dq, dk, dv = _bwd_flash(dout, q, k, v, out, lse, 0.0, False, attn_mask=attn, scale=scale)
    if hkv != h:  # GQA: the query heads of a group all read one kv head
        dk, dv = (g.unflatten(1, (hkv, h // hkv)).sum(2) for g in (dk, dv))
    return dq, dk, dv


def _careful_backward(dout, q, k, v, out, lse, mask, scale):
    blocked, _ = mask.derived(_blocked, _CPU)
    h, hkv = q.shape[1], k.shape[1]
    k, v, bad_keys, hit = _clean_keys(k, v, blocked, h)
    q, bad_q = _zero_bad_rows(q)
    dout, bad_do = _zero_bad_rows(dout)
    live = ~blocked.all(-1)  # (Bm, 1, Nq)
    rows = (bad_q | bad_do | hit) & live
    out = out.masked_fill(rows[..., None] | ~torch.isfinite(out), 0.0)
    lse = lse.masked_fill(rows | ~live, 0.0)  # finite: a poisoned row's or dead row's exp() must not be NaN
    keys = (~blocked & rows[..., None]).any(-2) | (bad_keys & (~blocked).any(-2))  # (B, H, Nk)
    dq, dk, dv = _flash_backward(dout, q, k, v, out, lse, mask.derived(_additive, q.dtype, _CPU, k.shape[2]), scale)
    if hkv != h:
        keys = keys.unflatten(1, (hkv, h // hkv)).any(2)
    nan = float("nan")
    dq = dq.masked_fill(rows[..., None], nan)
    return dq, dk.masked_fill(keys[..., None], nan), dv.masked_fill(keys[..., None], nan)


class _Dense(torch.autograd.Function):
    """The forward/backward pair as one autograd Function with only what this backend needs: on tiny problems the
    generic Function's bias plumbing costs as much as a fifth of the kernel."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = _forward(q, k, v, mask, scale)  # the kernel's LSE: fp64 for fp64 inputs (see dense_backward)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: the flash backward has no derivative
            raise RuntimeError(
                "zorro_attention: the dense backend's backward cannot be differentiated (double backward, "
                "create_graph=True); use backend='reference' for higher-order gradients"
            )
        return (*dense_backward(dout, *ctx.saved_tensors, ctx.mask, ctx.scale), None, None)


def dense_attention(q, k, v, mask, scale: float, bias=None):
    """Differentiable ``out (B, H, Nq, D)`` (validated CPU inputs, no bias): the backend's ``eager`` form."""
    return _Dense.apply(q, k, v, mask, scale)
