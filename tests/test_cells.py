"""Rule cells none / full / causal (issue 20 item 1): causal per segment pair, aligned bottom-right inside each pair's
valid tokens. The API, the segment arithmetic (attended, tile maps) against to_dense, every CPU backend against the
fp64 oracle (forward and all gradients), NaN isolation, a seeded fuzzer, and the Triton backend's refusal."""

from __future__ import annotations

import random

import pytest
import torch

from zorro_kernels import ZorroMask, _ops, zorro_attention
from zorro_kernels.backends import BACKENDS
from zorro_kernels.testing import ODD_SIZES, cell_masks, check_against_oracle, random_cell_mask
from zorro_kernels.tilemap import AllowRuns

from .helpers import (  # noqa: F401 (small_triton_tiles: a fixture)
    TRITON,
    attn_fn,
    check_tile_map,
    deterministic,
    qkv_for,
    small_triton_tiles,
)
from .isolation import check_isolation, poison_everything_unseen

CPU_BACKENDS = ["reference", "segments", "dense"]
# the reference backend is the oracle's own code, and slow on layouts where every row sees its own key set (a causal
# cell): it runs in the full tier
TIERED = ["segments", "dense", pytest.param("reference", marks=pytest.mark.full)]
SMALL_SIZES = (0, 1, 2, 3, 5, 8, 13, 17)


def _by_hand(q_sizes, kv_sizes, kinds, ql=None, kl=None) -> torch.Tensor:
    """The definition, cell by cell: ``kinds[a][c]`` 0/1/2, valid lengths ``ql``/``kl`` (default the sizes)."""
    ql, kl = ql or q_sizes, kl or kv_sizes
    out = torch.zeros(sum(q_sizes), sum(kv_sizes), dtype=torch.bool)
    qs = 0
    for a, qn in enumerate(q_sizes):
        ks = 0
        for c, kn in enumerate(kv_sizes):
            i, j = torch.arange(ql[a])[:, None], torch.arange(kl[c])[None]
            if kinds[a][c] == 1:
                out[qs : qs + ql[a], ks : ks + kl[c]] = True
            elif kinds[a][c] == 2:
                out[qs : qs + ql[a], ks : ks + kl[c]] = j <= i + (kl[c] - ql[a])
            ks += kn
        qs += qn
    return out


# ------------------------------------------------------------------------------------------------ the API
def test_rules_dict_gives_cell_kinds():
    m = ZorroMask.from_segments(
        [("t0", 4), ("img", 3), ("t1", 2)],
        {"t0": {"t0": "causal"}, "img": ["t0", "img"], "t1": {"t0": "full", "img": "full", "t1": "causal"}},
    )
    assert m.cell_kinds.tolist() == [[2, 0, 0], [1, 1, 0], [1, 1, 2]]
    assert m.causal_rules == {"t0": ["t0"], "t1": ["t1"]}
    assert m.rules == {"t0": ["t0"], "img": ["t0", "img"], "t1": ["t0", "img", "t1"]}
    assert torch.equal(m.to_dense(), _by_hand([4, 3, 2], [4, 3, 2], m.cell_kinds.tolist()))
    assert not m.causal  # cells, not the row-wide rule


def test_causal_with_blocks_is_gemma3s_mask():
    segs = [("t0", 5), ("img0", 4), ("t1", 3), ("img1", 2), ("t2", 1)]
    m = ZorroMask.causal_with_blocks(segs, ["img*"])
    n = 15
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    image = torch.tensor([0] * 5 + [1] * 4 + [0] * 3 + [2] * 2 + [0])
    # transformers' composition: causal OR (same image block)
    want = (j <= i) | ((image[:, None] == image[None, :]) & (image[:, None] > 0))
    assert torch.equal(m.to_dense(), want)
    assert ZorroMask.from_segments(segs, {"t0": {"t0": "causal"}}).key != m.key
    # the table's runs: one full run and at most one causal cell per segment (linear in segments)
    assert len(m._runs.row) <= 2 * len(segs)


def test_prefix_lm_is_paligemmas_mask():
    m = ZorroMask.prefix_lm(4, 3)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None]
    assert torch.equal(m.to_dense(), (j < 4) | (j <= i))
    ragged = ZorroMask.prefix_lm(4, 3, lengths=torch.tensor([[2, 3]]))
    want = _by_hand([4, 3], [4, 3], [[1, 0], [1, 2]], [2, 3], [2, 3])
    assert torch.equal(ragged.to_dense()[0], want)


