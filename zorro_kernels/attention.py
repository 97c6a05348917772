"""``zorro_attention``: the public entry point — validation, then dispatch to a backend."""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops, auto
from ._checks import check_inputs, check_scale_range
from .auto import select_backend
from .backends import BACKENDS
from .bias import hide_dead_keys
from .mask import ZorroMask

__all__ = ["zorro_attention", "check_inputs", "select_backend"]


def zorro_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: ZorroMask,
    *,
    bias=None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention restricted by a modality layout, computing only the parts of the matrix the mask leaves visible.

    Args:
        q: ``(B, H, Nq, D)`` queries.
        k, v: ``(B, Hkv, Nk, D)`` keys and values; ``H % Hkv == 0`` (grouped-query attention: query head ``h`` reads
            kv head ``h // (H // Hkv)``). K/V are not copied per head by the Triton backend.
        mask: a :class:`ZorroMask` with ``mask.num_q == Nq`` and ``mask.num_kv == Nk``; its lengths, if any, are for B
            samples.
        bias: added to the scaled scores before the softmax, only where the mask allows (see
            :mod:`zorro_kernels.bias`): a float tensor broadcastable to ``(B, H, Nq, Nk)`` (read only on the blocks
            the mask leaves visible; differentiable), or a :class:`~zorro_kernels.RelativePositionBias` (a table
            ``(H, T)`` indexed by coordinate offsets, computed per block, never ``Nq x Nk``; the table gets its
            gradient). A ``-inf`` bias counts as masked: a row whose every allowed key is ``-inf`` returns 0 with zero
            gradients, and keys a ``(..., 1, Nk)`` bias hides from every query (key padding, e.g. left padding) are
            zero-filled before any backend reads them, so NaN or garbage there never reaches a row.
        scale: softmax scale; default ``D ** -0.5``. A scale above 1 that can make ``scale * q . k`` overflow float32
            (bounded by the largest q and k row norms) raises ValueError: every backend computes scores in float32.
        backend: ``"auto"`` (on CUDA the faster of ``"triton"`` and ``"segments"``, timed once per problem; on CPU
            ``"dense"`` for tiny problems, else ``"segments"``; :func:`zorro_kernels.explain` says which and why), or
            force one of ``"triton"``, ``"segments"``, ``"dense"``, ``"reference"``. A forced backend that cannot take
            the input raises ValueError saying why.

    Returns:
        ``(B, H, Nq, D)`` in q's dtype. A query row that may attend no valid key (padding rows included) is exactly 0
        and passes zero gradient. Inputs may be non-contiguous. float16, bfloat16, float32 (and float64 on the
        reference and segment paths) are supported.

    Raises:
        TypeError / ValueError naming the argument and the numbers for malformed input (see :func:`check_inputs`).
    """
    calls = key = None
    if _cacheable(q, k, v, mask, bias, backend):
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        calls, key = mask.derived(_calls), _call_key(q, k, v, scale, backend, grad)
        try:
            name = calls.get(key)
        except TypeError:  # an unhashable scale: validation says what is wrong with it
            calls = None
        if name is not None:  # seen before: valid, and the backend is chosen
            check_scale_range(q, k, scale)
            chosen, s = BACKENDS[name], q.shape[-1] ** -0.5 if scale is None else float(scale)
            try:
                if not grad:
                    return chosen.forward(q, k, v, mask, s)[0]
                return chosen.eager(q, k, v, mask, s) if chosen.eager else _ops.attention(q, k, v, mask, s, name)
            except Exception:  # noqa: BLE001 - under auto, a failing backend goes through auto's guard below
                if backend != "auto":
                    raise
                calls.pop(key, None)
    check_inputs(q, k, v, mask, scale, bias)
    if not _ops._traced(q):  # reads values: not while tracing (a huge scale under torch.compile is unchecked)
        check_scale_range(q, k, scale)
    k, v = hide_dead_keys(k, v, bias, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    grad = auto.wants_grad(q, k, v, bias)
    if _ops._traced(q):
        # backends plan in Python (tile maps, segment plans) where dynamo cannot follow: under torch.compile every
        # backend runs behind the zorro::attention_fwd/bwd custom ops, so graphs stay whole (fullgraph=True works)
        return _ops.attention(q, k, v, mask, scale, select_backend(q, k, v, mask, backend, bias, scale, grad), bias)

    def call(name: str):
        chosen = BACKENDS[name]
        if not grad:  # nothing to differentiate: the forward alone, without autograd's bookkeeping
            out = chosen.forward(q, k, v, mask, scale, **_ops._bias_kw(bias))[0]
        elif chosen.eager is not None:
            out = chosen.eager(q, k, v, mask, scale, bias)
        else:
            out = _ops.attention(q, k, v, mask, scale, name, bias)
        if calls is not None:  # the backend that ran: the next call with this key goes straight to it
            calls[key] = name
        return out

    if backend == "auto":  # a candidate that fails is dropped for the problem and the next one runs
        return auto.run_guarded(q, k, v, mask, scale, grad, bias, call)
    return call(select_backend(q, k, v, mask, backend, bias, scale, grad))


# ------------------------------------------------------------------------------------------------------ call cache
# Validation and the backend choice depend only on what this key holds (types, shapes, strides, dtypes, devices, the
# scale, grad or not, the backend asked for, the deterministic flag and auto's settings), never on values: a call
# seen before on this mask skips both. Tiny problems pay these checks on every call, in every layer.
def _calls(mask) -> dict:
    return {}


def _call_key(q, k, v, scale, backend, grad: bool):
    return (
        backend,
        grad,
        type(scale),
        scale,
        q.shape,
        k.shape,
        v.shape,
        q.stride(),
        k.stride(),
        v.stride(),
        q.dtype,
        k.dtype,
        v.dtype,
        q.device,
        k.device,
        v.device,
        torch.are_deterministic_algorithms_enabled(),
        auto._generation[0],
    )


def _cacheable(q, k, v, mask, bias, backend) -> bool:
    # plain eager CPU tensors without a bias, where auto's choice is final (CUDA times its candidates)
    return (
        bias is None
        and type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and type(v) is torch.Tensor
        and q.is_cpu
        and isinstance(mask, ZorroMask)
        and not torch.compiler.is_compiling()
    )
