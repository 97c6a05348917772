"""Modality layouts: which query token may attend which key token.

A :class:`ZorroMask` describes attention over a token sequence made of *contiguous named segments* (``audio``,
``video``, ``fusion``, ... in token order) with a *rule* per query segment naming the key segments it may see. Optional
per-sample ``lengths`` mark the tail of each segment as padding. Everything the kernels need (tile maps, per-token
metadata, the execution plan of the CPU path) is derived from this small description — never from an ``Nq x Nk`` matrix,
which only :meth:`ZorroMask.to_dense` builds, on purpose slowly, as the oracle for tests.

The paper's rule (Recasens et al., 2023)::

    keys ->      audio   video   fusion
    audio        ####    ....    ..
    video        ....    ####    ..
    fusion       ####    ####    ##

Semantics, for sample ``b``: the token at position ``p`` (0-based inside its segment ``s``) is valid iff
``p < lengths[b, s]``. A valid query may attend a valid key iff the rules allow (query segment, key segment) and, when
``causal=True``, the key's index ``j`` and the query's index ``i`` satisfy ``j <= i + (Nk - Nq)`` (bottom-right aligned,
as flash-attention does). The diagonal is aligned to the full sizes ``Nq``/``Nk``, not to each sample's valid lengths:
flash-attn's varlen functions and xformers' ``...WithOffsetPaddedKeysMask`` align it to each sample's (or block's)
valid keys instead, so with key padding and ``causal`` the two agree only where the padding does not move the
diagonal (causal rule cells, below, align per segment pair instead: ``integrations.xformers.from_xformers`` uses
them where it does). With a sliding ``window=(left, right)`` (flash-attention's ``window_size``) it must also satisfy
``i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right``, ``-1`` leaving that side unbounded. A query row with no key
it may attend returns exactly 0 with zero gradients.

A sliding window of 2 keys back on one 6-token segment (``window=(2, 0)``, the same as ``(2, -1)`` with ``causal``)::

    keys ->  0 1 2 3 4 5
    q 0      #
    q 1      # #
    q 2      # # #
    q 3        # # #
    q 4          # # #
    q 5            # # #
"""

from __future__ import annotations

import fnmatch
import hashlib
import numbers
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch

from .caching import Derived, tensor_key
from .tilemap import AllowRuns, build_tile_map, build_token_meta, pairs_below

__all__ = ["ZorroMask"]

Rule = Union[str, Sequence[str]]
SegmentSpec = Sequence[tuple[str, int]]
ALL = "*"  # rule value: every key segment
SELF = "self"  # rule value: the key segment with the query segment's own name (group-local rules)
FULL_CELL, CAUSAL_CELL = "full", "causal"  # rule cell kinds in a rules dict {key pattern: kind}
CAUSAL = 2  # a causal cell in an integer kind table (0 none, 1 full)
_GLOB = set("*?[")
# the most tokens a side (query or key) may hold, and the widest window side: the kernels index tokens with int32, and
# the pair counts (Nq * Nk, banded lattice sums) then stay inside int64
MAX_TOKENS = 2**31 - 1


