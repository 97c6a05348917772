"""The Triton backend against the oracle.

Default tier: Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest when there is no GPU) on small shapes
with tiles forced to 16x16 / 32x32 so that a handful of tiles exercise full, partial and empty tiles. bfloat16 is
skipped in the interpreter (its bf16 arithmetic is wrong); the ``gpu`` tier checks it. ``full`` adds larger sweeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TRITON_CASES as CASES
from tests.helpers import deterministic, gpu, zorro_ragged
from zorro_kernels import ZorroMask, _ops, zorro_attention
from zorro_kernels.backends import BACKENDS
from zorro_kernels.backends import triton as triton_backend
from zorro_kernels.backends.triton._config import override_blocks
from zorro_kernels.testing import check_against_oracle, generate_qkv, random_layout

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# the default tier runs wherever the backend does: CPU tensors in the interpreter, CUDA tensors on a GPU
DEV = "cuda" if CUDA else "cpu"
_PROBE = torch.zeros(1, 1, 1, 16, device=DEV)
_UNAVAILABLE = BACKENDS["triton"].not_supported_reasons(_PROBE, _PROBE, _PROBE, ZorroMask.packed([1]))
pytestmark = pytest.mark.skipif(bool(_UNAVAILABLE), reason="; ".join(_UNAVAILABLE))


MODES = ["one_pass", "deterministic"]


def triton_attn(q, k, v, mask, scale=None):
    return zorro_attention(q, k, v, mask, scale=scale, backend="triton")


_BF16 = pytest.mark.skipif(
    INTERPRET, reason="bfloat16 arithmetic is wrong in Triton's CPU interpreter; the gpu tier checks bf16"
)
# both backward modes in fp32; fp16 in the default (one-pass) mode, its deterministic mode under -m full
_ORACLE_MODES = [
    pytest.param(dt, mode, id=f"{name}-{mode}", marks=marks)
    for dt, name, marks in (
        (torch.float32, "fp32", ()),
        (torch.float16, "fp16", ()),
        (torch.bfloat16, "bf16", (_BF16,)),
    )
    for mode in MODES
    if name != "fp16" or mode == "one_pass" or not INTERPRET
] + [pytest.param(torch.float16, "deterministic", id="fp16-deterministic-full", marks=pytest.mark.full)]


@pytest.mark.parametrize("dtype, mode", _ORACLE_MODES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_oracle(case, dtype, mode):
    _, build, (b, h, hkv, d), blocks = case
    mask = build()
    q, k, v = generate_qkv(mask, batch=b, heads=h, kv_heads=hkv, head_dim=d, dtype=dtype, device=DEV)
    with override_blocks(blocks), deterministic(mode == "deterministic"):
        check_against_oracle(triton_attn, q, k, v, mask)


def test_cases_cover_every_tile_kind():
    """The oracle cases must keep exercising both kernel paths and the skipping of empty tiles."""
    totals = {"empty": 0, "partial": 0, "full": 0}
    for _, build, _, (bm, bn) in CASES:
        for kind, n in build().tile_map(bm, bn).counts().items():
            totals[kind] += n
    assert min(totals.values()) > 0, totals


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims(d):
    mask = ZorroMask.zorro(audio=9, video=14, fusion=3)
    q, k, v = generate_qkv(mask, batch=1, heads=1, kv_heads=1, head_dim=d, dtype=torch.float16, device=DEV)
    with override_blocks((16, 16)):
        check_against_oracle(triton_attn, q, k, v, mask, scale=0.3)


def test_dead_rows_exact():
    """Rows that see nothing: output exactly 0, LSE -inf, zero gradient; keys nobody sees get zero dK/dV."""
    mask = ZorroMask.from_segments(
        [("a", 10), ("ghost", 12), ("b", 20)],
        {"a": ["a"], "b": ["a", "b"]},
        lengths=torch.tensor([[10, 12, 20], [4, 12, 9]]),
    )
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, batch=2, heads=2, head_dim=16, device=DEV))
    with override_blocks((16, 16)):
        out, lse = torch.ops.zorro.attention_fwd(
            q.detach(), k.detach(), v.detach(), *_ops.describe(mask), 0.25, "triton"
        )
        o2 = zorro_attention(q, k, v, mask, backend="triton")
        o2.backward(torch.randn_like(o2))
    dense = mask.to_dense().to(DEV)  # (B, Nq, Nk)
    dead = ~dense.any(-1)  # (B, Nq)
    unseen = ~dense.any(-2)  # (B, Nk)
    assert dead.any() and unseen.any()
    d4 = dead[:, None, :, None].expand_as(out)
    assert (out[d4] == 0).all() and (o2.detach()[d4] == 0).all() and (q.grad[d4] == 0).all()
    assert torch.isneginf(lse[dead[:, None].expand_as(lse)]).all()
    assert torch.isfinite(lse[~dead[:, None].expand_as(lse)]).all()
    u4 = unseen[:, None, :, None].expand_as(k.grad)
    assert (k.grad[u4] == 0).all() and (v.grad[u4] == 0).all()


def _many_segment_mask() -> ZorroMask:
    """36 segments (more than one 32-bit rule word on either side) whose 16-token tiles give query and kv tiles two
    separate runs of full tiles: big segments 0-3 fill tiles 0-3 and see every other big segment; 32 one-token
    segments fill tiles 4-5 with a checkerboard rule."""
    sizes = [16, 16, 16, 16] + [1] * 32
    idx = torch.arange(len(sizes))
    allow = (idx[:, None] + idx[None, :]) % 2 == 0
    allow[4:, :4] = True  # the small segments see all big ones: partial tiles with a real element mask
    return ZorroMask.from_allow([(f"s{i}", n) for i, n in enumerate(sizes)], allow)


def test_plan_runs_expand_to_the_full_tile_lists():
    """Runs of full tiles (what the kernels walk) cover exactly the tile map's full lists, in order, both ways."""
    from zorro_kernels.backends.triton._plan import tile_plan

    gen = torch.Generator().manual_seed(3)
    masks = [random_layout(gen, 60, lengths=i % 2 == 1) for i in range(12)] + [_many_segment_mask()]
    max_runs = 0
    for mask in masks:
        tm = mask.tile_map(16, 16)
        for direction, num, idx in (("kv", tm.full_kv_num, tm.full_kv_idx), ("q", tm.full_q_num, tm.full_q_idx)):
            plan = tile_plan(mask, 16, 16, direction, "cpu")
            max_runs = max(max_runs, plan.max_runs)
            for b in range(num.shape[0]):
                for r in range(num.shape[1]):
                    runs = plan.runs[b, r, : plan.run_num[b, r]].tolist()
                    got = [t for lo, hi in runs for t in range(lo, hi)]
                    assert got == idx[b, r, : num[b, r]].tolist(), (mask, direction, b, r, runs)
                    assert all(lo < hi for lo, hi in runs)
                    assert all(a[1] < b_[0] for a, b_ in zip(runs, runs[1:]))  # maximal: gaps between runs
    assert max_runs >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_many_segments_and_runs(dtype):
    """More than 32 segments (the rule table spans several bit words: the gather path of the element mask) and two
    runs of full tiles per row, forward and backward."""
    from zorro_kernels.backends.triton._plan import kernel_mask, tile_plan

    mask = _many_segment_mask()
    assert kernel_mask(mask, "cpu").q_words == 2 and kernel_mask(mask, "cpu").k_words == 2
    assert tile_plan(mask, 16, 16, "kv", "cpu").max_runs == 2 and tile_plan(mask, 16, 16, "q", "cpu").max_runs == 3
    q, k, v = generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=16, dtype=dtype, device=DEV)
    with override_blocks((16, 16)):
        check_against_oracle(triton_attn, q, k, v, mask)


