"""The segment backend's CPU autograd path against the oracle, over the layout families the benchmarks time.

Covers what its output/dQ assembly and per-step log-sum-exp must get right: rows no step covers, fused runs of
windows, batch patterns from per-sample lengths, cross-attention, causal steps with dead rows, GQA, non-contiguous
and broadcast (stride-0) upstream gradients, and forward without autograd.
"""

import pytest
import torch

from tests.isolation import check_isolation, poison_everything_unseen
from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.backends.segments import _segment_attention_autograd, build_plan
from zorro_kernels.testing import check_against_oracle


def _windows(n_windows=3, size=7, fusion=3):
    segs = [(f"w{i}", size) for i in range(n_windows)] + [("fusion", fusion)]
    allow = torch.eye(len(segs), dtype=torch.bool)
    allow[-1] = True
    return ZorroMask.from_allow(segs, allow)


def _cross():
    kv = [("a", 11), ("b", 11), ("c", 5)]
    q = [("la", 4), ("lb", 4), ("lf", 3)]
    allow = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return ZorroMask.from_allow(q, allow, kv_segments=kv)


LAYOUTS = {
    "zorro": lambda: ZorroMask.zorro(audio=13, video=29, fusion=3),
    "ragged": lambda: ZorroMask.zorro(
        audio=13, video=29, fusion=3, lengths=torch.tensor([[13, 29, 3], [0, 29, 3], [5, 0, 3]])
    ),
    "no-fusion-rows-see-nothing": lambda: ZorroMask.from_segments(
        [("a", 9), ("b", 8), ("c", 5)], {"a": ["a"], "b": ["a", "b"]}
    ),
    "windows": _windows,
    "cross": _cross,
    "packed": lambda: ZorroMask.packed([7, 12, 5]),
    "packed-causal": lambda: ZorroMask.packed([7, 12, 5], causal=True),
    "bottleneck": lambda: ZorroMask.bottleneck(audio=10, video=17, bottleneck=4),
    # longer than BAND_ROWS: the diagonal is cut into chunks; cross-causal with Nk != Nq and ragged lengths
    "causal-long-ragged": lambda: ZorroMask.from_segments(
        [("a", 40), ("b", 37)], {"a": ["a"], "b": "*"}, causal=True, lengths=torch.tensor([[40, 37], [33, 0], [5, 30]])
    ),
    "cross-causal": lambda: ZorroMask.from_segments(
        [("q", 45)], {"q": "*"}, kv_segments=[("k", 70)], causal=True, kv_lengths=torch.tensor([[70], [50], [12]])
    ),
    "window-ragged": lambda: ZorroMask.from_segments(
        [("a", 90), ("f", 3)], {"a": ["a"], "f": "*"}, window=(9, 4), lengths=torch.tensor([[90, 3], [70, 2], [3, 3]])
    ),
}


def _inputs(mask, b=3, h=4, hkv=4, d=16, dtype=torch.float32):
    q = torch.randn(b, h, mask.num_q, d, dtype=dtype)
    k = torch.randn(b, hkv, mask.num_kv, d, dtype=dtype)
    return q, k, torch.randn_like(k)


def _segments(q, k, v, mask, scale=None):
    return zorro_attention(q, k, v, mask, scale=scale, backend="segments")


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_oracle(name, dtype):
    mask = LAYOUTS[name]()
    check_against_oracle(_segments, *_inputs(mask, dtype=dtype), mask)


def test_gqa_and_noncontiguous_inputs():
    mask = LAYOUTS["ragged"]()
    q = torch.randn(3, mask.num_q, 4, 16).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    k = torch.randn(3, mask.num_kv, 2, 16).transpose(1, 2)
    v = torch.randn(3, mask.num_kv, 2, 16).transpose(1, 2)
    check_against_oracle(_segments, q, k, v, mask)


@pytest.mark.parametrize("name", ["zorro", "ragged", "windows"])
def test_broadcast_and_strided_upstream_gradient(name):
    mask = LAYOUTS[name]()
    q, k, v = (t.requires_grad_() for t in _inputs(mask))
    shape = q.shape
    # a broadcast (stride-0) gradient, as .sum() hands backward, and one laid out (B, N, H, D)
    for g in (
        torch.randn(1, 1, 1, 1).expand(shape),
        torch.randn(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2),
    ):
        got = torch.autograd.grad(_segments(q, k, v, mask), (q, k, v), g)
        want = torch.autograd.grad(_segments(q, k, v, mask), (q, k, v), g.contiguous())
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"{name}: gradients differ with a non-contiguous upstream gradient"


def test_forward_without_autograd_matches():
    mask = LAYOUTS["ragged"]()
    q, k, v = _inputs(mask)
    with torch.no_grad():
        plain = _segments(q, k, v, mask)
    tracked = _segments(q.requires_grad_(), k, v, mask)
    assert torch.equal(plain, tracked.detach())


def _segments_autograd(q, k, v, mask, scale=None):
    """The off-CPU path (fp64 and large head dims on GPU), run on CPU tensors: no other tier reaches it."""
    return _segment_attention_autograd(q, k, v, build_plan(mask), q.shape[-1] ** -0.5 if scale is None else scale)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_path_matches_oracle(name, dtype):
    mask = LAYOUTS[name]()
    check_against_oracle(_segments_autograd, *_inputs(mask, dtype=dtype, hkv=2), mask)


@pytest.mark.parametrize("name", ["ragged", "packed-causal", "causal-long-ragged", "cross-causal", "window-ragged"])
@pytest.mark.parametrize("path", ["cpu", "autograd"])
def test_nan_isolation_both_paths(name, path):
    mask = LAYOUTS[name]()
    q, k, v = _inputs(mask, dtype=torch.float64, hkv=2)
    rows = torch.rand(q.shape[0], mask.num_q, generator=torch.Generator().manual_seed(3)) < 0.3
    check_isolation(
        _segments if path == "cpu" else _segments_autograd,
        q,
        k,
        v,
        mask,
        *poison_everything_unseen(mask, q.shape[0], rows),
    )


def test_double_backward_says_so():
    mask = LAYOUTS["ragged"]()
    q, k, v = (t.requires_grad_() for t in _inputs(mask))
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(_segments(q, k, v, mask).sum(), q, create_graph=True)
    # the reference supports it
    out = zorro_attention(q.double(), k.double(), v.double(), mask, backend="reference")
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    assert torch.autograd.grad(dq.sum(), k)[0].abs().sum() > 0
