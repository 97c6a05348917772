"""xformers: convert an ``xformers.ops.fmha.attn_bias`` mask into a :class:`~zorro_kernels.ZorroMask`.

::

    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
    from zorro_kernels.integrations.xformers import from_xformers
    mask = from_xformers(BlockDiagonalCausalMask.from_seqlens([5, 3, 4]))
    # the same layout as ZorroMask.packed([5, 3, 4], causal=True)

Only the mask classes are used (they import without xformers' compiled kernels). Like xformers' block-diagonal
biases, the result is for a batch of 1 row holding every sequence: ``q``, ``k``, ``v`` of shape ``(1, H, N, D)``.

Expressible, hence converted:
    ====================================================  =================================================
    xformers bias                                         ZorroMask
    ====================================================  =================================================
    ``BlockDiagonalMask``                                 ``packed(q_seqlens, kv_seq_lens=k_seqlens)``
    ``BlockDiagonalCausalMask``                           the same, causal (*)
    ``BlockDiagonalCausalFromBottomRightMask``            the same, causal (*)
    ``BlockDiagonalPaddedKeysMask``                       key segments of ``kv_padding`` slots, ``kv_lengths``
    ``BlockDiagonalCausalWithOffsetPaddedKeysMask``       the same, causal (*)
    ``BlockDiagonalGappyKeysMask``                        key segments from ``seqstart``, ``kv_lengths``
    ``BlockDiagonalCausalWithOffsetGappyKeysMask``        the same, causal (*)
    ``LowerTriangularMask`` / ``...FromBottomRightMask``  one segment, causal (needs ``shape=``) (*)
    ``LocalAttentionFromBottomRightMask``                 one segment, ``window=(left, right)`` (``shape=``)
    ``LowerTriangularFromBottomRightLocalAttentionMask``  one segment, causal, ``window=(w - 1, -1)`` (``shape=``)
    ``BlockDiagonalCausalLocalAttentionMask``             packed, causal, ``window=(w - 1, -1)`` (*)
    ``...CausalLocalAttentionFromBottomRightMask``        the same (*)
    ``BlockDiagonalCausalLocalAttentionPaddedKeysMask``   padded keys, causal, ``window=(w - 1, -1)`` (*)
    ``BlockDiagonalLocalAttentionPaddedKeysMask``         padded keys, ``window=(left, right)`` (*)
    ====================================================  =================================================

(*) xformers aligns the causal diagonal per block (top-left, or bottom-right on the valid keys). Where every block's
diagonal lands on the row-wide one, ``key <= query + (Nk - Nq)`` (equal query and key counts per block, single-query
decoding, ...), the mask is the row-wide ``causal``/``window`` above. Otherwise each block's upper edge becomes a
causal rule cell, which a ZorroMask aligns bottom-right per segment pair over its valid tokens: a block whose
diagonal sits elsewhere (top-left with more keys than queries, ...) is split into a causal query segment and a full
one, or its unreachable keys become padding, so every diagonal is exact. A local bias's lower edge (its window's
left side) has no per-cell form: it stays the row-wide ``window``, and :func:`from_xformers` raises ValueError naming
the block where that edge lands elsewhere (checked row by row, only where it changes which keys a row sees).

Not expressible (ValueError naming the type): tensor biases
(``LowerTriangularMaskWithTensorBias``, plain tensors) and paged masks (their keys live in a page table).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from ..mask import ZorroMask, causal_offsets_agree
from ..tilemap import AllowRuns


def _drop_extension_warning(record: logging.LogRecord) -> bool:
    # Only the mask classes are used here, and they need none of xformers' compiled extensions: its warning that they
    # cannot load (always the case on CPU, or with a torch other than the one xformers was built for) does not apply.
    return "can't load C++/CUDA extensions" not in record.getMessage()


logging.getLogger("xformers").addFilter(_drop_extension_warning)
try:
    from xformers.ops.fmha import attn_bias as xab
except ImportError as e:  # pragma: no cover - exercised only without xformers
    raise ImportError(
        "zorro_kernels.integrations.xformers needs xformers (its mask classes; the kernels are not "
        "used): pip install xformers"
    ) from e
finally:  # scoped to our import: code that uses xformers' kernels itself still hears about them
    logging.getLogger("xformers").removeFilter(_drop_extension_warning)

__all__ = ["from_xformers"]

_TOP_LEFT, _BOTTOM_RIGHT = "top-left", "bottom-right"


def _row_intervals(q: int, valid: int, lo: Optional[int], hi: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``il`` of a ``q x valid`` block, the keys ``lo <= jl - il <= hi`` (None: unbounded) as ``[a, b)``, an
    empty one as ``[0, 0)``: O(q), no ``q x valid`` tensor."""
    il = torch.arange(q)
    a = torch.zeros_like(il) if lo is None else (il + lo).clamp(0, valid)
    b = torch.full_like(il, valid) if hi is None else (il + hi + 1).clamp(0, valid)
    empty = a >= b
    return torch.where(empty, 0, a), torch.where(empty, 0, b)


