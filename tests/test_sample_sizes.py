"""Per-sample segment boundaries (issue 20 item 1): each sample's segments at its own positions, no padding between.
The API and its errors, the segment arithmetic and tile maps against to_dense, the CPU backends against the fp64
oracle (forward and all gradients), NaN isolation, a seeded fuzzer, and the Triton backend's refusal."""

from __future__ import annotations

import random

import pytest
import torch

from zorro_kernels import ZorroMask, _ops
from zorro_kernels.backends import BACKENDS
from zorro_kernels.testing import check_against_oracle, per_sample_masks, random_per_sample_mask
from zorro_kernels.tilemap import build_tile_map

from .helpers import (  # noqa: F401 (small_triton_tiles: a fixture)
    TRITON,
    attn_fn,
    deterministic,
    expected_kinds,
    qkv_for,
    small_triton_tiles,
)
from .isolation import check_isolation, poison_everything_unseen

# the reference backend is the oracle's own code: full tier
TIERED = ["segments", "dense", pytest.param("reference", marks=pytest.mark.full)]


def test_each_sample_has_its_own_layout():
    sizes = torch.tensor([[2, 3, 3], [5, 3, 0]])
    m = ZorroMask.causal_with_blocks([("t0", 2), ("img", 3), ("t1", 3)], ["img"], sample_sizes=sizes)
    d = m.to_dense()
    assert d.shape == (2, 8, 8) and m.batch_size == 2 and m.per_sample
    for b in range(2):
        want = ZorroMask.causal_with_blocks(
            [("t0", int(sizes[b, 0])), ("img", int(sizes[b, 1])), ("t1", int(sizes[b, 2]))], ["img"]
        ).to_dense()
        assert torch.equal(d[b], want)
    # sample 1: causal over its 5 text tokens, then the image sees them and itself
    assert d[1, 5].tolist() == [True] * 8
    assert d[1, 4].tolist() == [True] * 5 + [False] * 3
    assert m.attended().tolist() == d.sum((1, 2)).tolist()


def _sample_masks():
    cross = ZorroMask.from_segments(  # query lengths without key lengths: the sample's keys stay unpadded
        [("new", 2)],
        {"new": {"t0": "full", "img": "full", "new_k": "causal"}},
        kv_segments=[("t0", 4), ("img", 6), ("new_k", 2)],
        kv_sample_sizes=torch.tensor([[4, 6, 2], [8, 2, 2]]),
        lengths=torch.tensor([[2], [1]]),
    )
    return {**per_sample_masks(), "cross_q_lengths": cross}


@pytest.mark.parametrize("name", list(_sample_masks()))
def test_sample_is_the_mask_of_that_samples_layout(name):
    # mask.sample(b) is assembled without the constructor (planning builds one per distinct sample): it must equal
    # the mask the constructor builds from sample b's sizes and lengths
    m = _sample_masks()[name]
    for b in range(m.batch_size):
        got = m.sample(b)
        qs = m.sample_sizes[b] if m.sample_sizes is not None else torch.tensor(m.q_sizes)
        ks = m.kv_sample_sizes[b] if m.kv_sample_sizes is not None else torch.tensor(m.kv_sizes)
        want = ZorroMask(
            list(zip(m.q_names, qs.tolist())),
            m.allow,
            kv_segments=None if m.is_self else list(zip(m.kv_names, ks.tolist())),
            lengths=None if m.lengths is None else m.lengths[b : b + 1],
            kv_lengths=None if m.is_self or m.kv_lengths is None else m.kv_lengths[b : b + 1],
            causal=m.causal,
            window=m.window,
            causal_cells=m.causal_cells,
        )
        assert (got.q_sizes, got.kv_sizes, got.batch_size, got.per_sample) == (
            want.q_sizes,
            want.kv_sizes,
            want.batch_size,
            False,
        )
        for a, c in ((got.lengths, want.lengths), (got.kv_lengths, want.kv_lengths)):
            assert (a is None and c is None) or torch.equal(a, c)
        assert torch.equal(got.to_dense(), want.to_dense()) and repr(got) == repr(want)


