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

from typing import NamedTuple, Optional

import numpy as np
import torch

__all__ = ["AllowRuns", "TileMap", "TokenMeta", "build_tile_map", "build_token_meta", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


class AllowRuns(NamedTuple):
    """The segment rule table as runs: query segment ``row[r]`` may see key segments ``c0[r] <= c < c1[r]``.

    Each cell of the table is *none*, *full* or *causal*; a run holds cells of one kind (``causal[r]``, or full when
    ``causal`` is None). A causal cell ``(a, c)`` lets query ``il`` of segment a (0-based inside it) see key ``jl`` of
    segment c iff ``jl <= il + (kl - ql)``, ``ql``/``kl`` the sample's valid tokens of a and c: the diagonal aligned
    bottom-right inside the pair, as flash-attn's varlen ``causal``. Runs are sorted by ``(row, c0)`` and maximal
    (two runs of one row touch only where the kind changes), so equal tables have equal runs. Their number is what
    describes a layout: one per query segment for packed sequences, windows or full attention, where the dense table
    would hold ``Sq x Sk`` cells. All arrays int64 ``(R,)`` (``causal``: bool ``(R,)`` or None).
    """

    n_q: int
    n_kv: int
    row: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    causal: Optional[np.ndarray] = None

    @classmethod
    def from_dense(cls, allow, causal=None) -> "AllowRuns":
        """The runs of a bool ``(Sq, Sk)`` table (tensor or array); ``causal``, a bool table of the same shape (or
        None), marks the allowed cells that are causal (a causal cell need not be set in ``allow``)."""

        def arr(t):
            return np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t)

        a = arr(allow).astype(np.int8)
        if causal is not None:
            cz = arr(causal).astype(bool)
            a = np.where(cz, 2, a).astype(np.int8)
        sq, sk = a.shape
        edge = np.zeros((sq, sk + 2), dtype=np.int8)
        edge[:, 1 : sk + 1] = a
        change = edge[:, 1:] != edge[:, :-1]  # (sq, sk + 1): the kind changes before column c
        rs, cs = np.nonzero(change[:, :sk] & (a != 0))  # a run starts where a non-none kind begins
        # its end: the next change in the row (row-major order keeps each row's changes ascending)
        flat = np.flatnonzero(change.ravel())
        start_flat = rs * (sk + 1) + cs
        end_flat = flat[np.searchsorted(flat, start_flat, side="right")]
        ce = end_flat - rs * (sk + 1)
        # no branch on the table's values: masks are built inside torch.compile traces (transformers' mask
        # interface), where dynamo cannot follow a data-dependent `if`; an all-False kinds array means no cells
        kinds = (a[rs, cs] == 2) if causal is not None else None
        return cls(sq, sk, rs.astype(np.int64), cs.astype(np.int64), ce.astype(np.int64), kinds)

    @classmethod
    def diagonal(cls, n: int, causal: bool = False) -> "AllowRuns":
        """Segment i sees segment i only (packed sequences); ``causal``: each cell causal."""
        idx = np.arange(n, dtype=np.int64)
        return cls(n, n, idx, idx, idx + 1, np.ones(n, dtype=bool) if causal and n else None)

    @property
    def has_causal(self) -> bool:
        """Whether any cell is causal."""
        return self.causal is not None and bool(self.causal.any())

    def _kind(self, causal: bool) -> "AllowRuns":
        keep = np.zeros(len(self.row), bool) if self.causal is None else self.causal.copy()
        if not causal:
            keep = ~keep
        return AllowRuns(
            self.n_q, self.n_kv, self.row[keep], self.c0[keep], self.c1[keep], keep[keep] if causal else None
        )

    def full_cells(self) -> "AllowRuns":
        """The runs of full cells only."""
        return self if not self.has_causal else self._kind(False)

    def causal_cells(self) -> "AllowRuns":
        """The runs of causal cells only (kind kept)."""
        return self._kind(True)

    def dense(self) -> torch.Tensor:
        """The bool ``(Sq, Sk)`` table of allowed cells (full or causal)."""
        out = np.zeros((self.n_q, self.n_kv), dtype=bool)
        out[self.pairs()] = True
        return torch.from_numpy(out)

    def dense_causal(self) -> torch.Tensor:
        """The bool ``(Sq, Sk)`` table of causal cells."""
        out = np.zeros((self.n_q, self.n_kv), dtype=bool)
        out[self.causal_cells().pairs()] = True
        return torch.from_numpy(out)

    def lookup(self, a: np.ndarray, c: np.ndarray, causal: bool = False) -> np.ndarray:
        """bool array: may query segment ``a`` see key segment ``c`` (elementwise, any broadcastable shapes); with
        ``causal``, is that cell causal."""
        if causal:
            return self.causal_cells().lookup(a, c) if self.has_causal else np.zeros(np.broadcast(a, c).shape, bool)
        stride = self.n_kv + 1
        starts = self.row * stride + self.c0
        key = np.asarray(a, dtype=np.int64) * stride + np.asarray(c, dtype=np.int64)
        i = np.searchsorted(starts, key, side="right") - 1
        ic = np.maximum(i, 0)
        return (i >= 0) & (key < (self.row * stride + self.c1)[ic]) if len(starts) else np.zeros(key.shape, bool)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every allowed ``(a, c)`` pair (cost: their number)."""
        n = self.c1 - self.c0
        a = np.repeat(self.row, n)
        c = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n - self.c0, n)
        return a, c

    def digest_bytes(self) -> bytes:
        kinds = b"" if not self.has_causal else b"causal" + self.causal.astype(np.int8).tobytes()
        return repr((self.n_q, self.n_kv)).encode() + np.stack([self.row, self.c0, self.c1]).tobytes() + kinds


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
    window, ``j >= i + causal_offset - window_left`` / ``j <= i + causal_offset + window_right``, and, in a causal
    cell, ``k_pos[j] <= q_pos[i] + k_len[b, k_seg[j]] - q_len[b, q_seg[i]]``.
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
    # int32 (Sq, Sk): 1 where the cell is causal (bottom-right inside the pair's valid tokens), or None
    cell_causal: Optional[torch.Tensor] = None

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
        if self.cell_causal is not None:
            cell = self.cell_causal[qs[:, :, None], ks[:, None, :]].bool()[None]
            ql, kl = self.q_len[:, qs].long(), self.k_len[:, ks].long()
            seen = self.k_pos[cols][None, :, None, :] <= (
                self.q_pos[rows][None, :, :, None] + kl[:, :, None, :] - ql[:, :, :, None]
            )
            m = m & (~cell | seen)
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
    if mask.per_sample:
        raise ValueError(
            "a mask with per-sample segment sizes has no single per-token table (token ids differ per sample); "
            "use mask.sample(b).token_meta()"
        )
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
        mask.causal_cells.to(torch.int32) if mask.has_causal_cells else None,
    )


def _valid_before(starts: np.ndarray, ends: np.ndarray, lens: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Valid tokens before position ``p`` (any shape ``P``), per sample: ``(Bm, P)``. ``starts``/``ends``: the
    segments' token ranges (sizes may be 0), ``lens (Bm, S)``: valid tokens per segment (a prefix of each)."""
    cum_len = np.zeros((lens.shape[0], lens.shape[1] + 1), dtype=np.int64)
    np.cumsum(lens, 1, out=cum_len[:, 1:])
    s = np.searchsorted(ends, p, side="right")  # segments wholly before p: s; p lies in segment s (if any)
    sc = np.minimum(s, len(starts) - 1)
    inside = np.where(s < len(starts), np.maximum(p - starts[sc], 0), 0)
    return cum_len[:, s] + np.minimum(inside[None], lens[:, sc] * (s < len(starts))[None])