@pytest.mark.parametrize("mode", MODES)
def test_staggered_dkdv_start_is_exact(mode):
    """One-pass dK/dV programs start their query runs and partial lists at their own kv tile's offset and wrap around
    (the dQ atomics spread out): long runs, several kv tiles per run, per-sample lengths (partial lists)."""
    from zorro_kernels.backends.triton._plan import tile_plan

    mask = ZorroMask.zorro(audio=37, video=90, fusion=5, lengths=torch.tensor([[37, 90, 5], [20, 61, 5]]))
    plan = tile_plan(mask, 16, 16, "q", "cpu")
    assert max(int((plan.runs[..., 1] - plan.runs[..., 0]).max()), 0) >= 3  # a run the shift really rotates
    q, k, v = generate_qkv(mask, batch=2, heads=2, kv_heads=1, head_dim=16, device=DEV)
    with override_blocks((16, 16)), deterministic(mode == "deterministic"):
        check_against_oracle(triton_attn, q, k, v, mask)


def _range_plan_dense(plan, mask) -> torch.Tensor:
    """Expand a RangePlan to the bool ``(Bm, Nq, Nk)`` mask it makes the forward compute (query padding removed)."""
    nq, nk = mask.num_q, mask.num_kv
    q_len = mask.lengths if mask.lengths is not None else torch.tensor(mask.q_sizes)[None]
    seg = torch.repeat_interleave(torch.arange(len(mask.q_sizes)), torch.tensor(mask.q_sizes))
    pos = torch.cat([torch.arange(n) for n in mask.q_sizes]) if nq else torch.zeros(0, dtype=torch.long)
    rows = plan.row_pattern.numel()
    q_ok = (pos[None] < q_len[:, seg]).expand(rows, -1)
    out = torch.zeros(rows, nq, nk, dtype=torch.bool)
    cols = torch.arange(nk)
    for r in range(rows):
        p = int(plan.row_pattern[r])
        for lo, hi, g in zip(plan.tile_lo.tolist(), plan.tile_hi.tolist(), plan.tile_group.tolist()):
            seen = torch.zeros(nk, dtype=torch.bool)
            for ks, ke in plan.iv[int(plan.iv_ptr[p, g]) : int(plan.iv_ptr[p, g + 1])].tolist():
                seen[ks:ke] = True
            block = seen[None].expand(hi - lo, -1).clone()
            if mask.causal:
                block &= cols[None] <= torch.arange(lo, hi)[:, None] + (nk - nq)
            out[r, lo:hi] = block & q_ok[r, lo:hi, None]
    return out


