"""A large softmax scale on every backend: exact against fp64 where float32 holds the scaled scores, refused in one
line where it does not (``scale=1e39`` used to give an all-NaN output on every backend, the fp64 result finite)."""

import pytest
import torch
import torch.nn.functional as F

from zorro_kernels import ZorroMask, reference_attention, zorro_attention
from zorro_kernels._checks import SCORE_LIMIT
from zorro_kernels.testing import FLOOR, assert_within_policy

from .helpers import TRITON, small_triton_tiles  # noqa: F401  (a fixture)

BACKENDS = ["reference", "dense", "segments", TRITON]
pytestmark = pytest.mark.usefixtures("small_triton_tiles")


def _inputs(dtype, seed=0, b=2, nq=14):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, 2, nq, 16, generator=g).to(dtype) for _ in range(3))


def _largest_norm(x):
    return torch.linalg.vector_norm(x.double(), dim=-1).max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scale_that_overflows_float32_is_refused_in_one_line(backend):
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"scale=1e\+39 can make the scaled scores overflow float32") as e:
        zorro_attention(q, k, v, mask, scale=1e39, backend=backend)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="scale=1e\\+39"):  # the second call (validation cached) checks it too
        zorro_attention(q, k, v, mask, scale=1e39, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_largest_scale_taken_is_exact_against_fp64(backend):
    """Just under the bound the scores are ~1e37: the softmax is a hard argmax, and every backend must give the fp64
    answer (the argmax row's value), not NaN."""
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = _inputs(torch.float32)
    scale = 0.99 * SCORE_LIMIT / (_largest_norm(q) * _largest_norm(k))
    out = zorro_attention(q, k, v, mask, scale=scale, backend=backend)
    ref = reference_attention(q.double(), k.double(), v.double(), mask, scale=scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=FLOOR[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scaled_scores_past_half_range_match_fp64_forward_and_backward(backend, dtype):
    """``scale * q.k`` far beyond fp16's 65504: every backend computes scores in float32, so output and gradients
    follow the fp64 reference within the dtype's policy. The same-precision comparison is PyTorch's own SDPA computed
    in float32 (rounded to the dtype): the dense reference in the dtype itself would overflow, and its softmax backward
    is exact on a one-hot row, where every flash-style backward (``dS = P (dP - D)``, ``D = rowsum(dO O)``) leaves
    ``scale`` times float32 rounding in dq and dk."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 arithmetic is wrong in Triton's CPU interpreter")
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = _inputs(dtype, seed=1)
    scale = 3e4
    assert scale * (q.double() @ k.double().transpose(-1, -2)).abs().max() > 65504 * 4
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = mask.to_dense()

    def run(fn, cast):
        qq, kk, vv = (cast(t).detach().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        grads = torch.autograd.grad(out, (qq, kk, vv), d_out.to(out.dtype))
        return [x.to(dtype) if x.dtype != torch.float64 else x for x in (out.detach(), *grads)]

    got = run(lambda a, b, c: zorro_attention(a, b, c, mask, scale=scale, backend=backend), lambda t: t)
    ref = run(lambda a, b, c: reference_attention(a, b, c, mask, scale=scale), lambda t: t.double())
    sdpa = run(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense, scale=scale), lambda t: t.float()
    )
    for name, g, s, r in zip(("out", "dq", "dk", "dv"), got, sdpa, ref):
        assert_within_policy(f"{backend} {name}", g, s, r, dtype)


def test_scale_at_most_one_costs_no_pass_over_the_inputs(monkeypatch):
    """Scaling by at most 1 cannot make a finite score overflow: no norms are computed (tiny calls pay nothing)."""
    from zorro_kernels import _checks

    def boom(x):
        raise AssertionError("norms computed for a scale <= 1")

    monkeypatch.setattr(_checks, "_largest_norm", boom)
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = _inputs(torch.float32)
    for scale in (None, 0.25, 1.0):
        zorro_attention(q, k, v, mask, scale=scale)


def test_non_finite_tokens_do_not_trip_the_scale_bound():
    """A NaN/Inf token's scores are NaN whatever the scale (the isolation rule's business): a large scale with a
    poisoned token still runs, and clean rows stay finite."""
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = _inputs(torch.float32)
    k[:, :, 0] = float("inf")  # an audio key: audio rows see it, video rows do not
    out = zorro_attention(q, k, v, mask, scale=1e3)
    assert torch.isfinite(out[:, :, 4:12]).all()


def test_a_call_seen_before_still_refuses_what_differs():
    """Validation and the backend choice are cached per mask under the call's shapes, dtypes, devices and scale: a
    later call that differs in any of them is validated again (``True == 1`` for a dict, so the scale's type is part
    of the key)."""
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = _inputs(torch.float32)
    for _ in range(2):
        zorro_attention(q, k, v, mask, scale=1)
    with pytest.raises(TypeError, match="scale must be a float or None, got bool"):
        zorro_attention(q, k, v, mask, scale=True)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        zorro_attention(q, k.double(), v, mask, scale=1)
    with pytest.raises(ValueError, match="k/v have Nk=13 tokens"):
        zorro_attention(q, k[:, :, :13], v[:, :, :13], mask, scale=1)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        zorro_attention(q, k, v, mask, scale=-1.0)
