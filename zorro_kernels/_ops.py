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

A bias crosses the ops as tensors too: a dense bias as itself; a :class:`~zorro_kernels.RelativePositionBias` as its
table plus its positions packed into int64 tensors (query and key rows ``(group, coordinates...)``, extents per group),
found again by content like masks. The backward op returns its gradient (shaped as the dense bias or the table).

Data flows one way: this module depends on the backends, no backend depends on it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .backends import BACKENDS
from .bias import RelativePositionBias, RelativePositions
from .caching import LRU, tensor_key
from .mask import CAUSAL, ZorroMask, content_key

__all__ = ["attention"]

_masks = LRU(64)  # content key -> mask rebuilt from its description
_positions = LRU(64)  # tensor keys of the packed positions -> RelativePositions


def describe(mask: ZorroMask) -> tuple:
    """What the custom ops take instead of the mask: ``(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self,
    causal, window)``; ``kv_lengths`` is None for self-attention, ``window`` ``[left, right]`` (``[-1, -1]``: none).
    ``allow`` is the bool rule table, or, when some cells are causal, the int8 kind table (0 none, 1 full, 2 causal).
    With per-sample segment sizes, ``lengths`` is ``(B, 2 * Sq)``: the valid tokens, then the sizes (and
    ``kv_lengths`` likewise), which its width tells apart."""

    def side(lengths, per_sample, valid):
        if per_sample is None:
            return lengths
        return torch.cat([valid, per_sample], 1)

    return (
        mask.cell_kinds if mask.has_causal_cells else mask.allow,
        side(mask.lengths, mask.sample_sizes, mask._q_lengths_or_sizes()),
        None if mask.is_self else side(mask.kv_lengths, mask.kv_sample_sizes, mask._kv_lengths_or_sizes()),
        list(mask.q_sizes),
        list(mask.kv_sizes),
        mask.is_self,
        mask.causal,
        list(mask.window or (-1, -1)),
    )


def _mask_from(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, window) -> ZorroMask:
    """The mask with this description: the cached one with the same content key, or a new one (then cached)."""
    window = None if list(window) == [-1, -1] else tuple(window)
    sizes = kv_sizes_b = None
    if lengths is not None and lengths.shape[1] == 2 * len(q_sizes):
        lengths, sizes = lengths[:, : len(q_sizes)], lengths[:, len(q_sizes) :]
    if kv_lengths is not None and kv_lengths.shape[1] == 2 * len(kv_sizes):
        kv_lengths, kv_sizes_b = kv_lengths[:, : len(kv_sizes)], kv_lengths[:, len(kv_sizes) :]
    key = content_key(q_sizes, kv_sizes, is_self, causal, allow, lengths, kv_lengths, window, sizes, kv_sizes_b)
    return _masks.get(
        key,
        lambda: ZorroMask(
            [(f"q{i}", n) for i, n in enumerate(q_sizes)],
            allow.detach().cpu() != 0,
            kv_segments=None if is_self else [(f"k{i}", n) for i, n in enumerate(kv_sizes)],
            lengths=lengths,
            kv_lengths=None if is_self else kv_lengths,
            causal=causal,
            window=window,
            causal_cells=None if allow.dtype == torch.bool else allow.detach().cpu() == CAUSAL,
            sample_sizes=sizes,
            kv_sample_sizes=None if is_self else kv_sizes_b,
        ),
    )


# ------------------------------------------------------------------------------------------------ bias
class BiasArgs(NamedTuple):
    """A bias as the custom ops take it (see :func:`describe_bias`); None where absent."""

    dense: Optional[Tensor] = None
    table: Optional[Tensor] = None
    pos_q: Optional[Tensor] = None
    pos_k: Optional[Tensor] = None
    extents: Optional[Tensor] = None


def _pack(p: RelativePositions) -> tuple[Tensor, Tensor, Tensor]:
    """``(pos_q (Nq, 1 + A), pos_k (Nk, 1 + A), extents (G, A))``: each token's position set, then its coordinates."""
    return torch.cat([p.q_group[:, None], p.q_coords], 1), torch.cat([p.k_group[:, None], p.k_coords], 1), p.extents


def _positions_key(pos_q: Tensor, pos_k: Tensor, extents: Tensor) -> tuple:
    return tensor_key(pos_q), tensor_key(pos_k), tensor_key(extents)