def _range_families() -> dict:
    import random

    from benchmarks import layouts as bl
    from zorro_kernels.testing import named_masks, random_mask

    fams = dict(named_masks())
    small = dict(batch=2, heads=1, head_dim=16)
    fams.update(
        {
            "figure2": bl.figure2(20, 97, 4, **small).mask,
            "ragged": bl.ragged(20, 97, 4, **small).mask,
            "swin": bl.swin(2, 9, 3, 7, 4, **small).mask,
            "hip": bl.hip((10, 7), (13, 13, 5), 3, **small).mask,
            "packed": bl.packed((30, 17, 45, 8), **small).mask,
            "packed_causal": ZorroMask.packed([19, 26, 7], causal=True),
            "cross_lengths": ZorroMask.from_segments(
                [("a", 30), ("b", 21)],
                {"a": ["x"], "b": "*"},
                kv_segments=[("x", 13), ("y", 40)],
                kv_lengths=torch.tensor([[13, 40], [5, 0], [0, 17]]),
            ),
        }
    )
    rng = random.Random(7)
    fams.update({f"random{i}": random_mask(rng) for i in range(40)})
    return fams


def test_range_plan_is_exact_over_layout_families():
    """The segment-aligned plan covers exactly the dense oracle's pairs, per sample, for every layout family
    (Figure-2, ragged, Swin windows, HiP cross-attention, packing, causal packing, cross with key lengths, odd and
    empty segments, 40 random layouts): every query row in exactly one tile, no tile mixing groups or longer than
    BLOCK_M, no (B, Tq, Tk) tensor."""
    from zorro_kernels.backends.triton._plan import query_groups, range_plan

    for name, mask in _range_families().items():
        for bm, bn in ((16, 16), (32, 64)):
            plan = range_plan(mask, bm, bn, "cpu")
            dense = mask.to_dense()
            dense = dense[None] if dense.ndim == 2 else dense
            got = _range_plan_dense(plan, mask)
            assert torch.equal(got, dense.expand_as(got)), (name, bm, bn)
            lo, hi, grp = plan.tile_lo.long(), plan.tile_hi.long(), plan.tile_group.long()
            covered = torch.zeros(mask.num_q, dtype=torch.long)
            for a, b in zip(lo.tolist(), hi.tolist()):
                covered[a:b] += 1
            groups = query_groups(mask)
            empty = torch.zeros(mask.num_q, dtype=torch.long)
            assert torch.equal(covered, empty + 1) or mask.num_q == 0, name
            assert ((hi - lo) <= bm).all() and ((hi - lo) > 0).all(), name
            for a, b, g in zip(lo.tolist(), hi.tolist(), grp.tolist()):
                assert groups[g][0] <= a and b <= groups[g][1], (name, a, b, groups[g])
            assert all(t.dim() <= 2 for t in plan[4:11]), name
            assert sorted(plan.order.tolist()) == list(range(plan.row_pattern.numel() * plan.num_tiles)), name


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tile_plan_forward_against_oracle(case):
    """The uniform tile plan's forward (still used for layouts of tiny query groups) stays exact."""
    from zorro_kernels.backends.triton._config import override_plan

    _, build, (b, h, hkv, d), blocks = case
    mask = build()
    q, k, v = generate_qkv(mask, batch=b, heads=h, kv_heads=hkv, head_dim=d, device=DEV)
    with override_blocks(blocks), override_plan("tiles"):
        check_against_oracle(triton_attn, q, k, v, mask, grad=False)


