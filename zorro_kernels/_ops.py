"""Masked attention as PyTorch sees it, for every backend: custom ops -> fake -> autograd Function -> :func:`attention`.

The chain (as in flash-attn's interface module):

- ``zorro::attention_fwd`` / ``zorro::attention_bwd``: ``torch.library`` custom ops with plain arguments — the mask's
  *description* (rule table ``allow`` and per-sample ``lengths`` / ``kv_lengths`` as CPU int tensors, segment sizes as
  ints, ``is_self``, ``causal``), the scale and the backend's name. ``torch.compile`` cannot trace a :class:`ZorroMask`
  (a Python object whose derived data is built in Python), so the op finds the mask again by its content key
  (:func:`zorro_kernels.mask.content_key`) in a small bounded cache, rebuilding it from the description the first time.
- ``register_fake`` for both: shapes only, so ``torch.compile(fullgraph=True)`` sees one opaque node each way.
- :class:`_Attention`, an autograd Function around the backend's ``forward`` / ``backward`` pair: in eager mode it calls
  them directly with the mask object (no dispatcher, no lookup); traced, it calls the ops.
- :func:`attention`, the thin wrapper :func:`zorro_kernels.zorro_attention` calls.

Data flows one way: this module depends on the backends, no backend depends on it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from .backends import BACKENDS
from .mask import ZorroMask, content_key

__all__ = ["attention"]

_MAX_MASKS = 64
_masks: "OrderedDict[str, ZorroMask]" = OrderedDict()  # content key -> mask rebuilt from its description


def describe(mask: ZorroMask) -> tuple:
    """What the custom ops take instead of the mask: ``(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self,
    causal)``; ``kv_lengths`` is None for self-attention."""
    return (mask.allow, mask.lengths, None if mask.is_self else mask.kv_lengths, list(mask.q_sizes),
            list(mask.kv_sizes), mask.is_self, mask.causal)


def _mask_from(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal) -> ZorroMask:
    """The mask with this description: the cached one with the same content key, or a new one (then cached)."""
    key = content_key(q_sizes, kv_sizes, is_self, causal, allow, lengths, kv_lengths)
    mask = _masks.get(key)
    if mask is None:
        mask = ZorroMask([(f"q{i}", n) for i, n in enumerate(q_sizes)], allow.detach().cpu().bool(),
                         kv_segments=None if is_self else [(f"k{i}", n) for i, n in enumerate(kv_sizes)],
                         lengths=lengths, kv_lengths=None if is_self else kv_lengths, causal=causal)
        _masks[key] = mask
        while len(_masks) > _MAX_MASKS:
            _masks.popitem(last=False)
    else:
        _masks.move_to_end(key)
    return mask


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("zorro::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, allow: Tensor, lengths: Optional[Tensor],
                   kv_lengths: Optional[Tensor], q_sizes: list[int], kv_sizes: list[int], is_self: bool, causal: bool,
                   scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Nq, D) contiguous, lse (B, H, Nq) fp32)``; see the module docstring for the arguments."""
    mask = _mask_from(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal)
    out, lse = BACKENDS[backend].forward(q, k, v, mask, scale)
    return out.contiguous(), lse.float()


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("zorro::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, allow: Tensor,
                   lengths: Optional[Tensor], kv_lengths: Optional[Tensor], q_sizes: list[int], kv_sizes: list[int],
                   is_self: bool, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped as q, k, v."""
    mask = _mask_from(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal)
    grads = BACKENDS[backend].backward(dout, q, k, v, out, lse, mask, scale)
    return tuple(g.contiguous() for g in grads)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal,
                        scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ------------------------------------------------------------------------------------------------ autograd
def _traced(t: Tensor) -> bool:
    """Under torch.compile / export, or on fake or functional tensors: go through the custom ops. Plain eager calls
    run the backend directly and skip the custom-op dispatcher's Python overhead (tens of microseconds, as much as a
    small kernel takes)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


class _Attention(torch.autograd.Function):
    """Eager: ``mask`` is the ZorroMask and ``desc`` empty. Traced: ``mask`` is None and ``desc`` its description."""

    @staticmethod
    def forward(ctx, q, k, v, scale, backend, mask, *desc):
        if mask is None:
            out, lse = torch.ops.zorro.attention_fwd(q, k, v, *desc, scale, backend)
        else:
            out, lse = BACKENDS[backend].forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, *desc[:3])
        ctx.args = (scale, backend, mask, desc[3:])
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        scale, backend, mask, rest = ctx.args
        if mask is None:
            dq, dk, dv = torch.ops.zorro.attention_bwd(dout, q, k, v, out, lse, *tensors, *rest, scale, backend)
        else:
            dq, dk, dv = BACKENDS[backend].backward(dout, q, k, v, out, lse, mask, scale)
        return (dq, dk, dv, None, None, None) + (None,) * (len(tensors) + len(rest))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: ZorroMask, scale: float, backend: str) -> Tensor:
    """Masked attention with ``BACKENDS[backend]``'s forward/backward pair (differentiable;
    ``torch.compile(fullgraph=True)``-safe).

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; mask, scale: as :func:`zorro_kernels.zorro_attention`
            (inputs already validated there, and the backend already chosen).
    Returns:
        ``(B, H, Nq, D)`` in q's dtype.
    """
    if _traced(q):
        return _Attention.apply(q, k, v, float(scale), backend, None, *describe(mask))
    return _Attention.apply(q, k, v, float(scale), backend, mask)
