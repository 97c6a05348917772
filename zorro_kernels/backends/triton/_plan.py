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

__all__ = ["TilePlan", "KernelMask", "tile_plan", "kernel_mask", "program_order", "PARTIAL_COST"]

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
    """
    q_code: torch.Tensor
    k_code: torch.Tensor
    q_bits: torch.Tensor
    q_words: int
    k_bits: torch.Tensor
    k_words: int
    causal: bool
    causal_offset: int


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
    return TilePlan(block_m, block_n, full_idx.shape[1], full_idx.shape[2], runs.shape[2],
                    torch.from_numpy(run_num).to(device), torch.from_numpy(runs).to(device),
                    part_num.contiguous().to(device), part_idx.contiguous().to(device), full_num.shape[0] > 1,
                    torch.from_numpy(order).to(device))


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
    device = torch.device(device)
    return mask.cached(("triton_plan", block_m, block_n, direction, device),
                       lambda: _build_plan(mask, block_m, block_n, direction, device))


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


def kernel_mask(mask, device) -> KernelMask:
    """The :class:`KernelMask` of ``mask`` on ``device`` (cached on the mask)."""
    device = torch.device(device)

    def build():
        meta = mask.token_meta("cpu")
        q_code, k_code = _codes(meta.q_seg, meta.q_pos, meta.q_len), _codes(meta.k_seg, meta.k_pos, meta.k_len)
        bm = max(q_code.shape[0], k_code.shape[0])  # as the tile map: one side may broadcast over the batch
        allow = mask.allow.bool().numpy()
        q_bits, k_bits = _pack(allow), _pack(np.ascontiguousarray(allow.T))
        return KernelMask(q_code.expand(bm, -1).contiguous().to(device), k_code.expand(bm, -1).contiguous().to(device),
                          torch.from_numpy(q_bits).to(device), q_bits.shape[1],
                          torch.from_numpy(k_bits).to(device), k_bits.shape[1], bool(meta.causal),
                          int(meta.causal_offset))

    return mask.cached(("triton_kernel_mask", device), build)