def test_prefix_lm_per_sample_prompts():
    m = ZorroMask.prefix_lm([3, 5], [4, 2])
    i, j = torch.arange(7)[:, None], torch.arange(7)[None]
    for b, p in enumerate((3, 5)):
        assert torch.equal(m.to_dense()[b], (j < p) | (j <= i))


def test_errors_name_the_argument_and_numbers():
    segs = [("a", 2), ("b", 3)]
    with pytest.raises(ValueError, match=r"sample_sizes\[1\] sums to 4 tokens, but the segments hold 5"):
        ZorroMask.from_segments(segs, {"a": "*"}, sample_sizes=torch.tensor([[2, 3], [1, 3]]))
    with pytest.raises(ValueError, match=r"lengths\[0, 0\] = 3 exceeds sample 0's size 1 of segment 'a'"):
        ZorroMask.from_segments(segs, {"a": "*"}, sample_sizes=torch.tensor([[1, 4]]), lengths=torch.tensor([[3, 2]]))
    with pytest.raises(ValueError, match=r"disagree on the batch size"):
        ZorroMask.from_segments(
            segs, {"a": "*"}, sample_sizes=torch.tensor([[1, 4]]), lengths=torch.tensor([[1, 2], [2, 3]])
        )
    with pytest.raises(ValueError, match=r"sample_sizes\[0, 1\] \('b'\) = -1 is negative"):
        ZorroMask.from_segments(segs, {"a": "*"}, sample_sizes=torch.tensor([[6, -1]]))
    with pytest.raises(ValueError, match="kv_sample_sizes is only for cross-attention"):
        ZorroMask.from_segments(segs, {"a": "*"}, kv_sample_sizes=torch.tensor([[2, 3]]))


def test_sizes_are_part_of_the_value():
    segs = [("a", 2), ("b", 3)]
    sizes = torch.tensor([[2, 3], [4, 1]])
    m = ZorroMask.from_segments(segs, {"a": "*", "b": ["b"]}, sample_sizes=sizes)
    other = ZorroMask.from_segments(segs, {"a": "*", "b": ["b"]}, sample_sizes=torch.tensor([[2, 3], [3, 2]]))
    assert m.key != other.key
    sizes[1, 0] = 0  # the caller's tensor: the mask keeps its own copy
    m.sample_sizes[1, 0] = 0  # a handed-out copy
    assert m.sample_sizes.tolist() == [[2, 3], [4, 1]]
    assert m.with_lengths(torch.tensor([[1, 1], [1, 1]])).sample_sizes.tolist() == [[2, 3], [4, 1]]
    with pytest.raises(AttributeError, match="immutable"):
        m._sample_sizes = None
    back = _ops._mask_from(*_ops.describe(m))
    assert torch.equal(back.to_dense(), m.to_dense())
    assert "per-sample sizes" in repr(m)


@pytest.mark.parametrize("name", sorted(per_sample_masks()))
def test_attended_and_tile_maps_match_to_dense(name):
    m = per_sample_masks()[name]
    d = m.to_dense()
    assert m.attended().tolist() == d.sum((1, 2)).tolist()
    for bm, bn in ((16, 16), (4, 8)):
        assert torch.equal(build_tile_map(m, bm, bn).kinds, expected_kinds(m, bm, bn))


@pytest.mark.parametrize("backend", TIERED)
@pytest.mark.parametrize("name", sorted(per_sample_masks()))
def test_against_oracle(backend, name):
    m = per_sample_masks()[name]
    q, k, v = qkv_for(m, dtype=torch.float32 if backend == "dense" else torch.float64)
    check_against_oracle(attn_fn(backend), q, k, v, m)


@pytest.mark.parametrize("backend", TIERED)
@pytest.mark.parametrize("name", ["blocks_left_padded", "prefix_lm", "decode_cross"])
def test_nan_isolation(backend, name):
    m = per_sample_masks()[name]
    q, k, v = qkv_for(m, dtype=torch.float32)
    rows = torch.rand(q.shape[0], m.num_q, generator=torch.Generator().manual_seed(2)) < 0.3
    check_isolation(attn_fn(backend), q, k, v, m, *poison_everything_unseen(m, q.shape[0], rows))


