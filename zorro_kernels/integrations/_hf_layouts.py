"""The masks Hugging Face transformers composes, read as :class:`~zorro_kernels.ZorroMask` layouts.

transformers' ``create_causal_mask`` and friends hand a mask interface a *mask function* composed from their own parts
(causal, bidirectional, sliding window, packed sequences found from ``position_ids``, bidirectional blocks such as
images) plus sizes, cache offsets and the 2-D padding mask. :func:`_layout_from_model` reads that composition from the
functions' closures (:mod:`._hf_reading`, never evaluating it on ``N x N`` pairs) and builds the equal layout: a
ZorroMask, a :class:`ZorroLayout` (a mask plus a key bias) or :class:`ZorroGroups` (one mask per group of samples), or
says why it cannot. :mod:`zorro_kernels.integrations.transformers` (the mask interface and the attention function) is
the only user; it imports transformers first and refuses versions this module cannot read.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.masking_utils import prepare_padding_mask

from ..mask import ZorroMask
from ..tilemap import AllowRuns
from ._hf_reading import _read

_LAYOUTS: dict = {}
_MAX_LAYOUTS = 64
_TENSOR_VALUED = object()  # _layout_from_model's layout when it must read tensor values while tracing


def _plain_layout(nq: int, nk: int, causal: bool, window: Optional[tuple[int, int]] = None) -> ZorroMask:
    """One segment, every query sees every key (causal: bottom-right aligned; ``window``: a sliding window). Cached
    (a plain dict, which torch.compile traces, unlike ``functools.lru_cache``): its tile maps and CPU plan are then
    built once per shape for the whole model, not once per layer and call."""
    key = (nq, nk, causal, window)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        allow = torch.ones(1, 1, dtype=torch.bool)
        kv = None if nq == nk else [("tokens", nk)]
        _LAYOUTS[key] = ZorroMask([("tokens", nq)], allow, kv_segments=kv, causal=causal, window=window)
    return _LAYOUTS[key]


def _padded_layout(nq: int, nk: int, causal: bool, window, kv_lengths: torch.Tensor) -> ZorroMask:
    # Cross-attention form even for self-attention: only the keys carry lengths, so padded query rows attend the valid
    # keys exactly as they do under SDPA (a self-attention mask with lengths would zero them).
    allow = torch.ones(1, 1, dtype=torch.bool)
    return ZorroMask(
        [("tokens", nq)], allow, kv_segments=[("tokens", nk)], kv_lengths=kv_lengths, causal=causal, window=window
    )


class ZorroLayout:
    """What the mask interface hands the attention function when padding is not a suffix (left padding, holes) or
    cannot be read (tracing): the layout plus a key bias, ``bias (B, 1, 1, Nk)`` fp32, ``-inf`` on padded keys."""

    def __init__(self, mask: ZorroMask, bias: torch.Tensor):
        self.mask, self.bias = mask, bias


class ZorroGroups:
    """What the mask interface hands the attention function when the samples of a batch have different layouts
    (packed sequences with other boundaries per sample): ``groups``, a list of ``(rows, mask, bias)`` — the sample
    indices (int64, on the tensors' device) sharing one ZorroMask, and that group's key bias or None. The attention
    function makes one zorro_attention call per group; nothing is ``N x N``."""

    def __init__(self, groups: list, batch_size: int):
        self.groups, self.batch_size = groups, batch_size


def _run_lengths(ids: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(ids, return_counts=True)[1].tolist()


def _packed_layout(packed: torch.Tensor, causal: bool, window, chunk: Optional[int] = None) -> ZorroMask:
    """The packed sequences of ``packed`` (transformers' ``(B, N)`` sequence index per token) as block-diagonal
    segments (per-sample ``sample_sizes`` where the samples differ). Rows that each hold one sequence (what
    transformers hands over under torch.compile for plain ``position_ids``) are the plain layout. ``chunk``: chunked
    attention of that many positions on the positions remapped per sequence (Llama 4 packed), so each sequence is
    cut into chunks from its start, each chunk a segment of its own."""
    if chunk is None and not bool(packed[:, -1].any()):  # the index counts up from 0: a last token in sequence 0
        return _plain_layout(packed.shape[-1], packed.shape[-1], causal, window)  # means one sequence

    def runs(ids: torch.Tensor) -> list[int]:
        lens = _run_lengths(ids)
        if chunk is None:
            return lens
        return [c for n in lens for c in [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])]

    if packed.shape[0] == 1 or bool((packed == packed[:1]).all()):
        return _packed_mask(tuple(runs(packed[0])), causal, window)
    # other boundaries per sample: one mask whose sample_sizes place them (zero-size sequences pad the shorter lists)
    rows = [runs(ids) for ids in packed]
    width = max(len(r) for r in rows)
    rows = tuple(tuple(r + [0] * (width - len(r))) for r in rows)

    def build():
        segments = [(f"seq{i}", n) for i, n in enumerate(rows[0])]
        sizes = torch.tensor(rows, dtype=torch.int64)
        return ZorroMask(segments, AllowRuns.diagonal(width), causal=causal, window=window, sample_sizes=sizes)

    return _cached(("packed", rows, causal, window), build)


def _cached(key, build) -> ZorroMask:
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = build()
    return _LAYOUTS[key]


def _by_sample(keys: list, build, device) -> object:
    """One layout for the batch when every sample's ``key`` agrees, else :class:`ZorroGroups` (one per distinct key);
    ``build(key)`` makes the ZorroMask of a key."""
    rows: dict = {}
    for b, key in enumerate(keys):
        rows.setdefault(key, []).append(b)
    if len(rows) == 1:
        return build(keys[0])
    return ZorroGroups([(torch.tensor(bs, device=device), build(key), None) for key, bs in rows.items()], len(keys))


def _blocks_layout(blocks: torch.Tensor, window, num_q: int) -> Optional[object]:
    """transformers' causal mask OR ``blockwise_overlay(block_sequence_ids)`` (key j visible to query i iff ``j <= i``
    or both carry the same id >= 0) as rule cells: each run of equal ids is a segment; a segment sees every earlier
    one, itself whole when a block and causally when text (id -1). ``blocks (B, Nk)`` are the keys' ids; the
    ``num_q`` queries are the last keys (a chunk of a prefill over a cache when fewer): the query segments are the
    same runs cut to the queries, and a text cell's diagonal, aligned bottom-right per pair, ends with the run.

    Every sample is laid out as text, block, text, ..., text (a zero-size text segment between two adjacent blocks,
    zero-size pairs after a sample's last block up to the batch's most blocks), so the batch is one mask whose
    ``sample_sizes`` place each sample's images. A block id on several runs of a sample (PaliGemma's prefix ids
    after an answer: those runs see each other both ways) takes a table of its own per distinct layout
    (:class:`ZorroGroups`)."""
    runs = []
    for ids in blocks.cpu():
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        runs.append((tuple(values.tolist()), tuple(counts.tolist())))
    if any(len({v for v in ids if v >= 0}) != sum(v >= 0 for v in ids) for ids, _ in runs):
        if num_q != blocks.shape[-1]:
            return None
        return _by_sample(
            runs, lambda key: _cached(("blocks", key, window), lambda: _blocks_mask(*key, window)), blocks.device
        )
    rows = []
    for ids, counts in runs:
        sizes = [0]  # text, block, text, ...: the last slot is always text
        for v, c in zip(ids, counts):
            if v < 0:
                sizes[-1] += c
            else:
                sizes += [c, 0]
        rows.append(sizes)
    width = max(len(r) for r in rows)
    rows = tuple(tuple(r + [0] * (width - len(r))) for r in rows)
    if num_q == blocks.shape[-1]:
        return _cached(("blocks", rows, window), lambda: _text_and_blocks(rows, window))
    first = blocks.shape[-1] - num_q  # the first query's key index
    q_rows = []
    for r in rows:
        ends = torch.tensor(r).cumsum(0)
        q_rows.append(tuple((ends.clamp(min=first) - (ends - torch.tensor(r)).clamp(min=first)).tolist()))
    q_rows = tuple(q_rows)
    return _cached(("blocks", rows, window, q_rows), lambda: _text_and_blocks(rows, window, q_rows))


def _text_and_blocks(rows: tuple, window, q_rows: Optional[tuple] = None) -> ZorroMask:
    """Causal text and bidirectional blocks over the per-sample ``rows`` of segment sizes (text, block, ..., text);
    ``q_rows``: the query segments' sizes when the queries are only the last keys (cross-attention, same cells)."""
    names = [f"text{i // 2}" if i % 2 == 0 else f"block{i // 2}" for i in range(len(rows[0]))]
    per_sample = None if len(set(rows)) == 1 and len(set(q_rows or ((),))) == 1 else torch.tensor(rows)
    keys = ZorroMask.causal_with_blocks(
        list(zip(names, rows[0])), names[1::2] or [], window=window, sample_sizes=per_sample
    )
    if q_rows is None:
        return keys
    return ZorroMask(
        list(zip(names, q_rows[0])),
        keys._runs,
        kv_segments=list(zip(names, rows[0])),
        window=window,
        sample_sizes=None if per_sample is None else torch.tensor(q_rows),
        kv_sample_sizes=per_sample,
    )


