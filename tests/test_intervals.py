"""The intervals backend: the compiled CPU kernels against the fp64 oracle, the mask -> interval builder against
``mask.to_dense()``, NaN routing, and the loader's refusal when the kernels do not build.

Default tier: a few shapes and layouts (the first test pays the one-time compile when the build cache is cold).
``-m full``: every named, cell and per-sample layout and a few hundred random ones, in fp32 and fp64.
"""

from __future__ import annotations

import random

import pytest
import torch

from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.backends import BACKENDS, _cpp
from zorro_kernels.backends.intervals import interval_attention_reference, mask_intervals
from zorro_kernels.testing import (
    assert_within_policy,
    cell_masks,
    check_against_oracle,
    generate_qkv,
    named_masks,
    per_sample_masks,
    random_cell_mask,
    random_mask,
    random_per_sample_mask,
)

from .isolation import check_isolation, poison_everything_unseen

needs_kernel = pytest.mark.skipif(not _cpp.load(), reason=f"{_cpp.unavailable_reason()}")


def _attn(q, k, v, mask, scale=None):
    return zorro_attention(q, k, v, mask, scale=scale, backend="intervals")


def _dense_from(lo, hi, nk: int) -> torch.Tensor:
    j = torch.arange(nk)
    return ((lo[..., None] <= j) & (j < hi[..., None])).any(2)


