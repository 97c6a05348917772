"""Supervised heads (classifier per output, averaged logits), CE / BCE losses, contrastive heads and InfoNCE."""

import math

import pytest
import torch
import torch.nn.functional as F

from zorro_models import (
    OUTPUTS,
    ContrastiveHeads,
    SupervisedHeads,
    SupervisedLoss,
    ZorroContrastiveLoss,
    create_model,
    info_nce,
)


def embeddings(batch=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {o: torch.randn(batch, dim, generator=g) for o in OUTPUTS}


def test_supervised_heads_average_per_output_logits():
    heads = SupervisedHeads(16, 5)
    emb = embeddings()
    logits = heads(emb)
    assert set(logits) == set(OUTPUTS) | {"mean"}
    for o in OUTPUTS:
        assert logits[o].shape == (4, 5)
        torch.testing.assert_close(logits[o], emb[o] @ heads.classifiers[o].weight.T + heads.classifiers[o].bias)
    torch.testing.assert_close(logits["mean"], sum(logits[o] for o in OUTPUTS) / 4)


def test_supervised_heads_average_only_present_outputs():
    heads = SupervisedHeads(16, 5)
    emb = embeddings(batch=2)
    present = {o: torch.tensor([True, True]) for o in OUTPUTS}
    present["video"] = torch.tensor([True, False])
    logits = heads(emb, present=present)
    torch.testing.assert_close(logits["mean"][0], sum(logits[o][0] for o in OUTPUTS) / 4)
    torch.testing.assert_close(logits["mean"][1], sum(logits[o][1] for o in ("audio", "fusion", "global")) / 3)


def test_supervised_heads_single_output_needs_only_that_embedding():
    heads = SupervisedHeads(16, 3, outputs=("audio",))
    logits = heads({"audio": torch.randn(2, 16)})
    assert set(logits) == {"audio", "mean"}
    torch.testing.assert_close(logits["mean"], logits["audio"])
    with pytest.raises(KeyError, match="video"):
        SupervisedHeads(16, 3, outputs=("video",))({"audio": torch.randn(2, 16)})
    with pytest.raises(ValueError, match="unknown output"):
        SupervisedHeads(16, 3, outputs=("text",))


def test_supervised_loss_cross_entropy_and_bce():
    heads = SupervisedHeads(16, 5)
    logits = heads(embeddings())
    labels = torch.tensor([0, 4, 2, 1])
    expected = sum(F.cross_entropy(logits[o], labels) for o in OUTPUTS) / 4
    torch.testing.assert_close(SupervisedLoss()(logits, labels), expected)
    torch.testing.assert_close(SupervisedLoss(on="mean")(logits, labels), F.cross_entropy(logits["mean"], labels))
    multi = (torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    expected = sum(F.binary_cross_entropy_with_logits(logits[o], multi) for o in OUTPUTS) / 4
    torch.testing.assert_close(SupervisedLoss(multi_label=True)(logits, multi), expected)
    per = SupervisedLoss().per_output(logits, labels)
    assert set(per) == set(OUTPUTS) | {"mean"}
    with pytest.raises(ValueError, match="multi-label target"):
        SupervisedLoss(multi_label=True)(logits, labels)
    with pytest.raises(ValueError, match="single-label target"):
        SupervisedLoss()(logits, labels.float())


def test_info_nce_matches_manual_formula_and_rewards_alignment():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(10.0)
    s = scale * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    manual = -(torch.diagonal(s.log_softmax(1)).mean() + torch.diagonal(s.log_softmax(0)).mean()) / 2
    torch.testing.assert_close(info_nce(a, b, scale), manual)
    assert info_nce(a, a, scale) < info_nce(a, b, scale)


def test_contrastive_loss_pairs_temperature_and_presence():
    proj = ContrastiveHeads(16, proj_dim=8)
    p = proj(embeddings(batch=6))
    assert all(v.shape == (6, 8) for v in p.values())
    loss_fn = ZorroContrastiveLoss(temperature=0.07)
    assert math.isclose(loss_fn.temperature, 0.07, rel_tol=1e-6)
    per = loss_fn.per_pair(p)
    assert set(per) == {"audio-video", "audio-fusion", "video-fusion"}
    loss = loss_fn(p)
    torch.testing.assert_close(loss, torch.stack(list(per.values())).mean())
    loss.backward()
    assert loss_fn.log_logit_scale.grad is not None and loss_fn.log_logit_scale.grad != 0
    for o in ("audio", "video", "fusion"):  # the default pairs; "global" is in none of them
        assert all(prm.grad is not None for prm in proj.projections[o].parameters())
    assert all(prm.grad is None for prm in proj.projections["global"].parameters())

    only = ZorroContrastiveLoss(pairs=[("audio", "global")], temperature=0.07)
    assert set(only.per_pair(p)) == {"audio-global"}
    present = {o: torch.ones(6, dtype=torch.bool) for o in OUTPUTS}
    present["audio"] = torch.tensor([True, True, True, False, True, False])
    keep = present["audio"]
    with torch.no_grad():
        got = only.per_pair(p, present)["audio-global"]
        want = info_nce(p["audio"][keep], p["global"][keep], only.logit_scale())
    torch.testing.assert_close(got, want)
    fixed = ZorroContrastiveLoss(learnable_temperature=False)
    assert not any(True for _ in fixed.parameters())
    with pytest.raises(ValueError, match="pair"):
        ZorroContrastiveLoss(pairs=[("audio", "audio")])
    with pytest.raises(ValueError, match="temperature"):
        ZorroContrastiveLoss(temperature=0.0)


def test_audio_video_contrastive_loss_never_reaches_the_fusion_tokens():
    """With the audio<->video pair only, the loss reaches the model through the pure audio and video outputs: the
    fusion tokens get no gradient (a leak from fusion into a unimodal output would give them one)."""
    model = create_model("zorro_vit_demo", depth=1)
    proj = ContrastiveHeads(model.embed_dim, proj_dim=8, outputs=("audio", "video"))
    loss_fn = ZorroContrastiveLoss(pairs=[("audio", "video")])
    x = model.example_inputs(batch_size=3)
    feats = model.forward_features(**x)
    loss = loss_fn(proj(feats.embeddings), present=feats.present)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.fusion_tokens.grad is None or torch.count_nonzero(model.fusion_tokens.grad) == 0
    assert torch.count_nonzero(model.video_embed.proj.weight.grad) > 0
