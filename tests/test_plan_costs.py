"""Costs that grow with the work: the rule table as runs, plans that batch equal blocks, causal blocks in one call.

Everything here is exact against the oracle (``to_dense()`` / the fp64 reference), including the NaN isolation of the
batched and causal paths; the speed itself is measured in benchmarks/.
"""

import random

import numpy as np
import pytest
import torch

from tests.isolation import check_isolation, poison_everything_unseen
from zorro_kernels import ZorroMask, auto, zorro_attention
from zorro_kernels.backends.segments import _segment_attention_autograd, build_plan
from zorro_kernels.mask import _dense_allow
from zorro_kernels.testing import check_against_oracle, random_mask
from zorro_kernels.tilemap import AllowRuns


def _segments(q, k, v, mask, scale=None, bias=None):
    return zorro_attention(q, k, v, mask, scale=scale, backend="segments", bias=bias)


def _segments_autograd(q, k, v, mask, scale=None):
    return _segment_attention_autograd(q, k, v, build_plan(mask), q.shape[-1] ** -0.5 if scale is None else scale)


def _docs(seed: int, n: int, total: int, repeat: int = 3) -> list[int]:
    """``n`` document lengths summing to ``total``, several of each length (so plans have buckets), shuffled."""
    rng = random.Random(seed)
    base = [rng.randint(1, max(1, 2 * total // n)) for _ in range(-(-n // repeat))]
    lens = [x for x in base for _ in range(repeat)][:n]
    lens[-1] += max(0, total - sum(lens))
    rng.shuffle(lens)
    return lens


def test_allow_runs_round_trip_and_key():
    gen = torch.Generator().manual_seed(0)
    for sq, sk in ((1, 1), (3, 7), (9, 4), (12, 12)):
        for p in (0.0, 0.3, 0.8, 1.0):
            dense = torch.rand(sq, sk, generator=gen) < p
            runs = AllowRuns.from_dense(dense)
            assert torch.equal(runs.dense(), dense)
            a, c = np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")
            assert np.array_equal(runs.lookup(a, c), dense.numpy())
            pa, pc = runs.pairs()
            assert sorted(zip(pa.tolist(), pc.tolist())) == [tuple(x) for x in dense.nonzero().tolist()]
    # a mask given by runs and the same table given dense are one content (the compiled-op path relies on it)
    seqs = [3, 1, 4, 1, 5]
    by_runs = ZorroMask.packed(seqs)
    by_table = ZorroMask.from_allow(
        [(f"seq{i}", n) for i, n in enumerate(seqs)], torch.eye(len(seqs), dtype=torch.bool)
    )
    assert by_runs.key == by_table.key
    assert torch.equal(by_runs.allow, by_table.allow) and torch.equal(by_runs.to_dense(), by_table.to_dense())


def test_many_documents_never_build_the_segment_table():
    """Describing and planning 5000 packed documents reads the rule table through its runs: the Sq x Sk table (25M
    cells) is never built, and equal-length documents share a call."""
    lens = _docs(1, 5000, 16384)
    for causal in (False, True):
        m = ZorroMask.packed(lens, causal=causal)
        plan = build_plan(m)
        tm = m.tile_map(64, 64)
        want = sum(n * (n + 1) // 2 for n in lens) if causal else sum(n * n for n in lens)
        assert int(m.attended()) == want
        assert (_dense_allow,) not in m._cache, "the dense rule table was built"
        assert len(plan.patterns[0].steps) <= len(set(lens)), "equal documents are not batched"
        t = -(-m.num_q // 64)
        assert tm.kinds.shape == (1, t, t) and tm.counts()["empty"] > 0
        assert m.rules["seq4999"] == ["seq4999"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["cpu", "autograd"])
def test_batched_documents_match_oracle(causal, path):
    # equal lengths scattered (index buckets), equal lengths adjacent (views), singletons, 1-token documents
    lens = [5, 3, 5, 1, 9, 5, 3, 1, 9, 2, 2, 2, 7]
    mask = ZorroMask.packed(lens, causal=causal)
    steps = build_plan(mask).patterns[0].steps
    assert any(st.index is not None for st in steps) and any(st.blocks > 1 and st.index is None for st in steps)
    assert any(st.causal for st in steps) == causal
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, mask.num_q, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, mask.num_kv, 8, generator=gen, dtype=torch.float64)  # GQA
    check_against_oracle(_segments if path == "cpu" else _segments_autograd, q, k, torch.randn_like(k), mask)


@pytest.mark.parametrize("causal", [False, True])
def test_batched_documents_with_a_bias(causal):
    lens = [4, 6, 4, 6, 3]
    mask = ZorroMask.packed(lens, causal=causal)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, mask.num_q, 8, generator=gen)
    k, v = torch.randn_like(q), torch.randn_like(q)
    bias = torch.randn(1, 2, mask.num_q, mask.num_kv, generator=gen)
    check_against_oracle(_segments, q, k, v, mask, bias=bias)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["cpu", "autograd"])
def test_batched_documents_nan_isolation(causal, path):
    lens = [4, 7, 4, 4, 1, 7, 2, 70, 70]  # 70 > BAND_ROWS: causal chunks on the autograd path
    mask = ZorroMask.packed(lens, causal=causal)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, mask.num_q, 8, generator=gen, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    rows = torch.rand(2, mask.num_q, generator=gen) < 0.3
    pk, pq, pg = poison_everything_unseen(mask, 2, rows)
    attn = _segments if path == "cpu" else _segments_autograd
    check_isolation(attn, q, k, v, mask, pk, pq, pg)
    # and the poison arrives where it may: every row of a document whose first key is NaN is NaN, as in the
    # reference (documents of 2+ tokens: a row whose every key is NaN is another matter, see the report of issue 21)
    starts = np.cumsum([0] + lens[:-1])
    pk = torch.zeros(2, mask.num_kv, dtype=torch.bool)
    hit = torch.zeros(2, mask.num_q, dtype=torch.bool)
    for s, n in zip(starts.tolist(), lens):
        if n >= 2:
            pk[:, s] = True
            hit[:, s : s + n] = True
    with torch.no_grad():
        out = attn(q, torch.where(pk[:, None, :, None], float("nan"), k), v, mask)
    assert torch.isnan(out[hit[:, None, :, None].expand_as(out)]).all()
    assert torch.isfinite(out[~hit[:, None, :, None].expand_as(out)]).all()


@pytest.mark.parametrize("seed, count", [(7, 8), pytest.param(11, 60, marks=pytest.mark.full)])
def test_random_layouts_plans_exact(seed, count):
    """The vectorised plan builder against the oracle on random layouts (rules, padding inside key runs, causal,
    cross-attention, empty segments): every path of the grouping."""
    rng = random.Random(seed)
    for i in range(count):
        mask = random_mask(rng, max_segments=7)
        b = mask.batch_size or 2
        gen = torch.Generator().manual_seed(i)
        q = torch.randn(b, 2, mask.num_q, 4, generator=gen, dtype=torch.float64)
        k = torch.randn(b, 2, mask.num_kv, 4, generator=gen, dtype=torch.float64)
        check_against_oracle(_segments, q, k, torch.randn_like(k), mask)


@pytest.mark.parametrize(
    "n, want", [(1, "dense"), (64, "dense"), (1024, "segments"), (2048, "segments"), (16384, "segments")]
)
def test_cpu_rule_on_masks_that_hide_nothing(n, want):
    """Large: one unmasked call on the segment path does what the dense backend does without its N x N mask (and the
    masked kernel is slower per pair: dense 1.21-1.26x the segment path's forward at 2052 tokens). Tiny: that one
    call's fixed costs outweigh the mask (dense 0.49-0.54x at 1 token, 0.72-0.83x at 84; B=1, H=4, D=64 and B=8, H=2,
    D=16, ``python -m benchmarks.cpu_auto_rule --sweep``, issue 21, 2026-12-07)."""
    q = k = torch.empty(1, 4, n, 64)
    audio = n // 4
    for mask in (
        ZorroMask.full(audio=audio, video=n - audio),
        ZorroMask.from_segments([("x", n)], {"x": "*"}),
        ZorroMask.packed([n]),
    ):
        for grad in (False, True):
            assert auto._cpu_rule(q, k, mask, grad) == want, (repr(mask).split("\n")[0], grad)


def test_cpu_rule_bounds_the_dense_mask():
    """Many calls with little work each would favour one dense call, but not past DENSE_MAX_CELLS of mask."""
    lens = _docs(3, 40, 2048, repeat=1)
    mask = ZorroMask.packed(lens)
    q = k = torch.empty(1, 1, mask.num_q, 1)
    assert mask.num_q * mask.num_kv > auto.DENSE_MAX_CELLS
    assert auto._cpu_rule(q, k, mask) == "segments"
    small = ZorroMask.packed(lens[:6])
    q = k = torch.empty(1, 1, small.num_q, 1)
    assert auto._cpu_rule(q, k, small) == "dense"  # the same shape of problem, small enough: one call wins