def _blocks_mask(ids: tuple, sizes: tuple, window) -> ZorroMask:
    names = [f"{'text' if v < 0 else 'block'}{i}" for i, v in enumerate(ids)]
    segments = list(zip(names, sizes))
    blocks = [n for n, v in zip(names, ids) if v >= 0]
    in_blocks = [v for v in ids if v >= 0]
    if len(set(in_blocks)) == len(in_blocks):  # every block one run (Gemma 3/4 images, PaliGemma's prefix)
        return ZorroMask.causal_with_blocks(segments, blocks, window=window)
    # a block id on several runs (PaliGemma's prefix ids after an answer): those runs see each other both ways
    v = torch.tensor(ids)
    n = len(ids)
    idx = torch.arange(n)
    same_block = (v[:, None] == v[None, :]) & (v[:, None] >= 0)
    allow = (idx[None, :] <= idx[:, None]) | same_block
    cells = torch.eye(n, dtype=torch.bool) & (v < 0)[:, None]
    return ZorroMask(segments, allow, causal_cells=cells, window=window)


def _packed_mask(lens: tuple, causal: bool, window) -> ZorroMask:
    segments = [(f"seq{i}", n) for i, n in enumerate(lens)]
    return _cached(
        ("packed", lens, causal, window),
        lambda: ZorroMask(segments, AllowRuns.diagonal(len(lens)), causal=causal, window=window),
    )


