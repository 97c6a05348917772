"""Block-sparse metadata: which (query tile, key tile) pairs a kernel must visit, and how.

For tile sizes ``(BM, BN)`` the ``Nq x Nk`` attention matrix is cut into ``Tq x Tk`` tiles, ``Tq = ceil(Nq / BM)``,
``Tk = ceil(Nk / BN)``. Every tile is exactly one of

- **empty** (0): no query in it may attend any key in it — never loaded, never computed;
- **full** (2): inside the matrix and every query may attend every key — computed with no mask arithmetic;
- **partial** (1): anything else (mixed rules, padding, the causal diagonal, the ragged last row/column of tiles) —
  computed with the element mask from :class:`TokenMeta`.

A forward kernel program for query tile ``m`` of sample ``b`` visits, in ascending order::

    for t in range(full_kv_num[b, m]):    n = full_kv_idx[b, m, t]     # no mask
    for t in range(partial_kv_num[b, m]): n = partial_kv_idx[b, m, t]  # element mask

and a backward program for key tile ``n`` visits the transposed lists ``full_q_*[b, n]`` / ``partial_q_*[b, n]``.
Entries past ``*_num`` are padding (other tile indices) and must not be read. ``b`` ranges over ``Bm`` = 1 when the
mask has no per-sample lengths (broadcast over the batch), else B.

The classification is exact (a test expands it and compares with :meth:`ZorroMask.to_dense`), costs time proportional
to segments + tiles (2-D prefix sums over the segment rule table and closed-form valid-token counts), and never builds
an ``Nq x Nk`` tensor. Only tiles that straddle the causal diagonal or a sliding window's edges, O(Tq + Tk) of them, are
checked element-wise; tiles wholly outside the band are empty (never visited).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["TileMap", "TokenMeta", "build_tile_map", "build_token_meta", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


class TileMap(NamedTuple):
    """Per-tile work lists for block-sparse attention (see the module docstring for how kernels read them).

    Shapes (``Bm`` = 1 without per-sample lengths, else B):
        kinds: int8 ``(Bm, Tq, Tk)`` — EMPTY / PARTIAL / FULL per tile.
        full_kv_num, partial_kv_num: int32 ``(Bm, Tq)``.
        full_kv_idx, partial_kv_idx: int32 ``(Bm, Tq, Tk)``, ascending in the first ``*_num`` entries.
        full_q_num, partial_q_num: int32 ``(Bm, Tk)``.
        full_q_idx, partial_q_idx: int32 ``(Bm, Tk, Tq)``.
    """

    block_m: int
    block_n: int
    num_q: int
    num_kv: int
    kinds: torch.Tensor
    full_kv_num: torch.Tensor
    full_kv_idx: torch.Tensor
    partial_kv_num: torch.Tensor
    partial_kv_idx: torch.Tensor
    full_q_num: torch.Tensor
    full_q_idx: torch.Tensor
    partial_q_num: torch.Tensor
    partial_q_idx: torch.Tensor

    def to(self, device) -> "TileMap":
        return self._replace(
            **{f: getattr(self, f).to(device) for f in self._fields if isinstance(getattr(self, f), torch.Tensor)}
        )

    @property
    def tile_sparsity(self) -> float:
        """Fraction of tiles that are empty (work the kernel skips)."""
        return float((self.kinds == EMPTY).float().mean())

    def counts(self) -> dict[str, int]:
        """Number of empty, partial and full tiles over all ``Bm`` maps."""
        return {
            name: int((self.kinds == k).sum()) for name, k in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))
        }


class TokenMeta(NamedTuple):
    """The element mask token by token: what the tile-map and kernel-mask builders evaluate partial tiles with
    (internal; no kernel reads it).

    Shapes:
        q_seg, q_pos: int32 ``(Nq,)`` — segment id of each query token and its position inside the segment.
        k_seg, k_pos: int32 ``(Nk,)`` — the same for keys.
        allow: int32 ``(Sq, Sk)`` — 1 where query segment a may see key segment c.
        q_len: int32 ``(Bm, Sq)``, k_len: int32 ``(Bm, Sk)`` — valid tokens per segment (the sizes when no lengths).
        causal_offset: ``Nk - Nq``; meaningful when ``causal`` or with a window.
        window_left, window_right: the mask's sliding window, -1 for an unbounded side (or no window).

    Element rule: query i of sample b may see key j iff ``allow[q_seg[i], k_seg[j]] and q_pos[i] < q_len[b, q_seg[i]]
    and k_pos[j] < k_len[b, k_seg[j]] and (not causal or j <= i + causal_offset)`` and, for a bounded side of the
    window, ``j >= i + causal_offset - window_left`` / ``j <= i + causal_offset + window_right``.
    """

    q_seg: torch.Tensor
    q_pos: torch.Tensor
    k_seg: torch.Tensor
    k_pos: torch.Tensor
    allow: torch.Tensor
    q_len: torch.Tensor
    k_len: torch.Tensor
    causal: bool
    causal_offset: int
    window_left: int = -1
    window_right: int = -1

    def to(self, device) -> "TokenMeta":
        return self._replace(
            **{f: getattr(self, f).to(device) for f in self._fields if isinstance(getattr(self, f), torch.Tensor)}
        )

    def element_mask(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The mask on sub-grids: bool ``(Bm, P, R, C)`` for int64 indices ``rows (P, R)``, ``cols (P, C)`` (in
        range)."""
        qs, ks = self.q_seg[rows].long(), self.k_seg[cols].long()  # (P, R), (P, C)
        m = self.allow[qs[:, :, None], ks[:, None, :]].bool()[None]  # (1, P, R, C)
        q_ok = self.q_pos[rows][None] < self.q_len[:, qs]  # (Bm, P, R)
        k_ok = self.k_pos[cols][None] < self.k_len[:, ks]  # (Bm, P, C)
        m = m & q_ok[..., :, None] & k_ok[..., None, :]
        d = cols[None, :, None, :] - rows[None, :, :, None] - self.causal_offset
        if self.causal:
            m = m & (d <= 0)
        if self.window_left >= 0:
            m = m & (d >= -self.window_left)
        if self.window_right >= 0:
            m = m & (d <= self.window_right)
        return m


