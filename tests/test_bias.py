"""Score biases (``bias=``): dense tensors and relative position tables against the fp64 oracle, ``-inf`` as masked,
NaN isolation, refusals and bad input — on the reference, the segment path and the Triton kernels (in Triton's CPU
interpreter here; tests/test_triton_bias.py has the Triton-only cases)."""

import random

import pytest
import torch

from zorro_kernels import RelativePositionBias, RelativePositions, ZorroMask, reference_attention, zorro_attention
from zorro_kernels.attention import select_backend
from zorro_kernels.testing import check_against_oracle, generate_qkv, named_masks, random_mask

from .helpers import (  # noqa: F401 (small_triton_tiles: a fixture)
    TRITON,
    attn_fn,
    dense_bias,
    deterministic,
    skip_interpreted_bf16,
    small_triton_tiles,
    triton_unavailable,
    windows_mask,
)

BACKENDS = ["segments", "reference", TRITON]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("small_triton_tiles")


def on_triton(*args, fast: bool = False):
    """A case on the Triton backend: in its CPU interpreter one costs tens of seconds, so each test keeps one cheap
    Triton case (``fast``) in the default tier and runs the rest under ``-m full``."""
    return pytest.param("triton", *args, marks=[*TRITON.marks, *(() if fast else (pytest.mark.full,))])


# ------------------------------------------------------------------------------------------------------ dense bias
NAMED = ["figure2_small", "ragged", "packed", "packed_causal", "cross_readout", "nothing_visible_rows"]
# the fast tier: every layout in fp32 on segments; half types and the reference on a few
FAST = (
    [("segments", torch.float32, n) for n in NAMED]
    + [("segments", dt, n) for dt in DTYPES[1:] for n in ("ragged", "packed_causal")]
    + [("reference", dt, "ragged") for dt in DTYPES]
    + [
        on_triton(dt, n, fast=n in ("packed_causal", "nothing_visible_rows", "cross_readout", "packed"))
        for dt, names in ((torch.float32, NAMED), (torch.float16, ("ragged", "packed")))
        for n in names
    ]
)
FULL = [
    (b, dt, n)
    for b in ("segments", "reference")
    for dt in DTYPES + [torch.float64]
    for n in NAMED
    if (b, dt, n) not in FAST
]


@pytest.mark.parametrize(
    "backend, dtype, name", FAST + [pytest.param(*x, marks=pytest.mark.full) for x in FULL], ids=str
)
def test_dense_bias_named_layouts(backend, dtype, name):
    mask = named_masks()[name]
    check_against_oracle(
        attn_fn(backend), *generate_qkv(mask, dtype=dtype), mask, bias=dense_bias(mask, "BHQK", dtype=dtype)
    )


@pytest.mark.parametrize("shape", ["BHQK", "1HQK", "B1QK", "B11K", "11QK", "QK", "K", "B1Q1"])
def test_dense_bias_broadcast_shapes(shape):
    mask = named_masks()["ragged"]
    check_against_oracle(attn_fn("segments"), *generate_qkv(mask), mask, bias=dense_bias(mask, shape))


def test_dense_bias_random_layouts():
    rng = random.Random(11)
    for i in range(10):
        mask = random_mask(rng, sizes=(0, 1, 2, 5, 13, 17))
        h, hkv = rng.choice([(2, 2), (4, 1), (6, 2)])
        shape = rng.choice(["BHQK", "1HQK", "B11K", "QK"])
        check_against_oracle(
            attn_fn("segments"),
            *generate_qkv(mask, heads=h, kv_heads=hkv, head_dim=16),
            mask,
            bias=dense_bias(mask, shape, h=h),
            seed=i,
        )


@pytest.mark.full
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_dense_bias_random_layouts_many(dtype):
    rng = random.Random(hash(str(dtype)) % 1000)
    for i in range(150):
        mask = random_mask(rng, max_segments=7)
        h, hkv = rng.choice([(1, 1), (4, 1), (6, 3)])
        shape = rng.choice(["BHQK", "1HQK", "B1QK", "B11K", "11QK", "K"])
        check_against_oracle(
            attn_fn("segments"),
            *generate_qkv(mask, heads=h, kv_heads=hkv, head_dim=rng.choice([16, 32]), dtype=dtype),
            mask,
            bias=dense_bias(mask, shape, h=h, dtype=dtype),
            seed=i,
        )