def test_segments_plan_shares_patterns_between_equal_samples():
    from zorro_kernels.backends.segments import build_plan

    sizes = torch.tensor([[2, 3, 3], [5, 3, 0], [2, 3, 3]])
    m = ZorroMask.causal_with_blocks([("t0", 2), ("img", 3), ("t1", 3)], ["img"], sample_sizes=sizes)
    plan = build_plan(m)
    assert sorted(p.batch.tolist() for p in plan.patterns) == [[0, 2], [1]]


@pytest.mark.parametrize("det", [True, False], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("name", ["blocks_left_padded", "blocks_ragged", "prefix_lm", "decode_cross"])
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.usefixtures("small_triton_tiles")
def test_triton_against_oracle(backend, name, det):
    # per-sample token codes and end offsets, one row per sample, over the per-sample tile map
    m = per_sample_masks()[name]
    q, k, v = qkv_for(m, 1, 2, d=16, dtype=torch.float32)
    assert not BACKENDS["triton"].not_supported_reasons(q, k, v, m)
    with deterministic(det):
        check_against_oracle(attn_fn(backend), q, k, v, m)


def _fuzz(seed: int, backends) -> None:
    rng = random.Random(seed)
    m = random_per_sample_mask(rng)
    d = m.to_dense()
    assert m.attended().tolist() == d.sum((1, 2)).tolist(), (seed, m)
    assert torch.equal(build_tile_map(m, 8, 8).kinds, expected_kinds(m, 8, 8)), (seed, m)
    for backend in backends:
        q, k, v = qkv_for(m, 1, 2, dtype=torch.float32 if backend == "dense" else torch.float64, seed=seed)
        check_against_oracle(attn_fn(backend), q, k, v, m)
        rows = torch.rand(q.shape[0], m.num_q, generator=torch.Generator().manual_seed(seed)) < 0.3
        check_isolation(
            attn_fn(backend), q.float(), k.float(), v.float(), m, *poison_everything_unseen(m, q.shape[0], rows)
        )


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_per_sample_fast(seed):
    _fuzz(seed, ["segments", "dense"])


@pytest.mark.full
@pytest.mark.parametrize("seed", range(8, 408))
def test_fuzz_per_sample_full(seed):
    _fuzz(seed, ["segments", "dense", "reference"])


def test_left_padding_is_a_leading_segment_of_length_zero():
    # Gemma 3's left-padded batch: the padding as a segment with lengths 0 equals the hand-built rules without it
    segs = [("pad", 0), ("t0", 5), ("img0", 8), ("t1", 3), ("img1", 4), ("t2", 9)]
    sizes = torch.tensor([[0, 5, 8, 3, 4, 9], [4, 1, 8, 13, 0, 3], [2, 0, 8, 1, 4, 14]])
    lengths = sizes.clone()
    lengths[:, 0] = 0
    m = ZorroMask.causal_with_blocks(segs, ["img*"], sample_sizes=sizes, lengths=lengths)
    assert torch.equal(m.to_dense(), per_sample_masks()["blocks_left_padded"].to_dense())
    q, k, v = qkv_for(m)
    check_against_oracle(attn_fn("segments"), q, k, v, m)


@pytest.mark.full
@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.usefixtures("small_triton_tiles")
def test_fuzz_per_sample_triton(backend, seed):
    m = random_per_sample_mask(random.Random(seed))
    q, k, v = qkv_for(m, 1, 2, d=16, dtype=torch.float32, seed=seed)
    with deterministic(seed % 2 == 0):
        check_against_oracle(attn_fn(backend), q, k, v, m)
    rows = torch.rand(q.shape[0], m.num_q, generator=torch.Generator().manual_seed(seed)) < 0.3
    check_isolation(attn_fn(backend), q, k, v, m, *poison_everything_unseen(m, q.shape[0], rows))