def _bidirectional_window(w: int, nq: int, nk: int, shift: int):
    """transformers' bidirectional window (key j visible to query i iff ``|(i + q_offset) - (j + kv_offset)| <= w``,
    ``shift = q_offset - kv_offset``) as zorro's ``window=(left, right)`` on ``d = j - i - (Nk - Nq)``: ``j - i`` lies
    in ``[shift - w, shift + w]``, so ``left = w - t`` and ``right = w + t`` with ``t = shift - (Nk - Nq)`` (0 for
    self-attention without a cache: ``(w, w)``). A side reaching past every pair (``d`` spans ``[-(Nk - 1), Nq -
    1]``) is unbounded (-1), both: None. False when the band lies wholly on one side of zorro's diagonal (a side
    negative), which zorro's window cannot express."""
    t = shift - (nk - nq)
    left, right = w - t, w + t
    if left < 0 or right < 0:
        return False
    left, right = (-1 if left >= nk - 1 else left), (-1 if right >= nq - 1 else right)
    return None if (left, right) == (-1, -1) else (left, right)


def _chunked_layout(size: int, left_padding: torch.Tensor, batch_size: int, nq: int, nk: int, kv_offset: int):
    """transformers' chunked causal mask (Llama 4: key at position p visible to the query at position r iff ``p <=
    r`` and ``(p - pad) // size == (r - pad) // size``, ``pad = left_padding[b]`` the sample's leading padding) over
    keys at positions ``kv_offset ..`` and the queries at the last ``nq`` of them (the caller checked the alignment):
    one segment per chunk on each side, each query chunk seeing its key chunk (a block diagonal), and the row-wide
    causal rule, which is causality by position because both sides end at the same position. A sample's padding
    is one more leading segment (its keys are hidden by the padding bias, so its grouping does not matter). The
    chunks as cut by the keys' and the queries' ranges are per-sample sizes where the paddings differ; costs
    ``O(B * Nk)``, nothing ``Nq x Nk``."""
    pad = left_padding.detach().to("cpu", torch.int64).expand(batch_size)[:, None]
    pos = torch.arange(kv_offset, kv_offset + nk)[None]
    seg = torch.where(pos < pad, 0, 1 + torch.div(pos - pad, size, rounding_mode="floor"))  # (B, Nk) chunk index
    seg = seg - seg[:, :1]  # counted from each sample's first key
    width = int(seg.max()) + 1
    kv_rows = torch.zeros(batch_size, width, dtype=torch.int64).scatter_add_(1, seg, torch.ones_like(seg))
    q_rows = torch.zeros(batch_size, width, dtype=torch.int64).scatter_add_(
        1, seg[:, nk - nq :], torch.ones_like(seg[:, nk - nq :])
    )
    keep = kv_rows.any(0)  # drop chunks no sample has (a chunk with queries always has keys)
    kv_rows, q_rows = tuple(map(tuple, kv_rows[:, keep].tolist())), tuple(map(tuple, q_rows[:, keep].tolist()))
    return _cached(("chunked", kv_rows, q_rows), lambda: _chunks_mask(kv_rows, q_rows))


