"""Score biases in the Triton kernels: what the kernels read for ``bias=`` (Python side) and the in-kernel tile loads
and gradient writes (``@triton.jit`` side).

Two kinds (``BIAS_KIND``, a constexpr, so a kernel without a bias compiles exactly as before):

- **dense** (1): a float tensor broadcastable to ``(B, H, Nq, Nk)``, read through four strides (0 on a broadcast dim).
  Partial tiles load it under their element mask, so entries the mask hides are never read.
- **relative** (2): a :class:`~zorro_kernels.RelativePositionBias`. Its table index is linear in the coordinates,
  ``index(c_i - c_j) = base + sum_a (c_ia - c_ja + e_a - 1) s_a = lin_q[i] - lin_k[j]`` with
  ``lin_q[i] = base + sum_a (e_a - 1) s_a + sum_a c_ia s_a`` and ``lin_k[j] = sum_a c_ja s_a`` (``s_a`` the row-major
  strides of the token's position set). So a tile's bias is one subtraction and one gather from the ``(H, T)`` table
  per pair — two ints per token, nothing ``Nq x Nk``. The identity holds only for offsets inside the extent, so
  :func:`_check_extents` proves once per (mask, positions) that every pair the mask allows is inside it, or raises the
  same ValueError as the other backends. Pairs across position sets, or with an unplaced token, get 0.

Gradients. The dK/dV kernel visits every attended ``(query, key)`` pair of a ``(sample, head)`` exactly once, so a
full-size dense bias gets its gradient by plain stores (``DB_MODE`` 1, deterministic). A broadcast dense bias or a
relative table receives many pairs per entry: fp32 atomic adds (``DB_MODE`` 2). Under
``torch.use_deterministic_algorithms(True)`` the atomic cases store into a full ``(B, H, Nq, Nk)`` buffer instead and
reduce it in PyTorch (sum over broadcast dims, or ``index_add`` into the table) — exact and reproducible, at the
cost of that buffer.

A ``-inf`` bias counts as masked: the forward's guarded running max keeps such rows at exactly 0, and the backward
reads a row whose LSE is ``-inf`` (every allowed key had ``-inf``) as ``+inf`` so its probabilities are 0, not NaN.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from ...bias import RelativePositionBias

LOG2E = 1.4426950408889634
NONE, DENSE, RELATIVE = 0, 1, 2


# ------------------------------------------------------------------------------------------------ Python side
class KernelBias(NamedTuple):
    """The bias as kernel arguments. ``ptr``: the dense bias, or the table; ``rq``, ``rk``: int32 ``(Nq, 2)``,
    ``(Nk, 2)`` (position set or -1, linear index) for a relative bias, else a placeholder; ``strides``: the dense
    bias's ``(b, h, m, n)`` element strides (0 where broadcast), for a table ``(0, head stride, 0, 0)``."""

    kind: int
    ptr: torch.Tensor
    rq: torch.Tensor
    rk: torch.Tensor
    strides: tuple
    table_size: int

    def args(self) -> dict:
        sb, sh, sm, sn = self.strides
        return dict(
            BIAS=self.ptr,
            RQ=self.rq,
            RK=self.rk,
            stride_zb=sb,
            stride_zh=sh,
            stride_zm=sm,
            stride_zn=sn,
            T=self.table_size,
        )