def test_bias_without_grad_runs_the_cpu_kernels():
    """A bias that needs no gradient takes the CPU flash-kernel path (forward and backward with the bias added)."""
    mask = named_masks()["packed_causal"]
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask))
    bias = dense_bias(mask, "BHQK")
    out = zorro_attention(q, k, v, mask, bias=bias)
    assert type(out.grad_fn).__name__ == "_SegmentAttentionCPUBackward"
    ref = reference_attention(q, k, v, mask, bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ -inf, NaN
@pytest.mark.parametrize(
    "backend, grad_bias",
    [(b, g) for b in BACKENDS[:2] for g in (True, False)] + [on_triton(True), on_triton(False, fast=True)],
)
def test_minus_inf_rows_are_zero_with_zero_grads(backend, grad_bias):
    mask = ZorroMask.zorro(audio=7, video=21, fusion=2, lengths=torch.tensor([[7, 21, 2], [0, 21, 2], [5, 13, 2]]))
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask))
    bias = dense_bias(mask, "BHQK")
    bias[0, 1, 5] = float("-inf")  # one row of one head: every key -inf
    bias[1, :, 20:27] = float("-inf")  # rows of every head
    bias[2, 0, :, 3] = float("-inf")  # a single key column: just masked
    bias.requires_grad_(grad_bias)
    if grad_bias:
        check_against_oracle(attn_fn(backend), q, k, v, mask, bias=bias)
    out = zorro_attention(q, k, v, mask, bias=bias, backend=backend)
    assert (out[0, 1, 5] == 0).all() and (out[1, :, 20:27] == 0).all()
    inputs = (q, k, v) + ((bias,) if grad_bias else ())
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0, 1, 5] == 0).all() and (grads[0][1, :, 20:27] == 0).all()
    if grad_bias:
        assert (grads[3][0, 1, 5] == 0).all() and (grads[3][1, :, 20:27] == 0).all()


_LAYOUTS = ["causal", "causal_window", "two_segments_causal", "full"]


@pytest.mark.parametrize(
    "backend, grad_bias, layout",
    [(b, g, lay) for b in ("segments", "reference", "dense") for g in (True, False) for lay in _LAYOUTS]
    + [on_triton(True, "causal", fast=True)]
    + [on_triton(g, lay) for g in (True, False) for lay in _LAYOUTS if (g, lay) != (True, "causal")],
)
def test_rows_a_key_padding_bias_hides_have_zero_grads(backend, grad_bias, layout):
    """Left padding under a causal mask: a ``(B, 1, 1, Nk)`` -inf key bias hides every key of the first rows. They
    return 0 and every gradient there (dq, and the bias's) is exactly 0 — the segment path's rows across the diagonal
    gave NaN dq and NaN bias gradient (a log-sum-exp over only -inf scores, differentiated), even with a zero upstream
    gradient. The dense backend takes no bias: it must refuse rather than compute."""
    n, pad = 24, 20
    kwargs = {
        "causal": dict(segments=[("x", n)], rules={"x": "*"}, causal=True),
        "causal_window": dict(segments=[("x", n)], rules={"x": "*"}, causal=True, window=(n - 8, -1)),
        "two_segments_causal": dict(
            segments=[("a", n // 2), ("b", n - n // 2)], rules={"a": "a", "b": "*"}, causal=True
        ),
        "full": dict(segments=[("x", n)], rules={"x": "*"}),
    }[layout]
    mask = ZorroMask.from_segments(kwargs.pop("segments"), kwargs.pop("rules"), **kwargs)
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, batch=2, heads=4, kv_heads=2, head_dim=16))
    bias = torch.zeros(2, 1, 1, n)
    bias[0, ..., :pad] = float("-inf")
    bias[1, ..., :3] = float("-inf")
    bias.requires_grad_(grad_bias)
    if backend == "dense":
        with pytest.raises(ValueError, match="takes no attention bias"):
            zorro_attention(q, k, v, mask, bias=bias, backend=backend)
        return
    check_against_oracle(attn_fn(backend), q, k, v, mask, bias=bias.detach().requires_grad_(grad_bias))
    out = zorro_attention(q, k, v, mask, bias=bias, backend=backend)
    hidden = mask.to_dense()[None, None].expand(2, 1, -1, -1).clone()
    hidden &= ~torch.isneginf(bias)  # the pairs the mask allows and the bias does not hide
    dead = ~hidden.any(-1)  # (2, 1, Nq) rows with nothing left
    assert layout == "full" or dead[0, 0, :pad].all()  # "full": every row keeps keys; the bias only masks
    inputs = (q, k, v) + ((bias,) if grad_bias else ())
    for g_out in (torch.randn_like(out), torch.zeros_like(out)):
        grads = torch.autograd.grad(out, inputs, g_out, retain_graph=True)
        for name, g in zip(("dq", "dk", "dv", "dbias"), grads):
            assert torch.isfinite(g).all(), f"{name}: {int((~torch.isfinite(g)).sum())} non-finite"
        assert (out.masked_select(dead[..., None]) == 0).all()
        assert (grads[0].masked_select(dead[..., None]) == 0).all(), "dq of a hidden row"
        if grad_bias:
            assert (grads[3][..., :3] == 0).all() and (grads[3][0, ..., :pad] == 0).all(), "dbias of a hidden key"