def _band_rows_agree(d: int, e: int, lo: Optional[int], hi: Optional[int], q: int, valid: int) -> bool:
    """Do bands ``d + lo <= jl - il <= d + hi`` and ``e + lo <= jl - il <= e + hi`` (None: unbounded) select the same
    keys of a ``q x valid`` block? Compared row by row on the clipped key intervals."""
    if d == e or q == 0 or valid == 0:
        return True

    def shift(x, off):
        return None if x is None else x + off

    (a1, b1), (a2, b2) = (_row_intervals(q, valid, shift(lo, o), shift(hi, o)) for o in (d, e))
    return bool(torch.equal(a1, a2) and torch.equal(b1, b2))


def _build(
    bias,
    q_lens: Sequence[int],
    k_starts: Sequence[int],
    k_lens: Sequence[int],
    k_total: int,
    causal: Optional[str],
    window: Optional[tuple[int, int]] = None,
    align: Optional[str] = None,
) -> ZorroMask:
    """Block i: queries ``q_lens[i]`` (contiguous), keys ``[k_starts[i], k_starts[i] + k_lens[i])``. ``causal``: the
    alignment of a causal diagonal per block, or None; ``window``: a sliding window ``(left, right)`` aligned as
    ``align`` per block (the causal alignment when causal)."""
    name = type(bias).__name__
    n = len(q_lens)
    if n == 0 or len(k_lens) != n or len(k_starts) != n:
        raise ValueError(f"{name}: {len(q_lens)} query blocks but {len(k_lens)} key blocks")
    kv_segments, kv_lengths, names = [], [], [f"seq{i}" for i in range(n)]
    if k_starts[0] > 0:  # keys before the first block: a segment nobody sees
        kv_segments.append(("_gap", k_starts[0]))
        kv_lengths.append(0)
    ends = list(k_starts[1:]) + [k_total]
    for i in range(n):
        if ends[i] < k_starts[i]:
            raise ValueError(
                f"{name}: key block {i} starts at {k_starts[i]}, after the next one at {ends[i]}: "
                f"out-of-order key blocks are not expressible"
            )
        if k_lens[i] < 0 or k_starts[i] + k_lens[i] > ends[i]:
            raise ValueError(
                f"{name}: key block {i} spans [{k_starts[i]}, {k_starts[i] + k_lens[i]}), overlapping "
                f"the next block at {ends[i]}: overlapping key blocks are not expressible"
            )
        kv_segments.append((names[i], ends[i] - k_starts[i]))
        kv_lengths.append(k_lens[i])
    lo, hi = _bias_band(causal is not None, window)
    align = causal or align
    if _row_band_fits(q_lens, k_starts, k_lens, k_total, lo, hi, align):
        allow = torch.zeros(len(q_lens), len(kv_segments), dtype=torch.bool)
        first = len(kv_segments) - n
        allow[torch.arange(n), first + torch.arange(n)] = True
        q_segments = list(zip(names, q_lens))
        is_causal = causal is not None
        padded = any(length != size for (_, size), length in zip(kv_segments, kv_lengths))
        if kv_segments == q_segments and not padded:  # self-attention only when no key slot is padded
            return ZorroMask(q_segments, allow, causal=is_causal, window=window)
        return ZorroMask(
            q_segments,
            allow,
            kv_segments=kv_segments,
            kv_lengths=torch.tensor([kv_lengths]) if padded else None,
            causal=is_causal,
            window=window,
        )
    # The row-wide diagonal misses some block's: each block's upper edge becomes a causal cell instead, and only the
    # lower edge (a window's left side) is left to the row-wide band.
    _check_band_per_block(bias, q_lens, k_starts, k_lens, k_total, lo, hi, align)
    return _per_block_cells(q_lens, k_lens, kv_segments, kv_lengths, lo, hi, align)