def pairs_below(i0, i1, j0, w, d) -> np.ndarray:
    """``#{(i, j): i0 <= i < i1, j0 <= j < j0 + w, j <= i + d}`` elementwise over broadcastable int64 arrays
    (closed form: row i sees ``clamp(i + d - j0 + 1, 0, w)`` keys)."""
    i0, i1, j0, w, d = (np.asarray(x, dtype=np.int64) for x in (i0, i1, j0, w, d))
    # j - i never exceeds j0 + w - 1 - i0: clamping d there changes no count and keeps the arithmetic small
    d = np.minimum(d, j0 + w - i0)

    def cum(t):  # sum_{s <= t} clamp(s, 0, w)
        tc = np.maximum(t, -1)
        low = np.maximum(np.minimum(tc, w), 0)
        return low * (low + 1) // 2 + np.maximum(tc - w, 0) * w

    t0 = i0 + d - j0 + 1
    t1 = i1 - 1 + d - j0 + 1
    return np.where((i1 > i0) & (w > 0), cum(t1) - cum(t0 - 1), 0)


def _tile_ranges(start: np.ndarray, stop: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last tile overlapping each non-empty token range ``[start, stop)``."""
    return start // block, (stop - 1) // block


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
    if mask.per_sample:  # each sample's own layout, one map per sample (linear in samples x segments)
        kinds = np.concatenate(
            [build_tile_map(mask.sample(b), block_m, block_n).kinds.numpy() for b in range(mask.batch_size)]
        )
        return _from_kinds(mask, kinds, block_m, block_n)
    ql, kl = mask._q_lengths_or_sizes().numpy(), mask._kv_lengths_or_sizes().numpy()
    bm = max(ql.shape[0], kl.shape[0])  # one side may have per-sample lengths while the other broadcasts
    ql, kl = np.broadcast_to(ql, (bm, ql.shape[1])), np.broadcast_to(kl, (bm, kl.shape[1]))
    tq, tk = -(-mask.num_q // block_m), -(-mask.num_kv // block_n)
    q_end = np.cumsum(np.asarray(mask.q_sizes, dtype=np.int64))
    q_start = q_end - np.asarray(mask.q_sizes, dtype=np.int64)
    k_end = np.cumsum(np.asarray(mask.kv_sizes, dtype=np.int64))
    k_start = k_end - np.asarray(mask.kv_sizes, dtype=np.int64)

    # Each run of the rule table is a rectangle of the matrix: its query segment's rows x its key segments' columns.
    # Rectangles are disjoint, so the allowed valid pairs of a tile are the sum of its overlaps with them: 0 = empty,
    # the whole tile = full (which also needs the tile inside the matrix and free of padding), else partial.
    runs = mask._runs.full_cells()
    r_q0, r_q1 = q_start[runs.row], q_end[runs.row]
    r_k0, r_k1 = k_start[runs.c0], k_end[runs.c1 - 1]
    keep = (r_q1 > r_q0) & (r_k1 > r_k0)
    rid = np.flatnonzero(keep)
    m0, m1 = _tile_ranges(r_q0[rid], r_q1[rid], block_m)
    n0, n1 = _tile_ranges(r_k0[rid], r_k1[rid], block_n)
    nn = n1 - n0 + 1
    count = (m1 - m0 + 1) * nn
    owner = np.repeat(np.arange(len(rid)), count)  # one entry per (rectangle, tile it touches)
    local = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    mi = m0[owner] + local // nn[owner]
    ni = n0[owner] + local % nn[owner]
    rq0, rk0, rk1 = r_q0[rid][owner], r_k0[rid][owner], r_k1[rid][owner]
    a = runs.row[rid][owner]
    # valid rows of the query segment inside the tile (its valid rows are a prefix of the segment)
    rows = np.minimum(rq0[None] + ql[:, a], np.minimum((mi + 1) * block_m, mask.num_q)[None]) - np.maximum(
        rq0, mi * block_m
    )
    rows = np.maximum(rows, 0)
    c_lo = np.maximum(rk0, ni * block_n)
    c_hi = np.minimum(rk1, (ni + 1) * block_n)
    cols = _valid_before(k_start, k_end, kl, c_hi) - _valid_before(k_start, k_end, kl, c_lo)
    area = (rows * cols).astype(np.float64)  # exact: at most block_m * block_n per entry, summed per tile
    flat = (np.arange(bm, dtype=np.int64)[:, None] * (tq * tk) + (mi * tk + ni)[None]).ravel()
    covered = np.bincount(flat, weights=area.ravel(), minlength=bm * tq * tk).reshape(bm, tq, tk)
    if mask._runs.has_causal:
        covered = covered + _causal_cell_area(mask, ql, kl, q_start, q_end, k_start, k_end, block_m, block_n, tq, tk)
    kinds = np.where(covered == 0, EMPTY, np.where(covered == block_m * block_n, FULL, PARTIAL)).astype(np.int8)

    if mask.band() != (None, None):
        kinds = _apply_band(mask, torch.from_numpy(kinds), block_m, block_n).numpy()
    return _from_kinds(mask, kinds, block_m, block_n)


def _from_kinds(mask, kinds: np.ndarray, block_m: int, block_n: int) -> TileMap:
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


def _causal_cell_area(mask, ql, kl, q_start, q_end, k_start, k_end, block_m, block_n, tq, tk) -> np.ndarray:
    """float64 ``(Bm, Tq, Tk)``: the attended pairs each tile holds in the mask's causal cells (closed form per cell
    and tile it touches, :func:`pairs_below`)."""
    bm = ql.shape[0]
    a, c = mask._runs.causal_cells().pairs()
    keep = (q_end[a] > q_start[a]) & (k_end[c] > k_start[c])
    a, c = a[keep], c[keep]
    m0, m1 = _tile_ranges(q_start[a], q_end[a], block_m)
    n0, n1 = _tile_ranges(k_start[c], k_end[c], block_n)
    nn = n1 - n0 + 1
    count = (m1 - m0 + 1) * nn
    owner = np.repeat(np.arange(len(a)), count)
    local = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    mi = m0[owner] + local // nn[owner]
    ni = n0[owner] + local % nn[owner]
    a, c = a[owner], c[owner]
    q0, k0 = q_start[a][None], k_start[c][None]
    qv, kv = ql[:, a], kl[:, c]  # (Bm, P)
    r0 = np.maximum(q0, mi * block_m)
    r1 = np.minimum(q0 + qv, np.minimum((mi + 1) * block_m, mask.num_q))
    c0 = np.maximum(k0, ni * block_n)
    c1 = np.minimum(k0 + kv, (ni + 1) * block_n)
    # key jl = j - k0 visible to query il = i - q0 iff jl <= il + kv - qv: j <= i + (k0 - q0 + kv - qv)
    area = pairs_below(r0, np.maximum(r1, r0), c0, np.maximum(c1 - c0, 0), k0 - q0 + kv - qv).astype(np.float64)
    flat = (np.arange(bm, dtype=np.int64)[:, None] * (tq * tk) + (mi * tk + ni)[None]).ravel()
    return np.bincount(flat, weights=area.ravel(), minlength=bm * tq * tk).reshape(bm, tq, tk)


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
        em = _element_mask(mask, rows.clamp(max=nq - 1), cols.clamp(max=nk - 1))
        em = em & rows_in[None, :, :, None] & cols_in[None, :, None, :]
        any_ = em.flatten(2).any(2).expand(kinds.shape[0], -1)  # (Bm, P)
        kinds[:, ms, ns] = torch.where(any_, PARTIAL, EMPTY).to(torch.int8)
    return kinds


def _element_mask(mask, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:meth:`TokenMeta.element_mask` with the rule table read through its runs (no ``Sq x Sk`` table)."""
    q_seg, q_pos = _segment_ids_and_pos(mask.q_sizes)
    k_seg, k_pos = _segment_ids_and_pos(mask.kv_sizes)
    qs, ks = q_seg[rows].long(), k_seg[cols].long()  # (P, R), (P, C)
    allowed = mask._runs.lookup(qs.numpy()[:, :, None], ks.numpy()[:, None, :])
    m = torch.from_numpy(np.ascontiguousarray(allowed))[None]  # (1, P, R, C)
    q_ok = q_pos[rows][None] < mask._q_lengths_or_sizes()[:, qs]  # (Bm, P, R)
    k_ok = k_pos[cols][None] < mask._kv_lengths_or_sizes()[:, ks]  # (Bm, P, C)
    m = m & q_ok[..., :, None] & k_ok[..., None, :]
    if mask.has_causal_cells:
        cell = torch.from_numpy(
            np.ascontiguousarray(mask._runs.lookup(qs.numpy()[:, :, None], ks.numpy()[:, None, :], True))
        )
        ql = mask._q_lengths_or_sizes()[:, qs]  # (Bm, P, R)
        kl = mask._kv_lengths_or_sizes()[:, ks]  # (Bm, P, C)
        seen = k_pos[cols][None, :, None, :] <= q_pos[rows][None, :, :, None] + kl[:, :, None, :] - ql[:, :, :, None]
        m = m & (~cell[None] | seen)
    d = cols[None, :, None, :] - rows[None, :, :, None] - (mask.num_kv - mask.num_q)
    lo, hi = mask.band()
    if hi is not None:
        m = m & (d <= hi)
    if lo is not None:
        m = m & (d >= lo)
    return m