def test_program_order_is_heaviest_first():
    """Each plan's program order is a permutation of its entries, estimated cost non-increasing, per-sample plans
    ordered over (sample, tile) together; the kernels read their tile through it (the oracle cases cover results)."""
    from zorro_kernels.backends.triton._plan import PARTIAL_COST, tile_plan

    for mask in (ZorroMask.zorro(audio=70, video=60, fusion=2), zorro_ragged()):
        for direction in ("kv", "q"):
            plan = tile_plan(mask, 16, 16, direction, "cpu")
            full = (plan.runs[..., 1] - plan.runs[..., 0]).sum(-1).reshape(-1).double()
            cost = (full + PARTIAL_COST * plan.part_num.reshape(-1)).tolist()
            order = plan.order.tolist()
            assert sorted(order) == list(range(plan.run_num.numel()))
            got = [cost[e] for e in order]
            assert got == sorted(got, reverse=True) and got[0] > got[-1]


@pytest.mark.parametrize("mode", MODES)
def test_backward_mode_follows_torch_determinism(monkeypatch, mode):
    """Deterministic algorithms off: one pass (dK/dV kernel with atomic dQ, no dQ kernel); on: the atomic-free
    kernels."""
    from zorro_kernels.backends.triton import _bwd

    launched = []
    real = _bwd.launch

    def record(kernel, grid, args, constexprs, cfg, bucket=(), restore=()):
        launched.append(
            (kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, constexprs.get("ONE_PASS"), restore)
        )
        real(kernel, grid, args, constexprs, cfg, bucket, restore)

    monkeypatch.setattr(_bwd, "launch", record)
    mask = ZorroMask.zorro(audio=9, video=14, fusion=3)
    q, k, v = generate_qkv(mask, batch=1, heads=1, kv_heads=1, head_dim=16, device=DEV)
    with override_blocks((16, 16)), deterministic(mode == "deterministic"):
        check_against_oracle(triton_attn, q, k, v, mask)
    if mode == "one_pass":
        assert launched == [("_bwd_preprocess", None, ()), ("_attn_bwd_dkdv", True, ("DQ_ACC",))]
    else:
        assert launched == [("_bwd_preprocess", None, ()), ("_attn_bwd_dkdv", False, ()), ("_attn_bwd_dq", None, ())]


def test_autotune_keys_shape_buckets_and_never_tunes_while_capturing(monkeypatch):
    """Autotuning is per shape bucket; while a graph is captured (or dynamo traces) a launch never tunes: it reuses
    the bucket's earlier choice, else the table's config."""
    from types import SimpleNamespace

    from zorro_kernels.backends.triton import _launch
    from zorro_kernels.backends.triton._config import KernelConfig

    calls, tuners, forbidden = [], {}, [True]

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kw: calls.append((kw["num_warps"], kw["num_stages"]))

    class Tuner:
        best_config = SimpleNamespace(num_warps=8, num_stages=2)

        def __getitem__(self, grid):
            return lambda **kw: calls.append("tuned")

    monkeypatch.setattr(_launch, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_launch, "tuning_forbidden", lambda: forbidden[0])
    monkeypatch.setattr(
        _launch, "_tuner", lambda kernel, cfg, bucket, key, restore=(): tuners.setdefault(bucket, Tuner())
    )
    cfg, kernel = KernelConfig(64, 64, 4, 3, ((8, 2),)), Kernel()
    small, big = _launch.shape_bucket(1000, 1000, 40), _launch.shape_bucket(16000, 16000, 40)
    assert small == _launch.shape_bucket(1024, 513, 64) != big
    _launch.launch(kernel, (1,), {}, {"X": 1}, cfg, small)  # capturing, nothing tuned yet: the table's config
    forbidden[0] = False
    _launch.launch(kernel, (1,), {}, {"X": 1}, cfg, small)  # tunes this bucket
    forbidden[0] = True
    _launch.launch(kernel, (1,), {}, {"X": 1}, cfg, small)  # capturing again: the bucket's choice
    _launch.launch(kernel, (1,), {}, {"X": 1}, cfg, big)  # another bucket, never tuned: the table's
    assert calls == [(4, 3), "tuned", (8, 2), (4, 3)] and list(tuners) == [small]