def _segment_ids_and_pos(sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    pos = torch.arange(int(sizes_t.sum())) - starts[seg]
    return seg.to(torch.int32), pos.to(torch.int32)


def build_token_meta(mask) -> TokenMeta:
    q_seg, q_pos = _segment_ids_and_pos(mask.q_sizes)
    k_seg, k_pos = _segment_ids_and_pos(mask.kv_sizes)
    return TokenMeta(
        q_seg,
        q_pos,
        k_seg,
        k_pos,
        mask.allow.to(torch.int32),
        mask._q_lengths_or_sizes().to(torch.int32).contiguous(),
        mask._kv_lengths_or_sizes().to(torch.int32).contiguous(),
        mask.causal,
        mask.num_kv - mask.num_q,
        *(mask.window or (-1, -1)),
    )


class _Axis(NamedTuple):
    """One side (queries or keys) of the layout, reduced to its non-empty segments, cut into tiles (numpy arrays)."""

    lo: np.ndarray  # (T,) first non-empty segment overlapping each tile
    hi: np.ndarray  # (T,) last one
    lo_valid: np.ndarray  # (Bm, T) first segment with a *valid* token in the tile (> hi: none)
    n_valid: np.ndarray  # (Bm, T) valid tokens in the tile
    n_rows: np.ndarray  # (T,) tokens of the tile inside the matrix
    complete: np.ndarray  # (T,) the tile lies wholly inside the matrix
    valid_seg: np.ndarray  # (Bm, S) segment has at least one valid token


def _axis(sizes: tuple[int, ...], lens: np.ndarray, block: int) -> tuple[_Axis, np.ndarray]:
    """Tile geometry of one side. Returns the axis and the kept (non-empty) segment indices."""
    sizes_a = np.asarray(sizes, dtype=np.int64)
    keep = np.flatnonzero(sizes_a > 0)
    sizes_a, lens = sizes_a[keep], lens[:, keep]
    n = int(sizes_a.sum())
    ends = np.cumsum(sizes_a)
    starts = ends - sizes_a
    r0 = np.arange(-(-n // block), dtype=np.int64) * block
    r1 = np.minimum(r0 + block, n)
    lo = np.searchsorted(ends, r0, side="right")
    hi = np.searchsorted(ends, r1 - 1, side="right")

    # valid tokens before position p: earlier segments' valid tokens + this segment's valid prefix (closed form)
    cum_len = np.cumsum(lens, 1) - lens  # (Bm, S) exclusive

    def valid_before(p):
        s = np.minimum(np.searchsorted(ends, p, side="right"), len(sizes_a) - 1)
        return cum_len[:, s] + np.minimum(np.maximum(p - starts[s], 0)[None], lens[:, s])

    n_valid = valid_before(r1) - valid_before(r0)
    # the first overlapping segment may have all its valid tokens before r0
    lo_valid = lo[None] + ((starts[lo] + lens[:, lo]) <= r0[None])
    return _Axis(lo, hi, lo_valid, n_valid, r1 - r0, (r0 + block) <= n, lens > 0), keep


def _rect_sum(prefix: np.ndarray, a0, a1, c0, c1) -> np.ndarray:
    """Sum of a table over rows a0..a1 x columns c0..c1, inclusive, for every (row tile, column tile).

    prefix: (Bm, S + 1, K + 1) from :func:`_prefix2d`; a0, a1: (Bm or 1, Tq); c0, c1: (Bm or 1, Tk).
    Returns (Bm, Tq, Tk); 0 where a0 > a1 or c0 > c1. Rows are gathered first, so the (Tq, Tk)-sized work is two
    1-D column gathers per sample rather than four 3-D fancy-index gathers.
    """
    bm = prefix.shape[0]
    a1p, c1p = np.maximum(a1 + 1, a0), np.maximum(c1 + 1, c0)
    a0, a1p = np.broadcast_to(a0, (bm, a0.shape[-1])), np.broadcast_to(a1p, (bm, a1p.shape[-1]))
    c0, c1p = np.broadcast_to(c0, (bm, c0.shape[-1])), np.broadcast_to(c1p, (bm, c1p.shape[-1]))
    rows = np.take_along_axis(prefix, a1p[:, :, None], 1) - np.take_along_axis(prefix, a0[:, :, None], 1)
    return np.stack([rows[b][:, c1p[b]] - rows[b][:, c0[b]] for b in range(bm)])


def _prefix2d(table: np.ndarray) -> np.ndarray:
    """(Bm, S, K) -> (Bm, S + 1, K + 1) inclusive 2-D prefix sums with a zero border."""
    p = np.zeros((table.shape[0], table.shape[1] + 1, table.shape[2] + 1), dtype=np.int64)
    p[:, 1:, 1:] = table.cumsum(1).cumsum(2)
    return p


def _sorted_lists(kinds: np.ndarray, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``kinds (Bm, R, C)``: count and ascending indices of the columns equal to ``kind`` (rest: 0)."""
    hit = kinds == kind
    b, r, c = np.nonzero(hit)  # row-major order: grouped by (b, r), columns ascending
    num = hit.sum(-1, dtype=np.int32)
    row_start = (np.cumsum(num, axis=None) - num.ravel()).reshape(num.shape)
    idx = np.zeros(kinds.shape, dtype=np.int32)
    idx[b, r, np.arange(len(c)) - row_start[b, r]] = c
    return torch.from_numpy(num), torch.from_numpy(idx)


def build_tile_map(mask, block_m: int, block_n: int) -> TileMap:
    """Classify every (query tile, key tile) of ``mask`` for tiles of ``block_m x block_n``. See the module docstring.

    Works on numpy arrays: the inputs are a few hundred integers and numpy's per-call overhead is ~10x below torch's.
    """
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    ql, kl = mask._q_lengths_or_sizes().numpy(), mask._kv_lengths_or_sizes().numpy()
    bm = max(ql.shape[0], kl.shape[0])  # one side may have per-sample lengths while the other broadcasts
    ql, kl = np.broadcast_to(ql, (bm, ql.shape[1])), np.broadcast_to(kl, (bm, kl.shape[1]))
    qa, qkeep = _axis(mask.q_sizes, ql, block_m)
    ka, kkeep = _axis(mask.kv_sizes, kl, block_n)
    allow = mask.allow.numpy()[np.ix_(qkeep, kkeep)]  # (Sq', Sk') over non-empty segments

    # empty unless some allowed pair of segments both have valid tokens in the tile
    live = allow[None] & qa.valid_seg[:, :, None] & ka.valid_seg[:, None, :]
    n_live = _rect_sum(_prefix2d(live), qa.lo_valid, qa.hi[None], ka.lo_valid, ka.hi[None])
    # full iff inside the matrix, no padding on either side, and every overlapping segment pair allowed
    n_allow = _rect_sum(_prefix2d(allow[None]), qa.lo[None], qa.hi[None], ka.lo[None], ka.hi[None])
    area = (qa.hi - qa.lo + 1)[:, None] * (ka.hi - ka.lo + 1)[None, :]
    no_pad = (qa.n_valid == qa.n_rows)[:, :, None] & (ka.n_valid == ka.n_rows)[:, None, :]
    empty = (n_live == 0) | (qa.n_valid == 0)[:, :, None] | (ka.n_valid == 0)[:, None, :]
    full = ~empty & no_pad & (qa.complete[:, None] & ka.complete[None, :]) & (n_allow == area)
    kinds = np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)

    if mask.band() != (None, None):
        kinds = _apply_band(mask, torch.from_numpy(kinds), block_m, block_n).numpy()

    kt = kinds.transpose(0, 2, 1)
    return TileMap(
        block_m,
        block_n,
        mask.num_q,
        mask.num_kv,
        torch.from_numpy(np.ascontiguousarray(kinds)),
        *_sorted_lists(kinds, FULL),
        *_sorted_lists(kinds, PARTIAL),
        *_sorted_lists(kt, FULL),
        *_sorted_lists(kt, PARTIAL),
    )


def _apply_band(mask, kinds: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """The band ``lo <= j - i - off <= hi`` of causality and the sliding window (:meth:`ZorroMask.band`): tiles wholly
    outside it become empty; the O(Tq + Tk) tiles that straddle one of its edges are classified from their exact
    element masks (segment rules and padding interact with the edges there)."""
    nq, nk, off = mask.num_q, mask.num_kv, mask.num_kv - mask.num_q
    lo, hi = mask.band()
    tq, tk = kinds.shape[1], kinds.shape[2]
    r0 = torch.arange(tq) * block_m
    r1 = torch.clamp(r0 + block_m, max=nq) - 1  # last row in the matrix
    c0 = torch.arange(tk) * block_n
    c1 = torch.clamp(c0 + block_n, max=nk) - 1
    d_min = c0[None, :] - r1[:, None] - off  # the tile's smallest and largest j - i - off
    d_max = c1[None, :] - r0[:, None] - off
    outside = torch.zeros(tq, tk, dtype=torch.bool)
    inside = torch.ones(tq, tk, dtype=torch.bool)
    if hi is not None:
        outside |= d_min > hi
        inside &= d_max <= hi
    if lo is not None:
        outside |= d_max < lo
        inside &= d_min >= lo
    kinds = kinds.clone()
    kinds[:, outside] = EMPTY
    straddle = (~outside & ~inside).nonzero()
    if len(straddle):
        ms, ns = straddle[:, 0], straddle[:, 1]
        rows = r0[ms, None] + torch.arange(block_m)[None]  # (P, BM)
        cols = c0[ns, None] + torch.arange(block_n)[None]  # (P, BN)
        rows_in, cols_in = rows <= r1[ms, None], cols <= c1[ns, None]
        em = build_token_meta(mask).element_mask(rows.clamp(max=nq - 1), cols.clamp(max=nk - 1))
        em = em & rows_in[None, :, :, None] & cols_in[None, :, None, :]
        any_ = em.flatten(2).any(2).expand(kinds.shape[0], -1)  # (Bm, P)
        kinds[:, ms, ns] = torch.where(any_, PARTIAL, EMPTY).to(torch.int8)
    return kinds
