"""The Triton kernels with score biases and sliding windows: what only Triton has — both backward modes, both forward
plans, the gradient buffers of broadcast biases and tables, the in-kernel relative index, the extent check and
``need_dbias`` — against the fp64 oracle. The cases every backend shares (named layouts, -inf rows, NaN in masked bias
entries, windows) run on Triton from tests/test_bias.py and tests/test_window.py.

Default tier: Triton's CPU interpreter with 16 x 16 tiles (bfloat16 skipped: its arithmetic is wrong there).
"""

from __future__ import annotations

import pytest
import torch

from zorro_kernels import RelativePositionBias, RelativePositions, ZorroMask, zorro_attention
from zorro_kernels.backends.triton import _bias as triton_bias
from zorro_kernels.backends.triton._config import override_blocks, override_plan
from zorro_kernels.testing import check_against_oracle, generate_qkv, random_mask

from .helpers import TRITON_CASES as CASES
from .helpers import dense_bias, deterministic, gpu, random_window_mask, triton_unavailable, windows_mask

_OFF = triton_unavailable()
pytestmark = pytest.mark.skipif(bool(_OFF), reason="; ".join(_OFF))
MODES = ["one_pass", "deterministic"]


def triton_attn(q, k, v, mask, scale=None, bias=None):
    return zorro_attention(q, k, v, mask, scale=scale, bias=bias, backend="triton")


def check(q, k, v, mask, bias, *, mode="one_pass", blocks=(16, 16), **kw):
    with override_blocks(blocks), deterministic(mode == "deterministic"):
        check_against_oracle(triton_attn, q, k, v, mask, bias=bias, **kw)


# ------------------------------------------------------------------------------------------------------ dense
# in the interpreter the plain Zorro case costs a minute and adds nothing the others lack: -m full
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.full) if c[0] == "zorro" else c for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_dense_bias_over_the_kernel_cases(case):
    """Odd lengths (1, 3, 97, 113), cross-attention, GQA, causal, ragged lengths, empty segments, dead rows."""
    _, build, (b, h, hkv, d), blocks = case
    mask = build()
    q, k, v = generate_qkv(mask, batch=b, heads=h, kv_heads=hkv, head_dim=d)
    check(q, k, v, mask, dense_bias(mask, "BHQK", b=b, h=h), blocks=blocks)


@pytest.mark.parametrize("mode", MODES)
# the default tier keeps the cheap broadcast shapes (the full-size store path runs in the kernel cases above); the
# shapes with a full (Q, K) plane cost over a minute each in the interpreter: -m full
@pytest.mark.parametrize(
    "shape", [pytest.param(s, marks=pytest.mark.full) for s in ("BHQK", "1HQK", "B11K")] + ["QK", "B1Q1", "K"]
)
def test_dense_bias_broadcast_gradients(shape, mode):
    """A full-size bias gets its gradient by stores; a broadcast one by fp32 atomics (one pass) or a full buffer
    summed over the broadcast dims (deterministic)."""
    mask = ZorroMask.zorro(audio=20, video=30, fusion=4, lengths=torch.tensor([[20, 30, 4], [7, 0, 3]]))
    check(*generate_qkv(mask, head_dim=16), mask, dense_bias(mask, shape), mode=mode)


