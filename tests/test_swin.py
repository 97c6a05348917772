"""Zorro-Swin layouts: shifted windows == Swin's cyclic shift + region mask; the block mask keeps windows local and
modality-pure; lengths mark the valid prefix of each window; per-modality patch merging."""

import itertools
import math

import pytest
import torch

from zorro_kernels import RelativePositionBias
from zorro_models.models.swin import PatchMerging, effective_window, swin_block_layout, window_order, window_partition


def swin_group_ids(grid, window, shift):
    """Independent oracle, the way Swin does it: roll the grid by -shift, cut regular windows, and inside the last
    window of each dimension separate the tokens that wrapped around (region slices [0, n-w), [n-w, n-s), [n-s, n)).
    Returns, per raster index, a hashable id; two tokens may attend each other iff their ids are equal."""
    ids = []
    for cell in itertools.product(*(range(n) for n in grid)):
        key = []
        for i, n, w, s in zip(cell, grid, window, shift):
            r = (i - s) % n  # position in the rolled grid
            region = 0 if r < n - w else (1 if r < n - s else 2)
            key.append((r // w, region if s else 0))
        ids.append(tuple(key))
    return ids


@pytest.mark.parametrize(
    "grid,window", [((8, 8), (4, 4)), ((4, 12), (2, 4)), ((4, 8, 8), (2, 4, 4)), ((6, 6, 6), (2, 3, 3))]
)
@pytest.mark.parametrize("shifted", [False, True])
def test_shifted_windows_equal_swin_cyclic_shift_regions(grid, window, shifted):
    win, shift = effective_window(grid, window, shifted)
    windows = window_partition(grid, win, shift)
    perm, sizes = window_order(grid, windows)
    mine = torch.empty(math.prod(grid), dtype=torch.int64)
    mine[perm] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ref = swin_group_ids(grid, win, shift)
    for i in range(len(ref)):
        for j in range(len(ref)):
            assert (mine[i] == mine[j]) == (ref[i] == ref[j]), (i, j)


def test_partition_is_an_exact_cover_with_equal_windows_consecutive():
    grid = (7, 10)
    win, shift = effective_window(grid, (4, 4), shifted=True)
    assert (win, shift) == ((4, 4), (2, 2))
    windows = window_partition(grid, win, shift)
    perm, sizes = window_order(grid, windows)
    assert sorted(perm.tolist()) == list(range(70))
    sizes_in_order = [math.prod(e - s for s, e in w) for w in windows]
    assert sizes_in_order == sorted(sizes_in_order) == sizes, "equal-size windows are consecutive"
    # a dimension not larger than the window is clipped and never shifted (Swin's rule)
    assert effective_window((3, 10), (4, 4), True) == ((3, 4), (0, 2))


def test_block_mask_is_window_local_and_pure():
    grids = {"audio": (4, 4), "video": (2, 4, 4)}
    layout = swin_block_layout(grids, {"audio": (2, 2), "video": (2, 2, 2)}, True, num_fusion=3)
    dense = layout.mask.to_dense()
    canon = dense[layout.inverse][:, layout.inverse]  # back to raster order: audio, video, fusion
    na, nv = 16, 32
    a_ids = swin_group_ids((4, 4), (2, 2), (1, 1))
    v_ids = swin_group_ids((2, 4, 4), (2, 2, 2), (0, 1, 1))
    ids = [("a",) + x for x in a_ids] + [("v",) + x for x in v_ids]
    for i in range(na + nv):
        for j in range(na + nv + 3):
            want = j < na + nv and ids[i] == ids[j]
            assert bool(canon[i, j]) == want, (i, j)
    assert canon[na + nv :].all(), "fusion rows see every token"


def test_block_mask_lengths_mark_valid_time_prefix():
    grids = {"audio": (6, 2), "video": None}
    valid_t = {"audio": torch.tensor([6, 3, 0])}
    layout = swin_block_layout(grids, {"audio": (4, 2)}, True, num_fusion=2, valid_t=valid_t, batch=3)
    dense = layout.mask.to_dense()  # (B, N, N), window order
    canon = dense[:, layout.inverse][:, :, layout.inverse]
    time_of = torch.arange(12) // 2
    for b, vt in enumerate([6, 3, 0]):
        valid = torch.cat([time_of < vt, torch.ones(2, dtype=torch.bool)])
        assert torch.equal(canon[b].any(0), valid), b  # a key is seen by someone iff valid


def _merge_by_hand(merge, x, grid):
    """The merged tokens one at a time: each merged cell concatenates its ``factors`` neighbours in raster order
    (a neighbour past an odd edge is a zero vector), then LayerNorm and the linear reduction."""
    c = x.shape[-1]
    cells = x.reshape(x.shape[0], *grid, c)
    merged = [-(-n // f) for n, f in zip(grid, merge.factors)]
    out = []
    for cell in itertools.product(*(range(m) for m in merged)):
        parts = []
        for offset in itertools.product(*(range(f) for f in merge.factors)):
            idx = tuple(i * f + o for i, f, o in zip(cell, merge.factors, offset))
            inside = all(i < n for i, n in zip(idx, grid))
            parts.append(cells[(slice(None), *idx)] if inside else x.new_zeros(x.shape[0], c))
        out.append(merge.reduction(merge.norm(torch.cat(parts, -1))))
    return torch.stack(out, 1), tuple(merged)


@pytest.mark.parametrize("factors,grid", [((2, 2), (5, 3)), ((1, 2, 2), (2, 3, 4)), ((2, 2, 2), (3, 3, 1))])
def test_patch_merging_pads_odd_grids(factors, grid):
    """Values, not only shapes: each merged token is its neighbours in order, zeros past an odd edge."""
    torch.manual_seed(0)
    merge = PatchMerging(4, factors)
    with torch.no_grad():  # a non-trivial norm, so a zero neighbour and a missing one differ
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
    x = torch.randn(2, math.prod(grid), 4)
    y, merged = merge(x, grid)
    want, want_grid = _merge_by_hand(merge, x, grid)
    assert merged == want_grid and y.shape == (2, math.prod(want_grid), 8)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_padded_tokens_never_reach_a_merged_token():
    """A ragged audio sample with an odd number of valid time rows: its last valid row merges with a padding row.
    Changing the padding TOKENS (through the position embedding of the padded rows; padding frames are zeroed before
    patching, so NaN in the frames cannot show this) must leave every output unchanged: the padding is zeroed before
    each patch merging."""
    from zorro_models import create_model

    torch.manual_seed(0)
    model = create_model(
        "zorro_swin_tiny",
        depths=(1, 1, 1, 1),
        base_dim=16,
        num_heads=(1, 2, 2, 4),
        img_size=32,
        n_mels=32,
        audio_frames=64,
    ).eval()
    x = model.example_inputs(1, generator=torch.Generator().manual_seed(1))
    pt = model.audio_embed.patch[1]
    valid_rows = 5  # odd: row 4 merges with padding row 5 at the first stage change, row 2 with row 3 at the next
    lengths = torch.tensor([valid_rows * pt])
    with torch.no_grad():
        before = model(**x, audio_lengths=lengths)
        model.audio_embed.pos_embed[valid_rows:] += 10 * torch.randn_like(model.audio_embed.pos_embed[valid_rows:])
        after = model(**x, audio_lengths=lengths)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6, msg=name)


def test_docs_show_the_current_masks():
    """docs/swin.md's mask pictures are what swin_block_layout builds (so the documentation cannot go stale)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "swin.md").read_text()
    for shifted in (False, True):
        layout = swin_block_layout(
            {"audio": (4, 4), "video": (2, 4, 4)}, {"audio": (2, 2), "video": (2, 2, 2)}, shifted, num_fusion=4
        )
        picture = "\n".join("    " + "".join("#" if a else "." for a in row) for row in layout.mask.to_dense().tolist())
        assert picture in doc, f"docs/swin.md lacks the current {'shifted' if shifted else 'regular'} mask"


# ------------------------------------------------------------------------------------------ relative position bias
def test_relative_bias_index_is_swins():
    """One 2-D window: the bias zorro computes per window equals Swin's ``relative_position_index`` gather (so Swin
    tables load as they are), and the audio table part comes before the video one."""
    from zorro_models.models.swin import rel_table_size

    wt, wf = 3, 4
    layout = swin_block_layout(
        {"audio": (wt, wf), "video": None}, {"audio": (wt, wf), "video": (2, 2, 2)}, False, num_fusion=2
    )
    table = torch.randn(2, rel_table_size({"audio": (wt, wf), "video": (2, 2, 2)}))
    dense = RelativePositionBias(table, positions=layout.positions).materialize()[0]
    coords = torch.stack(torch.meshgrid(torch.arange(wt), torch.arange(wf), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor([wt - 1, wf - 1])
    index = rel[..., 0] * (2 * wf - 1) + rel[..., 1]  # Swin's relative_position_index
    torch.testing.assert_close(dense[:, : wt * wf, : wt * wf], table[:, index])
    assert (dense[:, -2:] == 0).all() and (dense[:, :, -2:] == 0).all()  # fusion: no position, no bias


def test_relative_bias_stays_inside_windows_and_shifted_windows_share_the_table():
    grids = {"audio": (4, 4), "video": (2, 4, 4)}
    windows = {"audio": (2, 2), "video": (2, 2, 2)}
    for shifted in (False, True):
        layout = swin_block_layout(grids, windows, shifted, num_fusion=3)
        table = torch.randn(1, 9 + 27)
        dense = RelativePositionBias(table, positions=layout.positions).materialize()[0, 0]
        allowed = layout.mask.to_dense()
        assert torch.isfinite(dense[allowed]).all()  # every allowed pair inside the extent
        n_audio = 16
        assert set(dense[:n_audio, :n_audio][allowed[:n_audio, :n_audio]].tolist()) <= set(table[0, :9].tolist())
        assert set(dense[n_audio:-3, n_audio:-3][allowed[n_audio:-3, n_audio:-3]].tolist()) <= set(
            table[0, 9:].tolist()
        )
        assert (dense[:n_audio, n_audio:-3] == 0).all()  # across streams: none


def test_swin_relative_bias_is_on_by_default_learned_and_optional():
    from zorro_models import create_model

    kw = dict(depths=(1, 1, 1, 1), base_dim=16, num_heads=(1, 2, 2, 4), img_size=32, n_mels=32, audio_frames=64)
    torch.manual_seed(0)
    model = create_model("zorro_swin_tiny", **kw)
    tables = [t for s in model.stages for t in s.rel_tables]
    assert len(tables) == 4 and tables[0].shape == (1, 225 + 147)
    x = model.example_inputs(2, generator=torch.Generator().manual_seed(1))
    out = model(**x)
    # a random projection, not a plain sum: the outputs end in a LayerNorm, whose rows sum to a constant, so the sum's
    # gradient is rounding noise (zero or not by chance)
    gen = torch.Generator().manual_seed(2)
    sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in out.values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 1e-6 for t in tables), [
        None if t.grad is None else t.grad.abs().sum().item() for t in tables
    ]
    off = create_model("zorro_swin_tiny", rel_pos_bias=False, **kw)
    assert not any(hasattr(s, "rel_tables") for s in off.stages)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in off.parameters()) == sum(
        t.numel() for t in tables
    )
    with pytest.raises(TypeError, match="rel_pos_bias must be a bool, got str"):
        create_model("zorro_swin_tiny", rel_pos_bias="yes", **kw)


def test_checkpoint_without_relative_bias_says_how_to_load_it(tmp_path):
    """A Zorro-Swin checkpoint from before the relative position bias (no rel_tables) into today's default model: the
    error names the setting that loads it, and that setting does."""
    from zorro_models import create_model
    from zorro_models.training.checkpoint import load_weights, save_checkpoint

    kw = dict(depths=(1, 1, 1, 1), base_dim=16, num_heads=(1, 2, 2, 4), img_size=32, n_mels=32, audio_frames=64)
    old = create_model("zorro_swin_tiny", rel_pos_bias=False, **kw)
    path = save_checkpoint(tmp_path, 1, old)
    with pytest.raises(
        ValueError,
        match=r"missing \['stages.0.rel_tables.0'.*predates Zorro-Swin's relative position "
        r"bias: .*model.kwargs.rel_pos_bias=false",
    ):
        load_weights(create_model("zorro_swin_tiny", **kw), path)
    assert load_weights(create_model("zorro_swin_tiny", rel_pos_bias=False, **kw), path) == []