@pytest.mark.parametrize(
    "backend, name",
    [(b, n) for b in BACKENDS[:2] for n in ("ragged", "packed_causal", "cross_readout")]
    + [on_triton("ragged"), on_triton("packed_causal", fast=True), on_triton("cross_readout")],
)
def test_bias_at_masked_positions_is_never_read(backend, name):
    """NaN in every masked bias entry: the same output and gradients as zeros there, and zero bias gradient there."""
    mask = named_masks()[name]
    q, k, v = generate_qkv(mask)
    dense = mask.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense)[:, None].expand(q.shape[0], 4, -1, -1)
    clean = dense_bias(mask, "BHQK").masked_fill(~dense, 0.0)
    poisoned = clean.masked_fill(~dense, float("nan"))
    runs = []
    for bias in (clean, poisoned):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        with deterministic(backend == "triton"):  # bitwise comparison: Triton's atomic-free backward
            out = zorro_attention(*leaves[:3], mask, bias=leaves[3], backend=backend)
            runs.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (runs[1][4][~dense] == 0).all()


@pytest.mark.parametrize(
    "backend, shape",
    [(b, s) for b in ("auto", "segments", "reference") for s in ("B11K", "BH1K", "K")]
    + [on_triton("B11K"), on_triton("BH1K"), on_triton("K", fast=True)],
)
def test_keys_a_padding_bias_hides_are_never_read(backend, shape):
    """Left padding as Hugging Face passes it, a key bias of -inf: NaN in those keys' K and V (uninitialised padding)
    never reaches any row or gradient — bitwise the run with zeros there. ``BH1K``: per-head biases; a kv head's key
    counts as hidden only where every query head of its group hides it."""
    mask = ZorroMask.zorro(audio=20, video=30, fusion=4)
    q, k, v = generate_qkv(mask, head_dim=16)
    b, n = q.shape[0], mask.num_kv
    hide = torch.zeros(b, 4, n, dtype=torch.bool)
    hide[0, :, :5] = True  # left padding of sample 0
    hide[1, :, 20:26] = True  # a hole in sample 1
    hide[1, :2, 40] = True  # key 40: hidden by kv head 0's query heads only
    if shape == "K":
        hide = hide[:1, :1].expand(b, 4, n)
    bias = torch.zeros(b, 4, 1, n).masked_fill(hide[:, :, None], float("-inf"))
    bias = {"B11K": bias[:, :1], "BH1K": bias, "K": bias[0, 0, 0]}[shape]
    if shape != "BH1K":
        hide = hide[:, :1].expand(b, 4, n)
    dead = hide.reshape(b, 2, 2, n).all(2)[..., None]  # (B, Hkv, Nk, 1) keys no query head of the group sees
    assert dead.any()
    runs = []
    for poison in (0.0, float("nan")):
        kk, vv = k.masked_fill(dead, poison), v.masked_fill(dead, poison)
        leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
        with deterministic(backend == "triton"):
            out = zorro_attention(*leaves, mask, bias=bias, backend=backend)
            runs.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for name, a, b_ in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.isfinite(b_).all(), f"{name}: NaN from a hidden key leaked into {int((~b_.isfinite()).sum())}"
        torch.testing.assert_close(b_, a, rtol=0, atol=0, msg=name)
    assert (runs[1][2].masked_select(dead) == 0).all() and (runs[1][3].masked_select(dead) == 0).all()


