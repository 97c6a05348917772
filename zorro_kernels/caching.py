"""Caches, each of one kind, for both packages: data derived from an immutable value (a mask, a set of positions) kept
on that value under the function that builds it (:class:`Derived`); and a small LRU (:class:`LRU`) for the
module-level caches that find such values again by content (:func:`tensor_key`).

The lowest module of ``zorro_kernels``: it imports nothing of ours, so every layer above (and ``zorro_models``) can
use it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Optional

import torch

__all__ = ["Derived", "LRU", "tensor_key"]


class Derived:
    """Mixin for immutable values: :meth:`derived` computes data from the value once and keeps it on the value.

    The cache key is the building function plus its arguments, so two modules can never pick the same key for
    different things, and nothing else writes the cache. A subclass must be immutable (what it caches is then true
    for its whole life) and set ``self._cache = {}`` in its ``__init__`` (a plain attribute, which ``torch.compile``
    traces).
    """

    def derived(self, build: Callable, *key: Hashable, **inputs):
        """``build(self, *key, **inputs)``, computed once per ``(build, *key)`` and kept on this object.

        ``inputs`` are passed to ``build`` but are not part of the key: only objects the key already determines (a
        mask whose content key is in ``key``), so a cache entry never holds on to a caller's object.
        """
        k = (build, *key)
        try:
            return self._cache[k]
        except KeyError:
            value = self._cache[k] = build(self, *key, **inputs)
            return value


def tensor_key(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """A hashable key for a tensor's content: ``(dtype, shape, bytes)`` (None for None).

    Equal for equal values whatever the device, strides or storage; different when the dtype, the shape or any element
    differs. Copies the tensor to the CPU: for small tensors (lengths, coordinates), not activations.
    """
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_key takes a torch.Tensor or None, got {type(t).__name__}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return (str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes())


class LRU:
    """A bounded mapping that forgets the least recently used entry first.

    Args:
        max_entries: how many entries it keeps (>= 1).
    """

    def __init__(self, max_entries: int):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self._store: OrderedDict = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], object]):
        """The value under ``key``, or ``build()`` (then kept); either way ``key`` becomes the most recent."""
        try:
            self._store.move_to_end(key)
            return self._store[key]
        except KeyError:
            value = build()
            self.put(key, value)
            return value

    def put(self, key: Hashable, value) -> None:
        """Keep ``value`` under ``key`` (replacing what was there) as the most recent entry."""
        self._store[key] = value
        self._store.move_to_end(key)
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)

    def clear(self) -> None:
        self._store.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)
