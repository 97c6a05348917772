"""Backends of :func:`zorro_kernels.zorro_attention`: what each supports, written as data, and its forward/backward
pair.

A :class:`Backend` declares its devices, dtypes, head dims, determinism and bias support as fields; its refusal reasons
(:meth:`Backend.not_supported_reasons`) are generated from those fields, plus ``extra_reasons`` for what fields cannot
say (an import that failed, a grid limit). Each backend is a pair of plain functions, ``forward(q, k, v, mask, scale)
-> (out, lse)`` and ``backward(dout, q, k, v, out, lse, mask, scale) -> (dq, dk, dv)`` (a backend with ``bias=True``
also takes ``bias=`` in both, when there is one, and its backward then takes ``need_dbias=`` and returns
``(dq, dk, dv, dbias)``, ``dbias`` shaped as the dense bias or the relative bias's table, or None when ``need_dbias``
is False), which :mod:`zorro_kernels._ops` wraps into one autograd Function and, under ``torch.compile``, into the
``zorro::attention_fwd`` / ``zorro::attention_bwd`` custom ops; so every backend runs under compile the same way. A
backend may also give an ``eager`` differentiable function, used outside compilation when it is cheaper than forward +
backward.

``backend="auto"`` chooses among the backends that take the input (:mod:`zorro_kernels.auto`); a forced backend that
refuses raises with its reasons. Nothing falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..bias import bias_tensor, with_tensor
from ..reference import reference_attention
from . import intervals as _intervals  # compiles nothing on import: the CPU kernels build on first use
from . import triton as _triton  # imports no Triton: kernels load on first use
from .dense import dense_attention, dense_backward, dense_forward
from .ragged import cpu_backward_mask, cpu_forward_mask, ragged_attention
from .segments import segment_attention, segment_attention_sdpa

__all__ = ["Backend", "BACKENDS", "register_backend", "backward_by_recompute"]

_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _no_reasons(q, k, v, mask) -> list:
    return []


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Backend:
    """One way to run masked attention, and what it supports.

    Fields:
        name, description: how it is chosen (``backend=name``) and what it is.
        forward: ``(q, k, v, mask, scale[, bias=]) -> (out (B, H, Nq, D), lse (B, H, Nq) fp32)``, without autograd.
        backward: ``(dout, q, k, v, out, lse, mask, scale[, bias=, need_dbias=]) -> (dq, dk, dv[, dbias])``, given
            forward's ``out`` and ``lse``.
        devices: device types it runs on (a tuple, or a function returning one when it depends on the environment);
            None for any device.
        dtypes: the dtypes of q, k, v it takes.
        max_head_dim: the largest D, or None.
        compile: whether it runs under ``torch.compile`` (behind the custom ops).
        deterministic: reruns are bitwise equal, so it may run under ``torch.use_deterministic_algorithms(True)``.
        bias: whether it takes an additive attention bias (``bias=`` of :func:`zorro_kernels.zorro_attention`).
        window: whether it takes masks with a sliding window (``ZorroMask(..., window=)``).
        eager: optional differentiable ``(q, k, v, mask, scale[, bias]) -> out`` used outside compilation.
        extra_reasons: ``(q, k, v, mask) -> list[str]`` for what the fields cannot say.
    """

    name: str
    description: str
    forward: Callable
    backward: Callable
    devices: Union[None, tuple, Callable[[], tuple]] = None
    dtypes: tuple = _ALL_DTYPES
    max_head_dim: Optional[int] = None
    compile: bool = True
    deterministic: bool = True
    bias: bool = False
    window: bool = False
    eager: Optional[Callable] = None
    extra_reasons: Callable = _no_reasons

    def supported_devices(self) -> Optional[tuple]:
        return self.devices() if callable(self.devices) else self.devices

    def not_supported_reasons(self, q, k, v, mask, *, bias=None) -> list:
        """Why this backend refuses these (validated) inputs; empty if it takes them."""
        reasons = []
        devices = self.supported_devices()
        if devices is not None and q.device.type not in devices:
            reasons.append(f"runs on {'/'.join(devices)} tensors, got device {q.device.type}")
        if q.dtype not in self.dtypes:
            reasons.append(
                f"dtype {_dtype_name(q.dtype)} is not supported ({', '.join(_dtype_name(d) for d in self.dtypes)} are)"
            )
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            reasons.append(f"head dim D={q.shape[-1]} exceeds the maximum {self.max_head_dim}")
        if not self.compile and torch.compiler.is_compiling():
            reasons.append("has no torch.compile path")
        if not self.deterministic and torch.are_deterministic_algorithms_enabled():
            reasons.append("is not deterministic and torch.use_deterministic_algorithms(True) is set")
        if bias is not None and not self.bias:
            reasons.append("takes no attention bias")
        if mask.window is not None and not self.window:
            reasons.append(f"takes no sliding window (the mask has window={mask.window})")
        return reasons + list(self.extra_reasons(q, k, v, mask))


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def _autograd_records() -> bool:
    """False inside a custom op's implementation, where ops record no history even under ``enable_grad``; the
    recompute then goes through ``torch.func.vjp``, which works there (on plain ops: a recomputed function must not
    use an autograd.Function without ``setup_context``)."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).requires_grad


