"""The compiled backward kernel ``torch.ops.zorro_cpu.interval_bwd`` (zorro_kernels/csrc/interval_bwd.cpp).

Its dq, dk, dv against autograd through ``interval_attention_reference`` in fp64, under the project's rule
(kernel error <= 2x torch's same-precision error + floor); rows with no keys and keys nobody attends get exactly 0;
finite garbage in keys a row may not attend changes nothing it must not. The fast tier covers each feature once; the
``full`` tier sweeps random shapes, interval counts and head groupings.
"""

import random

import pytest
import torch

from zorro_kernels.backends import _cpp
from zorro_kernels.backends.intervals import interval_attention_reference as reference
from zorro_kernels.testing import assert_within_policy

pytestmark = pytest.mark.skipif(_cpp.unavailable_reason() is not None, reason=str(_cpp.unavailable_reason()))

DTYPES = (torch.float32, torch.float64)


def dense_mask(lo: torch.Tensor, hi: torch.Tensor, nk: int) -> torch.Tensor:
    """(B, Nq, Nk) bool: row i of sample b attends key j iff lo[b, i, r] <= j < hi[b, i, r] for some r (which rows
    and keys must get exact zeros)."""
    j = torch.arange(nk)
    return ((lo[..., None] <= j) & (j < hi[..., None])).any(-2)


def interval_bwd(dout, q, k, v, out, lse, lo, hi, scale):
    return torch.ops.zorro_cpu.interval_bwd(dout, q, k, v, out, lse, lo, hi, scale)


def random_intervals(gen: torch.Generator, b: int, nq: int, nk: int, r: int):
    """lo, hi (b, nq, r) int32: sorted disjoint intervals from 2r sorted random points (some empty, some rows empty)."""
    pts = torch.sort(torch.randint(0, nk + 1, (b, nq, 2 * r), generator=gen), -1).values.int()
    return pts[..., 0::2].contiguous(), pts[..., 1::2].contiguous()


def draw(gen, b, hq, hkv, nq, nk, d):
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def reference_grads(q, k, v, dout, lo, hi, scale, dtype):
    """(out, lse, (dq, dk, dv)) of the reference computed at ``dtype``."""
    qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference(qq, kk, vv, lo, hi, scale)
    grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype))
    return out.detach(), lse.detach(), grads


def check(q, k, v, dout, lo, hi, dtype, *, layout=None):
    """The kernel's grads at ``dtype`` against the fp64 reference under the rule; also exact zeros where required.
    ``layout(t)`` turns each (B, H, N, D) input into the view the kernel receives (strided layouts)."""
    scale = q.shape[-1] ** -0.5
    _, _, ref64 = reference_grads(q, k, v, dout, lo, hi, scale, torch.float64)
    out, lse, same = reference_grads(q, k, v, dout, lo, hi, scale, dtype)
    view = layout or (lambda t: t)
    got = interval_bwd(*(view(t.to(dtype)) for t in (dout, q, k, v, out)), lse, lo, hi, scale)
    for name, g, s, r in zip(("dq", "dk", "dv"), got, same, ref64):
        assert g.dtype == dtype and g.is_contiguous(), f"{name}: dtype {g.dtype}, contiguous {g.is_contiguous()}"
        assert_within_policy(name, g, s, r, dtype)
    mask = dense_mask(lo, hi, k.shape[2])  # (B, Nq, Nk)
    dead_rows = ~mask.any(-1)  # (B, Nq)
    dq = got[0].transpose(1, 2)[dead_rows]
    assert (dq == 0).all(), f"{int((dq != 0).sum())} non-zero dq entries in rows with no keys"
    unread = ~mask.any(1)  # (B, Nk)
    for name, g in zip(("dk", "dv"), got[1:]):
        dead = g.transpose(1, 2)[unread]
        assert (dead == 0).all(), f"{name}: {int((dead != 0).sum())} non-zero entries for keys no row attends"
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b, hq, hkv, nq, nk, d, r",
    [
        (1, 1, 1, 1, 1, 8, 1),
        (2, 2, 2, 3, 97, 16, 1),
        (2, 2, 2, 97, 113, 32, 3),  # cross-attention, several intervals per row
        (1, 4, 2, 113, 3, 16, 2),  # GQA 2 query heads per kv head
        (2, 4, 1, 97, 97, 64, 2),  # GQA, one kv head
        (1, 2, 2, 300, 260, 24, 4),  # several row blocks and key chunks
    ],
)
def test_matches_reference(dtype, b, hq, hkv, nq, nk, d, r):
    gen = torch.Generator().manual_seed(nq * 1000 + nk)
    lo, hi = random_intervals(gen, b, nq, nk, r)
    check(*draw(gen, b, hq, hkv, nq, nk, d), lo, hi, dtype)


