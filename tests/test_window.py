"""Sliding windows on ZorroMask (flash-attention's ``window_size=(left, right)``): the definition, its combination
with segments, lengths and causal, exact tile maps that skip tiles outside the band, the segment path, the Triton
kernels (interpreted on CPU) and the reference against the fp64 oracle, dispatch and bad input."""

import random

import pytest
import torch

from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.attention import select_backend
from zorro_kernels.backends import BACKENDS
from zorro_kernels.testing import check_against_oracle, generate_qkv
from zorro_kernels.tilemap import EMPTY, build_tile_map

from .helpers import (  # noqa: F401 (small_triton_tiles: a fixture)
    TRITON,
    attn_fn,
    check_tile_map,
    dense_bias,
    deterministic,
    random_window_mask,
    skip_interpreted_bf16,
    small_triton_tiles,
    triton_unavailable,
)

pytestmark = pytest.mark.usefixtures("small_triton_tiles")


def flash_window(nq: int, nk: int, left: int, right: int, causal: bool) -> torch.Tensor:
    """flash-attn's rule, written out: key j visible to query i iff i + Nk - Nq - left <= j <= i + Nk - Nq + right
    (a side of -1 unbounded); causal sets right to 0."""
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None]
    c = i + nk - nq
    right = 0 if causal else right
    ok = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= c - left
    if right >= 0:
        ok &= j <= c + right
    return ok


