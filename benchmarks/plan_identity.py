"""Does the working tree's planner build the same plans as an older commit's? For planner speed-ups, which must not
change what runs.

    python -m benchmarks.plan_identity b875e96               # 1371 masks
    python -m benchmarks.plan_identity HEAD --few 0          # the small-input paths off (numpy everywhere)

The masks: the oracle kit's named, cell and per-sample layouts, seeded random ones of each family (``random_mask``,
``random_cell_mask``, ``random_per_sample_mask`` small and large, ``random_layout`` with and without lengths),
Gemma-3-like layouts (the benchmark row, 16-token text around 1-64 images, 40 per-sample batches with repeated and
empty images) and packed documents (100, 1000). Each side builds them with its own package from the same seeds, and
each plan is compared in a canonical form (ranges, block counts, element masks, key writes, causal flags, gather
indices, prefixes, batches, uncovered rows). A mask one side refuses is compared by its error. Exit status 1 when any
plan differs.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.cpu_costs import doc_lengths
from benchmarks.measure import import_commit
from benchmarks.paired_gemma3 import gemma3_mask


def _ranges(r) -> tuple:
    return tuple((int(a), int(b)) for a, b in r)


def canonical(plan) -> tuple:
    """A plan as nested tuples of Python values (equal iff the plans run the same calls)."""
    pats = []
    for p in plan.patterns:
        steps = tuple(
            (
                _ranges(st.q_ranges),
                _ranges(st.k_ranges),
                st.blocks,
                None if st.mask is None else (tuple(st.mask.shape), st.mask.flatten().tolist()),
                tuple(st.k_writes),
                bool(st.causal),
                None if st.index is None else (st.index[0].tolist(), st.index[1].tolist()),
                st.prefix,
            )
            for st in p.steps
        )
        batch = None if p.batch is None else p.batch.tolist()
        pats.append((batch, steps, _ranges(p.q_uncovered), _ranges(p.k_uncovered)))
    return tuple(pats), plan.num_q, plan.num_kv


def masks(pkg):
    """``(name, mask)`` built with package ``pkg`` (either side), the same sequence on both."""
    t = importlib.import_module(f"{pkg.__name__}.testing")
    yield from t.named_masks().items()
    yield from t.cell_masks().items()
    yield from t.per_sample_masks().items()
    for s in range(300):
        yield f"random{s}", t.random_mask(random.Random(s))
    for s in range(300):
        yield f"cells{s}", t.random_cell_mask(random.Random(s))
    for s in range(400):
        yield f"per_sample{s}", t.random_per_sample_mask(random.Random(s))
    for s in range(200):
        rng = random.Random(10_000 + s)
        yield f"per_sample_large{s}", t.random_per_sample_mask(rng, max_segments=12, max_tokens=300)
    g = torch.Generator().manual_seed(0)
    for s in range(100):
        yield f"layout{s}", t.random_layout(g, 30, lengths=s % 2 == 0)
    yield "gemma3", gemma3_mask(pkg)
    for n in (1, 4, 16, 64):
        segs = [x for i in range(n) for x in ((f"t{i}", 16), (f"img{i}", 64))] + [("t_end", 16)]
        yield f"images{n}", pkg.ZorroMask.causal_with_blocks(segs, ["img*"])
    rng = random.Random(5)
    for s in range(40):
        yield f"gemma_batch{s}", _gemma_batch(pkg, rng, s)
    for n in (100, 1000):
        yield f"documents{n}", pkg.ZorroMask.packed(doc_lengths(n))


def _gemma_batch(pkg, rng: random.Random, s: int):
    """1-6 images between text runs, 1-4 samples (the third repeating the first), image sizes differing per sample
    (zeros too) every third batch."""
    n_img, b = rng.randint(1, 6), rng.randint(1, 4)
    text = [[rng.randint(0, 40) for _ in range(n_img + 1)] for _ in range(b)]
    if b > 2:
        text[2] = text[0]
    names, sizes = [], [[] for _ in range(b)]
    for i in range(n_img + 1):
        names.append(f"t{i}")
        for j in range(b):
            sizes[j].append(text[j][i])
        if i < n_img:
            names.append(f"img{i}")
            for j in range(b):
                sizes[j].append(rng.choice([0, 5, 16]) if s % 3 == 0 else 16)
    total = max(sum(x) for x in sizes)
    for x in sizes:  # equal totals per sample: the first text run takes up the difference
        x[0] += total - sum(x)
    return pkg.ZorroMask.causal_with_blocks(
        list(zip(names, sizes[0])), ["img*"], sample_sizes=torch.tensor(sizes, dtype=torch.int64)
    )


def plans(pkg) -> dict:
    build_plan = importlib.import_module(f"{pkg.__name__}.backends.segments").build_plan
    out = {}
    for name, m in masks(pkg):
        try:
            out[name] = canonical(build_plan(m))
        except Exception as e:  # noqa: BLE001 (a refusal is compared too)
            out[name] = ("error", type(e).__name__, str(e))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("commit", help="the commit whose plans are the reference")
    p.add_argument("--few", type=int, help="this tree's cut-over to the small-input paths (segments._FEW)")
    args = p.parse_args(argv)
    import zorro_kernels
    from zorro_kernels.backends import segments

    if args.few is not None:
        segments._FEW = args.few
    with tempfile.TemporaryDirectory() as tmp:
        old = plans(import_commit(args.commit, Path(tmp)))
    new = plans(zorro_kernels)
    differ = [k for k in old if old[k] != new.get(k)]
    print(f"{len(old)} masks, {len(differ)} plans differ{': ' + ', '.join(differ[:20]) if differ else ''}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