def _check_segments(segments, arg: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise TypeError(f"{arg} must be a sequence of (name, size) pairs, got {type(segments).__name__}")
    if len(segments) == 0:
        raise ValueError(f"{arg} must name at least one segment, got an empty sequence")
    names, sizes, first = [], [], {}
    for i, item in enumerate(segments):
        # the common (str, int) tuple skips the abstract-class checks below, a mask's largest fixed cost
        plain = type(item) is tuple and len(item) == 2 and type(item[0]) is str and type(item[1]) is int
        if not (
            plain
            or (
                (type(item) in (tuple, list) or (isinstance(item, Sequence) and not isinstance(item, (str, bytes))))
                and len(item) == 2
            )
        ):
            raise TypeError(f"{arg}[{i}] must be a (name, size) pair, got {item!r}")
        name, size = item
        if not isinstance(name, str) or not name:
            raise TypeError(f"{arg}[{i}]: segment name must be a non-empty str, got {name!r}")
        if not plain and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
            if (
                isinstance(size, torch.Tensor)
                and size.numel() == 1
                and not size.is_floating_point()
                and size.dtype != torch.bool
            ):
                size = int(size)
            else:
                raise TypeError(f"{arg}[{i}] ({name!r}): size must be an int, got {type(size).__name__} {size!r}")
        if not 0 <= size <= MAX_TOKENS:
            raise ValueError(f"{arg}[{i}] ({name!r}): size must be in [0, {MAX_TOKENS}], got {int(size)}")
        if name == SELF or _GLOB & set(name):
            raise ValueError(f"{arg}[{i}]: segment name {name!r} is reserved or holds a glob character (*?[)")
        if first.setdefault(name, i) != i:
            raise ValueError(f"{arg}: duplicate segment name {name!r} (at positions {first[name]} and {i})")
        names.append(name)
        sizes.append(int(size))
    if sum(sizes) == 0:
        raise ValueError(f"{arg}: the segments hold no tokens (all sizes are 0)")
    if sum(sizes) > MAX_TOKENS:
        raise ValueError(f"{arg}: the segments hold {sum(sizes)} tokens in all, more than {MAX_TOKENS}")
    return tuple(names), tuple(sizes)


def as_int_tensor(x, arg: str, shape: str) -> torch.Tensor:
    """``x`` (a tensor or anything ``torch.as_tensor`` takes) as an integer tensor; else a TypeError naming ``arg``
    and the ``shape`` it should have (text, e.g. ``"(B, 3)"``). Shape and values are the caller's to check."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)):
            _check_int_leaves(x, arg)
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{arg} must be an int tensor of shape {shape}, got {type(x).__name__}") from e
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{arg} must have an integer dtype, got {x.dtype}")
    if x.dtype == torch.uint64 and x.numel() and bool((x.view(torch.int64) < 0).any()):
        # values past int64 would wrap to negatives on the way to int64: name the real one
        raise ValueError(f"{arg} holds {int(x.view(torch.int64)[x.view(torch.int64) < 0][0]) + 2**64}, beyond int64")
    return x


def _check_int_leaves(x, arg: str) -> None:
    """Refuse what ``torch.as_tensor`` would silently turn into an int (a bool) or fail on with a message naming
    nothing (an int beyond int64), in a nested list of ints."""
    stack = [x]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, bool):
            raise TypeError(f"{arg} must hold ints, got a bool ({item})")
        elif isinstance(item, numbers.Integral) and not -(2**63) <= item < 2**63:
            raise ValueError(f"{arg} holds {int(item)}, beyond int64")


def _check_lengths(
    lengths, sizes: tuple[int, ...], names: tuple[str, ...], arg: str, per_sample: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """``lengths (B, S)`` checked against the segments' ``sizes``, or their per-sample sizes ``(B', S)`` when given."""
    if lengths is None:
        return None
    lengths = as_int_tensor(lengths, arg, f"(B, {len(sizes)})")
    if lengths.ndim != 2 or lengths.shape[1] != len(sizes):
        raise ValueError(
            f"{arg} must have shape (B, n_segments) = (B, {len(sizes)}) for segments {list(names)}, "
            f"got {tuple(lengths.shape)}"
        )
    if lengths.shape[0] == 0:
        raise ValueError(f"{arg} must hold at least one sample, got shape {tuple(lengths.shape)}")
    lengths = lengths.detach().to(device="cpu", dtype=torch.int64)
    if (lengths < 0).any():
        b, s = (lengths < 0).nonzero()[0].tolist()
        raise ValueError(f"{arg}[{b}, {s}] ({names[s]!r}) = {int(lengths[b, s])} is negative")
    if per_sample is not None:
        if per_sample.shape[0] != lengths.shape[0]:
            raise ValueError(
                f"{arg} and the per-sample sizes disagree on the batch size: {lengths.shape[0]} vs "
                f"{per_sample.shape[0]}"
            )
        over = lengths > per_sample
        if over.any():
            b, s = over.nonzero()[0].tolist()
            raise ValueError(
                f"{arg}[{b}, {s}] = {int(lengths[b, s])} exceeds sample {b}'s size {int(per_sample[b, s])} of "
                f"segment {names[s]!r}"
            )
    else:
        over = lengths > torch.tensor(sizes, dtype=torch.int64)
        if over.any():
            b, s = over.nonzero()[0].tolist()
            raise ValueError(
                f"{arg}[{b}, {s}] = {int(lengths[b, s])} exceeds the size {sizes[s]} of segment {names[s]!r}"
            )
    return lengths.clone(memory_format=torch.contiguous_format)  # our own copy: the caller may edit theirs


def _check_sample_sizes(sizes, total: int, names: tuple[str, ...], arg: str) -> Optional[torch.Tensor]:
    """Per-sample segment sizes ``(B, S)``: non-negative, each sample's summing to the layout's ``total`` tokens."""
    if sizes is None:
        return None
    t = as_int_tensor(sizes, arg, f"(B, {len(names)})")
    if t.ndim != 2 or t.shape[1] != len(names) or t.shape[0] == 0:
        raise ValueError(
            f"{arg} must have shape (B, n_segments) = (B, {len(names)}) with B >= 1 for segments "
            f"{_short(names)}, got {tuple(t.shape)}"
        )
    t = t.detach().to(device="cpu", dtype=torch.int64)
    if (t < 0).any():
        b, c = (t < 0).nonzero()[0].tolist()
        raise ValueError(f"{arg}[{b}, {c}] ({names[c]!r}) = {int(t[b, c])} is negative")
    sums = t.sum(1)
    if (sums != total).any():
        b = int((sums != total).nonzero()[0])
        raise ValueError(
            f"{arg}[{b}] sums to {int(sums[b])} tokens, but the segments hold {total}: each sample's "
            f"sizes must sum to the same N (no padding between segments; mark padding with lengths)"
        )
    return t.clone(memory_format=torch.contiguous_format)


def _match(pattern: str, names: tuple[str, ...], index: dict[str, int]) -> list[int]:
    """Indices of the segments a rule names: an exact name, or a glob (``video/*``) over the names."""
    if pattern in index:
        return [index[pattern]]
    if _GLOB & set(pattern):
        return [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    return []


def _rules_to_allow(rules, q_names, kv_names) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(allow, causal)`` bool ``(Sq, Sk)`` tables of a rules mapping (``causal`` None when no cell is causal)."""
    if not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a mapping query segment -> key segments (or '*'), got {type(rules).__name__}")
    q_index = {n: i for i, n in enumerate(q_names)}
    kv_index = {n: i for i, n in enumerate(kv_names)}
    kinds = torch.zeros(len(q_names), len(kv_names), dtype=torch.int8)  # 0 none, 1 full, CAUSAL

    # Whether any rule says "causal" is known from the rules alone: without one no cell can clash and no table value
    # is branched on, so a mask of plain rules builds inside a torch.compile trace (transformers' mask interface)
    causal_rules = False

    def put(q_pat, k_pat, rows, cols, kind):
        if not causal_rules:
            kinds[rows[:, None], cols[None, :]] = kind
            return
        cells = kinds[rows[:, None], cols[None, :]]
        clash = (cells != 0) & (cells != kind)
        if clash.any():
            a, c = clash.nonzero()[0].tolist()
            raise ValueError(
                f"rules[{q_pat!r}][{k_pat!r}] makes cell ({q_names[int(rows[a])]!r}, {kv_names[int(cols[c])]!r}) "
                f"{'causal' if kind == CAUSAL else 'full'}, but another rule made it "
                f"{'full' if kind == CAUSAL else 'causal'}"
            )
        kinds[rows[:, None], cols[None, :]] = kind

    for q_pat, seen in rules.items():
        if not isinstance(q_pat, str):
            raise TypeError(f"rules keys must be segment names (str), got {q_pat!r}")
        rows = _match(q_pat, q_names, q_index)
        if not rows:
            raise ValueError(f"rules names unknown query segment {q_pat!r}; query segments are {_short(q_names)}")
        if isinstance(seen, str):
            seen = [seen]
        if isinstance(seen, Mapping):
            items = list(seen.items())
            causal_rules = causal_rules or any(kind == CAUSAL_CELL for kind in seen.values())
        elif isinstance(seen, (Sequence, set, frozenset)):
            items = [(k, FULL_CELL) for k in seen]
        else:
            raise TypeError(
                f"rules[{q_pat!r}] must be '*', 'self', a list of key segment names or a dict "
                f"{{key segment: 'full' | 'causal'}}, got {seen!r}"
            )
        for k_pat, kind in items:
            if not isinstance(k_pat, str):
                raise TypeError(f"rules[{q_pat!r}] must name key segments (str), got {k_pat!r}")
            if kind not in (FULL_CELL, CAUSAL_CELL):
                raise ValueError(f"rules[{q_pat!r}][{k_pat!r}] must be 'full' or 'causal', got {kind!r}")
            code = CAUSAL if kind == CAUSAL_CELL else 1
            if k_pat == SELF:  # group-local: each query segment sees the key segment of the same name
                for i in rows:
                    if q_names[i] not in kv_index:
                        raise ValueError(
                            f"rules[{q_pat!r}] = 'self' but there is no key segment named "
                            f"{q_names[i]!r}; key segments are {_short(kv_names)}"
                        )
                    put(q_pat, k_pat, torch.tensor([i]), torch.tensor([kv_index[q_names[i]]]), code)
                continue
            cols = _match(k_pat, kv_names, kv_index)
            if not cols:
                raise ValueError(
                    f"rules[{q_pat!r}] names unknown key segment {k_pat!r}; key segments are {_short(kv_names)}"
                )
            put(q_pat, k_pat, torch.tensor(rows), torch.tensor(cols), code)
    return kinds != 0, (kinds == CAUSAL) if causal_rules else None


def _short(names: tuple[str, ...], n: int = 12) -> str:
    return str(list(names)) if len(names) <= n else str(list(names[:n]))[:-1] + f", ... ({len(names)} in all)]"


def _check_window(window) -> Optional[tuple[int, int]]:
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints (-1 = unbounded) or None, got {window!r}")
    for side, w in zip(("left", "right"), window):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {side} must be an int, got {type(w).__name__} {w!r}")
        if not -1 <= w <= MAX_TOKENS:
            # a wider side already spans every token a mask can hold; the bound keeps band arithmetic inside int64
            raise ValueError(f"window {side} must be in [0, {MAX_TOKENS}] (or -1 for unbounded), got {int(w)}")
    window = (int(window[0]), int(window[1]))
    return None if window == (-1, -1) else window


def _check_causal_cells(cells, allow: torch.Tensor, shape: tuple) -> Optional[torch.Tensor]:
    """``causal_cells`` as a CPU bool table of ``allow``'s shape, its cells all allowed (None when it marks none)."""
    if not isinstance(cells, torch.Tensor):
        cells = torch.as_tensor(cells)
    if cells.dtype != torch.bool:
        raise TypeError(f"causal_cells must be a bool tensor, got dtype {cells.dtype}")
    if tuple(cells.shape) != shape:
        raise ValueError(f"causal_cells must have the shape of allow, {shape}, got {tuple(cells.shape)}")
    cells = cells.detach().to("cpu")
    stray = cells & ~torch.as_tensor(allow).detach().to("cpu")
    if stray.any():
        a, c = stray.nonzero()[0].tolist()
        raise ValueError(f"causal_cells[{a}, {c}] is True but allow[{a}, {c}] is False: a causal cell must be allowed")
    return cells if bool(cells.any()) else None


def content_key(
    q_sizes,
    kv_sizes,
    is_self: bool,
    causal: bool,
    allow: torch.Tensor,
    lengths: Optional[torch.Tensor],
    kv_lengths: Optional[torch.Tensor],
    window: Optional[Sequence[int]] = None,
    sample_sizes: Optional[torch.Tensor] = None,
    kv_sample_sizes: Optional[torch.Tensor] = None,
) -> str:
    """Digest of a mask's description (see :attr:`ZorroMask.key`); ``kv_lengths`` is None for self-attention."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(q_sizes), tuple(kv_sizes), bool(is_self), bool(causal))).encode())
    if window is not None:
        h.update(repr(("window", tuple(window))).encode())
    # the rule table by its runs (with their kinds): a dense table and the runs it has give one key, at a cost linear
    # in the runs; an integer table holds the kinds (0 none, 1 full, 2 causal, as :func:`_ops.describe` passes it)
    if not isinstance(allow, AllowRuns):
        allow = allow.detach().cpu()
        allow = AllowRuns.from_dense(allow != 0, None if allow.dtype == torch.bool else allow == CAUSAL)
    h.update(allow.digest_bytes())
    for t in (lengths, kv_lengths):  # as int64: a mask's content, not how its tensors were typed
        h.update(b"-" if t is None else repr(tensor_key(t.to(torch.int64))).encode())
    for t in (sample_sizes, kv_sample_sizes):
        if t is not None:
            h.update(b"sizes" + repr(tensor_key(t.to(torch.int64))).encode())
    return h.hexdigest()


def _band_pairs(q_st, k_st, ql, kl, a, c, lo, hi, cell) -> np.ndarray:
    """Pairs ``(i, j)`` with ``lo <= j - i <= hi`` (None: unbounded) in the valid rectangle of each segment pair
    ``(a[p], c[p])``, and, where ``cell[p]`` (bool, broadcast), on or below the pair's bottom-right diagonal:
    int64 ``(Bm, P)``. ``q_st``/``k_st``: segment starts; ``ql (Bm, Sq)``/``kl (Bm, Sk)``: valid tokens."""
    i0 = q_st[a][None].astype(np.int64)  # rows i in [i0, i1)
    i1 = i0 + ql[:, a]
    j0 = k_st[c][None].astype(np.int64)
    w = kl[:, c]
    upper = np.broadcast_to(j0 + w - i0, i1.shape)  # every pair of the rectangle
    if hi is not None:
        upper = np.minimum(upper, hi)
    # a causal cell: jl <= il + (kl - ql), i.e. j - i <= (j0 - i0) + w - (i1 - i0)
    upper = np.where(cell, np.minimum(upper, (j0 - i0) + w - (i1 - i0)), upper)
    counts = pairs_below(i0, i1, j0, w, upper)
    if lo is not None:
        counts = counts - pairs_below(i0, i1, j0, w, lo - 1)
    return np.maximum(counts, 0)


def _content_key(mask: "ZorroMask") -> str:
    return content_key(
        mask.q_sizes,
        mask.kv_sizes,
        mask.is_self,
        mask.causal,
        mask._runs,
        mask.lengths,
        None if mask.is_self else mask.kv_lengths,
        mask.window,
        mask._sample_sizes,
        None if mask.is_self else mask._kv_sample_sizes,
    )


def _tile_map(mask: "ZorroMask", block_m: int, block_n: int, device: torch.device):
    if device.type == "cpu":
        return build_tile_map(mask, block_m, block_n)
    return mask.tile_map(block_m, block_n, "cpu").to(device)


def _token_meta(mask: "ZorroMask", device: torch.device):
    return build_token_meta(mask).to(device)


# up to this many cells (bytes) a rule table given as runs is also kept dense: torch.compile traces read the dense
# table and cannot build it (beyond, a compiled call builds it on first use, outside any trace, or fails to trace)
_DENSE_ALLOW_CELLS = 1 << 22


def _dense_allow(mask: "ZorroMask") -> torch.Tensor:
    return mask._runs.dense()


def _dense_causal(mask: "ZorroMask") -> torch.Tensor:
    return mask._runs.dense_causal()


def _sample_view(mask: "ZorroMask", b: int) -> "ZorroMask":
    if not 0 <= b < (mask.batch_size or 1):
        raise IndexError(f"sample {b} out of range for a mask of {mask.batch_size or 1} samples")
    qs = mask.q_sizes if mask._sample_sizes is None else tuple(mask._sample_sizes[b].tolist())
    ks = mask.kv_sizes if mask._kv_sample_sizes is None else tuple(mask._kv_sample_sizes[b].tolist())
    # assembled from the mask's own checked fields, without the constructor's checks: the sample's sizes and lengths
    # were checked with the mask (a per-sample plan builds one view per distinct sample, on every new mask)
    view = object.__new__(ZorroMask)
    fields = dict(vars(mask))
    fields.update(
        q_sizes=qs,
        kv_sizes=qs if mask.is_self else ks,
        _sample_sizes=None,
        _kv_sample_sizes=None,
        _lengths=None if mask._lengths is None else mask._lengths[b : b + 1],
        _cache={},
    )
    if mask._kv_lengths is not None:
        fields["_kv_lengths"] = fields["_lengths"] if mask.is_self else mask._kv_lengths[b : b + 1]
    if len(mask.q_sizes) * len(mask.kv_sizes) <= _DENSE_ALLOW_CELLS:  # as the constructor keeps it
        fields["_cache"][(_dense_allow,)] = mask._allow
    vars(view).update(fields)
    return view


def causal_offsets_agree(d: int, e: int, q: int, valid: int) -> bool:
    """Do diagonals ``jl <= il + d`` and ``jl <= il + e`` select the same keys of a ``q x valid`` block?

    Row ``il`` sees ``clamp(il + d + 1, 0, valid)`` keys; two offsets agree on every row iff they are equal, or both
    open every row fully (``>= valid - 1``), or both close every row (``<= -q``), or the block is empty.
    """
    return d == e or q == 0 or valid == 0 or min(d, e) >= valid - 1 or max(d, e) <= -q


def _per_block_causal_agrees(q_lens, k_lens) -> bool:
    """Is the row-wide diagonal ``j <= i + (Nk - Nq)`` bottom-right causal inside every block?"""
    nq, nk = sum(q_lens), sum(k_lens)
    q_start = k_start = 0
    for ql, kl in zip(q_lens, k_lens):
        d = (q_start - k_start) + (nk - nq)
        if not causal_offsets_agree(d, kl - ql, ql, kl):
            return False
        q_start += ql
        k_start += kl
    return True


class ZorroMask(Derived):
    """A modality layout: contiguous named segments plus which query segment may see which key segment.

    Build one with a constructor rather than ``__init__``:

    - :meth:`zorro` — the paper's rule: each modality sees itself, ``fusion`` sees everything.
    - :meth:`from_segments` — any segments and rules (self- or cross-attention).
    - :meth:`bottleneck` — MBT-style: each modality sees itself and the bottleneck tokens.
    - :meth:`packed` — several independent sequences packed into one row (block-diagonal, optionally causal).
    - :meth:`from_allow` — segments plus an explicit boolean segment-to-segment matrix (for many segments: windows,
    groups).
    - :meth:`causal_with_blocks` — causal text with bidirectional blocks (Gemma 3's images).
    - :meth:`prefix_lm` — a bidirectional prefix and a causal suffix (PaliGemma).

    Rule cells. Each allowed cell ``(a, c)`` of the rule table is *full* (every valid query of segment a sees every
    valid key of segment c) or *causal*: query ``il`` of a (0-based inside it) sees key ``jl`` of c iff ``jl <= il +
    (kl - ql)``, with ``ql``/``kl`` the sample's valid tokens of a and c (the diagonal aligned bottom-right inside
    the pair, as flash-attn's varlen ``causal`` aligns it per sequence). For ``ql = kl = 4`` and ``ql = 2, kl = 4``::

        keys ->  0 1 2 3        keys ->  0 1 2 3
        q 0      #              q 0      # # #
        q 1      # #            q 1      # # # #
        q 2      # # #
        q 3      # # # #

    Cells combine (AND) with the row-wide ``causal`` and ``window``. Gemma 3's causal text with bidirectional images
    is causal cells on the text segments' diagonal, full cells elsewhere below it, and no row-wide ``causal``.

    Attributes:
        q_names, q_sizes: the query segments, in token order. ``num_q = sum(q_sizes)``.
        kv_names, kv_sizes: the key/value segments (the query ones for self-attention). ``num_kv = sum(kv_sizes)``.
        allow: bool tensor ``(len(q_sizes), len(kv_sizes))``, on CPU: ``allow[a, c]`` iff segment a may see segment c.
        causal_cells: bool tensor of allow's shape: the allowed cells that are causal (see above).
        lengths: int64 tensor ``(B, len(q_sizes))`` or None (every token valid).
        kv_lengths: int64 tensor ``(B, len(kv_sizes))`` or None. For self-attention it is ``lengths``.
        causal: also require ``key index <= query index + (num_kv - num_q)``.
        window: ``(left, right)`` sliding window (see the module docstring) or None.
        sample_sizes: int64 ``(B, len(q_sizes))`` or None: per-sample segment boundaries. Sample b's segment s
            holds ``sample_sizes[b, s]`` tokens, contiguous in token order with no padding between, each row summing
            to ``num_q`` (``q_sizes`` is then one nominal layout, e.g. sample 0's). Each sample's images can so sit
            at their own text positions (Gemma 3 batches); ``lengths`` still shorten segments from their tails
            (``lengths[b, s] <= sample_sizes[b, s]``), and cell diagonals align to each sample's valid tokens.
            :meth:`sample` gives one sample's layout as a mask of its own.
        kv_sample_sizes: the same for the key segments (cross-attention; for self-attention the query's).

    Per-sample sizes of one image block between two text segments (N = 8)::

        sample 0: [t0 t0 | img img img | t1 t1 t1]      sample_sizes[0] = [2, 3, 3]
        sample 1: [t0 t0 t0 t0 t0 | img img img | ]     sample_sizes[1] = [5, 3, 0]

    A mask is immutable; derived data (tile maps per ``(block_m, block_n, device)``, token metadata, the CPU plan) is
    cached on it, so build a mask once and reuse it across layers.
    """

    def __init__(
        self,
        q_segments: SegmentSpec,
        allow: torch.Tensor,
        *,
        kv_segments: Optional[SegmentSpec] = None,
        lengths=None,
        kv_lengths=None,
        causal: bool = False,
        window=None,
        causal_cells=None,
        sample_sizes=None,
        kv_sample_sizes=None,
    ):
        self.q_names, self.q_sizes = _check_segments(q_segments, "segments")
        self.is_self = kv_segments is None
        if self.is_self:
            self.kv_names, self.kv_sizes = self.q_names, self.q_sizes
        else:
            self.kv_names, self.kv_sizes = _check_segments(kv_segments, "kv_segments")
        if isinstance(allow, AllowRuns):  # from a constructor that knows the table's runs (packed sequences)
            shape = (allow.n_q, allow.n_kv)
        else:
            if not isinstance(allow, torch.Tensor):
                allow = torch.as_tensor(allow)
            if allow.dtype != torch.bool:
                raise TypeError(f"allow must be a bool tensor, got dtype {allow.dtype}")
            shape = tuple(allow.shape)
        if shape != (len(self.q_sizes), len(self.kv_sizes)):
            raise ValueError(
                f"allow must have shape (n_q_segments, n_kv_segments) = "
                f"({len(self.q_sizes)}, {len(self.kv_sizes)}), got {shape}"
            )
        # the rule table is kept as runs (linear in a layout's description); the dense table is derived on demand
        if causal_cells is not None:
            if isinstance(allow, AllowRuns):
                raise TypeError("causal_cells goes with a bool allow table; AllowRuns carry their cells' kinds")
            causal_cells = _check_causal_cells(causal_cells, allow, shape)
        self._runs = (
            allow if isinstance(allow, AllowRuns) else AllowRuns.from_dense(allow.detach().to("cpu"), causal_cells)
        )
        # kept dense too when given dense (the caller paid for it) or small: torch.compile traces read it, and a trace
        # cannot build it
        small = shape[0] * shape[1] <= _DENSE_ALLOW_CELLS
        dense_allow = None if isinstance(allow, AllowRuns) and not small else allow
        if isinstance(dense_allow, AllowRuns):
            dense_allow = dense_allow.dense()
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self.window = _check_window(window)
        self._sample_sizes = _check_sample_sizes(sample_sizes, sum(self.q_sizes), self.q_names, "sample_sizes")
        self._lengths = _check_lengths(lengths, self.q_sizes, self.q_names, "lengths", self._sample_sizes)
        if self.is_self:
            if kv_lengths is not None or kv_sample_sizes is not None:
                raise ValueError(
                    f"{'kv_lengths' if kv_lengths is not None else 'kv_sample_sizes'} is only for cross-attention "
                    f"(with kv_segments); for self-attention the keys share the queries' layout"
                )
            self._kv_lengths = self._lengths
            self._kv_sample_sizes = self._sample_sizes
        else:
            self._kv_sample_sizes = _check_sample_sizes(
                kv_sample_sizes, sum(self.kv_sizes), self.kv_names, "kv_sample_sizes"
            )
            self._kv_lengths = _check_lengths(
                kv_lengths, self.kv_sizes, self.kv_names, "kv_lengths", self._kv_sample_sizes
            )
        batches = {
            name: t.shape[0]
            for name, t in (
                ("lengths", self._lengths),
                ("kv_lengths", self._kv_lengths),
                ("sample_sizes", self._sample_sizes),
                ("kv_sample_sizes", self._kv_sample_sizes),
            )
            if t is not None
        }
        if len(set(batches.values())) > 1:
            raise ValueError(f"the per-sample tensors disagree on the batch size: {batches}")
        if (
            self._lengths is not None
            and self._kv_lengths is not None
            and self._lengths.shape[0] != self._kv_lengths.shape[0]
        ):
            raise ValueError(
                f"lengths and kv_lengths disagree on the batch size: "
                f"{self._lengths.shape[0]} vs {self._kv_lengths.shape[0]}"
            )
        self._cache: dict = {}  # Derived.derived's, and only its
        if dense_allow is not None:  # the dense rule table the caller gave: what _dense_allow would build
            self._cache[(_dense_allow,)] = dense_allow.detach().to("cpu").clone()
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"ZorroMask is immutable (its cached tile maps and plans depend on it): cannot set "
                f"{name!r}; build a new mask, e.g. mask.with_lengths(...)"
            )
        object.__setattr__(self, name, value)

    @property
    def _allow(self) -> torch.Tensor:
        """The dense rule table (built from the runs once, on first use)."""
        return self.derived(_dense_allow)

    # tensors are handed out as copies: editing one in place must not change the mask under its caches
    @property
    def allow(self) -> torch.Tensor:
        """bool ``(n_q_segments, n_kv_segments)`` (a copy)."""
        return self._allow.clone()

    @property
    def lengths(self) -> Optional[torch.Tensor]:
        """int64 ``(B, n_q_segments)`` or None (a copy)."""
        return None if self._lengths is None else self._lengths.clone()

    @property
    def kv_lengths(self) -> Optional[torch.Tensor]:
        """int64 ``(B, n_kv_segments)`` or None (a copy; for self-attention equal to :attr:`lengths`)."""
        return None if self._kv_lengths is None else self._kv_lengths.clone()

    @property
    def sample_sizes(self) -> Optional[torch.Tensor]:
        """int64 ``(B, n_q_segments)``: each sample's own segment sizes, or None (every sample has ``q_sizes``)."""
        return None if self._sample_sizes is None else self._sample_sizes.clone()

    @property
    def kv_sample_sizes(self) -> Optional[torch.Tensor]:
        """int64 ``(B, n_kv_segments)`` or None, as :attr:`sample_sizes` (for self-attention equal to it)."""
        return None if self._kv_sample_sizes is None else self._kv_sample_sizes.clone()

    @property
    def per_sample(self) -> bool:
        """Whether segment boundaries differ per sample (``sample_sizes`` / ``kv_sample_sizes``)."""
        return self._sample_sizes is not None or self._kv_sample_sizes is not None

    def sample(self, b: int) -> "ZorroMask":
        """Sample ``b``'s layout as a mask of its own: its segment sizes, its lengths (a batch of 1 where the mask has
        lengths), the same rules. Cached; what the backends plan a per-sample layout with."""
        return self.derived(_sample_view, int(b))

    @property
    def has_causal_cells(self) -> bool:
        """Whether any rule cell is causal (see the class docstring)."""
        return self._runs.has_causal

    @property
    def causal_cells(self) -> torch.Tensor:
        """bool ``(n_q_segments, n_kv_segments)``: the allowed cells that are causal (a copy)."""
        return self.derived(_dense_causal).clone()

    @property
    def cell_kinds(self) -> torch.Tensor:
        """int8 ``(n_q_segments, n_kv_segments)``: 0 none, 1 full, 2 causal per rule cell (a new tensor)."""
        return torch.where(self.derived(_dense_causal), CAUSAL, self._allow.to(torch.int8)).to(torch.int8)

    @property
    def causal_rules(self) -> dict[str, list[str]]:
        """query segment -> the key segments it sees through causal cells (only segments that have some)."""
        out: dict[str, list[str]] = {}
        cz = self._runs.causal_cells()
        for a, c0, c1 in zip(*(x.tolist() for x in (cz.row, cz.c0, cz.c1))):
            out.setdefault(self.q_names[a], []).extend(self.kv_names[c0:c1])
        return out

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_segments(
        cls,
        segments: SegmentSpec,
        rules: Mapping[str, Rule],
        *,
        kv_segments: Optional[SegmentSpec] = None,
        lengths=None,
        kv_lengths=None,
        causal: bool = False,
        window=None,
        sample_sizes=None,
        kv_sample_sizes=None,
    ) -> "ZorroMask":
        """Segments and rules by name.

        Args:
            segments: ``[(name, size), ...]``, contiguous, in token order; a size may be 0.
            rules: query segment name -> list of key segment names it may see, or ``"*"`` for all. A query segment
                absent from ``rules`` sees nothing (its rows return 0). Names on either side may be globs
                (``"video/*"``), and ``"self"`` means "the key segment with this query segment's own name" — so
                ``{"audio/*": "self", "video/*": "self", "fusion": "*"}`` is window-local attention for windows
                named ``audio/0, audio/1, ..., video/0, ...`` with global fusion tokens. A value may also be a
                dict ``{key pattern: "full" | "causal"}`` giving each cell's kind (a list means all full):
                ``{"text": {"image": "full", "text": "causal"}}`` (see the class docstring for causal cells).
            kv_segments: the key/value layout for cross-attention; None for self-attention.
            lengths: int tensor ``(B, len(segments))`` of valid tokens per segment per sample, or None.
            kv_lengths: the same for ``kv_segments`` (cross-attention only).
            causal: also apply a bottom-right aligned causal mask over token indices (the whole row; causal cells
                are per segment pair).
            window: ``(left, right)``: also a bottom-right aligned sliding window over token indices (flash-attention's
                ``window_size``; -1 = unbounded on that side), combined with the rules, lengths and ``causal``.
            sample_sizes, kv_sample_sizes: ``(B, len(segments))`` / ``(B, len(kv_segments))`` per-sample segment
                sizes, each row summing to the segments' total (see the class docstring), or None.

        Example::

            ZorroMask.from_segments([("audio", 320), ("video", 1568), ("fusion", 8)],
                                    {"audio": ["audio"], "video": ["video"], "fusion": "*"})
        """
        q_names, _ = _check_segments(segments, "segments")
        kv_names = q_names if kv_segments is None else _check_segments(kv_segments, "kv_segments")[0]
        allow, cells = _rules_to_allow(rules, q_names, kv_names)
        return cls(
            segments,
            allow,
            kv_segments=kv_segments,
            lengths=lengths,
            kv_lengths=kv_lengths,
            causal=causal,
            window=window,
            causal_cells=cells,
            sample_sizes=sample_sizes,
            kv_sample_sizes=kv_sample_sizes,
        )

    @classmethod
    def from_allow(cls, segments: SegmentSpec, allow: torch.Tensor, **kwargs) -> "ZorroMask":
        """Segments plus a bool matrix ``allow (n_q_segments, n_kv_segments)``; keywords as :meth:`from_segments`.

        Use this for layouts with many segments (windows, groups), where a rules dict would be unwieldy.
        """
        return cls(segments, allow, **kwargs)

    @classmethod
    def zorro(
        cls,
        audio: Optional[int] = None,
        video: Optional[int] = None,
        fusion: int = 0,
        *,
        lengths=None,
        **modalities: int,
    ) -> "ZorroMask":
        """The paper's mask: each modality attends to itself only; ``fusion`` attends to everything.

        Token order is ``audio, video, <other modalities in keyword order>, fusion``. Extra modalities may be given
        by keyword (``ZorroMask.zorro(audio=320, video=1568, text=77, fusion=8)``). A missing modality is a size-0
        segment; ``lengths (B, n_segments)`` marks per-sample padding in the same order.
        """
        mods = {}
        if audio is not None:
            mods["audio"] = audio
        if video is not None:
            mods["video"] = video
        mods.update(modalities)
        if "fusion" in mods:
            raise ValueError("'fusion' is the fusion stream; pass it as fusion=")
        if not mods:
            raise ValueError("ZorroMask.zorro needs at least one modality (audio=, video=, ...)")
        segments = list(mods.items()) + [("fusion", fusion)]
        rules = {name: [name] for name in mods}
        rules["fusion"] = ALL
        return cls.from_segments(segments, rules, lengths=lengths)

    @classmethod
    def full(
        cls,
        audio: Optional[int] = None,
        video: Optional[int] = None,
        fusion: int = 0,
        *,
        lengths=None,
        **modalities: int,
    ) -> "ZorroMask":
        """Vanilla attention over the same layout as :meth:`zorro` (every token sees every token): the paper's
        full-attention ablation. Padding from ``lengths`` is still masked."""
        z = cls.zorro(audio, video, fusion, lengths=lengths, **modalities)
        return cls(list(zip(z.q_names, z.q_sizes)), torch.ones_like(z.allow), lengths=lengths)

    @classmethod
    def bottleneck(
        cls,
        audio: Optional[int] = None,
        video: Optional[int] = None,
        bottleneck: int = 4,
        *,
        lengths=None,
        **modalities: int,
    ) -> "ZorroMask":
        """MBT-style (Nagrani et al., 2021) attention bottleneck: each modality attends to itself and to the
        bottleneck tokens; the bottleneck attends to everything. Token order ``audio, video, ..., bottleneck``."""
        z = cls.zorro(audio, video, bottleneck, lengths=lengths, **modalities)
        allow = z.allow.clone()
        allow[:, -1] = True
        segments = list(zip(z.q_names[:-1], z.q_sizes[:-1])) + [("bottleneck", z.q_sizes[-1])]
        return cls(segments, allow, lengths=lengths)

    @classmethod
    def packed(
        cls,
        seq_lens: Sequence[int],
        *,
        causal: bool = False,
        names: Optional[Sequence[str]] = None,
        kv_seq_lens: Optional[Sequence[int]] = None,
    ) -> "ZorroMask":
        """Independent sequences packed into one row: sequence i attends only to sequence i (block-diagonal).

        Args:
            seq_lens: the length of each packed sequence, in token order.
            causal: causal attention inside each sequence (for packed language-model training), bottom-right aligned
                within each sequence (as flash-attn varlen and xformers' ``BlockDiagonalCausalFromBottomRightMask``).
                When every sequence's diagonal lands on the row-wide one (equal query and key counts, or none given)
                this is the row-wide ``causal``; otherwise each sequence is a causal rule cell (same attention).
            names: segment names (default ``seq0, seq1, ...``).
            kv_seq_lens: key lengths per sequence for cross-attention (same count as ``seq_lens``).

        Example: ``ZorroMask.packed([5, 3])`` is the 8 x 8 mask with two diagonal blocks.
        """
        if isinstance(seq_lens, torch.Tensor):
            seq_lens = seq_lens.tolist()
        names = list(names) if names is not None else [f"seq{i}" for i in range(len(seq_lens))]
        if len(names) != len(seq_lens):
            raise ValueError(f"names has {len(names)} entries but seq_lens has {len(seq_lens)}")
        segments = list(zip(names, seq_lens))
        kv = None
        if kv_seq_lens is not None:
            if isinstance(kv_seq_lens, torch.Tensor):
                kv_seq_lens = kv_seq_lens.tolist()
            if len(kv_seq_lens) != len(seq_lens):
                raise ValueError(f"kv_seq_lens has {len(kv_seq_lens)} entries but seq_lens has {len(seq_lens)}")
            kv = list(zip(names, kv_seq_lens))
            if causal and not _per_block_causal_agrees(seq_lens, kv_seq_lens):
                return cls(segments, AllowRuns.diagonal(len(seq_lens), causal=True), kv_segments=kv)
        return cls(segments, AllowRuns.diagonal(len(seq_lens)), kv_segments=kv, causal=causal)

    @classmethod
    def causal_with_blocks(
        cls,
        segments: SegmentSpec,
        blocks,
        *,
        lengths=None,
        window=None,
        causal_blocks: bool = False,
        sample_sizes=None,
    ) -> "ZorroMask":
        """Causal attention over segments in token order, except inside each named block, which sees itself whole
        (Gemma 3: text causal, each image's tokens bidirectional among themselves).

        Every segment sees every earlier segment fully; a segment in ``blocks`` sees itself fully, any other segment
        sees itself through a causal cell (bottom-right inside its valid tokens, see the class docstring). Nothing is
        ``N x N``: the table has one full run and at most one causal cell per segment.

        Args:
            segments: ``[(name, size), ...]`` in token order, e.g. ``[("text0", 12), ("image0", 256), ("text1",
                30)]``.
            blocks: names (or globs, e.g. ``"image*"``) of the bidirectional segments.
            lengths: ``(B, len(segments))`` valid tokens per segment (tails), as :meth:`from_segments`.
            window: a row-wide sliding window, combined with the cells (Gemma 3's local layers).
            causal_blocks: unused by Gemma 3; True makes the blocks causal too (plain causal attention over the
                same segments, for ablations).
            sample_sizes: ``(B, len(segments))`` per-sample sizes (each sample's blocks at its own positions), each
                row summing to the segments' total; see the class docstring. Left padding: a leading segment whose
                ``lengths`` are 0 (its tokens see nothing and nobody sees them), its size per sample in here.

        Example::

            ZorroMask.causal_with_blocks([("t0", 5), ("img", 4), ("t1", 3)], ["img"])
            #        t0      img   t1
            # t0     causal  .     .
            # img    full    full  .
            # t1     full    full  causal
        """
        names, sizes = _check_segments(segments, "segments")
        index = {n: i for i, n in enumerate(names)}
        if isinstance(blocks, str):
            blocks = [blocks]
        is_block = np.zeros(len(names), dtype=bool)
        for pat in blocks:
            if not isinstance(pat, str):
                raise TypeError(f"blocks must name segments (str), got {pat!r}")
            hit = _match(pat, names, index)
            if not hit:
                raise ValueError(f"blocks names unknown segment {pat!r}; segments are {_short(names)}")
            is_block[hit] = True
        if causal_blocks:
            is_block[:] = False
        n = len(names)
        idx = np.arange(n, dtype=np.int64)
        # per segment a: a full run over the earlier segments [0, a) (and itself when a block), then its causal cell
        full_end = np.where(is_block, idx + 1, idx)
        has_full = full_end > 0
        row = np.concatenate([idx[has_full], idx[~is_block]])
        c0 = np.concatenate([np.zeros(int(has_full.sum()), dtype=np.int64), idx[~is_block]])
        c1 = np.concatenate([full_end[has_full], idx[~is_block] + 1])
        kind = np.concatenate([np.zeros(int(has_full.sum()), dtype=bool), np.ones(int((~is_block).sum()), bool)])
        order = np.lexsort((c0, row))
        runs = AllowRuns(n, n, row[order], c0[order], c1[order], kind[order] if kind.any() else None)
        return cls(list(zip(names, sizes)), runs, lengths=lengths, window=window, sample_sizes=sample_sizes)

    @classmethod
    def prefix_lm(cls, prefix, suffix, *, lengths=None, names=("prefix", "suffix")) -> "ZorroMask":
        """A prefix-LM (PaliGemma): the ``prefix`` tokens (image + prompt) see each other bidirectionally, the
        ``suffix`` (the answer) sees the whole prefix and itself causally.

        Args:
            prefix, suffix: token counts: ints, or one per sample (sequences or 1-D int tensors of length B whose
                sums ``prefix[b] + suffix[b]`` are all equal: per-sample boundaries, see the class docstring).
            lengths: ``(B, 2)`` valid tokens of each (tails: ``[prefix valid, pad, suffix valid, pad]``), or None.
            names: the two segments' names.
        """
        if isinstance(prefix, numbers.Integral) and isinstance(suffix, numbers.Integral):
            return cls.causal_with_blocks([(names[0], prefix), (names[1], suffix)], [names[0]], lengths=lengths)
        pre = as_int_tensor(prefix, "prefix", "(B,)").to(torch.int64).reshape(-1)
        suf = as_int_tensor(suffix, "suffix", "(B,)").to(torch.int64).reshape(-1)
        if pre.numel() != suf.numel() and min(pre.numel(), suf.numel()) != 1:
            raise ValueError(f"prefix and suffix give {pre.numel()} and {suf.numel()} samples")
        per = torch.stack(torch.broadcast_tensors(pre, suf), 1)
        first = per[0].tolist()
        return cls.causal_with_blocks(
            [(names[0], first[0]), (names[1], first[1])], [names[0]], lengths=lengths, sample_sizes=per
        )

    # ------------------------------------------------------------------ derived views
    @property
    def num_q(self) -> int:
        """Total query tokens ``Nq`` (padding included)."""
        return sum(self.q_sizes)

    @property
    def num_kv(self) -> int:
        """Total key/value tokens ``Nk`` (padding included)."""
        return sum(self.kv_sizes)

    @property
    def batch_size(self) -> Optional[int]:
        """B when lengths or per-sample sizes are given, else None (the mask broadcasts over any batch)."""
        for t in (self._lengths, self._kv_lengths, self._sample_sizes, self._kv_sample_sizes):
            if t is not None:
                return t.shape[0]
        return None

    @property
    def rules(self) -> dict[str, list[str]]:
        """The rules as a dict (query segment -> key segments); segments that see nothing are omitted."""
        out: dict[str, list[str]] = {}
        for a, c0, c1 in zip(*(x.tolist() for x in (self._runs.row, self._runs.c0, self._runs.c1))):
            out.setdefault(self.q_names[a], []).extend(self.kv_names[c0:c1])
        return out

    def with_lengths(self, lengths=None, kv_lengths=None) -> "ZorroMask":
        """The same layout and rules with other per-sample lengths (a new mask with its own caches)."""
        return ZorroMask(
            list(zip(self.q_names, self.q_sizes)),
            self._runs,
            kv_segments=None if self.is_self else list(zip(self.kv_names, self.kv_sizes)),
            lengths=lengths,
            kv_lengths=kv_lengths,
            causal=self.causal,
            window=self.window,
            sample_sizes=self._sample_sizes,
            kv_sample_sizes=None if self.is_self else self._kv_sample_sizes,
        )

    def band(self) -> tuple[Optional[int], Optional[int]]:
        """Causality and the window as one band on ``d = j - i - (Nk - Nq)``: key j is visible to query i only if
        ``lo <= d <= hi``. Returns ``(lo, hi)``, None for an unbounded side."""
        lo = hi = None
        if self.window is not None:
            left, right = self.window
            lo = -left if left >= 0 else None
            hi = right if right >= 0 else None
        if self.causal:
            hi = 0 if hi is None else min(hi, 0)
        return lo, hi

    def _q_lengths_or_sizes(self) -> torch.Tensor:
        """``(Bm, Sq)`` valid tokens per query segment: Bm = B when either side has lengths, else 1."""
        return self._lengths_or_sizes(self._lengths, self.q_sizes, self._sample_sizes)

    def _kv_lengths_or_sizes(self) -> torch.Tensor:
        """``(Bm, Sk)`` valid tokens per key segment, as :meth:`_q_lengths_or_sizes`."""
        return self._lengths_or_sizes(self._kv_lengths, self.kv_sizes, self._kv_sample_sizes)

    def _lengths_or_sizes(
        self, lengths: Optional[torch.Tensor], sizes: tuple[int, ...], per_sample: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if lengths is not None:
            return lengths
        if per_sample is not None:
            return per_sample
        base = torch.tensor(sizes, dtype=torch.int64)[None]
        return base if self.batch_size is None else base.expand(self.batch_size, -1)

    def to_dense(self) -> torch.Tensor:
        """The mask as a bool tensor: ``(Nq, Nk)``, or ``(B, Nq, Nk)`` when lengths are given. ``True`` = may attend.

        Slow by design — it is the oracle every kernel path is checked against, so it is computed directly from the
        definition (per-token segment ids and positions), sharing no code with the tile-map builder.
        """
        if self.per_sample:  # each sample by its own layout
            return torch.cat(
                [(lambda d: d if d.ndim == 3 else d[None])(self.sample(b).to_dense()) for b in range(self.batch_size)]
            )
        q_seg = torch.repeat_interleave(torch.arange(len(self.q_sizes)), torch.tensor(self.q_sizes))
        k_seg = torch.repeat_interleave(torch.arange(len(self.kv_sizes)), torch.tensor(self.kv_sizes))
        q_pos = torch.cat([torch.arange(s) for s in self.q_sizes])
        k_pos = torch.cat([torch.arange(s) for s in self.kv_sizes])
        dense = self._allow[q_seg][:, k_seg]  # (Nq, Nk)
        i = torch.arange(self.num_q)[:, None]
        j = torch.arange(self.num_kv)[None, :]
        off = self.num_kv - self.num_q
        if self.causal:
            dense = dense & (j <= i + off)
        if self.window is not None:
            left, right = self.window
            if left >= 0:
                dense = dense & (j >= i + off - left)
            if right >= 0:
                dense = dense & (j <= i + off + right)
        ql = self._q_lengths_or_sizes()[:, q_seg]  # (Bm, Nq)
        kl = self._kv_lengths_or_sizes()[:, k_seg]  # (Bm, Nk)
        if self.has_causal_cells:  # per cell, bottom-right inside the pair's valid tokens
            cell = self.derived(_dense_causal)[q_seg][:, k_seg]  # (Nq, Nk)
            seen = k_pos[None, None, :] <= q_pos[None, :, None] + (kl[:, None, :] - ql[:, :, None])
            dense = dense & (~cell | seen)  # (Bm, Nq, Nk)
        if self.batch_size is None:
            return dense[0] if dense.ndim == 3 else dense
        q_valid = q_pos[None] < ql  # (B, Nq)
        k_valid = k_pos[None] < kl  # (B, Nk)
        return dense & q_valid[:, :, None] & k_valid[:, None, :]

    def attended(self) -> torch.Tensor:
        """Exact number of attended (query, key) pairs, per sample: int64 ``(B,)`` (``(1,)`` without lengths).

        Computed from segment arithmetic, without any ``Nq x Nk`` tensor: linear in the rule table's runs plus its
        causal cells, or, with causality or a window, in the allowed segment pairs.
        """
        if self.per_sample:
            return torch.cat([self.sample(b).attended() for b in range(self.batch_size)])
        ql = self._q_lengths_or_sizes().numpy()  # (Bm, Sq)
        kl = self._kv_lengths_or_sizes().numpy()  # (Bm, Sk)
        lo, hi = self.band()
        off = self.num_kv - self.num_q
        q_st = np.cumsum(self.q_sizes) - np.asarray(self.q_sizes)
        k_st = np.cumsum(self.kv_sizes) - np.asarray(self.kv_sizes)
        if lo is None and hi is None:
            runs = self._runs.full_cells()
            kl_cum = np.zeros((kl.shape[0], kl.shape[1] + 1), dtype=np.int64)
            np.cumsum(kl, 1, out=kl_cum[:, 1:])
            per_run = ql[:, runs.row] * (kl_cum[:, runs.c1] - kl_cum[:, runs.c0])  # (Bm, R)
            total = per_run.sum(1, dtype=np.int64)
            if self.has_causal_cells:
                a, c = self._runs.causal_cells().pairs()
                total = total + _band_pairs(q_st, k_st, ql, kl, a, c, None, None, True).sum(1, dtype=np.int64)
            return torch.from_numpy(total)
        # Banded: count lattice points lo <= j - i - off <= hi (and, in a causal cell, its diagonal) in each
        # (valid q range) x (valid k range) rectangle of an allowed segment pair.
        a, c = self._runs.pairs()
        is_cell = self._runs.lookup(a, c, causal=True)
        lo_g = None if lo is None else off + lo
        hi_g = None if hi is None else off + hi
        counts = _band_pairs(q_st, k_st, ql, kl, a, c, lo_g, hi_g, is_cell)
        return torch.from_numpy(np.asarray(counts, dtype=np.int64).sum(1, dtype=np.int64))

    def attended_fraction(self) -> float:
        """Attended pairs over all ``B * Nq * Nk`` pairs (padding counts as not attended)."""
        counts = self.attended()
        return float(counts.sum()) / (counts.numel() * self.num_q * self.num_kv)

    def sparsity(self) -> float:
        """Fraction of the ``Nq x Nk`` attention matrix that is masked, averaged over the batch."""
        return 1.0 - self.attended_fraction()

    # ------------------------------------------------------------------ derived kernel data (cached)
    def tile_map(self, block_m: int, block_n: int, device: Union[str, torch.device] = "cpu"):
        """The :class:`~zorro_kernels.tilemap.TileMap` for tiles of ``block_m`` queries x ``block_n`` keys.

        Cached on the mask per ``(block_m, block_n, device)``.
        """
        return self.derived(_tile_map, block_m, block_n, torch.device(device))

    def token_meta(self, device: Union[str, torch.device] = "cpu"):
        """Per-token segment ids / positions and the rule table, as kernels read them (cached per device)."""
        return self.derived(_token_meta, torch.device(device))

    @property
    def key(self) -> str:
        """Content key (hex digest): equal for masks with equal segments, rules, lengths and causality, whatever the
        names. The compiled-op path finds masks by it; computed once."""
        return self.derived(_content_key)

    # ------------------------------------------------------------------ printing
    def __repr__(self) -> str:
        def segs(names, sizes):
            return ", ".join(f"{n}:{s}" for n, s in zip(names, sizes))

        kv = "same" if self.is_self else f"[{segs(self.kv_names, self.kv_sizes)}]"
        rules = self.rules
        if len(rules) > 6:
            rules_s = f"<{len(rules)} rules>"
        else:
            rules_s = (
                "{"
                + ", ".join(
                    f"{q}: " + ("*" if len(v) == len(self.kv_names) else "[" + ", ".join(v) + "]")
                    for q, v in rules.items()
                )
                + "}"
            )
        head = (
            f"ZorroMask(q=[{segs(self.q_names, self.q_sizes)}], kv={kv}, rules={rules_s}"
            + (", causal" if self.causal else "")
            + (f", causal cells={self._cells_repr()}" if self.has_causal_cells else "")
            + (f", window={self.window}" if self.window is not None else "")
            + (f", B={self.batch_size} (lengths)" if self._lengths is not None or self._kv_lengths is not None else "")
            + (f", B={self.batch_size} (per-sample sizes)" if self.per_sample else "")
            + f", sparsity={self.sparsity():.1%})"
        )
        return head + "\n" + self.draw()

    def _cells_repr(self) -> str:
        cz = self.causal_rules
        if len(cz) > 6:
            n = int((self._runs.causal_cells().c1 - self._runs.causal_cells().c0).sum())
            return f"<{n} in {len(cz)} query segments>"
        return "{" + ", ".join(f"{q}: [" + ", ".join(v) + "]" for q, v in cz.items()) + "}"

    def draw(self, width: int = 48, sample: int = 0) -> str:
        """ASCII picture of the tile map at a resolution of about ``width`` tiles per row.

        ``#`` full tile (no masking needed), ``+`` partial tile (element mask), ``.`` empty tile (never computed).
        """
        n = max(self.num_q, self.num_kv)
        block = 16
        while -(-n // block) > width:
            block *= 2
        tm = self.tile_map(block, block)
        kinds = tm.kinds[min(sample, tm.kinds.shape[0] - 1)]
        chars = {0: ".", 1: "+", 2: "#"}
        rows = ["".join(chars[int(x)] for x in row) for row in kinds]
        return f"tiles of {block}x{block} (# full, + partial, . empty):\n" + "\n".join(rows)