def test_causal_cell_aligns_bottom_right_to_valid_lengths():
    # 2 valid queries, 4 valid keys of a (5 x 6) cell: row 0 sees keys 0-2, row 1 keys 0-3
    m = ZorroMask.from_segments(
        [("q", 5)],
        {"q": {"k": "causal"}},
        kv_segments=[("k", 6)],
        lengths=torch.tensor([[2], [5]]),
        kv_lengths=torch.tensor([[4], [6]]),
    )
    d = m.to_dense()
    assert d[0].sum(1).tolist() == [3, 4, 0, 0, 0]
    assert d[1].sum(1).tolist() == [2, 3, 4, 5, 6]


def test_cells_and_the_row_wide_rules_combine():
    m = cell_masks()["cells_and_causal"]
    i, j = torch.arange(19)[:, None], torch.arange(19)[None]
    assert torch.equal(m.to_dense(), _by_hand([12, 7], [12, 7], [[2, 0], [1, 2]]) & (j <= i))
    w = cell_masks()["cells_and_window"]
    i, j = torch.arange(45)[:, None], torch.arange(45)[None]
    base = ZorroMask.causal_with_blocks([("t0", 9), ("img", 16), ("t1", 20)], ["img"])
    assert torch.equal(w.to_dense(), base.to_dense() & (j >= i - 6))


def test_errors_name_the_cell():
    clash = r"rules\['\*'\]\['a'\] makes cell \('a', 'a'\) full, but another rule made it causal"
    with pytest.raises(ValueError, match=clash):
        ZorroMask.from_segments([("a", 2)], {"a": {"a": "causal"}, "*": ["a"]})
    with pytest.raises(ValueError, match=r"rules\['a'\]\['a'\] must be 'full' or 'causal', got 'half'"):
        ZorroMask.from_segments([("a", 2)], {"a": {"a": "half"}})
    with pytest.raises(ValueError, match=r"causal_cells\[0, 1\] is True but allow\[0, 1\] is False"):
        ZorroMask([("a", 2), ("b", 1)], torch.tensor([[True, False], [True, True]]), causal_cells=torch.eye(2) < 2)
    with pytest.raises(ValueError, match=r"causal_cells must have the shape of allow, \(1, 1\), got \(2, 2\)"):
        ZorroMask([("a", 2)], torch.ones(1, 1, dtype=torch.bool), causal_cells=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="blocks names unknown segment 'image'"):
        ZorroMask.causal_with_blocks([("t", 3)], ["image"])


def test_cells_are_part_of_the_value():
    full = ZorroMask.from_segments([("a", 5)], {"a": "*"})
    cz = ZorroMask.from_segments([("a", 5)], {"a": {"a": "causal"}})
    row = ZorroMask.from_segments([("a", 5)], {"a": "*"}, causal=True)
    assert len({full.key, cz.key, row.key}) == 3
    # the same table given as a rules dict, as tables and as runs: one key
    again = ZorroMask([("x", 5)], torch.ones(1, 1, dtype=torch.bool), causal_cells=torch.ones(1, 1, dtype=torch.bool))
    runs = ZorroMask([("y", 5)], AllowRuns.diagonal(1, causal=True))
    assert cz.key == again.key == runs.key
    # handed-out tables are copies; the mask cannot be edited
    cz.causal_cells[0, 0] = False
    assert cz.has_causal_cells and cz.causal_cells.all()
    with pytest.raises(AttributeError, match="immutable"):
        cz._runs = full._runs
    # with_lengths keeps the cells
    assert cz.with_lengths(torch.tensor([[3]])).causal_rules == {"a": ["a"]}


def test_custom_op_description_keeps_the_cells():
    m = cell_masks()["blocks_ragged"]
    desc = _ops.describe(m)
    back = _ops._mask_from(*desc)
    assert back.key == m.key and torch.equal(back.to_dense(), m.to_dense())


def test_repr_and_draw_show_causal_cells():
    m = ZorroMask.causal_with_blocks([("t0", 64), ("img", 64), ("t1", 64)], ["img"])
    r = repr(m)
    assert "causal cells={t0: [t0], t1: [t1]}" in r
    rows = m.draw().splitlines()[1:]
    assert rows[0] == "+..........." and rows[4] == "########...."  # the image block's first tile row
    assert rows[8] == "########+..."


