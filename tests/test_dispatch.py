"""The dispatcher's structure: backends declared as data, the custom ops with plain arguments, the mask's content
key."""

import pytest
import torch

import zorro_kernels
from zorro_kernels import ZorroMask, _ops, zorro_attention
from zorro_kernels.backends import BACKENDS, Backend, backward_by_recompute
from zorro_kernels.testing import generate_qkv


def test_refusal_reasons_are_generated_from_the_declared_fields():
    def unused(*args):
        raise AssertionError("not called")

    narrow = Backend(
        "narrow",
        "test",
        unused,
        unused,
        devices=("cuda",),
        dtypes=(torch.float16,),
        max_head_dim=32,
        deterministic=False,
        extra_reasons=lambda q, k, v, mask: ["and one more"],
    )
    mask = ZorroMask.zorro(audio=3, video=4, fusion=1)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=64)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        reasons = narrow.not_supported_reasons(q, k, v, mask, bias=torch.zeros(1))
    finally:
        torch.use_deterministic_algorithms(old)
    assert reasons == [
        "runs on cuda tensors, got device cpu",
        "dtype float32 is not supported (float16 are)",
        "head dim D=64 exceeds the maximum 32",
        "is not deterministic and torch.use_deterministic_algorithms(True) is set",
        "takes no attention bias",
        "and one more",
    ]
    assert BACKENDS["segments"].not_supported_reasons(q, k, v, mask) == []


def test_every_backend_is_a_forward_backward_pair_with_declared_support():
    for b in BACKENDS.values():
        assert callable(b.forward) and callable(b.backward), b.name
        assert isinstance(b.deterministic, bool) and isinstance(b.bias, bool), b.name
    # score biases (bias=) and sliding windows: every backend but the tiny-problem dense one and the compiled interval
    # kernel takes a bias; all take windows
    assert {n: b.bias for n, b in BACKENDS.items()} == {
        "reference": True,
        "segments": True,
        "triton": True,
        "dense": False,
        "intervals": False,
    }
    assert all(b.window for b in BACKENDS.values())


def test_segments_backward_without_cpu_kernels_recomputes(monkeypatch):
    """Off CPU the segment path has no standalone backward; under torch.compile it used to raise NotImplementedError
    at run time. It now recomputes its forward under autograd (checked here by taking the non-CPU branch on CPU)."""
    import zorro_kernels.backends as backends

    mask = ZorroMask.zorro(audio=5, video=7, fusion=2, lengths=torch.tensor([[5, 7, 2], [2, 0, 1]]))
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, heads=2, kv_heads=1, head_dim=16))
    want = zorro_attention(q, k, v, mask, backend="segments", scale=0.3)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    monkeypatch.setattr(backends, "_cpu_kernels", lambda device: False)
    torch._dynamo.reset()
    fn = torch.compile(
        lambda a, b, c: zorro_attention(a, b, c, mask, backend="segments", scale=0.3),
        fullgraph=True,
        backend="aot_eager",
    )
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backward_by_recompute_matches_the_cpu_backward():
    mask = ZorroMask.packed([6, 9], causal=True)
    q, k, v = generate_qkv(mask, heads=2, head_dim=16)
    out, lse = BACKENDS["segments"].forward(q, k, v, mask, 0.25)
    dout = torch.randn_like(out)
    want = BACKENDS["segments"].backward(dout, q, k, v, out, lse, mask, 0.25)
    got = backward_by_recompute(BACKENDS["reference"].eager)(dout, q, k, v, out, lse, mask, 0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_custom_ops_take_the_mask_description_and_find_it_by_content():
    a = ZorroMask.zorro(audio=4, video=6, fusion=2, lengths=torch.tensor([[4, 6, 2], [1, 3, 2]]))
    b = ZorroMask.from_segments(
        [("x", 4), ("y", 6), ("z", 2)], {"x": ["x"], "y": ["y"], "z": "*"}, lengths=torch.tensor([[4, 6, 2], [1, 3, 2]])
    )
    assert a.key == b.key and a.key != a.with_lengths(torch.tensor([[4, 6, 2], [2, 3, 2]])).key
    q, k, v = generate_qkv(a, heads=2, kv_heads=1, head_dim=16)
    out, lse = torch.ops.zorro.attention_fwd(q, k, v, *_ops.describe(a), 0.25, "segments")
    assert _ops._mask_from(*_ops.describe(b)) is _ops._mask_from(*_ops.describe(a))
    torch.testing.assert_close(out, zorro_attention(q, k, v, a, scale=0.25, backend="reference"), rtol=1e-5, atol=1e-6)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]