def _linear(p) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rq (Nq, 2), rk (Nk, 2))`` int32 of positions ``p`` (see the module docstring)."""
    strides, extents, bases = p.strides, p.extents, p.bases
    const = bases + ((extents - 1) * strides).sum(1)  # (G,)

    def side(coords, group, offset):
        g = group.clamp(min=0)
        lin = (coords * strides[g]).sum(1) + (const[g] if offset else 0)
        return torch.stack([group, torch.where(group >= 0, lin, 0)], 1).to(torch.int32)

    return side(p.q_coords, p.q_group, True), side(p.k_coords, p.k_group, False)


def _valid_tokens(sizes, lengths: Optional[torch.Tensor]) -> list[int]:
    """Per segment, how many leading tokens are valid in some sample (the rest is padding everywhere)."""
    return list(sizes) if lengths is None else lengths.max(0).values.tolist()


def _check_extents(mask, positions) -> bool:
    """Raise :meth:`RelativePositions.index`'s ValueError if a pair the mask allows (segment rules, band, tokens valid
    in some sample) has an offset outside its position set's extent. Per allowed segment pair a min/max bound over
    coordinates settles it; only pairs it cannot settle are checked element by element, in row chunks clipped to the
    band. :func:`kernel_bias` caches the result on the positions per mask content key (:func:`_extents_proven`)."""
    if mask.per_sample:  # each sample's segments sit at their own positions
        return all(_check_extents(mask.sample(b), positions) for b in range(mask.batch_size))
    p = positions
    allow = mask.allow.bool().numpy()
    q_sizes, k_sizes = mask.q_sizes, mask.kv_sizes
    q_starts = np.concatenate([[0], np.cumsum(q_sizes)[:-1]]).astype(int)
    k_starts = np.concatenate([[0], np.cumsum(k_sizes)[:-1]]).astype(int)
    q_valid = _valid_tokens(q_sizes, mask.lengths)
    k_valid = _valid_tokens(k_sizes, mask.kv_lengths)
    lo, hi = mask.band()
    off = mask.num_kv - mask.num_q

    def spans(coords, group, starts, valid, g):
        """Per segment: (min, max) coordinates (A,) of its tokens in set g, or None."""
        out = []
        for s, n in zip(starts, valid):
            sel = group[s : s + n] == g
            c = coords[s : s + n][sel]
            out.append((c.min(0).values, c.max(0).values) if len(c) else None)
        return out

    extents, q_coords, q_group, k_coords, k_group = p.extents, p.q_coords, p.q_group, p.k_coords, p.k_group
    for g in range(extents.shape[0]):
        e = extents[g]
        qs = spans(q_coords, q_group, q_starts, q_valid, g)
        ks = spans(k_coords, k_group, k_starts, k_valid, g)
        for a, c in zip(*np.nonzero(allow)):
            if qs[a] is None or ks[c] is None:
                continue
            (qmin, qmax), (kmin, kmax) = qs[a], ks[c]
            if bool(((qmax - kmin) < e).all() and ((kmax - qmin) < e).all()):
                continue
            _check_block(p, q_starts[a], q_starts[a] + q_valid[a], k_starts[c], k_starts[c] + k_valid[c], lo, hi, off)
    return True


def _check_block(p, r0: int, r1: int, c0: int, c1: int, lo, hi, off: int, chunk: int = 256) -> None:
    for s in range(r0, r1, chunk):
        e = min(s + chunk, r1)
        a = c0 if lo is None else max(c0, s + off + lo)
        b = c1 if hi is None else min(c1, e - 1 + off + hi + 1)
        if a >= b:
            continue
        rows, cols = torch.arange(s, e), torch.arange(a, b)
        if lo is None and hi is None:
            p.index(rows, cols)
            continue
        # keep only the band: a pair outside it is never read, so its offset does not matter
        d = cols[None, :] - rows[:, None] - off
        inside = torch.ones_like(d, dtype=torch.bool)
        if lo is not None:
            inside &= d >= lo
        if hi is not None:
            inside &= d <= hi
        idx, _ = p.index(rows, cols, check=False)
        if bool(((idx < 0) & inside).any()):
            i, j = ((idx < 0) & inside).nonzero()[0].tolist()
            p.index(rows[i : i + 1], cols[j : j + 1])  # raises the shared message for this pair


def _extents_proven(positions, mask_key: str, mask) -> bool:
    """:func:`_check_extents` of ``mask`` (whose content key is ``mask_key``), as :meth:`RelativePositions.derived`
    caches it: per mask content, not per mask object."""
    return _check_extents(mask, positions)


def _linear_on(positions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in _linear(positions))


def _broadcast_strides(t: torch.Tensor) -> tuple:
    """``t``'s element strides with 0 on its size-1 dims (what a kernel reading it as broadcast needs)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def kernel_bias(bias, q: torch.Tensor, mask) -> KernelBias:
    """The :class:`KernelBias` of ``bias`` (None, a dense tensor or a RelativePositionBias) for q ``(B, H, Nq, D)``."""
    if bias is None:
        dummy = q.new_empty(0, dtype=torch.int32)
        return KernelBias(NONE, q, dummy, dummy, (0, 0, 0, 0), 0)
    if isinstance(bias, RelativePositionBias):
        p = bias.positions
        # cached on the positions (not the mask): a caller building positions per call must not grow the mask's cache
        p.derived(_extents_proven, mask.key, mask=mask)
        rq, rk = p.derived(_linear_on, q.device)
        t = bias.table
        if t.stride(-1) != 1:
            t = t.contiguous()
        return KernelBias(RELATIVE, t, rq, rk, (0, t.stride(0) if t.shape[0] > 1 else 0, 0, 0), t.shape[1])
    x = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    dummy = q.new_empty(0, dtype=torch.int32)
    return KernelBias(DENSE, x, dummy, dummy, _broadcast_strides(x), 0)