@pytest.mark.parametrize("plan", ["ranges", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dense_bias_both_forward_plans(plan, dtype):
    mask = ZorroMask.zorro(audio=21, video=24, fusion=2)
    with override_plan(plan):
        check(
            *generate_qkv(mask, heads=2, kv_heads=1, head_dim=16, dtype=dtype),
            mask,
            dense_bias(mask, "BHQK", dtype=dtype, h=2),
        )


def test_bias_without_grad_writes_no_gradient(monkeypatch):
    """A bias that needs no gradient (a float attention mask) costs the backward no gradient buffer."""
    mask = ZorroMask.zorro(audio=20, video=30, fusion=4)
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, heads=2, head_dim=16))
    bias = dense_bias(mask, "B1QK")
    modes = []
    real = triton_bias.bias_grad
    monkeypatch.setattr(triton_bias, "bias_grad", lambda *a: modes.append(real(*a).mode) or real(*a))
    with override_blocks((16, 16)):
        out = zorro_attention(q, k, v, mask, bias=bias, backend="triton")
        got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        want = torch.autograd.grad(
            zorro_attention(q, k, v, mask, bias=bias, backend="reference"), (q, k, v), torch.ones_like(out)
        )
    assert modes == [0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bias.requires_grad_()
    with override_blocks((16, 16)):
        out = zorro_attention(q, k, v, mask, bias=bias, backend="triton")
        torch.autograd.grad(out, (q, bias), torch.ones_like(out))
    assert modes == [0, 2]


# ------------------------------------------------------------------------------------------------------ relative
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shift", [(0, 0), (1, 1)], ids=["regular", "shifted"])
def test_relative_bias_table_gradient_modes(shift, mode):
    """The table's gradient: fp32 atomics into (H, T) (one pass), or a full buffer and index_add (deterministic)."""
    mask, coords = windows_mask(grid=(6, 7), win=(3, 3), shift=shift)
    rpb = RelativePositionBias(torch.randn(4, 25), coords, coords, (3, 3))
    check(*generate_qkv(mask, head_dim=16), mask, rpb, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_relative_bias_shared_table_gqa_ragged(mode):
    """One table row for every head, GQA, per-sample lengths that cut windows short."""
    mask, coords = windows_mask(grid=(4, 6), win=(2, 3))
    lengths = torch.tensor([list(mask.q_sizes), [max(0, s - 2) for s in mask.q_sizes]])
    mask = mask.with_lengths(lengths)
    rpb = RelativePositionBias(torch.randn(1, 15), coords, coords, (2, 3))
    check(*generate_qkv(mask, kv_heads=1, head_dim=16), mask, rpb, mode=mode)


def test_relative_bias_causal_sliding_window_1d():
    """A 1-D relative bias over a long sequence whose offsets exceed the extent outside the band only: the window
    keeps every read pair inside it (T5/ALiBi-like learned bias with a sliding window)."""
    n, w = 90, 12
    mask = ZorroMask.from_segments([("x", n)], {"x": "*"}, causal=True, window=(w, 0))
    pos = torch.arange(n)[:, None]
    rpb = RelativePositionBias(torch.randn(2, 2 * (w + 1) - 1), pos, pos, (w + 1,))
    check(*generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=16), mask, rpb)


def test_relative_index_is_linear_in_the_coordinates():
    """The kernels' ``lin_q[i] - lin_k[j]`` equals :meth:`RelativePositions.index` on every placed pair inside the
    extent, over 2-D and 3-D sets joined (and is never read elsewhere)."""
    g = torch.Generator().manual_seed(3)
    a = RelativePositions(torch.randint(0, 3, (30, 2), generator=g), torch.randint(0, 3, (40, 2), generator=g), (3, 3))
    v = RelativePositions(
        torch.randint(0, 2, (30, 3), generator=g), torch.randint(0, 2, (40, 3), generator=g), (2, 2, 2)
    )
    qa, ka = torch.arange(30) < 12, torch.arange(40) < 25
    a = RelativePositions(torch.where(qa[:, None], a.q_coords, -1), torch.where(ka[:, None], a.k_coords, -1), (3, 3))
    v = RelativePositions(torch.where(qa[:, None], -1, v.q_coords), torch.where(ka[:, None], -1, v.k_coords), (2, 2, 2))
    p = RelativePositions.concat([a, v])
    rq, rk = triton_bias._linear(p)
    idx, placed = p.index(torch.arange(30), torch.arange(40))
    lin = rq[:, 1:2].long() - rk[None, :, 1].long()
    same = (rq[:, :1] >= 0) & (rq[:, :1] == rk[None, :, 0])
    assert torch.equal(same, placed) and torch.equal(lin[placed], idx[placed])


@pytest.mark.parametrize("window", [None, (1, 1)])
def test_relative_bias_beyond_the_extent_raises_the_shared_error(window):
    """A pair the mask allows with an offset beyond the extent: the same ValueError as the segment path (the
    kernels' linear index would alias it). With a window the pair is outside the band and the call is fine."""
    pos = torch.arange(9)[:, None]
    mask = ZorroMask.from_segments([("x", 9)], {"x": "*"}, window=window)
    q, k, v = generate_qkv(mask, kv_heads=4, head_dim=16)
    rpb = RelativePositionBias(torch.randn(4, 3), pos, pos, (2,))
    if window is None:
        for backend in ("segments", "triton"):
            with pytest.raises(ValueError, match="query 0 and key 2 differ by -2 on axis 0, beyond extent 2"):
                zorro_attention(q, k, v, mask, bias=rpb, backend=backend)
    else:
        check(q, k, v, mask, rpb)


def test_positions_built_per_call_do_not_grow_the_mask_cache():
    """The README builds ``RelativePositionBias(table, coords, coords, extent)`` inline: a training loop doing that
    each step must not accumulate one entry per positions object on the (long-lived) mask."""
    mask, coords = windows_mask()
    q, k, v = generate_qkv(mask, head_dim=16)
    table = torch.randn(4, 15)
    sizes = []
    for _ in range(3):
        with override_blocks((16, 16)):
            zorro_attention(q, k, v, mask, bias=RelativePositionBias(table, coords, coords, (2, 3)), backend="triton")
        sizes.append(len(mask._cache))
    assert sizes[0] == sizes[1] == sizes[2], sizes


@pytest.mark.parametrize("plan", ["tiles", "ranges"])
@pytest.mark.parametrize("kind", ["dense", "relative"])
def test_poisoned_keys_stay_isolated_with_a_bias(kind, plan):
    """NaN in the video keys and values (32 x 32 tiles straddling the segment boundaries): the audio rows, which may
    not see them, get bitwise the clean output and dq with either bias kind (the bias joins the score before the
    element mask selects, on partial tiles; the range plan never loads those keys for audio rows)."""
    mask = ZorroMask.zorro(audio=70, video=60, fusion=2)
    q, k, v = generate_qkv(mask, batch=1, heads=2, head_dim=16)
    n = mask.num_q
    pos = torch.arange(n)[:, None] % 70
    bias = torch.randn(1, 2, n, n) if kind == "dense" else RelativePositionBias(torch.randn(2, 139), pos, pos, (70,))
    runs = []
    for poison in (False, True):
        kk, vv = k.clone(), v.clone()
        if poison:
            kk[:, :, 70:130], vv[:, :, 70:130] = float("nan"), float("nan")
        leaves = [t.requires_grad_() for t in (q.clone(), kk, vv)]
        with override_blocks((32, 32)), override_plan(plan), deterministic():
            out = zorro_attention(*leaves, mask, bias=bias, backend="triton")
            dq = torch.autograd.grad(out, leaves[0], torch.ones_like(out))[0]
        runs.append((out[:, :, :70], dq[:, :, :70]))
    for name, a, b in zip(("out", "dq"), *runs):
        assert torch.isfinite(b).all() and torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------------ -inf, windows
@pytest.mark.parametrize("mode", MODES)
def test_minus_inf_rows_on_full_tiles(mode):
    """Rows whose every key is -inf inside *full* tiles (no element mask to fall back on): output 0, gradients 0."""
    mask = ZorroMask.from_segments([("x", 48)], {"x": "*"})
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, batch=1, heads=2, head_dim=16))
    bias = torch.randn(1, 2, 48, 48)
    bias[0, 1, 3:20] = float("-inf")
    bias.requires_grad_()
    with override_blocks((16, 16)), deterministic(mode == "deterministic"):
        out = zorro_attention(q, k, v, mask, bias=bias, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
    assert (out[0, 1, 3:20] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0, 1, 3:20] == 0).all() and (grads[3][0, 1, 3:20] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window, causal", [((9, 0), True), ((7, 5), False), ((-1, 3), False), ((20, -1), True)])
def test_windows_with_segments_and_bias(window, causal, mode):
    """Sliding windows on a segment layout, with a dense bias: both band edges, one edge, causal plus a window."""
    mask = ZorroMask.from_segments([("a", 40), ("b", 37)], {"a": ["a"], "b": ["a", "b"]}, causal=causal, window=window)
    check(
        *generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=16), mask, dense_bias(mask, "1HQK", h=2), mode=mode
    )


