"""Random and hand-picked layouts shared by the test files."""

from __future__ import annotations

import random

import torch

from zorro_kernels import ZorroMask

ODD_SIZES = (0, 1, 2, 3, 5, 8, 13, 17, 31, 64, 97, 113)


def random_mask(
    rng: random.Random,
    *,
    max_segments: int = 6,
    sizes=ODD_SIZES,
    allow_cross: bool = True,
    allow_causal: bool = True,
    max_batch: int = 3,
) -> ZorroMask:
    """A random layout: segment sizes include 0 and 1, random rules (some segments see nothing), optionally cross-
    attention, per-sample lengths on either side (including 0), and causal."""
    n_seg = rng.randint(1, max_segments)
    names = [f"s{i}" for i in range(n_seg)]
    q_sizes = [rng.choice(sizes) for _ in range(n_seg)]
    if sum(q_sizes) == 0:
        q_sizes[rng.randrange(n_seg)] = rng.choice([1, 3, 7])
    cross = allow_cross and rng.random() < 0.3
    if cross:
        n_kv = rng.randint(1, max_segments)
        kv_names = [f"k{i}" for i in range(n_kv)]
        kv_sizes = [rng.choice(sizes) for _ in range(n_kv)]
        if sum(kv_sizes) == 0:
            kv_sizes[rng.randrange(n_kv)] = rng.choice([1, 2, 9])
    else:
        kv_names, kv_sizes = names, q_sizes
    rules = {}
    for n in names:
        r = rng.random()
        if r < 0.1:
            continue  # sees nothing
        rules[n] = "*" if r < 0.25 else [k for k in kv_names if rng.random() < 0.5]
    b = rng.randint(1, max_batch)
    lengths = kv_lengths = None
    if rng.random() < 0.5:
        lengths = torch.tensor([[rng.randint(0, s) for s in q_sizes] for _ in range(b)])
    if cross and rng.random() < 0.5:
        kv_lengths = torch.tensor([[rng.randint(0, s) for s in kv_sizes] for _ in range(b)])
    return ZorroMask.from_segments(
        list(zip(names, q_sizes)),
        rules,
        kv_segments=list(zip(kv_names, kv_sizes)) if cross else None,
        lengths=lengths,
        kv_lengths=kv_lengths,
        causal=allow_causal and rng.random() < 0.2,
    )


def named_masks() -> dict[str, ZorroMask]:
    """Hand-picked layouts that every backend must get right."""
    return {
        "figure2_small": ZorroMask.zorro(audio=20, video=97, fusion=4),
        "odd_1_3_97_113": ZorroMask.zorro(audio=1, video=97, fusion=3, text=113),
        "empty_audio": ZorroMask.zorro(audio=0, video=33, fusion=2),
        "no_fusion": ZorroMask.zorro(audio=9, video=17, fusion=0),
        "ragged": ZorroMask.zorro(
            audio=16, video=40, fusion=3, lengths=torch.tensor([[16, 40, 3], [0, 40, 3], [5, 13, 3]])
        ),
        "bottleneck": ZorroMask.bottleneck(audio=11, video=29, bottleneck=4),
        "full": ZorroMask.full(audio=12, video=30, fusion=2),
        "packed": ZorroMask.packed([8, 8, 8, 5, 1, 13]),
        "packed_causal": ZorroMask.packed([7, 1, 20, 3], causal=True),
        "causal_self": ZorroMask.from_segments([("x", 45)], {"x": "*"}, causal=True),
        "cross_readout": ZorroMask.from_segments(
            [("audio_q", 1), ("video_q", 1), ("fusion_q", 1), ("global_q", 1)],
            {"audio_q": ["audio"], "video_q": ["video"], "fusion_q": ["fusion"], "global_q": "*"},
            kv_segments=[("audio", 21), ("video", 50), ("fusion", 4)],
            kv_lengths=torch.tensor([[21, 50, 4], [0, 50, 4]]),
        ),
        "cross_causal_bottom_right": ZorroMask.from_segments(
            [("q", 5)], {"q": "*"}, kv_segments=[("k", 23)], causal=True
        ),
        "nothing_visible_rows": ZorroMask.from_segments([("a", 7), ("b", 9)], {"a": ["a"]}),
    }


def random_layout(gen: torch.Generator, max_size: int, *, lengths: bool, batch: int = 2) -> ZorroMask:
    """Self-attention over 2-6 segments of 0..max_size tokens (the first non-empty), each pair allowed with
    probability 1/2; with ``lengths``, random per-sample valid lengths ``(batch, segments)``. Seeded by a torch
    Generator so the benchmark scripts (which run without the test package's fixtures) reproduce the same sweep."""
    n_seg = int(torch.randint(2, 7, (1,), generator=gen))
    sizes = torch.randint(0, max_size, (n_seg,), generator=gen).tolist()
    sizes[0] += 1
    allow = torch.rand(n_seg, n_seg, generator=gen) < 0.5
    lens = (torch.rand(batch, n_seg, generator=gen) * (torch.tensor(sizes) + 1)).long() if lengths else None
    return ZorroMask.from_allow([(f"s{j}", s) for j, s in enumerate(sizes)], allow, lengths=lens)
