"""Ragged batches on the CPU segment path (zorro_kernels/backends/ragged.py): per-sample length patterns grouped
into padded buckets, each run as one batched call per step with the samples' padding hidden (issue 21).

Every plan shape is forced here — one bucket of the whole batch (views, nothing gathered), gathered buckets, a mix of
buckets and exact per-pattern steps — and checked against the fp64 oracle (output and every gradient) and under NaN
poison (what a row may not attend never reaches it; rows that see nothing stay exactly 0).
"""

import functools

import numpy as np
import pytest
import torch

from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.backends import ragged
from zorro_kernels.backends.segments import build_plan
from zorro_kernels.testing import check_against_oracle, generate_qkv

from .isolation import check_isolation, poison_everything_unseen

segments = functools.partial(zorro_attention, backend="segments")


def _zorro_batch(b: int, sizes=(5, 9, 2), seed: int = 0) -> ZorroMask:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.stack([torch.randint(0, n + 1, (b,), generator=gen) for n in sizes], 1)
    return ZorroMask.zorro(audio=sizes[0], video=sizes[1], fusion=sizes[2], lengths=lengths)


def _cross_batch(b: int, seed: int = 0) -> ZorroMask:
    """Cross-attention with key padding only, a query segment whose keys skip a segment (several key ranges)."""
    gen = torch.Generator().manual_seed(seed)
    kv_lengths = torch.stack([torch.randint(0, n + 1, (b,), generator=gen) for n in (7, 11, 3)], 1)
    return ZorroMask.from_segments(
        [("a", 3), ("v", 4), ("g", 2)],
        {"a": ["ka"], "v": ["kv"], "g": ["ka", "kf"]},
        kv_segments=[("ka", 7), ("kv", 11), ("kf", 3)],
        kv_lengths=kv_lengths,
    )