def _random_intervals(gen, b: int, nq: int, nk: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted disjoint intervals, some empty (ends drawn with repeats), some rows with none."""
    ends = torch.randint(0, nk + 1, (b, nq, 2 * r), generator=gen).sort(-1).values.to(torch.int32)
    lo, hi = ends[..., 0::2].contiguous(), ends[..., 1::2].contiguous()
    dead = torch.rand(b, nq, generator=gen) < 0.1
    hi = torch.where(dead[..., None], lo, hi).contiguous()
    return lo, hi


# (B, Hq, Hkv, Nq, Nk, D, R): odd lengths, 1 x N, cross-attention, GQA, several intervals per row
SHAPES = [
    (2, 2, 1, 97, 113, 16, 2),
    (1, 3, 3, 1, 3, 8, 1),
    (2, 4, 2, 113, 97, 32, 3),
    (1, 2, 2, 300, 300, 64, 1),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("strided", [False, True], ids=["bhnd", "bnhd"])
def test_ops_match_the_oracle(dtype, shape, strided):
    b, hq, hkv, nq, nk, d, r = shape
    gen = torch.Generator().manual_seed(nq * 7 + nk)

    def draw(h, n):
        x = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(dtype)
        return x.transpose(1, 2) if strided else x.transpose(1, 2).contiguous()

    q, k, v = draw(hq, nq), draw(hkv, nk), draw(hkv, nk)
    lo, hi = _random_intervals(gen, b, nq, nk, r)
    scale = d**-0.5
    out, lse = torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, hi, scale)
    assert out.dtype == dtype and lse.dtype == dtype and out.is_contiguous()
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.ops.zorro_cpu.interval_bwd(dout, q, k, v, out, lse, lo, hi, scale)

    def oracle(cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        o, l_ = interval_attention_reference(*leaves, lo, hi, scale)
        return o.detach(), l_.detach(), torch.autograd.grad(o, leaves, cast(dout))

    ref, ref_lse, ref_g = oracle(lambda t: t.double())
    same, same_lse, same_g = oracle(lambda t: t)
    assert_within_policy("out", out, same, ref, dtype)
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live), "lse is -inf exactly for the rows with no keys"
    assert_within_policy("lse", lse[live], same_lse[live], ref_lse[live], dtype)
    for name, g, s, r_ in zip(("dq", "dk", "dv"), grads, same_g, ref_g):
        assert_within_policy(name, g, s, r_, dtype)
    dead = ~_dense_from(lo, hi, nk).any(-1)[:, None].expand(b, hq, nq)
    assert (out[dead] == 0).all() and (grads[0][dead] == 0).all(), "a row with no keys is exactly 0 with zero dq"
    unread = ~_dense_from(lo, hi, nk).any(1)[:, None].expand(b, hkv, nk)
    assert (grads[1][unread] == 0).all() and (grads[2][unread] == 0).all(), "keys no row attends get zero dk, dv"


def _masks(full: bool) -> dict:
    masks = {**named_masks(), **{f"cells/{k}": m for k, m in cell_masks().items()}}
    masks.update({f"per_sample/{k}": m for k, m in per_sample_masks().items()})
    if not full:
        keep = (
            "odd_1_3_97_113",
            "ragged",
            "packed",
            "cells/blocks_ragged",
            "cells/packed_unequal",
            "cells/cells_and_window",
        )
        keep += ("per_sample/blocks", "per_sample/blocks_left_padded", "per_sample/decode_cross")
        masks = {k: m for k, m in masks.items() if k in keep}
    return masks


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", sorted(_masks(False)))
def test_backend_matches_the_oracle(name, dtype):
    mask = _masks(False)[name]
    q, k, v = generate_qkv(mask, batch=mask.batch_size or 2, heads=4, kv_heads=2, head_dim=16, dtype=dtype)
    check_against_oracle(_attn, q, k, v, mask)


@pytest.mark.full
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", sorted(_masks(True)))
def test_backend_matches_the_oracle_full(name, dtype):
    mask = _masks(True)[name]
    for heads, kv_heads, d in ((2, 2, 8), (4, 1, 64)):
        q, k, v = generate_qkv(
            mask, batch=mask.batch_size or 2, heads=heads, kv_heads=kv_heads, head_dim=d, dtype=dtype
        )
        check_against_oracle(_attn, q, k, v, mask)


def _random_layouts(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        yield (random_mask, random_cell_mask, random_per_sample_mask)[i % 3](rng)


@pytest.mark.parametrize("n", [pytest.param(60, id="fast"), pytest.param(600, id="full", marks=pytest.mark.full)])
def test_builder_equals_to_dense(n):
    for mask in _random_layouts(n):
        b = mask.batch_size or 2
        lo, hi = mask_intervals(mask, b)
        assert lo.dtype == torch.int32 and lo.is_contiguous() and lo.shape[:2] == (b, mask.num_q)
        dense = mask.to_dense()
        dense = dense.expand(b, -1, -1) if dense.ndim == 2 else dense
        assert torch.equal(_dense_from(lo, hi, mask.num_kv), dense), mask
        nonempty = lo < hi
        # sorted and disjoint: each non-empty interval starts after the previous one ends (touching ones merged)
        ends = torch.where(nonempty, hi, 0).cummax(-1).values
        assert (~nonempty[..., 1:] | (lo[..., 1:] > ends[..., :-1])).all(), mask


def test_builder_merges_touching_segments_and_caches():
    mask = ZorroMask.zorro(audio=5, video=7, fusion=3)
    lo, hi = mask_intervals(mask, 2)
    assert lo.shape == (2, 15, 1)  # fusion sees audio, video and itself: one run of keys, not three
    assert hi[0, -1, 0] == 15 and lo[0, -1, 0] == 0
    assert mask_intervals(mask, 2)[0] is lo  # built once per mask and batch


@needs_kernel
@pytest.mark.parametrize("name", ["ragged", "per_sample/blocks", "per_sample/decode_cross", "cells/cells_and_window"])
def test_poison_stays_where_the_rule_lets_it(name):
    mask = _masks(False)[name]
    b = mask.batch_size or 2
    q, k, v = generate_qkv(mask, batch=b, heads=2, kv_heads=1, head_dim=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        rows = torch.rand(b, mask.num_q, generator=gen) < 0.3
        check_isolation(_attn, q, k, v, mask, *poison_everything_unseen(mask, b, rows))


@needs_kernel
def test_runs_under_torch_compile():
    mask = named_masks()["ragged"]  # (a mask with causal cells fails to trace in _ops.describe on every backend)
    q, k, v = generate_qkv(mask, batch=mask.batch_size, heads=2, head_dim=16, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(_attn, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, mask)
    eager = _attn(q, k, v, mask)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_failed_build_refuses_in_one_line_and_auto_still_runs(monkeypatch, tmp_path):
    (tmp_path / "broken.cpp").write_text("int broken( {\n")
    monkeypatch.setattr(_cpp, "CSRC", tmp_path)
    monkeypatch.setattr(_cpp, "_state", {})
    assert not _cpp.load()
    reason = _cpp.unavailable_reason()
    assert reason.startswith("the CPU kernel did not build: ") and "error" in reason and "\n" not in reason
    assert reason.endswith("set ZORRO_CPU_KERNEL=0 to skip it")
    mask = ZorroMask.zorro(audio=4, video=6, fusion=2)
    q, k, v = generate_qkv(mask, batch=2, heads=2, head_dim=16)
    assert BACKENDS["intervals"].not_supported_reasons(q, k, v, mask) == [reason]
    with pytest.raises(ValueError, match="did not build"):
        zorro_attention(q, k, v, mask, backend="intervals")
    torch.testing.assert_close(
        zorro_attention(q, k, v, mask), zorro_attention(q, k, v, mask, backend="reference"), rtol=1e-5, atol=1e-6
    )


def test_the_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("ZORRO_CPU_KERNEL", "0")
    assert not _cpp.load()
    assert _cpp.unavailable_reason() == "the CPU kernel is disabled (ZORRO_CPU_KERNEL=0)"


@needs_kernel
def test_an_interval_past_the_keys_is_an_error_not_a_read():
    q = torch.zeros(1, 1, 2, 8)
    lo = torch.tensor([[[0], [5]]], dtype=torch.int32)
    hi = torch.tensor([[[3], [9]]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"lo, hi must lie in \[0, Nk=8\]; got the interval \[5, 9\)"):
        torch.ops.zorro_cpu.interval_fwd(q, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), lo, hi, 1.0)
    hi[0, 1, 0] = 3  # empty (lo >= hi): never read, so any values
    torch.ops.zorro_cpu.interval_fwd(q, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), lo, hi, 1.0)