def test_derived_data_is_keyed_by_its_builder():
    mask = ZorroMask.zorro(audio=3, video=4)
    calls = []

    def build(m, n):
        calls.append(n)
        return n * 2

    assert mask.derived(build, 3) == 6 and mask.derived(build, 3) == 6 and mask.derived(build, 4) == 8
    assert calls == [3, 4]


def test_public_surface_exports_no_internal_kernel_metadata():
    """TokenMeta is the tile-map builder's helper, read by no kernel: it is not public API."""
    assert "TokenMeta" not in zorro_kernels.__all__ and not hasattr(zorro_kernels, "TokenMeta")


@pytest.mark.parametrize("backend", ["segments", "reference"])
def test_eager_and_op_chain_agree(backend):
    mask = ZorroMask.zorro(audio=5, video=7, fusion=2)
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, heads=2, kv_heads=1, head_dim=16))
    a = zorro_attention(q, k, v, mask, backend=backend)
    b = _ops.attention(q, k, v, mask, q.shape[-1] ** -0.5, backend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["segments", "dense"])
def test_custom_op_fakes_match_every_cpu_backend(backend):
    """The registered fakes promise contiguous out and lse: every backend's op output must keep that promise (22 x 22
    tokens: the dense backend's flash-kernel forward, whose LSE comes back transposed)."""
    mask = ZorroMask.zorro(audio=8, video=12, fusion=2, lengths=torch.tensor([[8, 12, 2], [1, 0, 2]]))
    q, k, v = generate_qkv(mask, head_dim=16)
    args = (q, k, v, *_ops.describe(mask), 0.25, backend)
    torch.library.opcheck(torch.ops.zorro.attention_fwd.default, args, test_utils=("test_faketensor",))
    out, lse = torch.ops.zorro.attention_fwd(*args)
    bwd = (torch.randn_like(out), q, k, v, out, lse, *_ops.describe(mask), 0.25, backend)
    torch.library.opcheck(torch.ops.zorro.attention_bwd.default, bwd, test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["segments", "dense", "reference", "triton"])
def test_double_backward_is_exact_or_refused_in_our_words(backend):
    """create_graph=True: the reference differentiates twice (against plain autograd through the dense softmax);
    the kernel backends refuse with one line naming the backend, never an error from inside ATen or Triton."""
    from tests.helpers import triton_unavailable

    if backend == "triton" and triton_unavailable():
        pytest.skip("; ".join(triton_unavailable()))
    mask = ZorroMask.zorro(audio=5, video=7, fusion=2)
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, heads=2, kv_heads=1, head_dim=16))
    out = zorro_attention(q, k, v, mask, backend=backend)
    if backend == "reference":
        (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        (g2,) = torch.autograd.grad(g.sum(), k)
        dense = mask.to_dense()
        s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
        p = s.masked_fill(~dense, float("-inf")).softmax(-1)
        want_out = p @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        (wg,) = torch.autograd.grad(want_out.sum(), q, create_graph=True)
        torch.testing.assert_close(g2, torch.autograd.grad(wg.sum(), k)[0], rtol=1e-4, atol=1e-5)
        return
    with pytest.raises(
        RuntimeError,
        match=f"zorro_attention: the {backend} backend's .*backward cannot be "
        r"differentiated \(double backward, create_graph=True\)",
    ):
        torch.autograd.grad(out.sum(), q, create_graph=True)