def test_window_cross_attention_ragged_gqa():
    mask = ZorroMask.from_segments(
        [("a", 30)],
        {"a": ["x", "y"]},
        kv_segments=[("x", 20), ("y", 33)],
        window=(10, 2),
        kv_lengths=torch.tensor([[20, 33], [5, 11]]),
    )
    check(*generate_qkv(mask, head_dim=16), mask, dense_bias(mask, "BHQK"))


@pytest.mark.parametrize("window", [(-1, 4), (6, 6)])
def test_window_forward_plans(window):
    """An upper band edge alone runs on the range plan (like causal); a lower edge always on the tile plan."""
    from zorro_kernels.backends.triton._config import choose_blocks
    from zorro_kernels.backends.triton._plan import RangePlan, forward_plan

    mask = ZorroMask.zorro(audio=21, video=24, fusion=2)
    mask = ZorroMask(list(zip(mask.q_names, mask.q_sizes)), mask.allow, window=window)
    with override_plan("ranges"), override_blocks((16, 16)):
        plan, _ = forward_plan(mask, choose_blocks(16, torch.float32), "cpu")
        assert isinstance(plan, RangePlan) == (window[0] == -1)
        check_against_oracle(triton_attn, *generate_qkv(mask, heads=2, head_dim=16), mask)


