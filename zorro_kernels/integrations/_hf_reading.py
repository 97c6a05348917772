"""Reading the mask functions Hugging Face transformers composes: which of its parts, with which parameters.

transformers hands a mask interface a *mask function* built from its own parts (``and_masks`` / ``or_masks`` of
causal, bidirectional, sliding-window, chunked, packed-sequence and block overlays) and, for a few models, overlays
defined in the model's own module (Gemma 3's text-only ``use_bidirectional_attention``). :func:`_read` takes such a
function apart through its closures, never evaluating it on ``N x N`` pairs, into a :class:`_Reading`, or says why
it cannot; :mod:`._hf_layouts` builds the equal ZorroMask from that reading. A transformers release that renames
one of these internals makes a mask unreadable (a counted fallback naming it), never a crash.
"""

from __future__ import annotations

import dis
from typing import Optional

import torch
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    blockwise_overlay,
    causal_mask_function,
    chunked_overlay,
    or_masks,
    packed_sequence_mask_function,
    remap_positions_for_packed_sequence,
    sliding_window_bidirectional_overlay,
    sliding_window_overlay,
)


def _describe(fn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return name.replace(".<locals>", "")


def _code(fn):
    return getattr(fn, "__code__", None)


_AND_MASKS_CODE = _code(and_masks(causal_mask_function))
_OR_MASKS_CODE = _code(or_masks(causal_mask_function))
_SLIDING_OVERLAY_CODE = _code(sliding_window_overlay(1))
_BIDIRECTIONAL_SLIDING_CODE = _code(sliding_window_bidirectional_overlay(1))
_CHUNKED_CODE = _code(chunked_overlay(1, None))
_REMAP_CODE = _code(remap_positions_for_packed_sequence(causal_mask_function, None))
_PACKED_CODE = _code(packed_sequence_mask_function(None))
_BLOCKWISE_CODE = _code(blockwise_overlay(None))


def _always_true():
    return lambda *args: torch.tensor(True, dtype=torch.bool)


def _exclusive_bidirectional_window(sliding_window: int):
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        """A docstring as Gemma 3's has: where a Python gives docstrings a constant slot, the indices agree."""
        return abs(q_idx - kv_idx) < sliding_window

    return inner_mask


# Overlays models define in their own modules (Gemma 3's text-only use_bidirectional_attention; Step3p7 copies
# them), so no identity check finds them: recognised by running the same bytecode as these twins (_runs_as)
_ALWAYS_TRUE_CODE = _code(_always_true())
_CODE_FLAGS = 0xFFFF  # a code object's own flags; the compiler's __future__ ones (annotations here) sit above
_EXCLUSIVE_WINDOW_CODE = _code(_exclusive_bidirectional_window(1))


def _loaded_constants(code) -> list:
    """The constants ``code``'s instructions load, in order (a docstring, never loaded, is left out)."""
    return [code.co_consts[ins.arg] for ins in dis.get_instructions(code) if ins.opcode in dis.hasconst]


def _runs_as(fn, reference) -> bool:
    """Whether ``fn`` computes what the function of code ``reference`` does: the same bytecode, names, loaded
    constants, closure variables and flags (``__future__`` ones aside), with ``torch`` and ``abs`` not shadowed in
    its module."""
    code = _code(fn)
    if code is None:
        return False
    same = (
        code.co_code == reference.co_code
        and code.co_names == reference.co_names
        and _loaded_constants(code) == _loaded_constants(reference)
        and code.co_freevars == reference.co_freevars
        and code.co_argcount == reference.co_argcount
        and code.co_flags & _CODE_FLAGS == reference.co_flags & _CODE_FLAGS
    )
    env = getattr(fn, "__globals__", {})
    return same and env.get("torch", torch) is torch and env.get("abs", abs) is abs


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
    ``block_sequence_ids``, ``(B, >= Nk)``, -1 outside blocks: Gemma 3/4 images, PaliGemma's prefix). On
    bidirectional attention instead of ``window``: ``bidirectional_window`` W (key j visible to query i iff
    ``|i - j| <= W``: ModernBERT's local layers). On causal attention: ``chunk``, ``(C, left_padding)`` (key j visible
    to query i iff both lie in the same chunk of C positions counted from each sample's first real token,
    ``left_padding (B,)``: Llama 4's chunked layers)."""

    def __init__(self):
        self.causal: Optional[bool] = None
        self.window: Optional[int] = None
        self.bidirectional_window: Optional[int] = None
        self.chunk: Optional[tuple[int, torch.Tensor]] = None
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
    elif code is _BIDIRECTIONAL_SLIDING_CODE and not in_or:
        w = _free(fn, "sliding_window")
        if not isinstance(w, int) or w < 0 or reading.bidirectional_window not in (None, w):
            raise _Unreadable(f"bidirectional sliding window {w!r}")
        reading.bidirectional_window = w
    elif code is _CHUNKED_CODE and not in_or:
        size, left_padding = _free(fn, "chunk_size"), _free(fn, "left_padding")
        if not isinstance(size, int) or size < 1 or reading.chunk is not None:
            raise _Unreadable(f"chunks of {size!r}")
        if not isinstance(left_padding, torch.Tensor) or left_padding.ndim != 1:
            raise _Unreadable(f"chunk left padding {left_padding!r}")
        reading.chunk = (size, left_padding)
    elif code is _PACKED_CODE and not in_or:
        reading.packed = _free(fn, "packed_sequence_mask")
    elif code is _REMAP_CODE:
        # positions restart per packed sequence and count up by one inside it (that is how transformers finds the
        # sequences), so inside a sequence the remapped rule is the rule on token indices; the packed term (checked
        # by the caller) removes every pair across sequences
        reading.remapped = True
        _read_into(reading, _free(fn, "mask_function"), in_or=in_or)
    elif code is _OR_MASKS_CODE and not in_or and _read_bidirectional_or(reading, _free(fn, "mask_functions")):
        pass
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


def _read_bidirectional_or(reading: _Reading, parts) -> bool:
    """Reads Gemma 3's text-only ``use_bidirectional_attention`` overlays into ``reading``, or returns False (not
    theirs). Full layers: anything OR always true, i.e. bidirectional. Sliding layers: ``(causal AND i - W < j) OR
    |i - j| < W'`` with ``W <= W'``, i.e. ``|i - j| <= W' - 1``: transformers' bidirectional window ``W' - 1``."""
    if len(parts) != 2:
        return False
    if _runs_as(parts[1], _ALWAYS_TRUE_CODE):
        _read_into(reading, bidirectional_mask_function)
        return True
    if not _runs_as(parts[1], _EXCLUSIVE_WINDOW_CODE):
        return False
    w = _free(parts[1], "sliding_window")
    inner = _Reading()  # the OR's first part alone, an AND of its own parts
    _read_into(inner, parts[0])
    plain = inner.packed is None and inner.blocks is None and inner.chunk is None and not inner.remapped
    narrower = inner.causal is True and inner.window is not None and inner.window <= w
    if not isinstance(w, int) or w < 1 or not plain or not narrower:
        raise _Unreadable(f"a window of {w!r} both ways OR-ed to something other than a narrower causal window")
    _read_into(reading, bidirectional_mask_function)
    if reading.bidirectional_window not in (None, w - 1):
        raise _Unreadable(f"bidirectional sliding windows {reading.bidirectional_window} and {w - 1}")
    reading.bidirectional_window = w - 1
    return True


def _read(mask_function) -> tuple[Optional[_Reading], Optional[str]]:
    reading = _Reading()
    try:
        _read_into(reading, mask_function)
        if reading.causal is None:
            raise _Unreadable("no causal or bidirectional rule")
        if reading.window is not None and not reading.causal:
            raise _Unreadable("a sliding window on bidirectional attention")
        if reading.bidirectional_window is not None and reading.causal:
            raise _Unreadable("a bidirectional sliding window on causal attention")
        if reading.chunk is not None and not reading.causal:
            raise _Unreadable("chunks on bidirectional attention")
        if reading.chunk is not None and (reading.window is not None or reading.blocks is not None):
            raise _Unreadable("chunks together with a sliding window or blocks")
        if reading.remapped and reading.packed is None:
            raise _Unreadable("positions remapped without packed sequences")
    except _Unreadable as e:
        return None, (
            f"the model's mask is not plain causal/bidirectional, a causal or bidirectional sliding window, causal "
            f"chunks, packed sequences or bidirectional blocks in a causal mask ({_describe(mask_function)}: {e})"
        )
    return reading, None