def _force(monkeypatch, how: str) -> None:
    """Make ragged_plan choose one plan shape: ``whole`` (one bucket of the whole batch), ``split`` (two gathered
    buckets) or ``mixed`` (the largest pattern exact, the rest one gathered bucket)."""
    if how == "whole":
        monkeypatch.setattr(ragged, "_cuts", lambda *a, **kw: None)
    elif how == "split":
        monkeypatch.setattr(ragged, "_cuts", lambda work, *a, **kw: [(0, len(work) // 2), (len(work) // 2, len(work))])
    else:
        monkeypatch.setattr(ragged, "_cuts", lambda work, *a, **kw: [(0, 1), (1, len(work))])


def _shape(mask) -> tuple:
    rp = mask.derived(ragged.ragged_plan)
    return tuple(b.whole for b in rp.buckets), len(rp.exact.patterns)


EXPECTED = {"whole": ((True,), 0), "split": ((False, False), 0), "mixed": ((False,), 1)}


@pytest.mark.parametrize("how", ["whole", "split", "mixed"])
@pytest.mark.parametrize("layout", ["zorro", "cross"])
@pytest.mark.parametrize("dtype,heads", [(torch.float64, (4, 4)), (torch.float32, (4, 2))])
def test_buckets_match_the_oracle(monkeypatch, how, layout, dtype, heads):
    _force(monkeypatch, how)
    mask = _zorro_batch(9) if layout == "zorro" else _cross_batch(9)
    assert _shape(mask) == EXPECTED[how]
    q, k, v = generate_qkv(mask, batch=9, heads=heads[0], kv_heads=heads[1], head_dim=8, dtype=dtype)
    check_against_oracle(segments, q, k, v, mask)
    with torch.no_grad():  # the forward-only entry (the dispatcher's) agrees with the autograd one
        torch.testing.assert_close(segments(q, k, v, mask), check_against_oracle(segments, q, k, v, mask, grad=False))


@pytest.mark.parametrize("how", ["whole", "split", "mixed"])
@pytest.mark.parametrize("layout", ["zorro", "cross"])
def test_buckets_keep_nan_where_it_may_not_go(monkeypatch, how, layout):
    """Poison every key a few rows may not attend (the samples' padding inside a bucket's ranges included) and every
    other row's query and upstream gradient: those rows, and the gradients of what they attend, stay bit for bit."""
    _force(monkeypatch, how)
    mask = _zorro_batch(8, seed=1) if layout == "zorro" else _cross_batch(8, seed=1)
    assert _shape(mask) == EXPECTED[how]
    q, k, v = generate_qkv(mask, batch=8, head_dim=8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        rows = torch.rand(8, mask.num_q, generator=gen) < 0.3
        check_isolation(segments, q, k, v, mask, *poison_everything_unseen(mask, 8, rows))


def test_a_bucket_with_nothing_to_see():
    """Every query row padding, the keys' lengths differing: several patterns, a bucket with no step."""
    mask = ZorroMask.from_segments(
        [("a", 3), ("b", 2)],
        {"a": "*", "b": "*"},
        kv_segments=[("k", 5)],
        lengths=torch.zeros(3, 2, dtype=torch.int64),
        kv_lengths=torch.tensor([[5], [2], [0]]),
    )
    assert mask.derived(ragged.ragged_plan) is not None
    q, k, v = generate_qkv(mask, batch=3, head_dim=8, dtype=torch.float64)
    check_against_oracle(segments, q, k, v, mask)


@pytest.mark.parametrize("huge", ["qk", "v"])
def test_huge_finite_padding_takes_the_careful_path(monkeypatch, huge):
    """Padding of huge finite values with finite inputs: a padding key of 1e30 makes its score overflow float32 to
    inf (forward), a padding value of 3e38 makes ``dO . v`` overflow (backward only: its zero weight keeps the
    forward finite), and inf + -inf or 0 * inf is NaN; the hidden keys are then zero-filled as for NaN (the output
    and gradients equal those with zero padding)."""
    _force(monkeypatch, "split")
    mask = _zorro_batch(8, seed=2)
    q, k, v = generate_qkv(mask, batch=8, head_dim=8, dtype=torch.float32)
    pad = ~torch.cat([torch.arange(n)[None] < mask.lengths[:, i : i + 1] for i, n in enumerate(mask.q_sizes)], 1)
    hide = pad[:, None, :, None]
    if huge == "qk":
        big, zero = [q.masked_fill(hide, 1e30), k.masked_fill(hide, 1e30), v], [q, k.masked_fill(hide, 0), v]
    else:
        big, zero = [q, k, v.masked_fill(hide, 3e38)], [q, k, v.masked_fill(hide, 0)]

    def run(qq, kk, vv):
        qq, kk, vv = (t.clone().requires_grad_() for t in (qq, kk, vv))
        out = segments(qq, kk, vv, mask)
        return [out.detach(), *torch.autograd.grad(out, (qq, kk, vv), torch.ones_like(out))]

    for a, b in zip(run(*big), run(*zero)):
        live = ~hide.expand_as(a)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a[live], b[live])


def test_a_ragged_batch_is_a_few_batched_calls():
    """B=256 at the demo's size: one plan pattern per sample, but the CPU path makes a few dozen calls (one bucket of
    3 steps, two of them in pieces of similar lengths); at the issue's size (160/784/8) buckets of similar samples."""
    for sizes, most in (((32, 64, 4), 40), ((160, 784, 8), 256)):
        mask = _zorro_batch(256, sizes)
        patterns = len(build_plan(mask).patterns)
        assert patterns > 200
        calls = ragged.ragged_calls(mask)
        assert calls <= most, (sizes, calls, patterns)


@pytest.mark.parametrize(
    "mask",
    [
        ZorroMask.zorro(audio=4, video=6, fusion=2),  # one pattern: the segment path's own plan
        ZorroMask.zorro(audio=4, video=6, fusion=2, lengths=torch.tensor([[4, 6, 2], [4, 6, 2]])),
        ZorroMask.packed([4, 6], causal=True).with_lengths(torch.tensor([[4, 6], [2, 3]])),
        ZorroMask.from_segments([("a", 6)], {"a": "*"}, lengths=torch.tensor([[6], [3]]), window=(2, 0)),
    ],
    ids=["no-lengths", "one-pattern", "causal", "window"],
)
def test_no_buckets_where_the_steps_are_not_plain(mask):
    assert mask.derived(ragged.ragged_plan) is None


def test_the_grouping_pads_less_than_one_bucket_at_the_issue_size():
    """The buckets' padded work at 160/784/8, B=256, stays within 15% of the exact work (one bucket would double it)."""
    mask = _zorro_batch(256, (160, 784, 8))
    rp = mask.derived(ragged.ragged_plan)
    runs, lengths = mask._runs, mask.lengths.numpy()
    exact = ragged._work(runs, lengths, lengths).sum()
    padded = sum(
        len(b.batch) * ragged._work(runs, *(lengths[b.batch.numpy()].max(0, keepdims=True),) * 2)[0] for b in rp.buckets
    )
    assert padded <= 1.15 * exact, (padded, exact)
    assert np.isclose(exact, float(mask.attended().sum()))


@pytest.mark.parametrize("rows", [0, 10**6], ids=["flash-only", "matmul-every-step"])
@pytest.mark.parametrize("layout", ["zorro", "cross"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_few_row_backward_matches_the_oracle_and_keeps_nan_out(monkeypatch, rows, layout, heads):
    """The batched-matmul backward of few-row steps (``FEW_ROWS``) forced onto every step of a whole-batch and a split
    plan, or onto none: fp64 oracle (dead rows exactly 0 with zero gradients, empty segments, odd lengths, GQA whose
    key gradients sum over the group), dK/dV writes merged or not (the cross layout's keys skip a segment), and NaN
    poison on every key a row may not attend and on some rows' queries (with and without their dO): the protected rows
    and gradients stay bit for bit."""
    monkeypatch.setattr(ragged, "FEW_ROWS", rows)
    calls = []
    real = ragged._matmul_backward
    monkeypatch.setattr(ragged, "_matmul_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for how, b in (("whole", 7), ("split", 8)):
        _force(monkeypatch, how)
        mask = _zorro_batch(b, sizes=(3, 5, 2), seed=3) if layout == "zorro" else _cross_batch(b, seed=3)
        q, k, v = generate_qkv(mask, batch=b, heads=heads[0], kv_heads=heads[1], head_dim=5, dtype=torch.float64)
        check_against_oracle(segments, q, k, v, mask)
        gen = torch.Generator().manual_seed(4)
        pq = torch.rand(b, mask.num_q, generator=gen) < 0.3
        pk, pq, pg = poison_everything_unseen(mask, b, pq)
        check_isolation(segments, q, k, v, mask, pk, pq, pg)
        # queries alone (a dead row's NaN query, its dO and every key finite, must not reach dK through its zero
        # weights)
        check_isolation(segments, q, k, v, mask, torch.zeros_like(pk), pq, torch.zeros_like(pg))
    assert bool(calls) == bool(rows)


def test_merged_key_writes():
    """A step's dK/dV writes, adjacent in dk and in the step's keys, become one accumulating write after the parts
    written first are zeroed; writes that are not adjacent stay apart."""
    writes = ((0, 96, 0, True), (96, 100, 96, False))
    assert ragged._merged_writes(writes, None) == [(96, 100, None, None), (0, 100, 0, True)]
    assert ragged._merged_writes(((0, 4, 0, False), (9, 12, 4, True)), None) == [(0, 4, 0, False), (9, 12, 4, True)]
    assert ragged._merged_writes(((5, 9, 0, False), (9, 12, 4, False)), None) == [
        (5, 9, None, None),
        (9, 12, None, None),
        (5, 12, 0, True),
    ]


@pytest.mark.parametrize("rows", [0, 10**6], ids=["flash-only", "matmul-every-step"])
def test_a_dead_rows_nan_query_reaches_no_key_gradient(monkeypatch, rows):
    """A sample with no audio: its audio rows are padding and every key of their step is hidden. NaN in those rows'
    queries alone (dO and every key finite) must leave every gradient finite: the clean pass's scores keep the NaN
    (the ``-inf`` bias is added, not selected), so the results check sees it and the careful pass zero-fills it."""
    monkeypatch.setattr(ragged, "FEW_ROWS", rows)
    _force(monkeypatch, "whole")
    mask = ZorroMask.zorro(audio=3, video=5, fusion=2, lengths=torch.tensor([[3, 5, 2], [1, 2, 0], [0, 4, 1]]))
    q, k, v = generate_qkv(mask, batch=3, heads=2, head_dim=4, dtype=torch.float64)
    q = q.clone()
    q[2, :, 0:3] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = segments(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for t in (out, *grads):
        assert torch.isfinite(t).all()


def _force_pieces(monkeypatch, how: str) -> None:
    """One whole-batch bucket, its one-segment steps cut into pieces ``each`` (every lengths pair its own piece) or
    ``halves`` (two)."""
    _force(monkeypatch, "whole")
    if how == "each":
        monkeypatch.setattr(ragged, "_piece_groups", lambda work, *a: [(i, i + 1) for i in range(len(work))])
    else:
        monkeypatch.setattr(
            ragged, "_piece_groups", lambda work, *a: [(0, len(work) // 2), (len(work) // 2, len(work))]
        )


def _pieces_of(mask) -> list[int]:
    (bucket,) = mask.derived(ragged.ragged_plan).buckets
    return [len(st.pieces) for st in bucket.steps]


@pytest.mark.parametrize("how", ["each", "halves"])
@pytest.mark.parametrize(
    "dtype,heads",
    [(torch.float64, (4, 4)), (torch.float32, (4, 2)), (torch.float16, (4, 2)), (torch.bfloat16, (4, 4))],
    ids=["fp64-mha", "fp32-gqa", "fp16-gqa", "bf16-mha"],
)
def test_pieces_match_the_oracle(monkeypatch, how, dtype, heads):
    """A whole-batch step of one query and one key segment (audio x audio, video x video) cut into pieces of samples
    by their own lengths, each run at its longest sample's lengths (odd ones, empty segments: rows and keys past a
    piece's cut are never read, their dq / dK / dV exactly 0): output and every gradient against the fp64 oracle."""
    _force_pieces(monkeypatch, how)
    mask = _zorro_batch(11, sizes=(9, 13, 2), seed=5)
    audio, video, fusion = _pieces_of(mask)
    assert fusion == 0 and (audio == video == 2 if how == "halves" else min(audio, video) > 2)
    q, k, v = generate_qkv(mask, batch=11, heads=heads[0], kv_heads=heads[1], head_dim=8, dtype=dtype)
    check_against_oracle(segments, q, k, v, mask)
    with torch.no_grad():
        torch.testing.assert_close(segments(q, k, v, mask), check_against_oracle(segments, q, k, v, mask, grad=False))


@pytest.mark.parametrize("how", ["each", "halves"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[1])
def test_pieces_keep_nan_where_it_may_not_go(monkeypatch, how, dtype):
    """NaN on every key some rows may not attend (a sample's padding past and inside its piece's cut), on the other
    rows' queries and upstream gradients (with and without the keys): the protected rows and the gradients of what
    they attend stay bit for bit; and a dead row's NaN query alone reaches no gradient."""
    _force_pieces(monkeypatch, how)
    mask = _zorro_batch(10, sizes=(13, 11, 2), seed=6)
    assert min(_pieces_of(mask)[:2]) >= 2
    q, k, v = generate_qkv(mask, batch=10, heads=4, kv_heads=2, head_dim=8, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        pk, pq, pg = poison_everything_unseen(mask, 10, torch.rand(10, mask.num_q, generator=gen) < 0.3)
        check_isolation(segments, q, k, v, mask, pk, pq, pg)
        check_isolation(segments, q, k, v, mask, torch.zeros_like(pk), pq, torch.zeros_like(pg))
    pad = ~torch.cat([torch.arange(n)[None] < mask.lengths[:, i : i + 1] for i, n in enumerate(mask.q_sizes)], 1)
    qn = q.masked_fill(pad[:, None, :, None], float("nan")).requires_grad_()
    kk, vv = (t.detach().requires_grad_() for t in (k, v))
    out = segments(qn, kk, vv, mask)
    for t in (out, *torch.autograd.grad(out, (qn, kk, vv), torch.ones_like(out))):
        assert torch.isfinite(t).all()


def test_the_demo_batch_runs_in_pieces_of_similar_lengths():
    """At the demo's size (32/64/4, B=256) the audio and video steps run in pieces whose padded work is within 1.5x
    of the exact work (one piece of the whole batch: about 3x); the fusion step, whose keys are no prefix, whole."""
    mask = _zorro_batch(256, (32, 64, 4))
    (bucket,) = mask.derived(ragged.ragged_plan).buckets
    lengths = mask.lengths
    for st, seg in zip(bucket.steps[:2], (0, 1)):
        assert len(st.pieces) > 2
        exact = int((lengths[:, seg] ** 2).sum())
        padded = sum(len(p.batch) * (p.step.q_ranges[0][1] - p.step.q_ranges[0][0]) ** 2 for p in st.pieces if p.step)
        assert padded <= 1.5 * exact, (padded, exact)
    assert bucket.steps[2].pieces == ()


@pytest.mark.parametrize("how", ["each", "halves"])
def test_pieces_of_cross_attention_with_empty_keys(monkeypatch, how):
    """Cross-attention, every query row valid and the keys' lengths random (some 0): a sample whose keys in a step
    are all padding has its rows dead there (0, zero dq) and joins no piece's kernel; fp64 oracle with GQA, and NaN
    on every key some rows may not attend."""
    _force_pieces(monkeypatch, how)
    gen = torch.Generator().manual_seed(8)
    kv_lengths = torch.stack([torch.randint(0, n + 1, (9,), generator=gen) for n in (7, 11)], 1)
    kv_lengths[0] = 0
    mask = ZorroMask.from_segments(
        [("a", 10), ("v", 12)],
        {"a": ["ka"], "v": ["kv"]},
        kv_segments=[("ka", 7), ("kv", 11)],
        kv_lengths=kv_lengths,
    )
    assert min(_pieces_of(mask)) >= 2
    q, k, v = generate_qkv(mask, batch=9, heads=4, kv_heads=2, head_dim=8, dtype=torch.float64)
    check_against_oracle(segments, q, k, v, mask)
    pk, pq, pg = poison_everything_unseen(mask, 9, torch.rand(9, mask.num_q, generator=gen) < 0.3)
    check_isolation(segments, q, k, v, mask, pk, pq, pg)