@pytest.mark.parametrize("name", sorted(cell_masks()))
def test_attended_and_tile_maps_match_to_dense(name):
    m = cell_masks()[name]
    d = m.to_dense()
    assert m.attended().tolist() == (d[None] if d.ndim == 2 else d).sum((1, 2)).tolist()
    for bm, bn in ((16, 16), (16, 32), (64, 16)):
        check_tile_map(m, bm, bn)


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("backend", TIERED)
@pytest.mark.parametrize("name", sorted(cell_masks()))
def test_against_oracle(backend, name):
    m = cell_masks()[name]
    dtype = torch.float32 if backend == "dense" else torch.float64
    q, k, v = qkv_for(m, dtype=dtype)
    check_against_oracle(attn_fn(backend), q, k, v, m)


@pytest.mark.parametrize("backend", TIERED)
@pytest.mark.parametrize("name", ["blocks_odd", "packed_unequal", "prefix_lm_ragged"])
def test_nan_isolation(backend, name):
    m = cell_masks()[name]
    q, k, v = qkv_for(m, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    rows = torch.rand(q.shape[0], m.num_q, generator=gen) < 0.3
    check_isolation(attn_fn(backend), q, k, v, m, *poison_everything_unseen(m, q.shape[0], rows))


@pytest.mark.parametrize("backend", ["segments", "dense"])
def test_a_key_a_causal_cell_hides_never_reaches_the_row(backend):
    # the last key of each document is hidden from the document's first query by the cell's diagonal
    m = ZorroMask.packed([3, 2], kv_seq_lens=[5, 4], causal=True)
    q, k, v = (torch.randn(1, 2, n, 8) for n in (5, 9, 9))
    k[:, :, [4, 8]] = float("nan")
    out = zorro_attention(q, k, v, m, backend=backend)
    assert torch.isnan(out).any(-1).any(1)[0].nonzero().flatten().tolist() == [2, 4]


def test_dead_rows_of_a_causal_cell_are_zero_with_zero_grads():
    # 6 queries and 2 keys: queries 0-3 see nothing (bottom-right), the segments backend must not write them
    m = ZorroMask.from_segments([("q", 6)], {"q": {"k": "causal"}}, kv_segments=[("k", 2)])
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, requires_grad=True) for n in (6, 2, 2))
    out = zorro_attention(q, k, v, m, backend="segments")
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert (out[:, :, :4] == 0).all() and (dq[:, :, :4] == 0).all()
    assert (out[:, :, 4:] != 0).all()


TRITON_CASES = ["blocks_ragged", "packed_unequal", "cells_and_window", "cells_and_causal", "packed_unequal_ragged"]