# ------------------------------------------------------------------------------------------------------ compile
def test_compile_fullgraph_relative_bias_and_window_no_dbias():
    """Under torch.compile a table that needs no gradient and a window go through the custom ops."""
    mask, coords = windows_mask(shift=(1, 1))
    mask = ZorroMask(list(zip(mask.q_names, mask.q_sizes)), mask.allow, window=(8, 8))
    q, k, v = generate_qkv(mask, head_dim=16)
    pos = RelativePositions(coords, coords, (2, 3))
    table = torch.randn(4, 15)
    f = lambda a, b, c: zorro_attention(
        a,
        b,
        c,
        mask,
        bias=RelativePositionBias(table, positions=pos),  # noqa: E731
        backend="triton",
    )
    outs, grads = [], []
    with override_blocks((16, 16)):
        for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves)
            outs.append(out)
            grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


# ------------------------------------------------------------------------------------------------------ full tier
@pytest.mark.full
@pytest.mark.parametrize("mode", MODES)
def test_random_layouts_with_biases_and_windows_many(mode):
    """Random layouts (odd and empty segments, cross-attention, ragged lengths, causal) with a random window and a
    random dense bias shape, GQA, fp32 and fp16."""
    import random

    rng = random.Random(23 + len(mode))
    for i in range(40):
        mask = random_window_mask(rng) if rng.random() < 0.6 else random_mask(rng, sizes=(0, 1, 3, 17, 33))
        h, hkv = rng.choice([(2, 2), (4, 1), (6, 2)])
        dtype = rng.choice([torch.float32, torch.float16])
        shape = rng.choice(["BHQK", "1HQK", "B11K", "QK", "B1Q1"])
        bias = dense_bias(mask, shape, h=h, dtype=dtype)
        check(
            *generate_qkv(mask, heads=h, kv_heads=hkv, head_dim=16, dtype=dtype),
            mask,
            bias,
            mode=mode,
            blocks=rng.choice([(16, 16), (32, 16), (16, 32)]),
            seed=i,
        )


# ------------------------------------------------------------------------------------------------------ GPU tier
@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["dense", "relative", "window"])
def test_gpu_biases_and_windows(kind, dtype, mode):
    """On the card with the real block table: a Figure-2 layout with a dense bias (B1QK, ragged lengths), Swin 7x7
    windows with the relative bias (shifted), packed causal sequences with a sliding window and an ALiBi-like bias."""
    if kind == "dense":
        mask = ZorroMask.zorro(audio=320, video=784, fusion=8, lengths=torch.tensor([[320, 784, 8], [17, 500, 8]]))
        bias = dense_bias(mask, "B1QK", dtype=dtype)
    elif kind == "relative":
        mask, coords = windows_mask(grid=(28, 28), win=(7, 7), fusion=8, shift=(3, 3))
        bias = RelativePositionBias(0.5 * torch.randn(8, 169, dtype=dtype).cuda(), coords, coords, (7, 7))
    else:
        mask = ZorroMask.from_segments(
            [("a", 700), ("b", 1100)], {"a": ["a"], "b": ["b"]}, causal=True, window=(255, 0)
        )
        i = torch.arange(1800)
        bias = -0.05 * (i[:, None] - i[None, :]).abs().float().to(dtype)[None, None]
    q, k, v = (t.cuda() for t in generate_qkv(mask, batch=2, heads=8, head_dim=64, dtype=dtype))
    if isinstance(bias, torch.Tensor):
        bias = bias.cuda()
    with deterministic(mode == "deterministic"):
        check_against_oracle(triton_attn, q, k, v, mask, bias=bias)