def _run(q, k, v, mask, d_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = zorro_attention(q, k, v, mask, backend="triton")
    out.backward(d_out)
    return out.detach(), q.grad, k.grad, v.grad


def test_bitwise_rerun():
    mask = zorro_ragged()
    q, k, v = generate_qkv(mask, batch=2, head_dim=16, dtype=torch.float16, device=DEV)
    d_out = torch.randn_like(q)
    with override_blocks((16, 16)), deterministic():
        first, second = _run(q, k, v, mask, d_out), _run(q, k, v, mask, d_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_nan_poison_does_not_leak():
    """NaN past the valid ranges (rows beyond N, head-dim padding, ragged padding tokens) must not reach any output:
    the poisoned run is bitwise equal to a clean run, whose accuracy the oracle tests cover."""
    mask = zorro_ragged()
    b, h, n, d = 2, 2, mask.num_q, 24
    clean = generate_qkv(num_q=n, batch=b, heads=h, kv_heads=h, head_dim=d, device=DEV)
    q_pos = torch.cat([torch.arange(s) for s in mask.q_sizes])
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(mask.q_sizes))
    padding = (q_pos[None] >= mask.lengths[:, seg]).to(DEV)  # (B, N) ragged padding tokens
    assert padding.any()
    poisoned = []
    for t in clean:
        big = torch.full((b, h, n + 7, d + 8), float("nan"), device=DEV)
        view = big[:, :, 3 : 3 + n, :d]  # NaN before, after and beside the view
        view.copy_(t.masked_fill(padding[:, None, :, None], float("nan")))
        poisoned.append(view)
    d_out = torch.randn(b, h, n, d, device=DEV)
    with override_blocks((16, 16)), deterministic():  # bitwise comparison: no atomics
        ref = _run(*(t.masked_fill(padding[:, None, :, None], 0.0) for t in clean), mask, d_out)
        got = _run(*poisoned, mask, d_out)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), f"{name}: NaN leaked into {int((~torch.isfinite(a)).sum())} values"
        assert torch.equal(a, r), f"{name}: poisoned run differs from the clean run"


# Layouts whose segment boundaries are not tile multiples (partial tiles mix rows that may and may not see a key):
# the repro at 32 x 32 tiles; N = 47 at 16 x 16 (the last tile one token short of full: 47 % 16 == 15);
# causal packing (the poison sits in the future of rows on the diagonal tiles). (id, mask, blocks, poisoned tokens)
_ISOLATION = [
    ("zorro_70_60_2", lambda: ZorroMask.zorro(audio=70, video=60, fusion=2), (32, 32), slice(70, 130)),
    ("last_tile_short", lambda: ZorroMask.zorro(audio=21, video=24, fusion=2), (16, 16), slice(21, 45)),
    ("packed_causal", lambda: ZorroMask.packed([19, 26], causal=True), (16, 16), slice(30, 45)),
]
_POISONS = [
    pytest.param(case, side, value, "one_pass", id=f"{case[0]}-{side}-{name}")
    for case in _ISOLATION
    for side in ("kv", "q_dout")
    for name, value in (("nan", float("nan")), ("inf", float("inf")))
    if name == "nan" or case is _ISOLATION[0]
]
_POISONS += [
    pytest.param(_ISOLATION[0], side, float("nan"), "deterministic", id=f"{_ISOLATION[0][0]}-{side}-nan-det")
    for side in ("kv", "q_dout")
]


@pytest.mark.parametrize("case, side, value, mode", _POISONS)
def test_poison_is_isolated(case, side, value, mode):
    """Masked means never read: NaN/Inf in tokens a row may not attend never reaches that row's output or dq, nor
    the dk/dv of keys attended only by rows that do not touch the poison. ``side="kv"`` poisons the keys and values
    of one segment; ``"q_dout"`` the queries and output gradients of its rows (they enter dK/dV's sums over rows).
    Everything the poison may not reach must be bitwise equal to a clean run."""
    _, build, blocks, poisoned = case
    mask = build()
    b, h, n, d = 1, 2, mask.num_q, 16
    q, k, v = generate_qkv(num_q=n, batch=b, heads=h, kv_heads=h, head_dim=d, device=DEV)
    d_out = torch.randn_like(q)
    dense = mask.to_dense().reshape(-1, n, mask.num_kv)[0].to(DEV)  # (Nq, Nk)
    hit = torch.zeros(n, dtype=torch.bool, device=DEV)
    hit[poisoned] = True
    if side == "kv":
        bad_rows = (dense & hit[None, :]).any(1)  # rows attending a poisoned key
        bad_keys = hit | (dense & bad_rows[:, None]).any(0)
        args = (q, k.masked_fill(hit[:, None], value), v.masked_fill(hit[:, None], value), d_out)
    else:
        bad_rows = hit
        bad_keys = (dense & hit[:, None]).any(0)  # keys a poisoned row attends
        args = (q.masked_fill(hit[:, None], value), k, v, d_out.masked_fill(hit[:, None], value))
    assert (~bad_rows).any() and (side == "kv" or (~bad_keys).any())  # (with kv poison fusion rows reach every key)
    with override_blocks(blocks), deterministic(mode == "deterministic"):
        ref = _run(q, k, v, mask, d_out)
        got = _run(*args[:3], mask, args[3])
    for name, a, r, bad in zip(("out", "dq", "dk", "dv"), got, ref, (bad_rows, bad_rows, bad_keys, bad_keys)):
        a, r = a[:, :, ~bad], r[:, :, ~bad]
        assert torch.isfinite(a).all(), f"{name}: poison leaked into {int((~torch.isfinite(a)).sum())} values"
        if mode == "deterministic" or INTERPRET:
            assert torch.equal(a, r), f"{name}: differs from the clean run where the poison may not reach"
        else:  # atomic dQ: the summation order may differ between two runs on a GPU
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    if side == "kv":  # rows that do attend the poison are not silently finite
        assert not torch.isfinite(got[0][:, :, bad_rows]).all(1).any()


