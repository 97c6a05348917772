"""Backends of :func:`zorro_kernels.zorro_attention`, each with what it supports and why it refuses an input.

A backend is a name, a ``not_supported_reasons(q, k, v, mask) -> list[str]`` (empty = it takes the input), and a
``forward(q, k, v, mask, scale) -> out`` that autograd can differentiate. ``backend="auto"`` takes the first backend of
the device's priority list that supports the input; a forced backend that refuses raises with its reasons. Nothing
falls back silently.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..reference import reference_attention
from . import triton as _triton  # imports no Triton: kernels load on first use
from .segments import segment_attention

__all__ = ["Backend", "BACKENDS", "register_backend", "auto_priority"]


class Backend(NamedTuple):
    name: str
    description: str
    not_supported_reasons: Callable[..., list]
    forward: Callable[..., torch.Tensor]


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def auto_priority(device: torch.device) -> list[str]:
    """Backends ``"auto"`` tries, best first, for tensors on ``device``."""
    if device.type == "cuda":
        return ["triton", "segments"]
    return ["segments"]


def _no_reasons(q, k, v, mask) -> list:
    return []


register_backend(Backend(
    "reference", "dense boolean mask through PyTorch SDPA in fp32 (slow; the oracle)", _no_reasons,
    lambda q, k, v, mask, scale: reference_attention(q, k, v, mask, scale=scale)))
register_backend(Backend(
    "triton", _triton.BACKEND_DESCRIPTION, _triton.not_supported_reasons,
    lambda q, k, v, mask, scale: _triton.attention(q, k, v, mask, scale, "triton")))
register_backend(Backend(
    "segments", "exact segment decomposition into unmasked fused SDPA calls (the CPU fast path; any device)",
    _no_reasons, segment_attention))
