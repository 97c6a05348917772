"""The record of integration fallbacks: when an integration runs its host library's attention instead of zorro's.

An integration falls back only for inputs a :class:`~zorro_kernels.ZorroMask` cannot express (or features
zorro_attention does not have, such as attention dropout). Each fallback is counted under ``"<integration>: <reason>"``
and logged at DEBUG level; in strict mode it raises :class:`FallbackError` instead, naming the reason.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch

__all__ = ["FallbackError", "record_fallback", "fallback_counts", "reset_fallback_counts"]

logger = logging.getLogger("zorro_kernels.integrations")

_COUNTS: Counter = Counter()
_LOCK = threading.Lock()


class FallbackError(ValueError):
    """Raised in strict mode where an integration would otherwise fall back to its library's own attention."""


def record_fallback(integration: str, reason: str, *, strict: bool = False) -> None:
    """Count (and log) one fallback of ``integration`` for ``reason``; raise :class:`FallbackError` if ``strict``."""
    if strict:
        raise FallbackError(f"zorro {integration} integration (strict): cannot run on zorro_attention: {reason}")
    key = f"{integration}: {reason}"
    if torch.compiler.is_compiling():
        # a lock cannot be traced (fullgraph=True refuses it); dynamo replays this update of a global after each run
        # of the compiled graph, so a compiled model counts every call as eager does
        _COUNTS[key] += 1
        return
    with _LOCK:
        _COUNTS[key] += 1
    logger.debug("fallback to the library's attention: %s", key)


def fallback_counts() -> dict[str, int]:
    """Attention calls that ran on the host library's attention instead of zorro_attention, by reason.

    Returns a copy: ``{"transformers: <reason>": calls, ...}`` since the last :func:`reset_fallback_counts`. One model
    forward counts once per attention layer that fell back.
    """
    with _LOCK:
        return dict(_COUNTS)


def reset_fallback_counts() -> None:
    """Forget all recorded fallbacks."""
    with _LOCK:
        _COUNTS.clear()


def dense_for_fallback(mask, device):
    """A :class:`~zorro_kernels.ZorroMask` as the dense boolean mask a library's own attention takes.

    Returns ``(safe, live)``: ``safe`` bool ``(B|1, 1, Nq, Nk)`` (True = may attend), in which a row that may attend
    nothing is opened to every key so softmax stays finite, and ``live`` bool ``(B|1, Nq)``, False on exactly those
    rows — the caller zeroes them afterwards, which is what zorro_attention returns there. Cached on the mask per
    device (it is ``Nq x Nk``: a fallback, not a fast path).
    """
    import torch

    return mask.derived(_dense_safe, torch.device(device))


def _dense_safe(mask, device):
    dense = mask.to_dense()
    dense = dense[None] if dense.ndim == 2 else dense
    live = dense.any(-1)
    safe = dense | ~live[..., None]
    return safe[:, None].to(device), live.to(device)