def test_non_contiguous_inputs():
    mask = ZorroMask.zorro(audio=12, video=21, fusion=3)
    n = mask.num_q
    # (B, N, H, D) storage viewed as (B, H, N, D), and a q whose head dim is strided
    q = torch.randn(2, n, 2, 32, device=DEV)[..., ::2].transpose(1, 2)
    k, v = (torch.randn(2, n, 2, 16, device=DEV).transpose(1, 2) for _ in range(2))
    assert q.stride(-1) == 2 and not k.is_contiguous()
    with override_blocks((16, 16)):
        check_against_oracle(triton_attn, q, k, v, mask)


def test_refusals_name_the_numbers():
    mask = ZorroMask.zorro(audio=4, video=4)
    reasons = BACKENDS["triton"].not_supported_reasons(
        *generate_qkv(num_q=8, batch=1, heads=1, kv_heads=1, head_dim=320), mask
    )
    assert any("D=320" in r and "256" in r for r in reasons), reasons
    reasons = BACKENDS["triton"].not_supported_reasons(
        *generate_qkv(num_q=8, batch=1, heads=1, kv_heads=1, head_dim=16, dtype=torch.float64), mask
    )
    assert any("float64" in r for r in reasons), reasons
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        zorro_attention(
            *generate_qkv(num_q=8, batch=1, heads=1, kv_heads=1, head_dim=16, dtype=torch.float64),
            mask,
            backend="triton",
        )