# ------------------------------------------------------------------------------------------------------ relative
@pytest.mark.parametrize(
    "backend, dtype, shift",
    [(b, dt, s) for b in BACKENDS[:2] for dt in DTYPES for s in ((0, 0), (1, 1))]
    + [on_triton(dt, s, fast=dt == torch.float32 and s == (0, 0)) for dt in DTYPES for s in ((0, 0), (1, 1))],
    ids=str,
)
def test_relative_bias_windows(backend, dtype, shift):
    skip_interpreted_bf16(backend, dtype)
    mask, coords = windows_mask(shift=shift)
    table = torch.randn(4, 3 * 5, dtype=dtype)
    rpb = RelativePositionBias(table, coords, coords, (2, 3))
    check_against_oracle(attn_fn(backend), *generate_qkv(mask, dtype=dtype), mask, bias=rpb)


@pytest.mark.parametrize("backend", ["segments", TRITON])
def test_relative_bias_shared_table_and_dense_equivalence(backend):
    """The relative bias equals its materialised dense form, and one table serves every head with (1, T)."""
    mask, coords = windows_mask()
    q, k, v = generate_qkv(mask)
    rpb = RelativePositionBias(torch.randn(1, 15), coords, coords, (2, 3))
    dense = rpb.materialize()
    assert dense.shape == (1, 1, mask.num_q, mask.num_kv)
    assert (dense[..., -3:, :] == 0).all() and (dense[..., :, -3:] == 0).all()  # fusion: no position
    torch.testing.assert_close(
        zorro_attention(q, k, v, mask, bias=rpb, backend=backend),
        zorro_attention(q, k, v, mask, bias=dense, backend=backend),
    )
    check_against_oracle(attn_fn(backend), q, k, v, mask, bias=rpb)


@pytest.mark.parametrize("backend", ["segments", TRITON])
def test_relative_bias_concat_2d_audio_3d_video_cross_attention(backend):
    """Two position sets with their own extents (2-D audio, 3-D video) in one table; cross-attention queries."""
    audio = torch.cartesian_prod(torch.arange(2), torch.arange(3))  # 6 tokens (t, f)
    video = torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(2))  # 8 tokens (t, h, w)
    kq = torch.cat(
        [
            torch.cat([audio, torch.full((8 + 2, 2), -1)]),
        ],
        0,
    )
    pa = RelativePositions(kq[:5], kq, (2, 3))  # queries: the first 5 audio tokens
    vq = torch.cat([torch.full((6, 3), -1), video, torch.full((2, 3), -1)])
    pv = RelativePositions(torch.full((5, 3), -1), vq, (2, 2, 2))
    pos = RelativePositions.concat([pa, pv])
    assert pos.table_size == 3 * 5 + 3 * 3 * 3
    mask = ZorroMask.from_segments(
        [("aq", 5)], {"aq": ["audio", "fusion"]}, kv_segments=[("audio", 6), ("video", 8), ("fusion", 2)]
    )
    rpb = RelativePositionBias(torch.randn(4, pos.table_size), positions=pos)
    check_against_oracle(attn_fn(backend), *generate_qkv(mask), mask, bias=rpb)
    # video queries against video keys read the video part of the table
    pv2 = RelativePositions(video, video, (2, 2, 2))
    pa2 = RelativePositions(torch.full((8, 2), -1), torch.full((8, 2), -1), (2, 3))
    both = RelativePositionBias(torch.randn(2, pos.table_size), positions=RelativePositions.concat([pa2, pv2]))
    alone = RelativePositionBias(both.table[:, 15:], positions=pv2)
    torch.testing.assert_close(both.materialize(), alone.materialize())


