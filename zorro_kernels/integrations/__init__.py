"""Drop-in integrations of :func:`zorro_kernels.zorro_attention` into other libraries' transformers.

Each integration lives in its own submodule and imports its library only when that submodule is first used, so
``import zorro_kernels`` never imports transformers, timm or xformers::

    from zorro_kernels.integrations import transformers as zt
    zt.register()                      # attn_implementation="zorro" for Hugging Face models

    from zorro_kernels.integrations import timm as ztimm
    ztimm.enable(vit)                  # vit(x, attn_mask=<ZorroMask>) runs on zorro_attention

    from zorro_kernels.integrations.xformers import from_xformers
    mask = from_xformers(BlockDiagonalMask.from_seqlens([5, 3]))

Where an integration meets something a :class:`~zorro_kernels.ZorroMask` cannot express, it runs the library's own
attention instead, *on purpose and on the record*: every such call is counted by reason (:func:`fallback_counts`) and
logged at DEBUG level on the ``zorro_kernels.integrations`` logger. Nothing inside zorro_attention falls back.
"""

from __future__ import annotations

import importlib

from ._fallback import FallbackError, fallback_counts, reset_fallback_counts

__all__ = ["transformers", "timm", "xformers", "fallback_counts", "reset_fallback_counts", "FallbackError"]

_SUBMODULES = ("transformers", "timm", "xformers")


def __getattr__(name: str):
    # PEP 562: the integration submodules (and the libraries they wrap) load on first access only
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
