"""Hugging Face transformers: ``attn_implementation="zorro"``.

After :func:`register`, a model whose attention goes through transformers' ``AttentionInterface`` (the models that
accept ``attn_implementation="sdpa"`` and build their masks with ``masking_utils``; tested on transformers 5.25:
BERT encoders, Llama/Mistral decoders, Gemma 3 and Gemma 4 image+text, PaliGemma) runs on
:func:`~zorro_kernels.zorro_attention`::

    from zorro_kernels.integrations import transformers as zt
    zt.register()
    model = AutoModel.from_pretrained(path, attn_implementation="zorro")
    out = model(input_ids, attention_mask=attention_mask)                 # same result as "sdpa"
    out = model(packed_ids, position_ids=pos, zorro_mask=ZorroMask.packed([7, 5, 9]))   # every layer on this layout

Two registrations make this work. The *mask interface* turns the mask a model asks for (causal or bidirectional, a
2-D padding ``attention_mask``, cache offsets) into a :class:`~zorro_kernels.ZorroMask` when one can express it; the
*attention function* runs zorro_attention on that mask, or on the ``zorro_mask=`` keyword of the model call, which
replaces the model's own mask in every attention call (padding included: give it ``lengths`` if you pad).

What runs on zorro_attention (and equals "sdpa" up to floating-point rounding; docs/integrations.md has the table):
    - bidirectional attention (encoders, cross-attention) and causal attention, including decoding with a
      DynamicCache (the key window ends at the last query: bottom-right alignment, which is what zorro's
      ``causal=True`` means);
    - static caches (keys past the last query): eagerly the filled slots as ``kv_lengths`` with a causal cell (or
      image blocks' cells);
      a compiled decoding step (tensor offset) as a key bias on the slots past the offset;
    - any padding: right padding as per-sample ``kv_lengths`` (padded keys are never visited), left padding (what
      batched ``generate`` uses) and holes as a key bias of ``-inf`` on the padded keys (``bias=``, ``(B, 1, 1, Nk)``);
    - sliding-window layers (Mistral, Qwen2, Gemma: transformers' ``sliding_window_causal_mask_function``) as
      ``ZorroMask(window=(W - 1, -1), causal=True)``, with or without a sliding cache;
    - sequences packed by restarting ``position_ids`` (``DataCollatorWithFlattening``), which transformers composes
      as causal on remapped positions AND the same packed sequence: block-diagonal causal segments (rows packed
      differently: per-sample ``sample_sizes``);
    - bidirectional blocks in a causal mask (``block_sequence_ids``: Gemma 3 and Gemma 4 images, PaliGemma's
      prefix), alone or AND a sliding window: rule cells (``ZorroMask.causal_with_blocks``) with per-sample
      ``sample_sizes``; the mask functions are read from their closures, never evaluated on ``N x N`` pairs; with a
      cache offset (a chunked prefill cutting images) as cross-attention cells over the runs cut to the queries;
    - a mask built once by a composite model (PaliGemma) and handed to its inner language model: it passes through
      transformers' mask preprocessing as a 4-D mask or BlockMask does;
    - ready-made 4-D masks passed to the model: a float mask (ALiBi, T5-style biases) goes in as ``bias=``, a bool
      mask as ``bias=`` of ``0 / -inf``; T5-style ``position_bias`` is added to the bias;
    - grouped-query attention (``num_key_value_heads < num_attention_heads``) without copying K/V;
    - models under ``torch.compile`` (no graph break around attention: zorro_attention runs behind its custom ops;
      the padding mask's values cannot be read while tracing, so padding always goes in as the key bias there);
      a layout held in tensor values (packed sequences' boundaries: transformers treats every ``position_ids``
      without an ``attention_mask`` as packed there; image blocks' positions) is read eagerly at one graph break per
      mask, which ``fullgraph=True`` refuses with an error naming the alternatives (``zorro_mask=``, which needs no
      break, or an ``attention_mask``);
    - any model call with ``zorro_mask=`` (eager or compiled). A model on another implementation ("sdpa", flash,
      flex) raises ValueError when given ``zorro_mask=`` after :func:`register`, instead of ignoring it.

What falls back to transformers' own "sdpa" function, counted in
:func:`zorro_kernels.integrations.fallback_counts` under ``"transformers: <reason>"`` (or raises
:class:`~zorro_kernels.integrations.FallbackError` after ``register(strict=True)``):
    - masks composed from other parts: chunked layers, bidirectional sliding windows, custom
      ``or_mask_function``/``and_mask_function`` overlays;
    - blocks together with packing; a block id on several runs of a sample with a cache offset;
    - static caches under torch.compile with more than one query (a prefill), or with packing, a window hiding
      filled slots or block ids on empty slots;
    - attention dropout in training mode (``dropout > 0``), logit ``softcap``, attention sinks, a value head dim
      different from the query's. With a layout known these run SDPA on its dense form, so the layout is still
      honoured.

What is refused: ``attn_implementation="zorro"`` on a model transformers would not run on "sdpa" that declares no
attention-backend support (GIT): its attention layers do not all call the attention interface.

In a fallback the model computes exactly what "sdpa" computes. Outputs at padded query positions: with right padding
or under bidirectional attention padded queries attend the real keys like SDPA's do; a left-padded query under causal
attention sees only padded keys and is 0 (SDPA's value there is never read).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from ..attention import zorro_attention
from ..mask import ZorroMask
from ..tilemap import AllowRuns
from ._fallback import dense_for_fallback, record_fallback

try:
    import transformers.masking_utils as _masking_utils
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        and_masks,
        bidirectional_mask_function,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        packed_sequence_mask_function,
        prepare_padding_mask,
        remap_positions_for_packed_sequence,
        sdpa_mask,
        sliding_window_overlay,
    )
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "zorro_kernels.integrations.transformers needs Hugging Face transformers >= 5 (pip install 'transformers>=5.0')"
    ) from e

# Older mask interfaces describe the cache by `cache_position` instead of `q_offset`/`kv_offset`; reading those as
# zero offsets would build wrong causal masks while decoding, so refuse them outright.
if "q_offset" not in inspect.signature(sdpa_mask).parameters:  # pragma: no cover - depends on the installed version
    raise ImportError(
        "zorro_kernels.integrations.transformers needs a transformers whose mask interface takes "
        "q_offset/kv_offset (5.x, tested on 5.24); please upgrade transformers"
    )

__all__ = ["NAME", "register", "zorro_attention_forward", "zorro_mask_interface"]

NAME = "zorro"
_INTEGRATION = "transformers"
# why the mask interface handed a model a dense mask; read back by the attention function for the fallback record
_REASON_ATTR = "_zorro_fallback_reason"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_strict = False
_zorro_mask_in_call = False  # set by _note_zorro_mask


def register(*, strict: bool = False) -> None:
    """Register ``attn_implementation="zorro"`` with transformers (the attention function and its mask interface).

    Args:
        strict: raise :class:`~zorro_kernels.integrations.FallbackError` instead of falling back to "sdpa" where
            zorro cannot run an attention call (see the module docstring for when).

    Idempotent; call it before ``from_pretrained(..., attn_implementation="zorro")`` or
    ``model.set_attn_implementation("zorro")``.
    """
    global _strict
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    _strict = strict
    AttentionInterface.register(NAME, zorro_attention_forward)
    AttentionMaskInterface.register(NAME, zorro_mask_interface)
    if not getattr(_masking_utils._preprocess_mask_arguments, "_zorro_guard", False):
        _masking_utils._preprocess_mask_arguments = _passing_zorro_masks(_masking_utils._preprocess_mask_arguments)
    if not getattr(PreTrainedModel.get_correct_attn_implementation, "_zorro_guard", False):
        PreTrainedModel.get_correct_attn_implementation = _refusing_models_off_the_interface(
            PreTrainedModel.get_correct_attn_implementation
        )
    for name, fn in list(AttentionInterface._global_mapping.items()):
        if name != NAME and not getattr(fn, "_zorro_guard", False):
            AttentionInterface.register(name, _refusing_zorro_mask(name, fn))


def _refusing_zorro_mask(name: str, fn):
    """``fn`` (another attention implementation) raising when a model call carries ``zorro_mask=``, which it would
    otherwise ignore silently. Models on "eager" call their own function, outside the interface: not covered."""

    @functools.wraps(fn)
    def guarded(module, *args, **kwargs):
        if kwargs.get("zorro_mask") is not None:
            raise ValueError(
                f"zorro_mask= was given but {type(module).__name__} runs attn_implementation={name!r}, "
                f'which would ignore it: load the model with attn_implementation="{NAME}" (or call '
                f'model.set_attn_implementation("{NAME}"))'
            )
        return fn(module, *args, **kwargs)

    guarded._zorro_guard = True
    return guarded


def _refusing_models_off_the_interface(get_correct):
    """transformers' check of a requested implementation, refusing "zorro" for a model whose attention layers do not
    all call the attention interface. Such a model would accept the name and then run its own attention on the mask
    our interface built (GIT's text layers add a boolean mask to the scores as +1/0). The test is transformers' own
    for "sdpa", which zorro replaces: the model supports sdpa, or declares that its attention goes through the
    interface (``_supports_attention_backend``)."""

    @functools.wraps(get_correct)
    def checked(self, requested_attention, *args, **kwargs):
        cls = type(self)
        if requested_attention == NAME and not (cls._supports_sdpa or cls._supports_attention_backend):
            raise ValueError(
                f'attn_implementation="{NAME}" is not supported by {cls.__name__}: some of its attention layers do '
                f'not call transformers\' attention interface (it supports neither "sdpa" nor attention backends) '
                f'and would run their own attention on zorro\'s masks; load it with attn_implementation="eager"'
            )
        chosen = get_correct(self, requested_attention, *args, **kwargs)
        if requested_attention == NAME:
            for model in self.modules():
                if isinstance(model, PreTrainedModel) and not getattr(model, "_zorro_noting", False):
                    model.register_forward_pre_hook(_note_zorro_mask, with_kwargs=True)
                    model._zorro_noting = True
        return chosen

    checked._zorro_guard = True
    return checked


def _note_zorro_mask(module, args, kwargs) -> None:
    """Forward pre-hook of the models set to "zorro": whether this call carries ``zorro_mask=``, for the mask
    interface under torch.compile (see :class:`_Unread`). Only a hint: the attention function stays correct either
    way."""
    global _zorro_mask_in_call
    _zorro_mask_in_call = kwargs.get("zorro_mask") is not None


def _passing_zorro_masks(preprocess):
    """transformers' mask preprocessing, letting a built ZorroMask, :class:`ZorroLayout`, :class:`ZorroGroups` or
    :class:`_Unread` through unchanged as it lets a 4-D tensor or a BlockMask through. A composite model (PaliGemma)
    builds the mask once and hands it to its inner language model, which calls ``create_causal_mask`` again with it
    as ``attention_mask``; transformers only knows its own mask types there and reads ``attention_mask.ndim``."""

    @functools.wraps(preprocess)
    def passing(*args, **kwargs):
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[2] if len(args) > 2 else None)
        if isinstance(mask, (ZorroMask, ZorroLayout, ZorroGroups, _Unread)):
            return True, mask, None, None, None, None, None  # transformers' own early exit for a ready-made mask
        return preprocess(*args, **kwargs)

    passing._zorro_guard = True
    return passing


# ------------------------------------------------------------------------------------------------------ layouts
_LAYOUTS: dict = {}
_MAX_LAYOUTS = 64


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


def _describe(fn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return name.replace(".<locals>", "")


def _code(fn):
    return getattr(fn, "__code__", None)


_AND_MASKS_CODE = _code(and_masks(causal_mask_function))
_OR_MASKS_CODE = _code(or_masks(causal_mask_function))
_SLIDING_OVERLAY_CODE = _code(sliding_window_overlay(1))
_REMAP_CODE = _code(remap_positions_for_packed_sequence(causal_mask_function, None))
_PACKED_CODE = _code(packed_sequence_mask_function(None))
_BLOCKWISE_CODE = _code(blockwise_overlay(None))


def _free(fn, name: str):
    """The value of ``fn``'s closure variable ``name``. These are transformers' internals: a release that renames one
    makes the mask unreadable (a counted fallback naming it), never a crash."""
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    try:
        return cells[name].cell_contents
    except (KeyError, ValueError) as e:  # ValueError: an empty cell
        raise _Unreadable(f"{_describe(fn)} has no closure variable {name!r}") from e


class _Reading:
    """What a mask function composed by transformers' ``create_*_mask`` says, read from its closures (no N x N
    evaluation): an AND of a base rule (``causal``), an optional sliding ``window`` W (key j visible to query i iff
    ``i - W < j``), optional packed sequences (``packed``: transformers' ``(B, N)`` sequence index per token, found
    from restarting ``position_ids``) and optional bidirectional blocks OR-ed to the causal rule (``blocks``:
    ``block_sequence_ids``, ``(B, >= Nk)``, -1 outside blocks: Gemma 3/4 images, PaliGemma's prefix)."""

    def __init__(self):
        self.causal: Optional[bool] = None
        self.window: Optional[int] = None
        self.packed: Optional[torch.Tensor] = None
        self.blocks: Optional[torch.Tensor] = None
        self.remapped = False  # a part runs on positions remapped per packed sequence


class _Unreadable(Exception):
    pass


def _read_into(reading: _Reading, fn, *, in_or: bool = False) -> None:
    code = _code(fn)
    if fn is causal_mask_function or fn is bidirectional_mask_function:
        causal = fn is causal_mask_function
        if reading.causal is not None and reading.causal != causal:
            raise _Unreadable("both causal and bidirectional")
        reading.causal = causal
    elif code is _AND_MASKS_CODE and not in_or:
        for part in _free(fn, "mask_functions"):
            _read_into(reading, part)
    elif code is _SLIDING_OVERLAY_CODE and not in_or:
        w = _free(fn, "sliding_window")
        if not isinstance(w, int) or w < 1 or reading.window not in (None, w):
            raise _Unreadable(f"sliding window {w!r}")
        reading.window = w
    elif code is _PACKED_CODE and not in_or:
        reading.packed = _free(fn, "packed_sequence_mask")
    elif code is _REMAP_CODE:
        # positions restart per packed sequence and count up by one inside it (that is how transformers finds the
        # sequences), so inside a sequence the remapped rule is the rule on token indices; the packed term (checked
        # by the caller) removes every pair across sequences
        reading.remapped = True
        _read_into(reading, _free(fn, "mask_function"), in_or=in_or)
    elif code is _OR_MASKS_CODE and not in_or:
        parts = _free(fn, "mask_functions")
        if len(parts) != 2 or _code(parts[1]) is not _BLOCKWISE_CODE or reading.blocks is not None:
            raise _Unreadable("an OR of mask functions other than causal OR blocks")
        inner = _Reading()
        _read_into(inner, parts[0], in_or=True)
        if inner.causal is not True or inner.window is not None or inner.packed is not None:
            raise _Unreadable("bidirectional blocks OR-ed to something other than the causal rule")
        reading.causal, reading.remapped = True, reading.remapped or inner.remapped
        reading.blocks = _free(parts[1], "block_sequence_ids")
    else:
        raise _Unreadable(_describe(fn))


def _read(mask_function) -> tuple[Optional[_Reading], Optional[str]]:
    reading = _Reading()
    try:
        _read_into(reading, mask_function)
        if reading.causal is None:
            raise _Unreadable("no causal or bidirectional rule")
        if reading.window is not None and not reading.causal:
            raise _Unreadable("a sliding window on bidirectional attention")
        if reading.remapped and reading.packed is None:
            raise _Unreadable("positions remapped without packed sequences")
    except _Unreadable as e:
        return None, (
            f"the model's mask is not plain causal/bidirectional, a causal sliding window, packed sequences or "
            f"bidirectional blocks in a causal mask ({_describe(mask_function)}: {e})"
        )
    return reading, None


def _run_lengths(ids: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(ids, return_counts=True)[1].tolist()


def _packed_layout(packed: torch.Tensor, causal: bool, window) -> ZorroMask:
    """The packed sequences of ``packed`` (transformers' ``(B, N)`` sequence index per token) as block-diagonal
    segments (per-sample ``sample_sizes`` where the samples differ). Rows that each hold one sequence (what
    transformers hands over under torch.compile for plain ``position_ids``) are the plain layout."""
    if not bool(packed[:, -1].any()):  # the index counts up from 0: a last token in sequence 0 means one sequence
        return _plain_layout(packed.shape[-1], packed.shape[-1], causal, window)
    if packed.shape[0] == 1 or bool((packed == packed[:1]).all()):
        return _packed_mask(tuple(_run_lengths(packed[0])), causal, window)
    # other boundaries per sample: one mask whose sample_sizes place them (zero-size sequences pad the shorter lists)
    rows = [_run_lengths(ids) for ids in packed]
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


def _static_cache_layout(
    reading, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask
) -> tuple[Optional[object], Optional[str]]:
    """A static cache's causal mask: the ``kv_length`` slots of a fixed-size cache, of which the first ``q_offset``
    (the tokens cached before these queries: an int, or a 0-d tensor, which keeps traces free of graph breaks) plus
    the queries hold keys; key j visible to query i iff ``j <= i + q_offset``, top-left aligned. An int offset, or
    a tensor one read eagerly: the filled slots as ``kv_lengths`` (the empty ones never visited) and a causal cell,
    whose diagonal aligns bottom-right inside the filled keys. A tensor offset while tracing: a decoding step (one
    query) sees the slots up to ``q_offset``, a key bias, no value read; a longer chunk would need a mask per query,
    so it falls back. Padding goes in as the key bias either way. A sliding window (a sliding layer's static cache
    before it fills: its keys in slots from 0) is taken only where it hides none of the filled slots (then it is
    dropped). Image blocks (eagerly): their rule cells over the filled slots, the empty ones appended to the last
    text segment (:func:`_with_empty_slots`)."""
    what = "a static cache"
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        return None, f"{what} with a key offset (kv_offset={kv_offset}): a sliding static cache"
    if not reading.causal or reading.packed is not None:
        return None, f"{what} with a mask other than causal (with a window or blocks)"
    if attention_mask is not None and attention_mask.ndim != 2:
        return None, f"a {attention_mask.ndim}-D attention_mask given to the mask interface"
    keys = None
    if attention_mask is not None:
        keys = prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length].bool().expand(batch_size, -1)
    if torch.compiler.is_compiling() and isinstance(q_offset, torch.Tensor):
        if reading.window is not None or reading.blocks is not None:
            return None, f"{what} under torch.compile with a sliding window or blocks"
        if q_length != 1:
            return None, f"{what} under torch.compile with Nq={q_length} > 1 (each query sees its own key range)"
        seen = torch.arange(kv_length, device=q_offset.device) <= q_offset
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
    if reading.blocks is not None and reading.packed is not None:
        return None, "bidirectional blocks together with packed sequences"
    if reading.packed is not None and (
        q_offset != 0 or kv_offset != 0 or q_length != kv_length or reading.packed.shape[-1] != q_length
    ):
        return None, f"packed sequences with a cache (Nq={q_length}, Nk={kv_length})"
    if torch.compiler.is_compiling() and (reading.blocks is not None or reading.packed is not None):
        # the blocks' positions and the sequences' boundaries are tensor values a trace cannot read
        return _TENSOR_VALUED, "blocks" if reading.blocks is not None else "packed"
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
        layout = _packed_layout(reading.packed, causal, window)
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
        if right and reading.packed is None and blocks is None:
            # right padding: padded keys are never visited
            return _padded_layout(q_length, kv_length, causal, window, lengths[:, None].cpu()), None
    # left padding, holes, or values that cannot be read while tracing: -inf on the padded keys
    bias = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill(~keys, float("-inf"))
    bias = bias[:, None, None, :]
    if isinstance(layout, ZorroGroups):
        return ZorroGroups([(rows, m, bias[rows]) for rows, m, _ in layout.groups], layout.batch_size), None
    return ZorroLayout(layout, bias), None


_TENSOR_VALUED = object()  # _layout_from_model's layout when it must read tensor values while tracing


class _Unread:
    """A layout that lies in tensor values (packed sequences' boundaries, blocks' positions; ``kind`` says which),
    which a trace cannot read: the mask interface's arguments (``args`` as :func:`_layout_from_model` takes them,
    ``kwargs`` the rest of ``sdpa_mask``'s), read eagerly at a graph break (:data:`_AT_GRAPH_BREAK`) and kept in
    ``read`` (a layout, or the fallback's dense mask). Under torch.compile the mask interface reads it at once, or,
    when the model call carries ``zorro_mask=`` (which replaces it in every attention call), hands it over unread: an
    attention call without ``zorro_mask=`` reads it then, and with it no graph break is needed (``fullgraph=True``)."""

    def __init__(self, kind: str, args: tuple, kwargs: dict):
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.done, self.read = False, None


def _read_now(unread: _Unread):
    if not unread.done:
        layout, reason = _layout_from_model(*unread.args)
        unread.read = layout if layout is not None else _dense(unread.args, unread.kwargs, reason)
        unread.done = True
    return unread.read


# _read_now outside the trace (dynamo breaks the graph at the call and runs it eagerly). fullgraph=True forbids that
# break: dynamo's error then quotes these reasons.
_AT_GRAPH_BREAK = {
    "packed": torch.compiler.disable(
        _read_now,
        reason=(
            "zorro reads packed sequences from position_ids at a graph break (under torch.compile transformers treats "
            "every position_ids without an attention_mask as packed, and their boundaries are tensor values a trace "
            "cannot read), which fullgraph=True forbids: pass zorro_mask=ZorroMask.packed(...) for packed rows, or an "
            "attention_mask for rows holding one sequence each, or compile without fullgraph=True"
        ),
    ),
    "blocks": torch.compiler.disable(
        _read_now,
        reason=(
            "zorro reads bidirectional blocks (image positions, token_type_ids) at a graph break (they are tensor "
            "values a trace cannot read), which fullgraph=True forbids: pass zorro_mask= with the layout (e.g. "
            "ZorroMask.causal_with_blocks(...)), or compile without fullgraph=True"
        ),
    ),
}


def _dense(args: tuple, kwargs: dict, reason: str):
    """``sdpa_mask``'s mask for :func:`_layout_from_model`'s ``args``, carrying why zorro could not express it."""
    batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask = args
    dense = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )
    if dense is not None:
        # generate makes a compileable cache's masks contiguous, which copies an expanded mask and drops the reason
        dense = dense.contiguous()
        setattr(dense, _REASON_ATTR, reason)
    return dense