def _chunks_mask(kv_rows: tuple, q_rows: tuple) -> ZorroMask:
    names = [f"chunk{i}" for i in range(len(kv_rows[0]))]
    runs = AllowRuns.diagonal(len(names))
    per_sample = len(set(kv_rows)) > 1 or len(set(q_rows)) > 1
    if kv_rows == q_rows:  # self-attention (a prefill without a cache)
        sizes = torch.tensor(kv_rows) if per_sample else None
        return ZorroMask(list(zip(names, kv_rows[0])), runs, causal=True, sample_sizes=sizes)
    return ZorroMask(
        list(zip(names, q_rows[0])),
        runs,
        kv_segments=list(zip(names, kv_rows[0])),
        causal=True,
        sample_sizes=torch.tensor(q_rows) if per_sample else None,
        kv_sample_sizes=torch.tensor(kv_rows) if per_sample else None,
    )


def _static_cache_layout(
    reading, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask
) -> tuple[Optional[object], Optional[str]]:
    """A static cache's causal mask: the ``kv_length`` slots of a fixed-size cache, of which the first ``q_offset``
    (the tokens cached before these queries: an int, or a 0-d tensor, which keeps traces free of graph breaks) plus
    the queries hold keys; key j visible to query i iff ``j <= i + q_offset`` (and ``j > i + q_offset - W`` with a
    sliding window W), top-left aligned.

    - An int offset, or a tensor one read eagerly: the filled slots as ``kv_lengths`` (the empty ones never visited)
      and a causal cell, whose diagonal aligns bottom-right inside the filled keys; image blocks as their rule cells
      over the filled slots, the empty ones appended to the last text segment (:func:`_with_empty_slots`). A window
      is dropped where it hides none of the filled slots (a sliding layer's static cache before it fills).
    - One query (a decoding step) without blocks, traced or with a window that hides filled slots: the slots it sees
      as a key bias, no value read.
    - Traced, several queries or blocks: ``_TENSOR_VALUED`` (the caller reads the offset at a graph break).

    Padding goes in as the key bias throughout."""
    what = "a static cache"
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        return None, f"{what} with a key offset (kv_offset={kv_offset}): a sliding static cache"
    if reading.chunk is not None:
        return None, f"{what} with chunked attention (Llama 4's chunked layers)"
    if not reading.causal or reading.packed is not None:
        return None, f"{what} with a mask other than causal (with a window or blocks)"
    if attention_mask is not None and attention_mask.ndim != 2:
        return None, f"a {attention_mask.ndim}-D attention_mask given to the mask interface"
    keys = None
    if attention_mask is not None:
        keys = prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length].bool().expand(batch_size, -1)
    traced = torch.compiler.is_compiling() and isinstance(q_offset, torch.Tensor)
    if traced and (q_length != 1 or reading.blocks is not None):
        return _TENSOR_VALUED, "static"  # each query its own key range: read the offset at a graph break
    if traced or (q_length == 1 and reading.window is not None and int(q_offset) + 1 > reading.window):
        # one query: the slots it sees (up to q_offset, inside the window) as a key bias, no value read
        slot = torch.arange(kv_length, device=torch.as_tensor(q_offset).device)
        seen = slot <= q_offset
        if reading.window is not None:
            seen = seen & (slot > q_offset - reading.window)
        seen = seen[None].expand(batch_size, -1) if keys is None else seen[None] & keys.to(seen.device)
        bias = torch.zeros(seen.shape, dtype=torch.float32, device=seen.device).masked_fill(~seen, float("-inf"))
        return ZorroLayout(_plain_layout(q_length, kv_length, False), bias[:, None, None, :]), None
    filled = int(q_offset) + q_length
    if filled > kv_length:
        return None, f"{what} holding {filled} tokens in {kv_length} slots"
    if reading.window is not None and filled > reading.window:
        # a sliding layer's cache becomes bottom-right aligned once full; before, its window hides no filled slot
        return None, f"{what} whose window of {reading.window} hides some of its {filled} filled slots"
    blocks = None if reading.blocks is None else reading.blocks[:, :filled]
    if reading.blocks is not None and bool((reading.blocks[:, filled:kv_length] >= 0).any()):
        return None, f"{what} whose empty slots carry block ids (token_type_ids past the {filled} filled tokens)"
    if blocks is not None and bool((blocks >= 0).any()):
        inner = _blocks_layout(blocks.expand(batch_size, -1) if blocks.shape[0] == 1 else blocks, None, q_length)
        if not isinstance(inner, ZorroMask):
            return None, f"{what} with a block id on several runs"
        layout = _with_empty_slots(inner, kv_length - filled, batch_size)
    else:
        key = ("static", batch_size, q_length, kv_length, filled)
        allow = torch.ones(1, 1, dtype=torch.bool)
        layout = _cached(
            key,
            lambda: ZorroMask(
                [("tokens", q_length)],
                allow,
                kv_segments=[("tokens", kv_length)],
                kv_lengths=torch.full((batch_size, 1), filled),
                causal_cells=allow,
            ),
        )
    if keys is None or (not torch.compiler.is_compiling() and bool(keys[:, :filled].all())):
        return layout, None
    bias = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill(~keys, float("-inf"))
    return ZorroLayout(layout, bias[:, None, None, :]), None


