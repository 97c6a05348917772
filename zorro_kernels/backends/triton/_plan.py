"""What the kernels read, derived from the mask's tile map and rule table (built once, cached on the mask).

Full tiles are stored as *runs*: per row of the tile map (a query tile for the forward and dQ kernels, a kv tile for
the dK/dV kernel) a few ``[start, end)`` ranges of consecutive full tiles. The kernels walk a run with pointer
increments — the loop shape of the dense fused-attention kernel, which Triton's software pipeliner turns into
``cp.async`` loads issued ``num_stages - 1`` tiles ahead. A list of tile *indices* instead makes every K/V address
depend on a load in the same iteration: the pipeliner then spends one stage on the index and can overlap the K/V
loads with nothing (see docs/triton.md, "Performance"). Zorro layouts have one or two runs per row (a modality's
tiles are consecutive); partial tiles, O(segment boundaries) of them, keep the index lists.

The rule table is packed into bit words, ``allow_bits[a, w]`` bit ``c % 32`` of word ``w = c // 32`` set iff segment
``a`` may see segment ``c``. With at most 32 segments on the side that varies inside the tile loop the program loads
its own side's words once and a partial tile's mask costs a shift per element instead of a 2-D gather.

Programs run **heaviest first**: each plan carries a program order, its rows sorted by estimated cost (full tiles +
``PARTIAL_COST`` x partial tiles, descending). With the query tile fastest in a plain ``(tiles, B*H)`` grid the
heaviest programs would start last and leave the card idle at the tail (a scheduling simulation of Figure-2/16k
on 264 slots: 0.78-0.90 efficiency, 0.93-0.99 heaviest first over the whole grid; /work/shared/KERNEL_REVIEW.md).

Per-sample token validity is folded into one code per token, ``segment id`` if the token is valid in that sample and
``-1`` if it is padding, so a partial tile reads one int per key instead of a segment id, a position and a dependent
gather of the segment's length.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "TilePlan",
    "KernelMask",
    "RangePlan",
    "tile_plan",
    "kernel_mask",
    "range_plan",
    "forward_plan",
    "program_order",
    "PARTIAL_COST",
]

# a partial tile's cost in full tiles: two extra (BM, BN) selects, the rule words and the token codes per tile
PARTIAL_COST = 1.5


class TilePlan(NamedTuple):
    """Work of one kernel direction for tiles of ``block_m x block_n``.

    ``rows`` are query tiles (``direction="kv"``: forward, dQ) or kv tiles (``direction="q"``: dK/dV); ``Bm`` as in
    :class:`~zorro_kernels.tilemap.TileMap`.

    Shapes:
        run_num: int32 ``(Bm, rows)`` — runs of full tiles per row.
        runs: int32 ``(Bm, rows, max_runs, 2)`` — ``[start, end)`` tile indices, ascending; entries past ``run_num``
            are 0.
        part_num: int32 ``(Bm, rows)``; part_idx: int32 ``(Bm, rows, cols)`` — partial tiles, ascending.
        order: int32 ``(Bm * rows,)`` — plan entries ``b * rows + row``, heaviest first (:func:`program_order`).
    """

    block_m: int
    block_n: int
    num_rows: int
    num_cols: int
    max_runs: int
    run_num: torch.Tensor
    runs: torch.Tensor
    part_num: torch.Tensor
    part_idx: torch.Tensor
    per_sample: bool
    order: torch.Tensor


class KernelMask(NamedTuple):
    """The element rule as the kernels read it (partial tiles only).

    Shapes:
        q_code: int32 ``(Bm, Nq)``, k_code: int32 ``(Bm, Nk)`` — the token's segment id where it is valid in sample
            ``b`` (row ``b`` with per-sample lengths, else the single row 0), ``-1`` where it is padding.
        q_bits: int32 ``(Sq, q_words)`` — row = query segment, one bit per key segment; k_bits: int32
            ``(Sk, k_words)`` — the transpose.
        band_lo, band_hi, lo_off, hi_off: causality and the sliding window as one band (:meth:`ZorroMask.band`): key
            ``j`` is visible to query ``i`` only if ``j >= i + lo_off`` (when ``band_lo``) and ``j <= i + hi_off``
            (when ``band_hi``); the offsets include ``Nk - Nq`` (bottom-right alignment).
        q_cbits, k_cbits: int32, as ``q_bits``/``k_bits``: the causal rule cells (all 0 without any).
        q_end: int32 ``(Bm, Nq)``, k_end: int32 ``(Bm, Nk)`` — each token's end offset ``pos - valid_len`` in its
            segment (negative where valid): a causal-cell pair is visible iff ``k_end[j] <= q_end[i]``.
        cells: whether the mask has causal cells (a constexpr: without, the kernels read none of these).
    """

    q_code: torch.Tensor
    k_code: torch.Tensor
    q_bits: torch.Tensor
    q_words: int
    k_bits: torch.Tensor
    k_words: int
    band_lo: bool
    band_hi: bool
    lo_off: int
    hi_off: int
    q_cbits: torch.Tensor
    k_cbits: torch.Tensor
    q_end: torch.Tensor
    k_end: torch.Tensor
    cells: bool


def _runs(num: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive tile indices in each row's ascending list ``idx[..., :num]``."""
    bm, rows, cols = idx.shape
    valid = np.arange(cols)[None, None, :] < num[..., None]
    prev = np.concatenate([np.full((bm, rows, 1), -2, dtype=np.int64), idx[..., :-1].astype(np.int64)], -1)
    nxt = np.concatenate([idx[..., 1:].astype(np.int64), np.full((bm, rows, 1), -2, dtype=np.int64)], -1)
    valid_next = np.concatenate([valid[..., 1:], np.zeros((bm, rows, 1), dtype=bool)], -1)
    starts = valid & (idx != prev + 1)
    ends = valid & ~(valid_next & (nxt == idx.astype(np.int64) + 1))
    run_num = starts.sum(-1).astype(np.int32)
    max_runs = max(1, int(run_num.max(initial=0)))
    runs = np.zeros((bm, rows, max_runs, 2), dtype=np.int32)
    run_id = np.cumsum(starts, -1) - 1
    b, r, c = np.nonzero(starts)
    runs[b, r, run_id[b, r, c], 0] = idx[b, r, c]
    b, r, c = np.nonzero(ends)
    runs[b, r, run_id[b, r, c], 1] = idx[b, r, c] + 1
    return run_num, runs