def describe_bias(bias) -> BiasArgs:
    """``bias`` as tensors: a dense bias as itself, a :class:`RelativePositionBias` as its table and packed positions
    (:func:`_pack`)."""
    if bias is None:
        return BiasArgs()
    if not isinstance(bias, RelativePositionBias):
        return BiasArgs(dense=bias)
    p = bias.positions
    packed = p.derived(_pack)
    if not torch.compiler.is_compiling():  # eager callers register their own object (and its cached indices)
        _positions.put(_positions_key(*packed), p)
    return BiasArgs(None, bias.table, *packed)


def _bias_from(dense, table, pos_q, pos_k, extents):
    if table is None:
        return dense
    p = _positions.get(
        _positions_key(pos_q, pos_k, extents),
        lambda: RelativePositions(pos_q[:, 1:], pos_k[:, 1:], extents, q_group=pos_q[:, 0], k_group=pos_k[:, 0]),
    )
    return RelativePositionBias(table, positions=p)


def _bias_kw(bias) -> dict:
    # backends without bias support keep their plain signatures
    return {} if bias is None else {"bias": bias}


def _bwd_bias_kw(bias, need_dbias: bool) -> dict:
    return {} if bias is None else {"bias": bias, "need_dbias": need_dbias}


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("zorro::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allow: Tensor,
    lengths: Optional[Tensor],
    kv_lengths: Optional[Tensor],
    q_sizes: list[int],
    kv_sizes: list[int],
    is_self: bool,
    causal: bool,
    window: list[int],
    scale: float,
    backend: str,
    dense: Optional[Tensor] = None,
    table: Optional[Tensor] = None,
    pos_q: Optional[Tensor] = None,
    pos_k: Optional[Tensor] = None,
    extents: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(out (B, H, Nq, D) contiguous, lse (B, H, Nq) fp32)``; see the module docstring for the arguments."""
    mask = _mask_from(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, window)
    bias = _bias_from(dense, table, pos_q, pos_k, extents)
    out, lse = BACKENDS[backend].forward(q, k, v, mask, scale, **_bias_kw(bias))
    return out.contiguous(), lse.float().contiguous()


@_attention_fwd.register_fake
def _attention_fwd_fake(
    q,
    k,
    v,
    allow,
    lengths,
    kv_lengths,
    q_sizes,
    kv_sizes,
    is_self,
    causal,
    window,
    scale,
    backend,
    dense=None,
    table=None,
    pos_q=None,
    pos_k=None,
    extents=None,
):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("zorro::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    allow: Tensor,
    lengths: Optional[Tensor],
    kv_lengths: Optional[Tensor],
    q_sizes: list[int],
    kv_sizes: list[int],
    is_self: bool,
    causal: bool,
    window: list[int],
    scale: float,
    backend: str,
    dense: Optional[Tensor] = None,
    table: Optional[Tensor] = None,
    pos_q: Optional[Tensor] = None,
    pos_k: Optional[Tensor] = None,
    extents: Optional[Tensor] = None,
    need_dbias: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``, contiguous, shaped as q, k, v and the dense bias or table (empty without a bias or
    when ``need_dbias`` is False: an op returns no None)."""
    mask = _mask_from(allow, lengths, kv_lengths, q_sizes, kv_sizes, is_self, causal, window)
    bias = _bias_from(dense, table, pos_q, pos_k, extents)
    grads = BACKENDS[backend].backward(dout, q, k, v, out, lse, mask, scale, **_bwd_bias_kw(bias, need_dbias))
    if bias is None:
        grads = (*grads, None)
    return tuple(q.new_empty(0) if g is None else g.contiguous() for g in grads)


@_attention_bwd.register_fake
def _attention_bwd_fake(
    dout,
    q,
    k,
    v,
    out,
    lse,
    allow,
    lengths,
    kv_lengths,
    q_sizes,
    kv_sizes,
    is_self,
    causal,
    window,
    scale,
    backend,
    dense=None,
    table=None,
    pos_q=None,
    pos_k=None,
    extents=None,
    need_dbias=True,
):
    b = dense if dense is not None else table
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(0) if b is None or not need_dbias else b.new_empty(b.shape),
    )


