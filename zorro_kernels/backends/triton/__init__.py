"""Triton backend: block-sparse attention kernels that read the mask's tile map (see docs/triton.md).

Importing this package does not import Triton: the kernels (``_fwd``, ``_bwd``) are loaded when first run, so
``import zorro_kernels`` works where Triton is absent or broken, and the backend then says why it refuses.
"""
from .op import BACKEND_DESCRIPTION, attention, not_supported_reasons

__all__ = ["attention", "not_supported_reasons", "BACKEND_DESCRIPTION"]