def _with_empty_slots(mask: ZorroMask, empty: int, batch_size: int) -> ZorroMask:
    """``mask`` (no window) with ``empty`` keys appended to its last key segment and never visited (``kv_lengths``):
    a static cache's slots past the filled ones. Its causal cells align inside the valid keys, so nothing else
    changes."""
    kv_sizes = [*mask.kv_sizes[:-1], mask.kv_sizes[-1] + empty]
    per_sample = mask.kv_sample_sizes
    valid = torch.tensor([mask.kv_sizes]).repeat(batch_size, 1) if per_sample is None else per_sample.clone()
    if per_sample is not None:
        per_sample = per_sample.clone()
        per_sample[:, -1] += empty
    return ZorroMask(
        list(zip(mask.q_names, mask.q_sizes)),
        mask._runs,
        kv_segments=list(zip(mask.kv_names, kv_sizes)),
        kv_lengths=valid,
        sample_sizes=mask.sample_sizes,
        kv_sample_sizes=per_sample,
    )


def _layout_from_model(
    batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask
) -> tuple[Optional[object], Optional[str]]:
    """The ZorroMask (or :class:`ZorroLayout`) equal to what ``sdpa_mask`` would build from these arguments, or
    ``(None, why not)``."""
    reading, reason = _read(mask_function)
    if reading is None:
        return None, reason
    causal = reading.causal
    # i - W < j (positions) is zorro's j >= i + off - (W - 1) once the offsets are aligned (checked below)
    window = None if reading.window is None else (reading.window - 1, -1)
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return _static_cache_layout(reading, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask)
    if reading.bidirectional_window is not None:
        window = _bidirectional_window(reading.bidirectional_window, q_length, kv_length, q_offset - kv_offset)
        if window is False:
            return None, (
                f"a bidirectional window of {reading.bidirectional_window} that excludes the aligned diagonal "
                f"(q_offset={q_offset}, kv_offset={kv_offset}, Nq={q_length}, Nk={kv_length})"
            )
    if reading.blocks is not None and reading.packed is not None:
        return None, "bidirectional blocks together with packed sequences"
    if reading.packed is not None and (
        q_offset != 0 or kv_offset != 0 or q_length != kv_length or reading.packed.shape[-1] != q_length
    ):
        return None, f"packed sequences with a cache (Nq={q_length}, Nk={kv_length})"
    if torch.compiler.is_compiling() and (
        reading.blocks is not None or reading.packed is not None or reading.chunk is not None
    ):
        # the blocks' positions, the sequences' boundaries and the chunks' left padding are tensor values a trace
        # cannot read
        kind = "blocks" if reading.blocks is not None else "packed" if reading.packed is not None else "chunked"
        return _TENSOR_VALUED, kind
    blocks = None
    if reading.blocks is not None:
        blocks = reading.blocks[:, kv_offset : kv_offset + kv_length]
        if not bool((blocks >= 0).any()):
            blocks = None  # no block in these keys (PaliGemma's generate without token_type_ids): plain causal
    # causal_mask_function: key (j + kv_offset) visible to query (i + q_offset) iff j <= i + q_offset - kv_offset;
    # zorro's causal is j <= i + (Nk - Nq), so the two agree exactly when these offsets match
    if causal and q_offset - kv_offset != kv_length - q_length:
        if kv_offset == 0 and q_offset + q_length < kv_length:  # keys past the last query: a static cache's slots
            return _static_cache_layout(reading, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask)
        return None, (
            f"causal mask not aligned at the last key (q_offset={q_offset}, kv_offset={kv_offset}, "
            f"Nq={q_length}, Nk={kv_length}): a static cache"
        )
    if q_length == 0 or kv_length == 0:
        return None, f"empty attention (Nq={q_length}, Nk={kv_length})"
    if blocks is not None:
        layout = _blocks_layout(blocks.expand(batch_size, -1) if blocks.shape[0] == 1 else blocks, window, q_length)
        if layout is None:
            return None, (
                f"a block id on several runs with a cache offset (q_offset={q_offset}, kv_offset={kv_offset}, "
                f"Nq={q_length}, Nk={kv_length})"
            )
    elif reading.packed is not None:
        if reading.chunk is not None and bool(reading.chunk[1].any()):
            return None, "chunked attention over packed sequences with left padding"
        layout = _packed_layout(reading.packed, causal, window, None if reading.chunk is None else reading.chunk[0])
    elif reading.chunk is not None:
        layout = _chunked_layout(*reading.chunk, batch_size, q_length, kv_length, kv_offset)
    else:
        layout = _plain_layout(q_length, kv_length, causal, window)
    if attention_mask is None:
        return layout, None
    if attention_mask.ndim != 2:
        return None, f"a {attention_mask.ndim}-D attention_mask given to the mask interface"
    keys = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset : kv_offset + kv_length].bool()
    if keys.shape[0] != batch_size:
        keys = keys.expand(batch_size, -1)
    if not torch.compiler.is_compiling():
        lengths = keys.sum(-1)
        if bool((lengths == kv_length).all()):
            return layout, None
        right = torch.equal(keys, torch.arange(kv_length, device=keys.device)[None] < lengths[:, None])
        if right and reading.packed is None and blocks is None and reading.chunk is None:
            # right padding: padded keys are never visited
            return _padded_layout(q_length, kv_length, causal, window, lengths[:, None].cpu()), None
    # left padding, holes, or values that cannot be read while tracing: -inf on the padded keys
    bias = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill(~keys, float("-inf"))
    bias = bias[:, None, None, :]
    if isinstance(layout, ZorroGroups):
        return ZorroGroups([(rows, m, bias[rows]) for rows, m, _ in layout.groups], layout.batch_size), None
    return ZorroLayout(layout, bias), None
