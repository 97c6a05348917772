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

Two registrations make this work. The *mask interface* turns the mask a model asks for (causal or bidirectional, a 2-D
padding ``attention_mask``, cache offsets) into a :class:`~zorro_kernels.ZorroMask` when one can express it (the reading
of transformers' composed masks lives in ``_hf_reading``, the layouts built from it in ``_hf_layouts``); the *attention
function* runs zorro_attention on that mask, or on the ``zorro_mask=`` keyword of the model call, which replaces the
model's own mask in every attention call (padding included: give it ``lengths`` if you pad).

What runs on zorro_attention (and equals "sdpa" up to floating-point rounding; docs/integrations.md has the table):
    - bidirectional attention (encoders, cross-attention) and causal attention, including decoding with a
      DynamicCache (the key window ends at the last query: bottom-right alignment, which is what zorro's
      ``causal=True`` means);
    - static caches (keys past the last query): eagerly the filled slots as ``kv_lengths`` with a causal cell (or
      image blocks' cells); a decoding step compiled (tensor offset) or under a window as a key bias on the slots it
      sees; a compiled chunk of several queries reads the offset at a graph break (``fullgraph=True`` refuses it);
    - any padding: right padding as per-sample ``kv_lengths`` (padded keys are never visited), left padding (what
      batched ``generate`` uses) and holes as a key bias of ``-inf`` on the padded keys (``bias=``, ``(B, 1, 1, Nk)``);
    - sliding-window layers (Mistral, Qwen2, Gemma: transformers' ``sliding_window_causal_mask_function``) as
      ``ZorroMask(window=(W - 1, -1), causal=True)``, with or without a sliding cache;
    - bidirectional sliding windows (ModernBERT's local layers: ``sliding_window_bidirectional_mask_function``, key
      j visible to query i iff ``|i - j| <= W``) as ``window=(W, W)``, packed or padded; Gemma 3 text's
      ``use_bidirectional_attention`` overlays (its own functions, recognised by their bytecode) as bidirectional
      attention and a bidirectional window;
    - chunked causal layers (Llama 4: ``chunked_causal_mask_function``, the same chunk of C positions counted from
      each sample's first real token) as one segment per chunk with the row-wide ``causal`` rule, in a prefill, a
      prefill in chunks and decoding over the layers' sliding cache (per-sample sizes where left paddings differ);
      packed by ``position_ids``, one causal segment per chunk of each sequence;
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
    - masks composed from other parts: custom ``or_mask_function``/``and_mask_function`` overlays, chunks with a
      window or blocks; a bidirectional window that misses the aligned diagonal (offsets shifting it);
    - blocks together with packing; a block id on several runs of a sample with a cache offset;
    - static caches with packing, a chunk of several queries whose window hides filled slots, block ids on
      empty slots, or chunked layers with a tensor offset;
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
from ..reference import expand_kv_heads
from ._fallback import dense_for_fallback, record_fallback

try:
    import transformers.masking_utils as _masking_utils
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from ._hf_layouts import _TENSOR_VALUED, ZorroGroups, ZorroLayout, _layout_from_model, _plain_layout
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
    "static": torch.compiler.disable(
        _read_now,
        reason=(
            "zorro reads a static cache's offset at a graph break when several queries (a prefill) or image blocks "
            "attend its slots (the offset is a tensor a trace cannot read, and each query sees its own key range), "
            "which fullgraph=True forbids: compile only the decoding steps (one query, no break), pass zorro_mask=, "
            "or compile without fullgraph=True"
        ),
    ),
    "chunked": torch.compiler.disable(
        _read_now,
        reason=(
            "zorro reads chunked attention's chunks (Llama 4) at a graph break (they start after each sample's left "
            "padding, a tensor value a trace cannot read), which fullgraph=True forbids: pass zorro_mask= with the "
            "chunks as segments, or compile without fullgraph=True"
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
        return _library_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    def sdpa_on_layout(q, k, v, mask, bias):
        # an expressible layout meeting a feature zorro lacks: SDPA on its dense form, rows that see nothing zeroed
        safe, live = dense_for_fallback(mask, q.device)
        if bias is not None:  # the bias on the visible pairs; rows left with only -inf come out of SDPA as 0
            safe = torch.where(safe, bias.to(q.dtype), float("-inf"))
        out, _ = _library_attention(module, q, k, v, safe, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
        if torch.compiler.is_compiling() or not bool(live.all()):  # traced: no data-dependent branch
            out = out.masked_fill(~live[:, :, None, None], 0.0)
        return out.transpose(1, 2)  # back to (B, H, Nq, D), as zorro_attention returns it

    return _by_parts(parts, query, key, value, sdpa_on_layout).transpose(1, 2).contiguous(), None


def _library_attention(module, query, key, value, mask, *, dropout, scaling, is_causal, **kwargs):
    """transformers' own attention for a fallback: ``sdpa_attention_forward``, except with logit softcapping, which
    sdpa refuses (raises): then the eager computation the softcapping models (Gemma 2) use, ``softmax(tanh(s / c) *
    c + mask)``, a row with no key left 0 (as sdpa gives it). ``query (B, H, Nq, D)``, ``key, value (B, Hkv, Nk,
    D)``; ``mask``: bool (True = may attend) or an additive float mask broadcastable to ``(B, H, Nq, Nk)``, or None.
    Returns ``(out (B, Nq, H, D), None)``."""
    softcap = kwargs.get("softcap")
    if softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    key, value = expand_kv_heads(key, query.shape[1]), expand_kv_heads(value, query.shape[1])
    scores = torch.tanh(torch.matmul(query, key.transpose(2, 3)) * scaling / softcap) * softcap
    if mask is None and is_causal:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    dead = torch.isneginf(scores).all(-1, keepdim=True)  # a row with no key left: 0, as sdpa gives it
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1, dtype=torch.float32).masked_fill(dead, 0.0)
    probs = probs.to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


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