def zorro_mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
):
    """transformers' mask interface for "zorro" (called by ``create_causal_mask`` / ``create_bidirectional_mask``).

    Args: as ``transformers.masking_utils.sdpa_mask``: ``attention_mask`` is the 2-D padding mask
    ``(batch_size, >= kv_length)`` (True = real token) or None; ``q_offset``/``kv_offset`` come from the cache.

    Returns:
        A :class:`~zorro_kernels.ZorroMask` over ``q_length`` queries and ``kv_length`` keys when the requested mask
        is expressible as one (plain causal/bidirectional or a causal sliding window, keys ending at the last query;
        right padding as lengths), a :class:`ZorroLayout` (that mask plus a key bias) for other padding, an
        :class:`_Unread` layout under torch.compile when the call carries ``zorro_mask=``; otherwise exactly what
        ``sdpa_mask`` returns (a bool ``(batch_size, 1, q_length, kv_length)`` tensor or None), which
        the attention function then runs through "sdpa" and records as a fallback.
    """
    args = (batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    layout, reason = _layout_from_model(*args)
    if layout is _TENSOR_VALUED:
        unread = _Unread(reason, args, kwargs)
        # read now, at one graph break before the layers (a break inside them splits the model into graphs per
        # layer), unless the call carries zorro_mask=: then no attention call reads it and fullgraph=True still works
        return unread if _zorro_mask_in_call else _AT_GRAPH_BREAK[reason](unread)
    if layout is not None:
        return layout
    return _dense(args, kwargs, reason)


# ------------------------------------------------------------------------------------------------------ attention
def _layout_without_mask(module, nq: int, nk: int, is_causal) -> tuple[Optional[ZorroMask], Optional[str]]:
    """SDPA's meaning of ``attention_mask=None``: causal iff ``is_causal`` (else the module's flag) and Nq > 1,
    aligned top-left — which is zorro's bottom-right alignment only when Nq == Nk."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and nq > 1
    if not causal or nq == nk:
        return _plain_layout(nq, nk, causal), None
    return None, (
        f"causal attention without a mask and Nq={nq} != Nk={nk}: SDPA aligns it top-left "
        f"(e.g. the prefill of an empty static cache)"
    )


def _unsupported(query, key, value, dropout, kwargs) -> Optional[str]:
    if dropout and dropout > 0:
        return f"attention dropout p={dropout} in training mode (zorro_attention has no dropout)"
    if kwargs.get("position_bias") is not None:
        return "additive position_bias (T5-style relative attention bias; pass it as a 4-D float attention_mask)"
    if kwargs.get("softcap") is not None:
        return "attention logit softcapping"
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return f"head dims differ (q {query.shape[-1]}, k {key.shape[-1]}, v {value.shape[-1]})"
    if query.dtype not in _DTYPES:
        return f"dtype {query.dtype}"
    return None


def _check_zorro_mask(mask, module, query, key) -> ZorroMask:
    if not isinstance(mask, ZorroMask):
        raise TypeError(f"zorro_mask must be a ZorroMask, got {type(mask).__name__}")
    nq, nk = query.shape[2], key.shape[2]
    if mask.num_q != nq or mask.num_kv != nk:
        where = type(module).__name__ + (f" (layer {module.layer_idx})" if hasattr(module, "layer_idx") else "")
        raise ValueError(
            f"zorro_mask covers {mask.num_q} queries x {mask.num_kv} keys, but {where} attends Nq={nq} queries x "
            f"Nk={nk} keys. zorro_mask= replaces the mask of every attention call of the model, so it must match "
            f"each of them (cross-attention layers and decoding with a cache change Nq/Nk)."
        )
    return mask


def zorro_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for "zorro"; a drop-in for ``sdpa_attention_forward``.

    Args:
        module: the calling attention module (``is_causal``, ``num_key_value_groups``, ``layer_idx`` are read).
        query: ``(B, H, Nq, D)``; key, value: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0``.
        attention_mask: what the model's mask interface built — a ZorroMask or :class:`ZorroLayout` (zorro path), None
            (no mask: SDPA's ``is_causal`` rule), a dense tensor it could not express (a fallback) — or a 4-D mask the
            caller gave the model (run as ``bias=``: float as is, bool as ``0 / -inf``).
        dropout, scaling, is_causal: as for ``sdpa_attention_forward``.
        **kwargs: the model call's keywords; ``zorro_mask`` (a ZorroMask over ``Nq`` x ``Nk`` tokens) replaces
            ``attention_mask``.

    Returns:
        ``(out, None)``: ``out (B, Nq, H, D)`` in query's dtype, as "sdpa" returns it.

    Raises:
        TypeError/ValueError for a ``zorro_mask`` of the wrong type or size; FallbackError in strict mode.
    """
    reason, parts = None, None  # parts: [(sample rows or None for all, ZorroMask, key bias or None)]
    zorro_mask = kwargs.pop("zorro_mask", None)
    if zorro_mask is None and isinstance(attention_mask, _Unread):
        attention_mask = (
            attention_mask.read if attention_mask.done else _AT_GRAPH_BREAK[attention_mask.kind](attention_mask)
        )
    if zorro_mask is not None:
        parts = [(None, _check_zorro_mask(zorro_mask, module, query, key), None)]
    elif isinstance(attention_mask, ZorroMask):
        parts = [(None, attention_mask, None)]
    elif isinstance(attention_mask, ZorroLayout):
        parts = [(None, attention_mask.mask, attention_mask.bias)]
    elif isinstance(attention_mask, ZorroGroups):
        parts = attention_mask.groups
    elif attention_mask is None:
        mask, reason = _layout_without_mask(module, query.shape[2], key.shape[2], is_causal)
        parts = None if mask is None else [(None, mask, None)]
    elif getattr(attention_mask, _REASON_ATTR, None) is not None:  # our mask interface could not express it
        reason = getattr(attention_mask, _REASON_ATTR)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
        # a ready-made 4-D mask from the model's caller holds everything: a plain layout plus the mask as a bias
        bias = (
            attention_mask
            if attention_mask.is_floating_point()
            else torch.zeros(attention_mask.shape, dtype=query.dtype, device=attention_mask.device).masked_fill(
                ~attention_mask.bool(), float("-inf")
            )
        )
        parts = [(None, _plain_layout(query.shape[2], key.shape[2], False), bias)]
    else:
        reason = f"the model passed a ready-made {type(attention_mask).__name__} mask"
    if parts is not None:
        reason = _unsupported(query, key, value, dropout, kwargs)
    if reason is None:
        return _by_parts(
            parts, query, key, value, lambda q, k, v, m, b: zorro_attention(q, k, v, m, bias=b, scale=scaling)
        ).transpose(1, 2).contiguous(), None

    record_fallback(_INTEGRATION, reason, strict=_strict)
    if parts is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    def sdpa_on_layout(q, k, v, mask, bias):
        # an expressible layout meeting a feature zorro lacks: SDPA on its dense form, rows that see nothing zeroed
        safe, live = dense_for_fallback(mask, q.device)
        if bias is not None:  # the bias on the visible pairs; rows left with only -inf come out of SDPA as 0
            safe = torch.where(safe, bias.to(q.dtype), float("-inf"))
        out, _ = sdpa_attention_forward(
            module, q, k, v, safe, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
        if not bool(live.all()):
            out = out.masked_fill(~live[:, :, None, None], 0.0)
        return out.transpose(1, 2)  # back to (B, H, Nq, D), as zorro_attention returns it

    return _by_parts(parts, query, key, value, sdpa_on_layout).transpose(1, 2).contiguous(), None


def _by_parts(parts, query, key, value, attend) -> torch.Tensor:
    """``attend(q, k, v, mask, bias) -> (b, H, Nq, D)`` on each part's samples, assembled into ``(B, H, Nq, D)``."""
    if len(parts) == 1 and parts[0][0] is None:
        _, mask, bias = parts[0]
        return attend(query, key, value, mask, bias)
    out = None
    for rows, mask, bias in parts:
        part = attend(query[rows], key[rows], value[rows], mask, bias)
        if out is None:
            out = part.new_zeros((query.shape[0], *part.shape[1:]))
        out = out.index_copy(0, rows, part)
    return out