# ------------------------------------------------------------------------------------------------ autograd
def _traced(t: Tensor) -> bool:
    """Under torch.compile / export, or on fake or functional tensors: go through the custom ops. Plain eager calls
    run the backend directly and skip the custom-op dispatcher's Python overhead (tens of microseconds, as much as a
    small kernel takes)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


#: :class:`_Attention`'s inputs in order (the traced call appends the mask's description): its backward reads
#: ``needs_input_grad`` and returns its gradients by these names
_INPUTS = ("q", "k", "v", "scale", "backend", "mask", "bias", *BiasArgs._fields)


class _Saved(NamedTuple):
    """What :class:`_Attention` saves for its backward; ``allow``, ``lengths``, ``kv_lengths``: the traced call's
    mask description (the eager call keeps the mask object instead)."""

    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Tensor
    dense: Optional[Tensor]
    table: Optional[Tensor]
    pos_q: Optional[Tensor]
    pos_k: Optional[Tensor]
    extents: Optional[Tensor]
    allow: Optional[Tensor] = None
    lengths: Optional[Tensor] = None
    kv_lengths: Optional[Tensor] = None

    @property
    def bias_args(self) -> BiasArgs:
        return BiasArgs(self.dense, self.table, self.pos_q, self.pos_k, self.extents)


class _Attention(torch.autograd.Function):
    """Eager: ``mask`` is the ZorroMask and ``desc`` empty. Traced: ``mask`` is None and ``desc`` its description
    (:func:`describe`). ``dense`` ... ``extents``: the bias as tensors (:class:`BiasArgs`), ``bias``: the eager bias
    object or None."""

    @staticmethod
    def forward(ctx, q, k, v, scale, backend, mask, bias, dense, table, pos_q, pos_k, extents, *desc):
        bias_args = BiasArgs(dense, table, pos_q, pos_k, extents)
        if mask is None:
            out, lse = torch.ops.zorro.attention_fwd(q, k, v, *desc, scale, backend, *bias_args)
        else:
            out, lse = BACKENDS[backend].forward(q, k, v, mask, scale, **_bias_kw(bias))
        desc_tensors, desc_rest = desc[:3], desc[3:]  # (allow, lengths, kv_lengths), (q_sizes, ..., window)
        ctx.save_for_backward(*_Saved(q, k, v, out, lse, *bias_args, *desc_tensors))
        ctx.args = (scale, backend, mask, bias, desc_rest, len(desc))
        return out

    @staticmethod
    def backward(ctx, dout):
        s = _Saved(*ctx.saved_tensors)
        scale, backend, mask, bias, desc_rest, n_desc = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: the backends' backwards (kernels) have no derivative
            raise RuntimeError(
                f"zorro_attention: the {backend} backend's backward cannot be differentiated (double "
                f"backward, create_graph=True); use backend='reference' for higher-order gradients"
            )
        needs = dict(zip(_INPUTS, ctx.needs_input_grad))
        need_dbias = bool(needs["dense"] or needs["table"])
        if mask is None:
            dq, dk, dv, db = torch.ops.zorro.attention_bwd(
                dout,
                s.q,
                s.k,
                s.v,
                s.out,
                s.lse,
                s.allow,
                s.lengths,
                s.kv_lengths,
                *desc_rest,
                scale,
                backend,
                *s.bias_args,
                need_dbias,
            )
        else:
            dq, dk, dv, *db = BACKENDS[backend].backward(
                dout, s.q, s.k, s.v, s.out, s.lse, mask, scale, **_bwd_bias_kw(bias, need_dbias)
            )
            db = db[0] if db else None
        db = db if need_dbias else None
        grads = {"q": dq, "k": dk, "v": dv}
        if s.dense is not None:
            grads["dense"] = db
        elif s.table is not None:
            grads["table"] = db
        return tuple(grads.get(name) for name in _INPUTS) + (None,) * n_desc


def attention(q: Tensor, k: Tensor, v: Tensor, mask: ZorroMask, scale: float, backend: str, bias=None) -> Tensor:
    """Masked attention with ``BACKENDS[backend]``'s forward/backward pair (differentiable;
    ``torch.compile(fullgraph=True)``-safe).

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; mask, scale, bias: as
            :func:`zorro_kernels.zorro_attention` (inputs already validated there, and the backend already chosen).
    Returns:
        ``(B, H, Nq, D)`` in q's dtype.
    """
    if _traced(q):
        return _Attention.apply(q, k, v, float(scale), backend, None, None, *describe_bias(bias), *describe(mask))
    return _Attention.apply(q, k, v, float(scale), backend, mask, bias, *describe_bias(bias))