def test_import_and_refusal_without_triton():
    """Without Triton, zorro_kernels still imports, "auto" still runs, and a forced "triton" says why it cannot."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\nfrom zorro_kernels import ZorroMask, zorro_attention\n"
        "m = ZorroMask.zorro(audio=4, video=4); q = torch.randn(1, 1, 8, 16)\n"
        "assert zorro_attention(q, q, q, m).shape == q.shape\n"
        "try:\n    zorro_attention(q, q, q, m, backend='triton')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "triton is not installed" in run.stdout, run.stdout


def test_layout_sweep_never_changes_constexprs(monkeypatch):
    """Segment sizes, lengths and N are runtime data: over 50 layouts the kernels see one set of compile-time
    constants per kernel (the real compile count on a GPU is measured by benchmarks/gpu_bench.py and
    benchmarks/triton_compile_check.py --layouts)."""
    from zorro_kernels.backends.triton import _bwd, _fwd

    seen = set()

    def record(kernel, grid, args, constexprs, cfg, bucket=(), restore=()):
        seen.add((getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(sorted(constexprs.items())), cfg))

    monkeypatch.setattr(_fwd, "launch", record)
    monkeypatch.setattr(_bwd, "launch", record)
    gen = torch.Generator().manual_seed(1)
    for i in range(50):
        mask = random_layout(gen, 40, lengths=i % 2 == 1)
        q, k, v = generate_qkv(mask, batch=2, heads=2, head_dim=16, dtype=torch.float16)
        out, lse = triton_backend.forward(q, k, v, mask, 0.25)
        triton_backend.backward(out, q, k, v, out, lse, mask, 0.25)
    names = [name for name, _, _ in seen]
    # one variant per kernel: the forward over either plan, preprocess, dk/dv (one-pass backward: no dq kernel)
    assert len(names) == len(set(names)) and {"_attn_fwd_ranges", "_bwd_preprocess", "_attn_bwd_dkdv"} <= set(names), (
        sorted(seen)
    )


# ------------------------------------------------------------------------------------------ torch.compile
class _Block(torch.nn.Module):
    def __init__(self, mask, d, backend):
        super().__init__()
        self.mask, self.backend = mask, backend
        self.proj = torch.nn.Linear(d, 3 * d)

    def forward(self, x):  # x: (B, H, N, D)
        q, k, v = self.proj(x).chunk(3, dim=-1)
        return zorro_attention(q, k, v, self.mask, backend=self.backend) * 2.0


def _compile_matches_eager(backend, mask, blocks=(16, 16)):
    torch._dynamo.reset()
    model = _Block(mask, 16, backend).to(DEV)
    x = torch.randn(2, 2, mask.num_q, 16, device=DEV)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with override_blocks(blocks):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, comp = model(x1), compiled(x2)
        g = torch.randn_like(eager)
        eager.backward(g)
        comp.backward(g)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.proj.weight.grad, model.proj.weight.grad, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_triton():
    """torch.compile(fullgraph=True) of a module calling zorro_attention: one opaque custom op each way."""
    _compile_matches_eager("triton", zorro_ragged())


def test_compile_fullgraph_segments_through_op():
    """The CPU path under compile goes through the same custom ops (impl='segments'): no graph break."""
    mask = ZorroMask.zorro(audio=10, video=14, fusion=3, lengths=torch.tensor([[10, 14, 3], [5, 9, 2]]))
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in generate_qkv(mask, batch=2, heads=2, head_dim=16))
    fn = torch.compile(
        lambda a, b, c: _ops.attention(a, b, c, mask, 0.25, "segments"), fullgraph=True, backend="aot_eager"
    )
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = zorro_attention(q, k, v, mask, scale=0.25, backend="segments")
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)


def test_compile_fullgraph_auto_cpu():
    """backend="auto" on CPU under compile: zorro_attention routes the traced call through the custom ops
    (``_ops._traced``), so fullgraph=True compiles without a graph break and matches eager."""
    _compile_matches_eager("auto", ZorroMask.zorro(audio=10, video=14, fusion=3))


# ------------------------------------------------------------------------------------------ full tier
@pytest.mark.full
@pytest.mark.parametrize("d", [8, 16, 40, 80, 96, 256])
def test_head_dims_full(d):
    mask = ZorroMask.zorro(audio=11, video=17, fusion=4, lengths=torch.tensor([[11, 17, 4], [3, 9, 1]]))
    q, k, v = generate_qkv(mask, batch=2, heads=2, kv_heads=1, head_dim=d, dtype=torch.float16, device=DEV)
    with override_blocks((16, 16)):
        check_against_oracle(triton_attn, q, k, v, mask)


@pytest.mark.full
@pytest.mark.parametrize("seed", range(12))
def test_random_layouts_full(seed):
    gen = torch.Generator().manual_seed(seed)
    n_seg = int(torch.randint(1, 6, (1,), generator=gen))
    sizes = torch.randint(0, 30, (n_seg,), generator=gen).tolist()
    sizes[-1] += 1
    cross = seed % 3 == 0
    kv_sizes = torch.randint(1, 30, (n_seg,), generator=gen).tolist() if cross else sizes
    allow = torch.rand(n_seg, n_seg, generator=gen) < 0.6
    lengths = (torch.rand(2, n_seg, generator=gen) * (torch.tensor(sizes) + 1)).long() if seed % 2 else None
    kv_lengths = (
        (torch.rand(2, n_seg, generator=gen) * (torch.tensor(kv_sizes) + 1)).long() if cross and seed % 2 else None
    )
    mask = ZorroMask.from_allow(
        [(f"s{j}", s) for j, s in enumerate(sizes)],
        allow,
        kv_segments=[(f"k{j}", s) for j, s in enumerate(kv_sizes)] if cross else None,
        lengths=lengths,
        kv_lengths=kv_lengths,
        causal=seed % 4 == 1,
    )
    dtype = (torch.float32, torch.float16)[seed % 2]
    q, k, v = generate_qkv(mask, batch=2, heads=2, kv_heads=(1, 2)[seed % 2], head_dim=16, dtype=dtype, device=DEV)
    with override_blocks(((16, 16), (32, 16), (16, 32))[seed % 3]):
        check_against_oracle(triton_attn, q, k, v, mask)


@pytest.mark.full
def test_kernels_compile_for_sm90():
    """Real Triton compilation (not the interpreter) of every fp16 D=64 kernel variant for sm_90, without a GPU."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(script), "--dims", "64", "--dtypes", "float16", "--no-fallback"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.full
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    mask = zorro_ragged()
    model = _Block(mask, 16, "triton")
    x = torch.randn(2, 2, mask.num_q, 16, requires_grad=True)
    with override_blocks((16, 16)):
        out = torch.compile(model, fullgraph=True)(x)
        out.sum().backward()
        ref = model(x.detach())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ GPU tier
GPU_DTYPES = [torch.float16, torch.bfloat16]


def _fig2(b, lengths=False):
    lens = torch.tensor([[320, 1568, 8], [200, 1000, 8], [320, 0, 8], [17, 1568, 3]])[:b] if lengths else None
    return ZorroMask.zorro(audio=320, video=1568, fusion=8, lengths=lens)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_figure2(dtype, d):
    mask = _fig2(2, lengths=True)
    q, k, v = generate_qkv(mask, batch=2, kv_heads=4, head_dim=d, dtype=dtype, device="cuda")
    check_against_oracle(triton_attn, q, k, v, mask)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp16", "bf16"])