@pytest.mark.parametrize("det", [True, False], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("name", TRITON_CASES)
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.usefixtures("small_triton_tiles")
def test_triton_against_oracle(backend, name, det):
    # the kernels' element mask: a second bit table for causal cells and per-token end offsets (e_k <= e_q)
    m = cell_masks()[name]
    q, k, v = qkv_for(m, 1, 2, d=16, dtype=torch.float32)
    with deterministic(det):
        check_against_oracle(attn_fn(backend), q, k, v, m)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.usefixtures("small_triton_tiles")
def test_triton_nan_isolation(backend):
    m = cell_masks()["packed_unequal"]
    q, k, v = qkv_for(m, 1, 2, d=16, dtype=torch.float32)
    rows = torch.rand(q.shape[0], m.num_q, generator=torch.Generator().manual_seed(4)) < 0.3
    check_isolation(attn_fn(backend), q, k, v, m, *poison_everything_unseen(m, q.shape[0], rows))


def test_triton_takes_causal_cells_on_the_tile_plan():
    from zorro_kernels.backends.triton._config import choose_blocks, override_plan
    from zorro_kernels.backends.triton._plan import TilePlan, forward_plan

    m = cell_masks()["prefix_lm"]
    q, k, v = qkv_for(m, dtype=torch.float32)
    assert not any("cell" in r for r in BACKENDS["triton"].not_supported_reasons(q, k, v, m))
    with override_plan("ranges"):  # even when asked for, the interval walk knows no per-pair diagonal
        plan, _ = forward_plan(m, choose_blocks(8, torch.float32), "cpu")
    assert isinstance(plan, TilePlan)


def test_segments_plan_runs_square_cells_as_causal_calls():
    # packed documents with causal cells of equal counts: one bucketed causal call, no element masks
    m = ZorroMask.from_segments([("a", 8), ("b", 8), ("c", 8)], {n: {n: "causal"} for n in "abc"})
    from zorro_kernels.backends.segments import build_plan

    (pat,) = build_plan(m).patterns
    assert [(st.causal, st.blocks, st.mask is None) for st in pat.steps] == [(True, 3, True)]


# ------------------------------------------------------------------------------------------------ fuzzer
def _fuzz(seed: int, backends, sizes) -> None:
    rng = random.Random(seed)
    m = random_cell_mask(rng, sizes=sizes)
    d = m.to_dense()
    assert m.attended().tolist() == (d[None] if d.ndim == 2 else d).sum((1, 2)).tolist(), (seed, m)
    check_tile_map(m, 16, 16)
    hkv, g = rng.choice([(1, 1), (2, 1), (1, 3)])
    for backend in backends:
        dtype = torch.float32 if backend == "dense" else torch.float64
        q, k, v = qkv_for(m, hkv, g, dtype=dtype, seed=seed)
        check_against_oracle(attn_fn(backend), q, k, v, m)
        rows = torch.rand(q.shape[0], m.num_q, generator=torch.Generator().manual_seed(seed)) < 0.3
        check_isolation(
            attn_fn(backend), q.float(), k.float(), v.float(), m, *poison_everything_unseen(m, q.shape[0], rows)
        )


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_cells_fast(seed):
    _fuzz(seed, ["segments", "dense"], SMALL_SIZES)


@pytest.mark.full
@pytest.mark.parametrize("seed", range(12, 612))
def test_fuzz_cells_full(seed):
    _fuzz(seed, CPU_BACKENDS, ODD_SIZES)


# ------------------------------------------------------------------------------------------------ the plan's paths
def test_gemma_text_runs_as_prefix_plus_causal_calls():
    # a text segment after an image: the keys before it (every row sees them) and its causal square, two flash
    # calls merged by log-sum-exp; the image's rows, which see exactly those keys, join the plain call (one step);
    # no element masks anywhere in the plan
    from zorro_kernels.backends.segments import build_plan

    m = ZorroMask.causal_with_blocks([("t0", 40), ("img", 30), ("t1", 50)], ["img"])
    (pat,) = build_plan(m).patterns
    assert all(st.mask is None for st in pat.steps)
    assert len(pat.steps) == 2
    (t1,) = [st for st in pat.steps if st.q_ranges == ((40, 120),)]
    assert t1.causal and t1.prefix == 70 and t1.k_ranges == ((0, 120),)


@pytest.mark.parametrize("name", ["blocks_odd", "packed_unequal", "prefix_lm_ragged", "cells_and_window"])
def test_with_a_dense_bias(name):
    # a bias is read per step: causal and prefix steps are expanded into masked chunks (the selecting path)
    m = cell_masks()[name]
    q, k, v = qkv_for(m, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(q.shape[0], 1, m.num_q, m.num_kv, generator=gen, dtype=torch.float64)
    check_against_oracle(
        lambda q, k, v, mask, scale=None, bias=None: zorro_attention(
            q, k, v, mask, scale=scale, bias=bias, backend="segments"
        ),
        q,
        k,
        v,
        m,
        bias=bias,
    )


@pytest.mark.parametrize("name", ["blocks_odd", "packed_unequal", "prefix_lm_ragged"])
def test_sdpa_composition_path(name):
    # the plan through F.scaled_dot_product_attention under autograd (other devices, torch.func)
    from zorro_kernels.backends.segments import segment_attention_sdpa

    m = cell_masks()[name]
    q, k, v = qkv_for(m, dtype=torch.float64)
    check_against_oracle(
        lambda q, k, v, mask, scale=None: segment_attention_sdpa(q, k, v, mask, q.shape[-1] ** -0.5), q, k, v, m
    )


@pytest.mark.full
@pytest.mark.parametrize("seed", range(150))
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.usefixtures("small_triton_tiles")
def test_fuzz_cells_triton(backend, seed):
    m = random_cell_mask(random.Random(seed), sizes=SMALL_SIZES)
    q, k, v = qkv_for(m, 1, 2, d=16, dtype=torch.float32, seed=seed)
    with deterministic(seed % 2 == 0):
        check_against_oracle(attn_fn(backend), q, k, v, m)
    rows = torch.rand(q.shape[0], m.num_q, generator=torch.Generator().manual_seed(seed)) < 0.3
    check_isolation(attn_fn(backend), q, k, v, m, *poison_everything_unseen(m, q.shape[0], rows))


def test_mask_built_inside_a_fullgraph_trace():
    """transformers' mask interface builds ZorroMasks while torch.compile traces the model: building the rule table's
    runs must not branch on the table's values (dynamo refused `kinds.any()` under fullgraph)."""
    torch._dynamo.reset()

    def f(x):
        m = ZorroMask.from_segments([("a", 3), ("b", 5)], {"a": ["a"], "b": "*"})
        return zorro_attention(x, x, x, m, backend="reference")

    x = torch.randn(1, 2, 8, 16)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, f(x), rtol=0, atol=0)