class BiasGrad(NamedTuple):
    """Where the dK/dV kernel writes the bias's gradient: ``buf`` with element strides ``(b, h, m, n)`` (a table:
    ``(0, head stride, 0, 0)``), written by stores (``mode`` 1) or fp32 atomics (2); ``finish()`` turns it into the
    gradient, shaped as the dense bias or the table."""

    mode: int
    buf: torch.Tensor
    strides: tuple
    finish: object

    def args(self) -> dict:
        sb, sh, sm, sn = self.strides
        return dict(DBIAS=self.buf, stride_gb=sb, stride_gh=sh, stride_gm=sm, stride_gn=sn)


def bias_grad(bias, kb: KernelBias, q: torch.Tensor, nk: int, deterministic: bool) -> BiasGrad:
    """The gradient buffer for ``bias`` (``kb`` its :class:`KernelBias`; None: no gradient wanted, mode 0); see the
    module docstring for the modes."""
    b, h, nq = q.shape[:3]
    if bias is None or kb.kind == NONE:
        return BiasGrad(0, q, (0, 0, 0, 0), lambda: None)
    full = (b, h, nq, nk)
    if kb.kind == DENSE:
        shape = tuple(kb.ptr.shape)
        if shape == full:  # each entry is one pair: plain stores, every entry written or left 0
            g = torch.zeros(full, dtype=bias.dtype, device=q.device)
            return BiasGrad(1, g, g.stride(), lambda: g.reshape(bias.shape))
        if deterministic:
            g = torch.zeros(full, dtype=torch.float32, device=q.device)
            dims = [i for i, n in enumerate(shape) if n == 1]
            return BiasGrad(1, g, g.stride(), lambda: g.sum(dims, keepdim=True).to(bias.dtype).reshape(bias.shape))
        g = torch.zeros(shape, dtype=torch.float32, device=q.device)
        return BiasGrad(2, g, _broadcast_strides(g), lambda: g.to(bias.dtype).reshape(bias.shape))
    table = bias.table
    if deterministic:  # a full buffer, then index_add over the pairs' table columns (visible pairs only are nonzero)
        g = torch.zeros(full, dtype=torch.float32, device=q.device)

        def finish():
            p = bias.positions
            idx, placed = p.index(torch.arange(p.num_q), torch.arange(p.num_kv), check=False)
            keep = (idx >= 0) if placed is None else (placed & (idx >= 0))
            flat = g.sum(0)[:, keep.to(g.device)]  # (H, pairs)
            cols = idx[keep].to(g.device)
            out = torch.zeros(h, table.shape[1], dtype=torch.float32, device=g.device).index_add_(1, cols, flat)
            return (out if table.shape[0] == h else out.sum(0, keepdim=True)).to(table.dtype)

        return BiasGrad(1, g, g.stride(), finish)
    g = torch.zeros(table.shape, dtype=torch.float32, device=q.device)
    return BiasGrad(2, g, (0, g.stride(0) if g.shape[0] > 1 else 0, 0, 0), lambda: g.to(table.dtype))