def test_gpu_cross_gqa_causal_odd(dtype):
    cross = ZorroMask.from_segments(
        [("a", 97), ("b", 1000)], {"a": ["x"], "b": "*"}, kv_segments=[("x", 113), ("y", 1025)]
    )
    q, k, v = generate_qkv(cross, batch=1, head_dim=64, dtype=dtype, device="cuda")
    check_against_oracle(triton_attn, q, k, v, cross)
    causal = ZorroMask.packed([1023, 1, 600], causal=True)
    q, k, v = generate_qkv(causal, batch=2, kv_heads=1, head_dim=64, dtype=dtype, device="cuda")
    check_against_oracle(triton_attn, q, k, v, causal)


@gpu
@pytest.mark.parametrize("d", [16, 80, 256])
def test_gpu_head_dims(d):
    mask = _fig2(1)
    q, k, v = generate_qkv(mask, batch=1, heads=2, head_dim=d, dtype=torch.bfloat16, device="cuda")
    check_against_oracle(triton_attn, q, k, v, mask)


@gpu
def test_gpu_fp32():
    mask = _fig2(2, lengths=True)
    q, k, v = generate_qkv(mask, batch=2, heads=2, head_dim=64, device="cuda")
    check_against_oracle(triton_attn, q, k, v, mask)


@gpu
def test_gpu_bitwise_rerun_and_nan_poison():
    mask = _fig2(4, lengths=True)
    n = mask.num_q
    q, k, v = generate_qkv(num_q=n, batch=4, head_dim=64, dtype=torch.bfloat16, device="cuda")
    d_out = torch.randn_like(q)
    with deterministic():
        first, second = _run(q, k, v, mask, d_out), _run(q, k, v, mask, d_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(mask.q_sizes))
    pos = torch.cat([torch.arange(s) for s in mask.q_sizes])
    pad = (pos[None] >= mask.lengths[:, seg]).cuda()[:, None, :, None]
    poisoned = []
    for t in (q, k, v):
        big = torch.full((t.shape[0], t.shape[1], n + 64, 64 + 16), float("nan"), dtype=t.dtype, device="cuda")
        view = big[:, :, 32 : 32 + n, :64]
        view.copy_(t.masked_fill(pad, float("nan")))
        poisoned.append(view)
    with deterministic():
        clean = _run(*(t.masked_fill(pad, 0.0) for t in (q, k, v)), mask, d_out)
        got = _run(*poisoned, mask, d_out)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, clean):
        assert torch.isfinite(a).all(), f"{name}: NaN leaked"
        assert torch.equal(a, r), f"{name}: poisoned run differs from the clean run"


@gpu
def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    mask = _fig2(2, lengths=True)
    model = _Block(mask, 64, "auto").cuda().half()
    x = torch.randn(2, 4, mask.num_q, 64, device="cuda", dtype=torch.half, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    out.float().sum().backward()
    ref = model(x.detach())
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)  # compiled projections may round differently


def _gemma3_like(text=((100, 300, 200, 150, 274), (20, 500, 64, 400, 40)), image=256) -> ZorroMask:
    """Causal text runs around 4 bidirectional images, the images at other positions in each sample (the layout of
    benchmarks/cpu_costs.py's gemma3 row: 1024 text + 4 x 256 image tokens per sample with the defaults)."""
    names = [n for i in range(5) for n in ([f"t{i}", f"img{i}"] if i < 4 else [f"t{i}"])]
    sizes = [[s for i in range(5) for s in ([t[i], image] if i < 4 else [t[i]])] for t in text]
    return ZorroMask.causal_with_blocks(
        list(zip(names, sizes[0])), ["img*"], sample_sizes=torch.tensor(sizes, dtype=torch.int64)
    )


def _check_new_layouts(device, dtypes, big=True):
    """Issue 20's layouts on the Triton kernels: rule cells (causal per segment pair, bottom-right), per-sample segment
    sizes, packed causal cross-attention with unequal counts, against the fp64 oracle, forward and gradients."""
    from zorro_kernels.testing import cell_masks, per_sample_masks

    masks = {**cell_masks(), **{f"per_sample_{k}": m for k, m in per_sample_masks().items()}}
    masks["gemma3_like"] = _gemma3_like() if big else _gemma3_like(((3, 9, 1, 0, 7), (1, 0, 12, 5, 2)), 5)
    for name, mask in masks.items():
        for dtype in dtypes:
            q, k, v = generate_qkv(mask, heads=4, kv_heads=2, head_dim=64, dtype=dtype, device=device)
            try:
                check_against_oracle(triton_attn, q, k, v, mask)
            except AssertionError as e:
                raise AssertionError(f"{name} {dtype}: {e}") from None


@gpu
def test_gpu_cells_and_per_sample_sizes():
    # in the default tier these run in the interpreter on small tiles (tests/test_cells.py, test_sample_sizes.py);
    # here the compiled kernels at their own tile sizes, half types included, and the Gemma-3-like row at full size
    _check_new_layouts("cuda", GPU_DTYPES + [torch.float32])
