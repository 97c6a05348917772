"""Equal-length token ranges kept as one array: the ``q_ranges`` / ``k_ranges`` of a plan step that batches scattered
blocks (packed documents grouped by length), which can number thousands.

A tuple of ``(start, stop)`` pairs per block costs a Python tuple per block to build, on every plan (a new mask per
batch in training): at 5000 packed documents that was a third of ``build_plan``. :class:`BlockRanges` holds the starts
and the common length and reads as that tuple would (iteration, indexing, ``len``, equality, hashing) on the paths that
do look at the ranges (a bias read per block, other devices); the CPU path gathers these steps by their index tensors
and never looks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BlockRanges"]


class BlockRanges(Sequence):
    """``((s, s + length) for s in starts)`` as a read-only sequence of int pairs."""

    __slots__ = ("_starts", "_length")

    def __init__(self, starts: np.ndarray, length: int):
        self._starts = np.array(starts, dtype=np.int64)  # our own copy: the sequence is a value
        self._starts.flags.writeable = False
        self._length = int(length)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self)[i]
        s = int(self._starts[i])
        return (s, s + self._length)

    def __iter__(self):
        n = self._length
        return ((s, s + n) for s in self._starts.tolist())

    def __eq__(self, other) -> bool:
        if isinstance(other, BlockRanges):
            return self._length == other._length and np.array_equal(self._starts, other._starts)
        return isinstance(other, (tuple, Sequence)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))  # as the tuple it stands for (equal objects, equal hashes)

    def __repr__(self) -> str:
        return f"BlockRanges({len(self)} blocks of {self._length})"