# ------------------------------------------------------------------------------------------------ kernel side
# Token indices come as 2-D broadcastable tensors, queries ``qi`` and keys ``kj`` ((R, 1) and (1, C) on the forward
# and dQ kernels' (query, key) tiles, (1, R) and (C, 1) on the dK/dV kernel's transposed ones), so one function serves
# both orientations; ``q_in``/``k_in`` (same shapes) say which indices are inside the matrix, ``ok`` (the tile's
# shape) which pairs are read at all.
@triton.jit
def bias_tile(BIAS_bh, RQ, RK, stride_zm, stride_zn, T, qi, kj, q_in, k_in, ok, BIAS_KIND: tl.constexpr):
    """The bias of a tile in base-2 units (x log2 e), fp32, 0 where ``ok`` is False. ``BIAS_bh``: the dense bias at
    this (sample, head), or this head's table row. ``ok`` is the element mask on partial tiles (entries the mask hides
    are never read) and the matrix bounds on full ones."""
    if BIAS_KIND == 1:
        x = tl.load(BIAS_bh + qi.to(tl.int64) * stride_zm + kj * stride_zn, mask=ok, other=0.0)
    else:
        idx, hit = relative_index(RQ, RK, T, qi, kj, q_in, k_in, ok)
        x = tl.load(BIAS_bh + idx, mask=hit, other=0.0)
    return x.to(tl.float32) * 1.4426950408889634


@triton.jit
def full_tile_bias(BIAS_bh, RQ, RK, stride_zm, stride_zn, T, rows, q_in, cols, Nk, BIAS_KIND: tl.constexpr):
    """:func:`bias_tile` of a full tile ``rows x cols`` (a query tile of the forward or dQ kernel), bounded by the
    matrix only: every pair of a full tile is attended."""
    k_in = cols[None, :] < Nk
    return bias_tile(
        BIAS_bh,
        RQ,
        RK,
        stride_zm,
        stride_zn,
        T,
        rows[:, None],
        cols[None, :],
        q_in[:, None],
        k_in,
        q_in[:, None] & k_in,
        BIAS_KIND,
    )


@triton.jit
def relative_index(RQ, RK, T, qi, kj, q_in, k_in, ok):
    """Table columns ``lin_q[i] - lin_k[j]`` of a tile, and where a pair reads the table (``ok``, one position set,
    inside ``[0, T)``)."""
    gq = tl.load(RQ + 2 * qi, mask=q_in, other=-1)
    lq = tl.load(RQ + 2 * qi + 1, mask=q_in, other=0)
    gk = tl.load(RK + 2 * kj, mask=k_in, other=-1)
    lk = tl.load(RK + 2 * kj + 1, mask=k_in, other=0)
    idx = lq - lk
    hit = ok & (gq >= 0) & (gq == gk) & (idx >= 0) & (idx < T)
    return idx, hit


@triton.jit
def write_bias_grad(
    DB_bh, RQ, RK, stride_gm, stride_gn, T, qi, kj, q_in, k_in, ok, ds, BIAS_KIND: tl.constexpr, DB_MODE: tl.constexpr
):
    """Add ``ds`` (the gradient of the tile's scores, 0 outside the element mask) to the bias's gradient: stores into a
    full-size buffer (``DB_MODE`` 1), fp32 atomics otherwise (a broadcast dense bias, a table)."""
    if BIAS_KIND == 1 or DB_MODE == 1:
        ptrs = DB_bh + qi.to(tl.int64) * stride_gm + kj * stride_gn
        if DB_MODE == 1:
            tl.store(ptrs, ds.to(DB_bh.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(ptrs, ds, mask=ok, sem="relaxed")
    else:
        idx, hit = relative_index(RQ, RK, T, qi, kj, q_in, k_in, ok)
        tl.atomic_add(DB_bh + idx, ds, mask=hit, sem="relaxed")