def backward_by_recompute(differentiable: Callable) -> Callable:
    """A ``backward`` for a backend whose only gradient is autograd through
    ``differentiable(q, k, v, mask, scale[, bias])``: the forward is recomputed under autograd (so it also runs inside
    the backward custom op). With a bias it returns ``(dq, dk, dv, dbias)``."""

    def backward(dout, q, k, v, out, lse, mask, scale, bias=None, need_dbias=True):
        # a bias whose gradient is not wanted is a constant of the recompute (its gradient comes back None)
        const = () if bias is None or need_dbias else (bias,)

        def fwd(a, b, c, *t):
            return differentiable(a, b, c, mask, scale, *const, *(with_tensor(bias, x) for x in t))

        inputs = (q, k, v) + (() if bias is None or const else (bias_tensor(bias),))
        if not _autograd_records():
            _, vjp = torch.func.vjp(fwd, *inputs)
            return (*vjp(dout), *((None,) if const else ()))
        with torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_() for t in inputs)
            grads = torch.autograd.grad(fwd(*leaves), leaves, dout, materialize_grads=True)
            return (*grads, *((None,) if const else ()))

    return backward


def _no_lse(q):
    # backends that recompute in the backward have no LSE; the custom op's output still needs one
    return q.new_zeros(q.shape[:3], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- reference
def _reference(q, k, v, mask, scale, bias=None):
    return reference_attention(q, k, v, mask, scale=scale, bias=bias)


def _reference_forward(q, k, v, mask, scale, bias=None):
    with torch.no_grad():
        return _reference(q, k, v, mask, scale, bias), _no_lse(q)


register_backend(
    Backend(
        "reference",
        "dense boolean mask, each row attending exactly its keys (slow; NaN-safe; the oracle)",
        _reference_forward,
        backward_by_recompute(_reference),
        bias=True,
        window=True,
        eager=_reference,
    )
)


# ---------------------------------------------------------------------------------------------------- segments
_segments_recompute = backward_by_recompute(segment_attention_sdpa)


def _cpu_kernels(device: torch.device) -> bool:
    """Whether the segment path has its own forward/backward kernels here (ATen's CPU flash attention)."""
    return device.type == "cpu"


def _segments_forward(q, k, v, mask, scale, bias=None):
    if _cpu_kernels(q.device):  # ATen's CPU flash kernels, out and LSE without autograd
        out, lse = cpu_forward_mask(q, k, v, mask, scale, bias)
        return out, lse.float()
    with torch.no_grad():
        return segment_attention(q, k, v, mask, scale, bias), _no_lse(q)


def _segments_backward(dout, q, k, v, out, lse, mask, scale, bias=None, need_dbias=True):
    if bias is not None:  # the bias's gradient comes from SDPA under autograd: recompute
        return _segments_recompute(dout, q, k, v, out, lse, mask, scale, bias, need_dbias)
    if _cpu_kernels(q.device):
        return cpu_backward_mask(dout, q, k, v, out, lse.double() if q.dtype == torch.float64 else lse, mask, scale)
    # elsewhere the path is SDPA under autograd, with no standalone backward: recompute it
    return _segments_recompute(dout, q, k, v, out, lse, mask, scale)


register_backend(
    Backend(
        "segments",
        "exact segment decomposition into unmasked fused SDPA calls (the CPU fast path; any device)",
        _segments_forward,
        _segments_backward,
        bias=True,
        window=True,
        eager=ragged_attention,
    )
)


# ---------------------------------------------------------------------------------------------------- triton
register_backend(
    Backend(
        "triton",
        _triton.DESCRIPTION,
        _triton.forward,
        _triton.backward,
        devices=_triton.devices,
        dtypes=_triton.DTYPES,
        max_head_dim=_triton.MAX_HEAD_DIM,
        bias=True,
        window=True,
        extra_reasons=_triton.extra_reasons,
    )
)


# ---------------------------------------------------------------------------------------------------- dense
register_backend(
    Backend(
        "dense",
        "the whole matrix in one masked computation, non-finite results redone by the "
        "segment path (CPU; for problems too small to split)",
        dense_forward,
        dense_backward,
        devices=("cpu",),
        # every dtype (fp64: an fp64 LSE for the backward, see dense_backward); the ``eager`` form is its own
        # forward/backward pair, not SDPA's autograd: that backward multiplies a NaN upstream gradient by the masked
        # P = 0 and so reaches keys the row may not attend, which dense_backward prevents
        window=True,
        eager=dense_attention,
    )
)


# ---------------------------------------------------------------------------------------------------- intervals
register_backend(
    Backend(
        "intervals",
        _intervals.DESCRIPTION,
        _intervals.forward,
        _intervals.backward,
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64),
        window=True,
        extra_reasons=_intervals.extra_reasons,
    )
)