def _bias_band(causal: bool, window: Optional[tuple[int, int]]) -> tuple[Optional[int], Optional[int]]:
    """The bias's band ``lo <= jl - il - e <= hi`` around its per-block diagonal ``e`` (None: unbounded)."""
    lo = hi = None
    if window is not None:
        left, right = window
        lo = -left if left >= 0 else None
        hi = right if right >= 0 else None
    if causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def _offsets(q_lens, k_starts, k_lens, k_total, align):
    """Per block: ``(queries, valid keys, d, e)``: the row-wide diagonal ``key = query + Nk - Nq`` (d) and the
    bias's per-block one (e), both in block-local coordinates."""
    nq = sum(q_lens)
    q_start = 0
    for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        d = (q_start - k_starts[i]) + (k_total - nq)
        e = 0 if align == _TOP_LEFT else kl - ql
        yield i, ql, kl, d, e
        q_start += ql


def _row_band_fits(q_lens, k_starts, k_lens, k_total, lo, hi, align) -> bool:
    """Does the row-wide band (causal flag and window at ``key - query = Nk - Nq``) give every block its keys?"""
    if lo is None and hi is None:
        return True
    for _, ql, kl, d, e in _offsets(q_lens, k_starts, k_lens, k_total, align):
        if lo is None and hi == 0:
            if not causal_offsets_agree(d, e, ql, kl):
                return False
        elif not _band_rows_agree(d, e, lo, hi, ql, kl):
            return False
    return True


def _per_block_cells(q_lens, k_lens, kv_segments, kv_lengths, lo, hi, align) -> ZorroMask:
    """Block i's upper edge ``jl <= il + u`` (``u = e + hi``) as a causal cell, which ZorroMask aligns bottom-right
    over the pair's valid tokens (``jl <= il + kl - ql``). Any ``u`` fits that form: the first ``kl - u`` queries are
    the cell (the rest see every key, a full cell), or, when the block has fewer queries, the keys past ``ql + u``
    (which no query reaches) become padding. The lower edge ``lo`` stays the row-wide window's (checked already)."""
    n = len(q_lens)
    first = len(kv_segments) - n
    kv_lengths = list(kv_lengths)
    q_segments, rows, cols, kinds = [], [], [], []
    for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        c = first + i
        u = None if hi is None else (0 if align == _TOP_LEFT else kl - ql) + hi
        if ql == 0 or u is None or u >= kl - 1:  # every query sees every valid key
            q_segments.append((f"seq{i}", ql))
            rows.append(len(q_segments) - 1), cols.append(c), kinds.append(False)
            continue
        if u <= -ql:  # no query reaches a key
            q_segments.append((f"seq{i}", ql))
            continue
        q_cell = min(ql, kl - u)
        kv_lengths[c] = q_cell + u
        q_segments.append((f"seq{i}", q_cell))
        rows.append(len(q_segments) - 1), cols.append(c), kinds.append(True)
        if ql > q_cell:
            q_segments.append((f"seq{i}_rest", ql - q_cell))
            rows.append(len(q_segments) - 1), cols.append(c), kinds.append(False)
    row, col = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    kind = np.asarray(kinds, dtype=bool)
    runs = AllowRuns(len(q_segments), len(kv_segments), row, col, col + 1, kind if kind.any() else None)
    padded = any(length != size for (_, size), length in zip(kv_segments, kv_lengths))
    return ZorroMask(
        q_segments,
        runs,
        kv_segments=kv_segments,
        kv_lengths=torch.tensor([kv_lengths]) if padded else None,
        window=None if lo is None else (-lo, -1),
    )