@pytest.mark.parametrize("threads, hq", [(2, 4), (3, 3), (4, 2)])
def test_more_threads_than_tasks(threads, hq):
    """One sample, one kv head (one task, run inline, its BLAS held to one thread) under several threads: the same
    grads under the rule, dead rows and unread keys still exactly 0."""
    gen = torch.Generator().manual_seed(7)
    lo, hi = random_intervals(gen, 1, 97, 113, 2)
    x = draw(gen, 1, hq, 1, 97, 113, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in DTYPES:
            check(*x, lo, hi, dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_and_full(dtype):
    """One interval per row: a causal square (diagonal chunks partial, the rest full) and every key for every row."""
    gen = torch.Generator().manual_seed(1)
    n = 257
    lo = torch.zeros(2, n, 1, dtype=torch.int32)
    causal = (torch.arange(n, dtype=torch.int32) + 1).expand(2, n)[..., None].contiguous()
    full = torch.full_like(causal, n)
    x = draw(gen, 2, 2, 2, n, n, 32)
    check(*x, lo, causal, dtype)
    check(*x, lo, full, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_and_unread_keys(dtype):
    """Rows with no keys (all intervals empty, some as lo > hi padding) get dq exactly 0; keys nobody attends get dk,
    dv exactly 0 (checked inside ``check``); a sample with no keys at all gives all zeros."""
    gen = torch.Generator().manual_seed(2)
    nq, nk = 40, 50
    lo = torch.zeros(2, nq, 2, dtype=torch.int32)
    hi = torch.zeros(2, nq, 2, dtype=torch.int32)
    lo[0, :20, 0], hi[0, :20, 0] = 5, 20  # rows 20.. of sample 0 see nothing; keys 0..4, 20..29, 45.. nobody
    lo[0, :10, 1], hi[0, :10, 1] = 30, 45
    lo[0, 30:, 1], hi[0, 30:, 1] = 40, 3  # lo > hi: empty padding
    got = check(*draw(gen, 2, 2, 1, nq, nk, 16), lo, hi, dtype)  # sample 1: no row sees anything
    assert all((g[1] == 0).all() for g in got), "a sample whose rows see nothing has non-zero gradients"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_intervals_cut_mid_chunk(dtype):
    """Intervals that start and end inside key chunks and row blocks, several per row, gaps bridged or not."""
    gen = torch.Generator().manual_seed(3)
    nq, nk = 150, 300
    lo = torch.tensor([5, 140, 201], dtype=torch.int32).expand(1, nq, 3).clone()
    hi = torch.tensor([77, 190, 263], dtype=torch.int32).expand(1, nq, 3).clone()
    hi[0, 70:, 2] = torch.arange(202, 282, dtype=torch.int32)  # the last interval grows row by row
    check(*draw(gen, 1, 2, 2, nq, nk, 16), lo, hi, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_bnhd_inputs(dtype):
    """(B, N, H, D)-layout views (last dim contiguous, rows strided by H * D) are read in place, same results."""
    gen = torch.Generator().manual_seed(4)
    lo, hi = random_intervals(gen, 2, 97, 113, 2)

    def bnhd(t):  # the same values, stored (B, N, H, D), viewed as (B, H, N, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    check(*draw(gen, 2, 4, 2, 97, 113, 16), lo, hi, dtype, layout=bnhd)


def test_broadcast_upstream_gradient():
    """The upstream gradient of ``out.sum()`` is one value expanded (every stride 0): the same grads as dense ones."""
    gen = torch.Generator().manual_seed(6)
    lo, hi = random_intervals(gen, 2, 33, 40, 2)
    q, k, v, _ = (t.float() for t in draw(gen, 2, 2, 1, 33, 40, 16))
    out, lse = reference(q, k, v, lo, hi, 0.25)
    ones = torch.ones(()).expand_as(q)
    got = interval_bwd(ones, q, k, v, out, lse, lo, hi, 0.25)
    want = interval_bwd(ones.contiguous(), q, k, v, out, lse, lo, hi, 0.25)
    assert all(torch.equal(g, w) for g, w in zip(got, want)), "an expanded dout gives other gradients"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_garbage_stays_out(dtype):
    """Huge finite keys/values that no row attends (their scores and dP overflow to inf) change no row's dq and no
    other key's dk/dv, bit for bit, and get dk = dv = 0: masked scores are selected, never multiplied by 0. The keys
    sit inside gaps that the kernel bridges (one GEMM over them), so the selection is what keeps them out."""
    gen = torch.Generator().manual_seed(5)
    nq, nk, d = 70, 100, 16
    lo = torch.tensor([0, 60], dtype=torch.int32).expand(1, nq, 2).contiguous()
    hi = torch.tensor([40, 100], dtype=torch.int32).expand(1, nq, 2).contiguous()
    q, k, v, dout = (t.to(dtype) for t in draw(gen, 1, 2, 2, nq, nk, d))
    scale = d**-0.5
    out, lse = reference(q, k, v, lo, hi, scale)
    clean = interval_bwd(dout, q, k, v, out, lse, lo, hi, scale)
    huge = torch.finfo(dtype).max / 4
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:60], v2[:, :, 40:60] = huge, -huge
    dirty = interval_bwd(dout, q, k2, v2, out, lse, lo, hi, scale)
    assert torch.equal(dirty[0], clean[0]), f"dq changed: max diff {(dirty[0] - clean[0]).abs().max()}"
    for name, c, g in zip(("dk", "dv"), clean[1:], dirty[1:]):
        assert torch.equal(g, c), f"{name} changed: max diff {(g - c).abs().max()}"
        assert (g[:, :, 40:60] == 0).all(), f"{name} of unattended garbage keys is not 0"


def test_bad_arguments_name_the_argument():
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 6, 8)
    lse = torch.zeros(1, 2, 5)
    lo = torch.zeros(1, 5, 1, dtype=torch.int32)
    hi = torch.full((1, 5, 1), 7, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="Nk=6"):
        interval_bwd(q, q, k, k, q, lse, lo, hi, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        interval_bwd(q, q, k, k, q, lse, lo.long(), hi.long(), 1.0)
    with pytest.raises(RuntimeError, match="heads must be a multiple"):
        interval_bwd(q, q, k[:, :1].expand(1, 3, 6, 8), k[:, :1].expand(1, 3, 6, 8), q, lse, lo, hi.clamp(max=6), 1.0)


@pytest.mark.full
@pytest.mark.parametrize("seed", range(40))
def test_random_sweep(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    hkv = rng.choice((1, 2, 3))
    hq = hkv * rng.choice((1, 2, 4))
    nq, nk = rng.choice((1, 3, 31, 64, 97, 113, 200)), rng.choice((1, 3, 64, 97, 113, 129, 300))
    d, r, b = rng.choice((8, 16, 32, 64, 80)), rng.choice((1, 2, 3, 5)), rng.choice((1, 2))
    lo, hi = random_intervals(gen, b, nq, nk, r)
    x = draw(gen, b, hq, hkv, nq, nk, d)
    for dtype in DTYPES:
        check(*x, lo, hi, dtype)
