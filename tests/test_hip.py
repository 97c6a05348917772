"""Zorro-HiP layouts: group-local, modality-pure cross- and self-attention masks, regrouping, padding propagation."""

import pytest
import torch

from zorro_models import create_model
from zorro_models.models.hip import GroupLayout, hip_level_masks, initial_groups, split_sizes


def test_split_and_regroup():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 5) == [1, 1, 1, 0, 0]
    lay = initial_groups(10, 4, torch.tensor([10, 5, 0]))
    assert lay.sizes == (3, 3, 2, 2)
    assert lay.valid.tolist() == [[3, 3, 2, 2], [3, 2, 0, 0], [0, 0, 0, 0]]
    lat = lay.latents(4)
    assert lat.sizes == (4, 4, 4, 4) and lat.valid.tolist() == [[4, 4, 4, 4], [4, 4, 0, 0], [0, 0, 0, 0]]
    up = lat.regroup(2)
    assert up.sizes == (8, 8) and up.valid.tolist() == [[8, 8], [8, 0], [0, 0]]
    assert initial_groups(3, 5, None).latents(2).sizes == (2, 2, 2, 0, 0), "empty groups get no latents"


def _owner(layout: GroupLayout, modality: str):
    """Per token: (modality, group) — computed from sizes alone, independently of the mask code."""
    return [(modality, g) for g, s in enumerate(layout.sizes) for _ in range(s)]


def test_level_masks_are_group_local_and_pure():
    inputs = {"audio": initial_groups(7, 2, None), "video": initial_groups(9, 3, None)}
    latents = {m: inputs[m].latents(2) for m in inputs}
    cross, self_attn = hip_level_masks(inputs, latents, n_fusion_in=3, n_fusion=2, batch=None)
    q_owner = _owner(latents["audio"], "audio") + _owner(latents["video"], "video") + [("fusion", 0)] * 2
    k_owner = _owner(inputs["audio"], "audio") + _owner(inputs["video"], "video") + [("fusion", 0)] * 3
    dense = cross.to_dense()
    assert dense.shape == (len(q_owner), len(k_owner)) == (4 + 6 + 2, 7 + 9 + 3)
    for i, qo in enumerate(q_owner):
        for j, ko in enumerate(k_owner):
            assert bool(dense[i, j]) == (qo[0] == "fusion" or qo == ko), (i, j, qo, ko)
    dense = self_attn.to_dense()
    for i, qo in enumerate(q_owner):
        for j, ko in enumerate(q_owner):
            assert bool(dense[i, j]) == (qo[0] == "fusion" or qo == ko), (i, j)


def test_level_masks_with_lengths_hide_padding_groups():
    inputs = {"audio": initial_groups(8, 2, torch.tensor([8, 3])), "video": initial_groups(4, 1, None)}
    latents = {m: inputs[m].latents(2) for m in inputs}
    cross, self_attn = hip_level_masks(inputs, latents, n_fusion_in=0, n_fusion=1, batch=2)
    dense = cross.to_dense()  # (B, 2+2+2+1, 4+4+4)
    # sample 1: audio group 1 has no valid input, so its latents (rows 2, 3) see nothing and nobody sees them later
    assert not dense[1, 2:4].any() and dense[0, 2:4].any()
    assert dense[1, 0, :3].all() and not dense[1, 0, 3:].any(), "group 0 latents see the 3 valid audio tokens only"
    assert not self_attn.to_dense()[1][:, 2:4].any()


def test_config_validation():
    with pytest.raises(ValueError, match="must divide"):
        create_model("zorro_hip_tiny", audio_groups=(4, 3, 1))
    with pytest.raises(ValueError, match="one entry per level"):
        create_model("zorro_hip_tiny", depths=(1, 1))


def test_more_groups_than_tokens_is_pure_and_finite():
    model = create_model("zorro_hip_tiny", audio_groups=(16, 4, 1), depths=(1, 1, 1)).eval()
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2, 64, 8, generator=g)  # one time patch: 8 tokens for 16 groups
    video = torch.randn(2, 4, 3, 64, 64, generator=g)
    with torch.no_grad():
        a = model(audio=audio, video=video)
        b = model(audio=audio, video=video + 1)
    assert torch.equal(a["audio"], b["audio"])
    assert all(torch.isfinite(v).all() for v in a.values())


def test_docs_show_the_current_masks():
    """docs/hip.md's mask pictures are what hip_level_masks builds."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "hip.md").read_text()
    inputs = {"audio": initial_groups(8, 2, None), "video": initial_groups(12, 3, None)}
    latents = {m: inputs[m].latents(2) for m in inputs}
    masks = list(hip_level_masks(inputs, latents, 0, 2, None))
    inputs = {m: latents[m].regroup(1) for m in latents}
    masks += hip_level_masks(inputs, {m: inputs[m].latents(3) for m in inputs}, 2, 2, None)
    for mask in masks:
        picture = "\n".join("    " + "".join("#" if a else "." for a in row) for row in mask.to_dense().tolist())
        assert picture in doc