def _check_band_per_block(bias, q_lens, k_starts, k_lens, k_total, lo, hi, align: str) -> None:
    """Raise unless the row-wide window's lower edge (``key - query >= Nk - Nq + lo``) selects, inside every block,
    the keys the bias's lower edge (aligned ``align``) selects; the upper edges are causal cells, exact anyway."""
    if lo is None:
        return
    for i, ql, kl, d, e in _offsets(q_lens, k_starts, k_lens, k_total, align):
        u = None if hi is None else e + hi  # the upper edge, a causal cell: the same on both sides
        if d == e or ql == 0 or kl == 0:
            continue
        (a1, b1), (a2, b2) = (_row_intervals(ql, kl, off + lo, u) for off in (d, e))
        if not (torch.equal(a1, a2) and torch.equal(b1, b2)):
            raise ValueError(
                f"{type(bias).__name__}: block {i} ({ql} queries, {kl} keys) has its local band's lower edge "
                f"(window left {-lo}) aligned {align} at offset {e} inside the block, but a ZorroMask's window is one "
                f"band for the whole row (key - query >= {lo} + Nk - Nq), which puts it at offset {d}: not "
                f"expressible (each block's upper edge can be its own causal cell, its lower edge cannot)"
            )


def from_xformers(bias, *, shape: Optional[tuple[int, int]] = None) -> ZorroMask:
    """The :class:`~zorro_kernels.ZorroMask` equal to an xformers attention bias (see the module docstring).

    Args:
        bias: an ``xformers.ops.fmha.attn_bias.AttentionBias`` (block-diagonal family or lower-triangular).
        shape: ``(Nq, Nk)``, only for ``LowerTriangularMask``/``LowerTriangularFromBottomRightMask``, which do not
            know their size.

    Returns:
        A mask over ``Nq`` queries and ``Nk`` keys with ``mask.to_dense() == (bias.materialize((Nq, Nk)) == 0)``
        (rows that see nothing aside: xformers leaves them undefined, zorro returns 0). Lengths, when the bias has
        padded or gappy keys, are for a batch of 1.

    Raises:
        TypeError for an object that is not an xformers bias; ValueError naming the type (and block) for a bias a
        ZorroMask cannot express.
    """
    name = type(bias).__name__
    if isinstance(bias, torch.Tensor):
        raise ValueError("a dense tensor bias is not a layout; build a ZorroMask from the structure it encodes")
    if not isinstance(bias, xab.AttentionBias):
        raise TypeError(f"bias must be an xformers AttentionBias, got {name}")
    if type(bias) in _local_types():
        return _from_local(bias, shape)
    if isinstance(bias, xab.LowerTriangularMaskWithTensorBias):
        raise ValueError(f"{name}: an additive tensor bias is not expressible as a ZorroMask")
    if "Paged" in name:
        raise ValueError(f"{name}: paged keys (a block table) are not expressible as a ZorroMask")
    if shape is not None and not isinstance(bias, (xab.LowerTriangularMask, xab.LowerTriangularFromBottomRightMask)):
        raise ValueError(f"shape= is only for LowerTriangularMask/LowerTriangularFromBottomRightMask, not {name}")

    if type(bias) in (xab.LowerTriangularMask, xab.LowerTriangularFromBottomRightMask):
        if shape is None or len(shape) != 2:
            raise ValueError(f"{name} does not know its size: pass shape=(Nq, Nk), got {shape!r}")
        nq, nk = (int(s) for s in shape)
        align = _TOP_LEFT if type(bias) is xab.LowerTriangularMask else _BOTTOM_RIGHT
        return _build(bias, [nq], [0], [nk], nk, align)

    exact = {
        xab.BlockDiagonalMask: None,
        xab.BlockDiagonalCausalMask: _TOP_LEFT,
        xab.BlockDiagonalCausalFromBottomRightMask: _BOTTOM_RIGHT,
        xab.BlockDiagonalPaddedKeysMask: None,
        xab.BlockDiagonalCausalWithOffsetPaddedKeysMask: _BOTTOM_RIGHT,
        xab.BlockDiagonalGappyKeysMask: None,
        xab.BlockDiagonalCausalWithOffsetGappyKeysMask: _BOTTOM_RIGHT,
    }
    # exact type, not isinstance: a subclass may change the semantics (as the local-attention ones do)
    if type(bias) not in exact:
        raise ValueError(
            f"{name} is not an xformers bias zorro knows how to express; supported: "
            f"{sorted(c.__name__ for c in exact)} and LowerTriangularMask(FromBottomRight) with shape="
        )
    causal = exact[type(bias)]
    q_starts = list(bias.q_seqinfo.seqstart_py)
    q_lens = [b - a for a, b in zip(q_starts[:-1], q_starts[1:])]
    kinfo = bias.k_seqinfo
    k_starts = list(kinfo.seqstart_py[:-1])
    k_total = kinfo.seqstart_py[-1]
    if hasattr(kinfo, "seqlen_py"):  # padded / gappy keys: each block's valid keys start its slot
        k_lens = list(kinfo.seqlen_py)
    else:
        k_lens = [b - a for a, b in zip(k_starts, list(k_starts[1:]) + [k_total])]
    return _build(bias, q_lens, k_starts, k_lens, k_total, causal)


