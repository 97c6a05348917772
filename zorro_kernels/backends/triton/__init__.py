"""Triton backend: block-sparse attention kernels that read the mask's tile map (see docs/triton.md).

Importing this package does not import Triton: the kernels (``_fwd``, ``_bwd``) are loaded when first run, so
``import zorro_kernels`` works where Triton is absent or broken, and the backend then says why it refuses.
"""

from .backend import DESCRIPTION, DTYPES, MAX_HEAD_DIM, backward, devices, extra_reasons, forward

__all__ = ["forward", "backward", "extra_reasons", "devices", "DESCRIPTION", "DTYPES", "MAX_HEAD_DIM"]