def _build_plan(mask, block_m: int, block_n: int, direction: str, device: torch.device) -> TilePlan:
    tm = mask.tile_map(block_m, block_n, "cpu")
    if direction == "kv":
        full_num, full_idx, part_num, part_idx = tm.full_kv_num, tm.full_kv_idx, tm.partial_kv_num, tm.partial_kv_idx
    else:
        full_num, full_idx, part_num, part_idx = tm.full_q_num, tm.full_q_idx, tm.partial_q_num, tm.partial_q_idx
    run_num, runs = _runs(full_num.numpy(), full_idx.numpy())
    order = program_order(full_num.numpy(), part_num.numpy())
    return TilePlan(
        block_m,
        block_n,
        full_idx.shape[1],
        full_idx.shape[2],
        runs.shape[2],
        torch.from_numpy(run_num).to(device),
        torch.from_numpy(runs).to(device),
        part_num.contiguous().to(device),
        part_idx.contiguous().to(device),
        full_num.shape[0] > 1,
        torch.from_numpy(order).to(device),
    )


def program_order(full_num: np.ndarray, part_num: np.ndarray) -> np.ndarray:
    """Plan entries ``b * rows + row`` of ``(Bm, rows)`` tile counts, by estimated cost descending (stable: equal
    costs keep their tile order), int32 ``(Bm * rows,)``."""
    cost = (full_num.astype(np.float64) + PARTIAL_COST * part_num).reshape(-1)
    return np.argsort(-cost, kind="stable").astype(np.int32)