def _local_types() -> dict:
    """xformers' local (sliding-window) biases, by exact type: ``(causal alignment or None, window alignment,
    window (left, right) of an instance)``. A causal window of ``w`` keys is ``causal`` plus ``window=(w - 1, -1)``."""
    kinds = {
        "LocalAttentionFromBottomRightMask": (None, _BOTTOM_RIGHT, lambda b: (b.window_left, b.window_right)),
        "LowerTriangularFromBottomRightLocalAttentionMask": (_BOTTOM_RIGHT, _BOTTOM_RIGHT, _causal_window),
        "BlockDiagonalCausalLocalAttentionMask": (_TOP_LEFT, _TOP_LEFT, _causal_window),
        "BlockDiagonalCausalLocalAttentionFromBottomRightMask": (_BOTTOM_RIGHT, _BOTTOM_RIGHT, _causal_window),
        "BlockDiagonalCausalLocalAttentionPaddedKeysMask": (_BOTTOM_RIGHT, _BOTTOM_RIGHT, _causal_window),
        "BlockDiagonalLocalAttentionPaddedKeysMask": (
            None,
            _BOTTOM_RIGHT,
            lambda b: (b.window_left, b.window_right),
        ),
    }
    return {getattr(xab, c): v for c, v in kinds.items() if hasattr(xab, c)}


def _causal_window(bias) -> tuple[int, int]:
    return (bias._window_size - 1, -1)


def _from_local(bias, shape) -> ZorroMask:
    """A local bias as ``window=`` (and ``causal``), or ValueError where a block's band does not land on the row's."""
    causal, align, window_of = _local_types()[type(bias)]
    window = window_of(bias)
    name = type(bias).__name__
    if not hasattr(bias, "q_seqinfo"):  # one block, size from shape=
        if shape is None or len(shape) != 2:
            raise ValueError(f"{name} does not know its size: pass shape=(Nq, Nk), got {shape!r}")
        nq, nk = (int(s) for s in shape)
        return _build(bias, [nq], [0], [nk], nk, causal, window, align)
    if shape is not None:
        raise ValueError(f"shape= is only for biases that do not know their size, not {name}")
    q_starts = list(bias.q_seqinfo.seqstart_py)
    q_lens = [b - a for a, b in zip(q_starts[:-1], q_starts[1:])]
    kinfo = bias.k_seqinfo
    k_starts = list(kinfo.seqstart_py[:-1])
    k_total = kinfo.seqstart_py[-1]
    if hasattr(kinfo, "seqlen_py"):
        k_lens = list(kinfo.seqlen_py)
    else:
        k_lens = [b - a for a, b in zip(k_starts, list(k_starts[1:]) + [k_total])]
    return _build(bias, q_lens, k_starts, k_lens, k_total, causal, window, align)