@pytest.mark.full
@pytest.mark.parametrize("backend", ["segments", TRITON])
def test_relative_bias_random_windows_many(backend):
    """Random grids, windows, shifts, fusion counts and head counts; shared (1, T) tables; on Triton both backward
    modes."""
    rng = random.Random(5)
    for i in range(40 if backend == "segments" else 25):
        grid = (rng.randint(1, 7), rng.randint(1, 7))
        win = (rng.randint(1, grid[0]), rng.randint(1, grid[1]))
        shift = (win[0] // 2 * rng.randint(0, 1), win[1] // 2 * rng.randint(0, 1))
        mask, coords = windows_mask(grid, win, rng.randint(0, 4), shift)
        h = rng.choice([1, 2, 4])
        rpb = RelativePositionBias(
            torch.randn(rng.choice([1, h]), (2 * win[0] - 1) * (2 * win[1] - 1)), coords, coords, win
        )
        with deterministic(backend == "triton" and i % 2 == 1):
            check_against_oracle(
                attn_fn(backend), *generate_qkv(mask, heads=h, kv_heads=1, head_dim=16), mask, bias=rpb, seed=i
            )


# ------------------------------------------------------------------------------------------------------ dispatch
def test_every_backend_but_dense_takes_a_bias_and_auto_picks_segments_on_cpu():
    """On CPU ``auto`` runs a bias on the segment path (dense takes none, Triton there is only the interpreter); a
    forced Triton backend takes it."""
    mask = named_masks()["figure2_small"]
    q, k, v = generate_qkv(mask)
    bias = dense_bias(mask, "BHQK")
    assert select_backend(q, k, v, mask, "auto", bias) == "segments"
    with pytest.raises(ValueError, match="backend .dense. cannot run this input: .*takes no attention bias"):
        zorro_attention(q, k, v, mask, bias=bias, backend="dense")
    if not triton_unavailable():
        torch.testing.assert_close(
            zorro_attention(q, k, v, mask, bias=bias, backend="triton"),
            zorro_attention(q, k, v, mask, bias=bias, backend="segments"),
        )


# ------------------------------------------------------------------------------------------------------ bad input
def _longs(*shape):
    return torch.zeros(*shape, dtype=torch.long)


def _call(bias, mask=None):
    mask = mask or ZorroMask.zorro(audio=3, video=5, fusion=1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    return lambda: zorro_attention(q, k, v, mask, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", [[("x", 20)], [("a", 9), ("b", 14)]], ids=["one", "two"])
def test_relative_extent_is_checked_on_allowed_pairs_only(backend, segments):
    """``causal=True, window=(5, -1)``: offsets 0..5 back; a 1-D table of extent 6 covers every pair the mask allows.
    The segment path checked the whole 64-row chunk of a step across the band's edge and raised for keys the causal
    mask hides (query 0, key 6). An allowed pair beyond the extent (extent 5: offset 5 is allowed) still raises."""
    mask = ZorroMask.from_segments(segments, {n: "*" for n, _ in segments}, causal=True, window=(5, -1))
    pos = torch.arange(mask.num_q)[:, None]
    q, k, v = generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=16)
    check_against_oracle(attn_fn(backend), q, k, v, mask, bias=RelativePositionBias(torch.randn(2, 11), pos, pos, (6,)))
    if backend != "reference":  # the reference reads NaN there (the materialised bias), it does not check
        with pytest.raises(ValueError, match="differ by 5 on axis 0, beyond extent 5"):
            zorro_attention(
                q, k, v, mask, bias=RelativePositionBias(torch.randn(2, 9), pos, pos, (5,)), backend=backend
            )


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (
            _call(torch.randn(2, 4, 9, 8)),
            ValueError,
            r"bias of shape \(2, 4, 9, 8\) does not broadcast to \(B, H, Nq, Nk\) = \(2, 4, 9, 9\)",
        ),
        (_call(torch.randn(3, 1, 9, 9)), ValueError, r"bias of shape \(3, 1, 9, 9\)"),
        (_call(torch.randn(1, 2, 4, 9, 9)), ValueError, "does not broadcast"),
        (_call(torch.ones(9, 9, dtype=torch.bool)), TypeError, "bias must be a float tensor .* got torch.bool"),
        (_call([[0.0]]), TypeError, "bias must be a float tensor broadcastable .* got list"),
        (_call(torch.randn(9, 9, device="meta")), ValueError, "bias is on meta but q is on cpu"),
        (
            _call(RelativePositionBias(torch.randn(3, 9), _longs(9, 1), _longs(9, 1), (5,))),
            ValueError,
            "bias.table has 3 heads, q has H=4",
        ),
        (
            _call(RelativePositionBias(torch.randn(4, 9), _longs(8, 1), _longs(9, 1), (5,))),
            ValueError,
            "bias positions cover Nq=8 x Nk=9 tokens, attention has Nq=9 x Nk=9",
        ),
        (
            _call(RelativePositionBias(torch.randn(4, 3), torch.arange(9)[:, None], torch.arange(9)[:, None], (2,))),
            ValueError,
            "query 0 and key 2 differ by -2 on axis 0, beyond extent 2",
        ),
    ],
)
def test_bad_bias_raises_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize(
    "make, exc, msg",
    [
        (
            lambda: RelativePositionBias(torch.randn(4, 8), _longs(9, 2), _longs(9, 2), (2, 2)),
            ValueError,
            r"table must have shape \(H, 9\) for extents \[\[2, 2\]\], got \(4, 8\)",
        ),
        (
            lambda: RelativePositionBias(torch.randn(4, 9), _longs(9, 2), _longs(9, 3), (2, 2)),
            ValueError,
            r"k_coords has 3 axes but extent has 2",
        ),
        (
            lambda: RelativePositionBias(torch.randn(4, 9), torch.zeros(9, 2) + 0.5, torch.zeros(9, 2), (2, 2)),
            TypeError,
            "q_coords must have an integer dtype",
        ),
        (
            lambda: RelativePositionBias(torch.randn(4, 9), _longs(9, 2), _longs(9, 2), (2, 0)),
            ValueError,
            r"extent must hold ints in \[1, 2147483647\], got \[2, 0\]",
        ),
        (  # past int64 this used to fail inside torch.tensor with "Overflow when unpacking long long"
            lambda: RelativePositionBias(torch.randn(4, 9), _longs(9, 2), _longs(9, 2), (2**63, 2)),
            ValueError,
            r"extent must hold ints in \[1, 2147483647\], got \[9223372036854775808, 2\]",
        ),
        (
            lambda: RelativePositionBias(torch.randn(4, 9), _longs(9, 2), _longs(9, 2), (70000, 70000)),
            ValueError,
            r"extent \[70000, 70000\] needs a table of 19599720001 columns, more than 2147483647",
        ),
        (
            lambda: RelativePositionBias(torch.randint(0, 2, (4, 9)), _longs(9, 2), _longs(9, 2), (2, 2)),
            TypeError,
            "table must be a float tensor",
        ),
        (lambda: RelativePositionBias(torch.randn(4, 9)), TypeError, "needs q_coords, k_coords and extent"),
    ],
)
def test_bad_relative_bias_raises_clear_errors(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


# ------------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize(
    "kind, backend",
    [
        ("dense", "auto"),
        ("relative", "auto"),
        pytest.param("dense", "triton", marks=TRITON.marks),
        pytest.param("relative", "triton", marks=[*TRITON.marks, pytest.mark.full]),
    ],
)
def test_compile_fullgraph_with_bias(kind, backend):
    """Under torch.compile(fullgraph=True) a bias goes through the custom ops, gradient included."""
    mask, coords = windows_mask(shift=(1, 1))
    q, k, v = generate_qkv(mask)
    table = torch.randn(4, 15, requires_grad=True)
    dense = torch.randn(1, 4, mask.num_q, mask.num_kv, requires_grad=True)
    pos = RelativePositions(coords, coords, (2, 3))

    def f(a, b, c, t):
        bias = RelativePositionBias(t, positions=pos) if kind == "relative" else t
        return zorro_attention(a, b, c, mask, bias=bias, backend=backend)

    leaf = table if kind == "relative" else dense
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for fn in (f, compiled):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, leaf)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (qq, kk, vv, leaf), torch.ones_like(out)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
