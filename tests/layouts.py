"""Random layouts for sweeps (tests and benchmark scripts): different segment counts, sizes, rules and lengths."""
from __future__ import annotations

import torch

from zorro_kernels import ZorroMask


def random_layout(gen: torch.Generator, max_size: int, *, lengths: bool, batch: int = 2) -> ZorroMask:
    """Self-attention over 2-6 segments of 0..max_size tokens (the first non-empty), each pair allowed with
    probability 1/2; with ``lengths``, random per-sample valid lengths ``(batch, segments)``."""
    n_seg = int(torch.randint(2, 7, (1,), generator=gen))
    sizes = torch.randint(0, max_size, (n_seg,), generator=gen).tolist()
    sizes[0] += 1
    allow = torch.rand(n_seg, n_seg, generator=gen) < 0.5
    lens = (torch.rand(batch, n_seg, generator=gen) * (torch.tensor(sizes) + 1)).long() if lengths else None
    return ZorroMask.from_allow([(f"s{j}", s) for j, s in enumerate(sizes)], allow, lengths=lens)