def tile_plan(mask, block_m: int, block_n: int, direction: str, device) -> TilePlan:
    """The :class:`TilePlan` of ``mask`` for tiles of ``block_m x block_n`` on ``device`` (cached on the mask).

    ``direction="kv"``: per query tile, the kv tiles (forward, dQ); ``"q"``: per kv tile, the query tiles (dK/dV).
    """
    if direction not in ("kv", "q"):
        raise ValueError(f"direction must be 'kv' or 'q', got {direction!r}")
    return mask.derived(_build_plan, block_m, block_n, direction, torch.device(device))


def _pack(allow: np.ndarray) -> np.ndarray:
    """bool ``(A, C)`` -> int32 ``(A, ceil(C / 32))`` bit words."""
    a, c = allow.shape
    words = max(1, -(-c // 32))
    packed = np.zeros((a, words), dtype=np.uint64)
    for j in range(c):
        packed[:, j // 32] |= allow[:, j].astype(np.uint64) << np.uint64(j % 32)
    return packed.astype(np.uint32).view(np.int32)


def _codes(seg: torch.Tensor, pos: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    seg, pos, lens = seg.long(), pos.long(), lens.long()  # (N,), (N,), (Bm, S)
    return torch.where(pos[None] < lens[:, seg], seg[None], -1).to(torch.int32)


def _build_kernel_mask(mask, device: torch.device) -> KernelMask:
    if mask.per_sample:
        # per-sample segment sizes: each sample's token codes and end offsets from its own layout, one row each (the
        # tile plan has a row per sample too); the rule bits are the mask's
        parts = [_build_kernel_mask(mask.sample(b), torch.device("cpu")) for b in range(mask.batch_size)]
        rows = {f: torch.cat([getattr(x, f) for x in parts]).to(device) for f in ("q_code", "k_code", "q_end", "k_end")}
        first = parts[0]._replace(
            **{f: getattr(parts[0], f).to(device) for f in ("q_bits", "k_bits", "q_cbits", "k_cbits")}
        )
        return first._replace(**rows)
    meta = mask.token_meta("cpu")
    q_code, k_code = _codes(meta.q_seg, meta.q_pos, meta.q_len), _codes(meta.k_seg, meta.k_pos, meta.k_len)
    bm = max(q_code.shape[0], k_code.shape[0])  # as the tile map: one side may broadcast over the batch
    allow = mask.allow.bool().numpy()
    q_bits, k_bits = _pack(allow), _pack(np.ascontiguousarray(allow.T))
    cells = mask.causal_cells.numpy()
    q_cbits, k_cbits = _pack(cells), _pack(np.ascontiguousarray(cells.T))
    # end offsets pos - valid_len: within a pair, key jl visible to query il iff jl - kl <= il - ql
    q_end = (meta.q_pos.long()[None] - meta.q_len.long()[:, meta.q_seg.long()]).to(torch.int32)
    k_end = (meta.k_pos.long()[None] - meta.k_len.long()[:, meta.k_seg.long()]).to(torch.int32)
    lo, hi = mask.band()
    off = mask.num_kv - mask.num_q
    return KernelMask(
        q_code.expand(bm, -1).contiguous().to(device),
        k_code.expand(bm, -1).contiguous().to(device),
        torch.from_numpy(q_bits).to(device),
        q_bits.shape[1],
        torch.from_numpy(k_bits).to(device),
        k_bits.shape[1],
        lo is not None,
        hi is not None,
        off + (lo or 0),
        off + (hi or 0),
        torch.from_numpy(q_cbits).to(device),
        torch.from_numpy(k_cbits).to(device),
        q_end.expand(bm, -1).contiguous().to(device),
        k_end.expand(bm, -1).contiguous().to(device),
        mask.has_causal_cells,
    )


def kernel_mask(mask, device) -> KernelMask:
    """The :class:`KernelMask` of ``mask`` on ``device`` (cached on the mask)."""
    return mask.derived(_build_kernel_mask, torch.device(device))


# ----------------------------------------------------------------------------------------- segment-aligned ranges
class RangePlan(NamedTuple):
    """Segment-aligned work of the forward kernel for tiles of ``block_m`` query rows and ``block_n``-key steps.

    Query segments are merged into **groups** — maximal runs of consecutive segments with the same rule row, which see
    the same keys — and each group is cut into query tiles that start at the group's first row (the last tile of a
    group is short; no tile mixes groups). For every **pattern** of per-sample key lengths (distinct rows of
    ``kv_lengths``; one pattern without lengths) and group, the plan lists the visible key **intervals**: the valid
    prefixes of the allowed key segments, adjacent ones merged. A program walks each interval from its unaligned start
    in steps of ``block_n`` with no mask, and masks only the interval's last step (``col < end``, keys past it never
    loaded) and, for causal masks, the steps that cross its rows' diagonal. Query padding is handled per row (its
    output is 0). Nothing is ``(B, Tq, Tk)``: sizes are O(tiles + patterns x groups x key segments).

    Shapes:
        tile_lo, tile_hi, tile_group: int32 ``(T,)`` — rows ``[lo, hi)`` of each query tile and its group.
        row_pattern: int32 ``(Bm,)`` — the key-length pattern of each plan row (sample, or the single row 0).
        iv_ptr: int32 ``(P, G + 1)`` — intervals of (pattern p, group g) are ``iv[iv_ptr[p, g]:iv_ptr[p, g + 1]]``.
        iv: int32 ``(max(I, 1), 2)`` — ``[start, end)`` key indices, ascending within a (pattern, group).
        order: int32 ``(Bm * T,)`` — entries ``row * T + tile``, heaviest first.
    """

    block_m: int
    block_n: int
    num_tiles: int
    num_groups: int
    tile_lo: torch.Tensor
    tile_hi: torch.Tensor
    tile_group: torch.Tensor
    row_pattern: torch.Tensor
    iv_ptr: torch.Tensor
    iv: torch.Tensor
    order: torch.Tensor
    per_sample: bool


def _starts(sizes) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)


def query_groups(mask) -> list[tuple[int, int, int]]:
    """``(row start, row end, rule row)`` of each group: consecutive non-empty query segments with equal rule rows."""
    allow = mask.allow.bool().numpy()
    sizes = np.asarray(mask.q_sizes, dtype=np.int64)
    starts = _starts(sizes)
    groups: list[tuple[int, int, int]] = []
    for a, (s, n) in enumerate(zip(starts, sizes)):
        if n == 0:
            continue
        if groups and groups[-1][1] == s and (allow[groups[-1][2]] == allow[a]).all():
            groups[-1] = (groups[-1][0], int(s + n), groups[-1][2])
        else:
            groups.append((int(s), int(s + n), a))
    return groups


def _build_ranges(mask, block_m: int, block_n: int, device: torch.device) -> RangePlan:
    allow = mask.allow.bool().numpy()
    k_sizes = np.asarray(mask.kv_sizes, dtype=np.int64)
    k_starts = _starts(k_sizes)
    bm = mask.batch_size or 1
    per_sample = mask.batch_size is not None
    k_lens = (
        mask.kv_lengths.long().numpy() if mask.kv_lengths is not None else np.broadcast_to(k_sizes, (bm, len(k_sizes)))
    )
    patterns, row_pattern = np.unique(k_lens.reshape(bm, -1), axis=0, return_inverse=True)
    groups = query_groups(mask)
    tiles = [(lo, min(lo + block_m, qe), g) for g, (qs, qe, _) in enumerate(groups) for lo in range(qs, qe, block_m)]
    iv, iv_ptr = [], np.zeros((len(patterns), len(groups) + 1), dtype=np.int32)
    for p, lens in enumerate(patterns):
        for g, (_, _, a) in enumerate(groups):
            iv_ptr[p, g] = len(iv)
            first = len(iv)
            for c in np.flatnonzero(allow[a]):
                lo, hi = int(k_starts[c]), int(k_starts[c] + lens[c])
                if hi <= lo:
                    continue
                if len(iv) > first and iv[-1][1] == lo:
                    iv[-1] = (iv[-1][0], hi)
                else:
                    iv.append((lo, hi))
        iv_ptr[p, len(groups)] = len(iv)
    iv_arr = np.asarray(iv or [(0, 0)], dtype=np.int32).reshape(-1, 2)
    # cost per (pattern, tile) in key steps, causal clipping included, for the program order
    _, band_hi = mask.band()
    off = int(mask.num_kv - mask.num_q)
    ti = np.asarray(tiles, dtype=np.int64).reshape(-1, 3)
    cost_pt = np.zeros((len(patterns), len(tiles)))
    for g in range(len(groups)):
        sel = np.flatnonzero(ti[:, 2] == g)
        last = ti[sel, 1] + off + band_hi if band_hi is not None else np.full(len(sel), np.iinfo(np.int64).max)
        for p in range(len(patterns)):
            for lo, hi in iv[iv_ptr[p, g] : iv_ptr[p, g + 1]]:
                cost_pt[p, sel] += np.maximum(0, -(-(np.minimum(hi, last) - lo) // block_n))
    cost = cost_pt[row_pattern.reshape(-1)]  # (Bm, T)
    order = np.argsort(-cost.reshape(-1), kind="stable").astype(np.int32)

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)

    return RangePlan(
        block_m,
        block_n,
        len(tiles),
        len(groups),
        dev(ti[:, 0]),
        dev(ti[:, 1]),
        dev(ti[:, 2]),
        dev(row_pattern.reshape(-1)),
        dev(iv_ptr),
        dev(iv_arr),
        dev(order),
        per_sample,
    )


def range_plan(mask, block_m: int, block_n: int, device) -> RangePlan:
    """The :class:`RangePlan` of ``mask`` for ``block_m``-row query tiles and ``block_n``-key steps on ``device``
    (cached on the mask)."""
    return mask.derived(_build_ranges, block_m, block_n, torch.device(device))


def _worth_it(mask, block_m: int) -> bool:
    uniform = -(-mask.num_q // block_m)
    aligned = sum(-(-(qe - qs) // block_m) for qs, qe, _ in query_groups(mask))
    return aligned <= 1.5 * max(uniform, 1)


def range_tiles_worth_it(mask, block_m: int) -> bool:
    """Whether segment-aligned query tiles keep the grid dense: at most 1.5x the tiles of a uniform grid (many tiny
    query groups — e.g. packing of short sequences — would leave most rows of each tile idle; they stay on the tile
    plan, whose partial tiles mix groups). Cached on the mask: it is asked on every forward call."""
    return mask.derived(_worth_it, block_m)


def forward_plan(mask, blocks, device):
    """``(plan, config)`` of the forward kernel for the :class:`~._config.Blocks` ``blocks`` (see
    :func:`~._config.forward_plan_kind`): a :class:`RangePlan` with ``blocks.forward(True)``, or the ``"kv"``
    :class:`TilePlan` with ``blocks.fwd``; always the tile plan for a mask whose band has a lower edge (a sliding
    window looking back)."""
    from ._config import forward_plan_kind

    kind = forward_plan_kind()
    cfg = blocks.forward(True)
    if mask.band()[0] is not None or mask.has_causal_cells or mask.per_sample:
        # a window's lower edge: the interval walk bounds keys from above only, the tile map skips below the band;
        # causal cells: the walk knows no per-pair diagonal, the tile plan's element mask does; per-sample sizes: its
        # groups are the segments of one layout
        kind = "tiles"
    if kind == "ranges" or (kind == "auto" and range_tiles_worth_it(mask, cfg.block_m)):
        return range_plan(mask, cfg.block_m, cfg.block_n, device), cfg
    return tile_plan(mask, blocks.fwd.block_m, blocks.fwd.block_n, "kv", device), blocks.fwd
