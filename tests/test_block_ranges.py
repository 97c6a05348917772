"""BlockRanges (zorro_kernels/backends/_blocks.py): a plan step's equal-length block ranges kept as one array read
exactly as the tuple of ``(start, stop)`` pairs it stands for."""

import numpy as np
import torch

from zorro_kernels import RelativePositionBias, ZorroMask, zorro_attention
from zorro_kernels.backends._blocks import BlockRanges
from zorro_kernels.backends.segments import build_plan
from zorro_kernels.testing import check_against_oracle


def test_reads_as_its_tuple():
    starts = np.array([3, 10, 40])
    r = BlockRanges(starts, 4)
    t = ((3, 7), (10, 14), (40, 44))
    assert tuple(r) == t and len(r) == 3 and r[1] == (10, 14) and r[-1] == (40, 44) and r[1:] == t[1:]
    assert r == t and r == BlockRanges([3, 10, 40], 4) and r != BlockRanges([3, 10, 40], 5)
    assert hash(r) == hash(t) and {r: 1}[BlockRanges(starts, 4)] == 1
    starts[0] = 99  # its own copy: a value
    assert r[0] == (3, 7)


def test_scattered_equal_documents_and_a_relative_bias():
    """Documents of equal lengths, scattered among others, are one bucket step whose ranges are BlockRanges; the
    bias path reads them per block (and the result matches the oracle)."""
    lens = [3, 5, 3, 2, 3, 5]
    mask = ZorroMask.packed(lens)
    steps = build_plan(mask).patterns[0].steps
    blocks = [st for st in steps if isinstance(st.q_ranges, BlockRanges)]
    assert blocks and all(st.index is not None for st in blocks)
    starts = np.cumsum([0] + lens[:-1])
    assert {tuple(st.q_ranges) for st in blocks} >= {tuple((int(s), int(s) + 3) for s in starts[[0, 2, 4]])}
    gen = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.arange(n) for n in lens])[:, None]
    rpb = RelativePositionBias(torch.randn(2, 9, generator=gen, dtype=torch.float64), coords, coords, (5,))
    q, k, v = (torch.randn(1, 2, sum(lens), 8, generator=gen, dtype=torch.float64) for _ in range(3))
    check_against_oracle(lambda *a, **kw: zorro_attention(*a, backend="segments", **kw), q, k, v, mask, bias=rpb)
