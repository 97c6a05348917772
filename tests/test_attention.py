"""zorro_attention on CPU: the segment path and the reference against the fp64 oracle; the surface; bad input."""

import math
import random

import pytest
import torch

from zorro_kernels import ZorroMask, reference_attention, zorro_attention
from zorro_kernels.attention import select_backend
from zorro_kernels.backends import BACKENDS
from zorro_kernels.testing import check_against_oracle, generate_qkv, named_masks, random_mask

CPU_BACKENDS = ["segments", "dense"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def attn_fn(backend):
    return lambda q, k, v, mask, scale=None: zorro_attention(q, k, v, mask, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(named_masks()))
def test_named_layouts(backend, dtype, name):
    mask = named_masks()[name]
    check_against_oracle(attn_fn(backend), *generate_qkv(mask, dtype=dtype), mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_layouts(backend):
    rng = random.Random(7)
    for i in range(60):
        mask = random_mask(rng, sizes=(0, 1, 2, 3, 5, 13, 17, 31))
        h, hkv = rng.choice([(2, 2), (4, 1), (6, 2)])
        check_against_oracle(
            attn_fn(backend), *generate_qkv(mask, heads=h, kv_heads=hkv, head_dim=rng.choice([8, 16, 24])), mask, seed=i
        )


@pytest.mark.full
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_random_layouts_many(backend, dtype):
    rng = random.Random(hash(str(dtype)) % 1000)
    for i in range(300):
        mask = random_mask(rng, max_segments=7)
        h, hkv = rng.choice([(1, 1), (2, 2), (4, 1), (8, 2), (6, 3)])
        check_against_oracle(
            attn_fn(backend),
            *generate_qkv(mask, heads=h, kv_heads=hkv, head_dim=rng.choice([16, 32, 64]), dtype=dtype),
            mask,
            seed=i,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_head_dims(backend, d):
    mask = ZorroMask.zorro(audio=13, video=40, fusion=3)
    check_against_oracle(attn_fn(backend), *generate_qkv(mask, head_dim=d), mask)


@pytest.mark.full
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [16, 24, 32, 40, 64, 80, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dims_many(backend, d, dtype):
    mask = ZorroMask.zorro(audio=31, video=113, fusion=5, lengths=torch.tensor([[31, 113, 5], [0, 97, 5]]))
    check_against_oracle(attn_fn(backend), *generate_qkv(mask, head_dim=d, dtype=dtype), mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs_and_custom_scale(backend):
    mask = named_masks()["ragged"]
    check_against_oracle(attn_fn(backend), *generate_qkv(mask, noncontiguous=True), mask, scale=0.3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_contents_never_leak(backend):
    """NaN in every padding token (queries and keys) must not reach any valid output or gradient."""
    mask = ZorroMask.zorro(audio=8, video=12, fusion=2, lengths=torch.tensor([[3, 12, 2], [8, 5, 1]]))
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask))
    dense = mask.to_dense()
    q_pad = ~dense.any(-1)
    k_pad = torch.stack(
        [
            torch.tensor([False] * 3 + [True] * 5 + [False] * 12 + [False] * 2),
            torch.tensor([False] * 8 + [False] * 5 + [True] * 7 + [False, True]),
        ]
    )
    with torch.no_grad():
        q[q_pad[:, None, :, None].expand_as(q)] = float("nan")
        k[k_pad[:, None, :, None].expand_as(k)] = float("nan")
        v[k_pad[:, None, :, None].expand_as(v)] = float("nan")
    out = zorro_attention(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(q.grad[~q_pad[:, None, :, None].expand_as(q)]).all()
    assert torch.isfinite(k.grad[~k_pad[:, None, :, None].expand_as(k)]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rerun_is_bitwise_equal(backend):
    mask = named_masks()["bottleneck"]
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask))
    runs = []
    for _ in range(2):
        out = zorro_attention(q, k, v, mask, backend=backend)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reference_matches_fp64_math():
    """The reference itself against an independent einsum/softmax implementation in fp64."""
    rng = random.Random(3)
    for _ in range(25):
        mask = random_mask(rng)
        q, k, v = (t.double() for t in generate_qkv(mask))
        d = mask.to_dense()
        d = (d[None] if d.ndim == 2 else d)[:, None]
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, kk) / math.sqrt(q.shape[-1])
        p = torch.softmax(s.masked_fill(~d, float("-inf")), -1).nan_to_num(0.0)
        want = torch.einsum("bhqk,bhkd->bhqd", p, vv)
        got = reference_attention(q, k, v, mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_auto_picks_a_sparse_path_on_cpu_and_forced_backends_work():
    # big enough for the segment path: at 204 tokens (B=2, H=4, D=32) the cost rule picks dense, the faster one there
    # (BENCHMARKS.md, the auto-rule sweep); at 404 the segment path's saved pairs outweigh its calls. Where the
    # compiled interval kernel builds it is faster still (Zorro at 292 tokens: 0.88 against 1.03 ms forward, the sweep)
    mask = ZorroMask.zorro(audio=80, video=320, fusion=4)
    q, k, v = generate_qkv(mask)
    kernel = not BACKENDS["intervals"].not_supported_reasons(q, k, v, mask)
    assert select_backend(q, k, v, mask) == ("intervals" if kernel else "segments")
    a = zorro_attention(q, k, v, mask)
    b = zorro_attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_missing_modality_rows_are_zero_and_fusion_still_works():
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2, lengths=torch.tensor([[0, 10, 2], [6, 10, 2]]))
    q, k, v = generate_qkv(mask)
    out = zorro_attention(q, k, v, mask)
    assert (out[0, :, :6] == 0).all() and (out[1, :, :6] != 0).any()
    only_video = zorro_attention(q[:1, :, 6:], k[:1, :, 6:], v[:1, :, 6:], ZorroMask.zorro(video=10, fusion=2))
    torch.testing.assert_close(out[:1, :, 6:], only_video, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ bad input
def _bad(**over):
    mask = ZorroMask.zorro(audio=3, video=5, fusion=1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    args = dict(q=q, k=k, v=v, mask=mask)
    args.update(over)
    kw = {x: args.pop(x) for x in ("scale", "backend") if x in args}
    return lambda: zorro_attention(args["q"], args["k"], args["v"], args["mask"], **kw)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (_bad(q=torch.randn(4, 9, 8)), ValueError, "q must be 4-D \\(B, H, Nq, D\\), got 3-D with shape \\(4, 9, 8\\)"),
        (_bad(k=torch.randn(1, 2, 9, 8), v=torch.randn(1, 2, 9, 8)), ValueError, "q has B=2, k/v have B=1"),
        (_bad(k=torch.randn(2, 2, 9, 4), v=torch.randn(2, 2, 9, 4)), ValueError, "q has D=8, k/v have D=4"),
        (_bad(k=torch.randn(2, 3, 9, 8), v=torch.randn(2, 3, 9, 8)), ValueError, "H=4 must be a multiple of .* Hkv=3"),
        (_bad(v=torch.randn(2, 2, 8, 8)), ValueError, "k and v must have the same shape"),
        (_bad(q=torch.randn(2, 4, 10, 8)), ValueError, "q has Nq=10 tokens but the mask's query segments hold 9"),
        (_bad(k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8)), ValueError, "k/v have Nk=7 tokens .* hold 9"),
        (
            _bad(k=torch.randn(2, 2, 9, 8).half(), v=torch.randn(2, 2, 9, 8).half()),
            TypeError,
            "share a dtype, got q torch.float32, k torch.float16",
        ),
        (_bad(q=torch.randint(0, 3, (2, 4, 9, 8))), TypeError, "q must be float16, bfloat16, float32 or float64"),
        (_bad(q=torch.randn(2, 4, 9, 8, device="meta")), ValueError, "one device, got q meta, k cpu"),
        (_bad(q=[1, 2]), TypeError, "q must be a torch.Tensor, got list"),
        (_bad(mask=torch.ones(9, 9, dtype=torch.bool)), TypeError, "mask must be a ZorroMask, got Tensor"),
        (
            _bad(mask=ZorroMask.zorro(audio=3, video=5, fusion=1, lengths=torch.tensor([[3, 5, 1]] * 3))),
            ValueError,
            "lengths are for B=3 samples but q has B=2",
        ),
        (_bad(backend="cuda-magic"), ValueError, "unknown backend 'cuda-magic'; choose 'auto' or one of"),
        (_bad(backend=3), TypeError, "backend must be a str"),
        (_bad(scale=-1.0), ValueError, "scale must be a finite positive number, got -1.0"),
        (_bad(scale=float("nan")), ValueError, "finite positive"),
        (_bad(scale="big"), TypeError, "scale must be a float or None, got str"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_numpy_scale_and_empty_batch():
    # issue 11 item 10: scale=np.float32(0.5) was rejected; B=0 must fail in our words, naming the shapes
    import numpy as np

    mask = ZorroMask.zorro(audio=3, video=4, fusion=1)
    q, k, v = generate_qkv(mask)
    want = zorro_attention(q, k, v, mask, scale=0.5)
    for s in (np.float32(0.5), np.float64(0.5), np.int64(1) / 2):
        assert torch.equal(zorro_attention(q, k, v, mask, scale=s), want)
    with pytest.raises(ValueError, match=r"non-zero B.*\(0, 4, 8, 32\)"):
        zorro_attention(q[:0], k[:0], v[:0], mask)


def test_dense_takes_float64_with_float64_gradients():
    """The dense backend runs fp64 (users gradcheck in fp64), within fp64's policy: eagerly, and through the
    dispatcher's op, which carries an fp32 LSE; its backward recomputes the LSE in fp64 (with the fp32 one dq is
    ~1e-8 off, far past fp64's floor)."""
    from zorro_kernels import _ops

    mask = ZorroMask.zorro(audio=3, video=5, fusion=2)
    q, k, v = generate_qkv(mask, batch=2, heads=2, kv_heads=1, head_dim=16, dtype=torch.float64)
    assert select_backend(q, k, v, mask) == "dense"
    check_against_oracle(lambda *a, **kw: zorro_attention(*a, **kw, backend="dense"), q, k, v, mask)
    check_against_oracle(
        lambda q, k, v, m, scale=None, bias=None: _ops.attention(q, k, v, m, 0.25, "dense"), q, k, v, mask
    )
    small = [t[:1, :, :, :2].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: zorro_attention(*t, mask, backend="dense"), small)