@pytest.mark.parametrize("nq, nk", [(9, 9), (4, 11), (11, 4), (1, 7)])
@pytest.mark.parametrize("window", [(2, 0), (0, 3), (3, 1), (-1, 2), (1, -1), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_flash_attention_semantics(nq, nk, window, causal):
    mask = ZorroMask.from_segments([("x", nq)], {"x": "*"}, kv_segments=[("x", nk)], causal=causal, window=window)
    assert torch.equal(mask.to_dense(), flash_window(nq, nk, *window, causal))
    assert int(mask.attended()) == int(mask.to_dense().sum())


def test_window_combines_with_segments_lengths_and_causal():
    mask = ZorroMask.zorro(audio=7, video=9, fusion=3, lengths=torch.tensor([[7, 9, 3], [4, 0, 2]]))
    wm = ZorroMask(list(zip(mask.q_names, mask.q_sizes)), mask.allow, lengths=mask.lengths, causal=True, window=(4, -1))
    want = mask.to_dense() & flash_window(19, 19, 4, -1, True)
    assert torch.equal(wm.to_dense(), want)
    assert torch.equal(wm.attended(), want.sum((1, 2)))
    assert wm.with_lengths(None).window == (4, -1)
    assert wm.key != ZorroMask(list(zip(mask.q_names, mask.q_sizes)), mask.allow, lengths=mask.lengths, causal=True).key
    assert "window=(4, -1)" in repr(wm)


def test_attended_counts_random_windows():
    rng = random.Random(2)
    for _ in range(60):
        mask = random_window_mask(rng)
        d = mask.to_dense()
        want = (d[None] if d.ndim == 2 else d).sum((1, 2))
        assert torch.equal(mask.attended(), want), repr(mask)


def test_tile_maps_exact_with_windows():
    rng = random.Random(4)
    for _ in range(25):
        mask = random_window_mask(rng)
        for bm, bn in [(1, 1), (2, 3), (4, 4), (16, 8)]:
            check_tile_map(mask, bm, bn)


def test_tiles_outside_the_band_are_skipped():
    """A 1024-token sequence with a 64-key window: only the tiles along the band are visited."""
    mask = ZorroMask.from_segments([("x", 1024)], {"x": "*"}, causal=True, window=(63, 0))
    tm = build_tile_map(mask, 64, 64)
    visited = (tm.kinds != EMPTY).sum().item()
    assert visited == 16 + 15  # the diagonal tiles and the ones just below them
    assert tm.tile_sparsity > 0.85  # 31 of 256 tiles
    check_tile_map(ZorroMask.from_segments([("x", 300)], {"x": "*"}, window=(20, 10)), 32, 16)


@pytest.mark.parametrize("backend", ["segments", "reference", TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_windows_against_the_oracle(backend, dtype):
    skip_interpreted_bf16(backend, dtype)
    if dtype == torch.float16 and backend != "triton":
        pytest.skip("fp16 windows are checked on the Triton kernels (the others take bf16 here)")
    rng = random.Random(9)
    for i in range({"segments": 8, "triton": 6}.get(backend, 3)):
        mask = random_window_mask(rng)
        check_against_oracle(attn_fn(backend), *generate_qkv(mask, head_dim=16, dtype=dtype), mask, seed=i)


def test_long_window_segments_steps_skip_the_outside():
    """The segment plan cuts a windowed sequence into chunks whose keys stay near the band."""
    from zorro_kernels.backends.segments import build_plan

    mask = ZorroMask.from_segments([("x", 1000)], {"x": "*"}, causal=True, window=(31, 0))
    plan = build_plan(mask)
    work = sum(
        (st.q_ranges[0][1] - st.q_ranges[0][0]) * sum(e - s for s, e in st.k_ranges) for st in plan.patterns[0].steps
    )
    assert work < 3 * int(mask.attended())
    check_against_oracle(attn_fn("segments"), *generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=8), mask)


@pytest.mark.parametrize("backend", ["segments", TRITON])
def test_window_with_bias_and_gqa(backend):
    mask = ZorroMask.from_segments(
        [("a", 20), ("b", 13)],
        {"a": ["a"], "b": "*"},
        causal=True,
        window=(5, -1),
        lengths=torch.tensor([[20, 13], [11, 4]]),
    )
    check_against_oracle(attn_fn(backend), *generate_qkv(mask), mask, bias=dense_bias(mask, "B11K"))


@pytest.mark.full
def test_windows_against_the_oracle_many():
    rng = random.Random(19)
    for i in range(150):
        mask = random_window_mask(rng)
        h, hkv = rng.choice([(1, 1), (4, 1), (6, 3)])
        check_against_oracle(attn_fn("segments"), *generate_qkv(mask, heads=h, kv_heads=hkv, head_dim=16), mask, seed=i)


def test_every_backend_takes_windows_and_auto_picks_by_cost_on_cpu():
    """auto on CPU: a small window on dense (the segment path's steps across the window's edges are masked products:
    5-30x dense's time from 14 to 600 tokens, BENCHMARKS.md), a large one on the segment path (dense's N x N mask), or
    where the compiled interval kernel builds, on it (a 2052-token window: 23 against the segment path's 71 ms)."""
    big = ZorroMask.from_segments([("x", 2048)], {"x": "*"}, window=(4, 4))
    q = torch.empty(1, 1, 2048, 8)
    kernel = not BACKENDS["intervals"].not_supported_reasons(q, q, q, big)
    assert select_backend(q, q, q, big) == ("intervals" if kernel else "segments")
    mask = ZorroMask.from_segments([("x", 40)], {"x": "*"}, window=(4, 4))
    q, k, v = generate_qkv(mask)
    # the kernel, where it builds: 0.079 against dense's 0.094 ms forward (process CPU time, best of 300, load 5.1)
    assert select_backend(q, k, v, mask) == ("intervals" if kernel else "dense")
    want = zorro_attention(q, k, v, mask, backend="reference")
    for backend in (
        ["segments", "dense"] + (["intervals"] if kernel else []) + ([] if triton_unavailable() else ["triton"])
    ):
        torch.testing.assert_close(zorro_attention(q, k, v, mask, backend=backend), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(bool(triton_unavailable()), reason="; ".join(triton_unavailable()))
def test_triton_keys_outside_the_band_never_reach_a_row():
    """Keys outside the band poisoned by NaN: the rows that may not see them are finite and bitwise equal to a clean
    run (most of those tiles are empty and never loaded; the band's edge tiles select)."""
    mask = ZorroMask.from_segments([("x", 160)], {"x": "*"}, causal=True, window=(15, 0))
    q, k, v = generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=16)
    tm = build_tile_map(mask, 16, 16)
    assert (tm.kinds == EMPTY).float().mean() > 0.75
    runs = []
    for poison in (False, True):
        leaves = [t.clone() for t in (q, k, v)]
        if poison:  # keys 0-31 lie outside the band of rows 64+
            leaves[1][:, :, :32] = float("nan")
        leaves = [t.requires_grad_() for t in leaves]
        with deterministic():
            out = zorro_attention(*leaves, mask, backend="triton")
            runs.append(
                (out[:, :, 64:], *(g[:, :, 64:] for g in torch.autograd.grad(out, leaves, torch.ones_like(out))))
            )
    for a, b in zip(*runs):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_compile_fullgraph_with_window():
    mask = ZorroMask.from_segments([("x", 40)], {"x": "*"}, causal=True, window=(6, -1))
    q, k, v = generate_qkv(mask)
    fn = torch.compile(lambda a, b, c: zorro_attention(a, b, c, mask), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), zorro_attention(q, k, v, mask))


@pytest.mark.parametrize(
    "window, exc, msg",
    [
        ((2,), TypeError, r"window must be a \(left, right\) pair of ints \(-1 = unbounded\) or None, got \(2,\)"),
        ("22", TypeError, "window must be a"),
        ((2, 1.5), TypeError, "window right must be an int, got float 1.5"),
        ((-2, 0), ValueError, r"window left must be in \[0, 2147483647\] \(or -1 for unbounded\), got -2"),
    ],
)
def test_bad_window_raises_clear_errors(window, exc, msg):
    with pytest.raises(exc, match=msg):
        ZorroMask.from_segments([("x", 4)], {"x": "*"}, window=window)
