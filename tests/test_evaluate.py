"""Evaluation: metrics against hand-computed cases, linear probes, and per-regime / per-head scoring."""

import pytest
import torch

import zorro_models
from zorro_models.training.evaluate import (
    REGIME_OUTPUTS,
    REGIMES,
    accuracy,
    average_precision,
    collect_embeddings,
    evaluate_heads,
    linear_probe,
    mean_average_precision,
    probe_all,
)


def test_accuracy_hand_case():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(scores, torch.tensor([1, 0, 0, 0])) == 0.75
    with pytest.raises(ValueError, match="labels"):
        accuracy(scores, torch.tensor([1, 0]))


def test_average_precision_hand_cases():
    # ranking: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    s = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert average_precision(s, torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(s, torch.tensor([1, 1, 0, 0])) == pytest.approx(1.0)
    assert average_precision(s, torch.tensor([0, 0, 1, 1])) == pytest.approx((1 / 3 + 2 / 4) / 2)
    # a tie enters as one threshold: {pos, neg} at 0.5 -> precision 1/2 at recall 1
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert average_precision(s, torch.zeros(4)) != average_precision(s, torch.zeros(4))  # NaN: no positive


def test_mean_average_precision_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.7, 0.2, 0.1], [0.6, 0.9, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    # class 0: AP (1 + 2/3)/2 ; class 1: ranking 0.9(pos) 0.7(pos) -> 1.0 ; class 2 has no positive: skipped
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1.0) / 2)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, torch.zeros(4, 3))


def test_linear_probe_separable_and_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 8, generator=g)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) > 0.95
    noise = torch.randn(300, 8, generator=g)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.6
    # multi-label: class c is on iff feature c > 0
    z = torch.randn(300, 4, generator=g)
    t = (z[:, :3] > 0).float()
    assert linear_probe(z[:200], t[:200], z[200:], t[200:], multi_label=True) > 0.95


def test_linear_probe_scores_the_held_out_split():
    """More features than training samples: any training labels are separable, so a probe scored on its training
    split would report ~1 for test labels that are pure chance."""
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(64, 96, generator=g), torch.randn(2000, 96, generator=g)
    y, yt = torch.randint(0, 4, (64,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    assert linear_probe(x, y, x, y, max_iter=100) > 0.95  # the training set is separable
    assert abs(linear_probe(x, y, xt, yt, max_iter=100) - 0.25) < 0.05  # held-out random labels: chance


def _tiny_model():
    torch.manual_seed(0)
    return zorro_models.create_model(
        "zorro_vit_demo",
        img_size=16,
        num_frames=2,
        video_patch=8,
        n_mels=16,
        audio_frames=16,
        audio_patch=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_fusion=2,
    )


class _Pre:
    """A stand-in preprocessor: batches already hold model inputs."""

    device = torch.device("cpu")

    def __call__(self, batch, modalities):
        return {m: batch[m] for m in modalities}


def _batches(n=2, b=6, k=3, multi=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = (torch.rand(b, k, generator=g) > 0.5).float() if multi else torch.randint(0, k, (b,), generator=g)
        out.append(
            {
                "audio": torch.randn(b, 16, 16, generator=g),
                "video": torch.randn(b, 2, 3, 16, 16, generator=g),
                "label": label,
                "size": b,
            }
        )
    return out + [{"size": 0, "num_skipped": 3}]  # an all-skipped batch is passed over


def test_collect_embeddings_regimes_and_purity():
    model = _tiny_model()
    emb, labels = collect_embeddings(model, _Pre(), _batches())
    assert labels.shape == (12,)
    for regime, outputs in REGIME_OUTPUTS.items():
        assert set(emb[regime]) == set(outputs)
        assert all(v.shape == (12, 32) for v in emb[regime].values())
    # Zorro: the audio output from audio alone is the audio output of the audio-visual call
    torch.testing.assert_close(emb["audio-only"]["audio"], emb["audio-visual"]["audio"])
    assert model.training  # restored


def test_probe_all_and_evaluate_heads():
    """Each score is the one computed by hand: probe_all's entries are linear probes fitted on the training embeddings
    of that (regime, output) and scored on the test ones, "all" on their concatenation; evaluate_heads' entries are
    the accuracy of each head (and of the mean) on the inputs of that regime against the batches' labels."""
    model = _tiny_model()
    train = collect_embeddings(model, _Pre(), _batches())
    test = collect_embeddings(model, _Pre(), _batches(n=3, seed=2))
    res = probe_all(train, test, multi_label=False, num_classes=3, max_iter=20)
    (tr, ytr), (te, yte) = train, test
    assert set(res) == set(REGIME_OUTPUTS)
    for regime, outputs in REGIME_OUTPUTS.items():
        assert set(res[regime]) == set(outputs) | {"all"}
        for o in outputs:
            assert res[regime][o] == linear_probe(tr[regime][o], ytr, te[regime][o], yte, num_classes=3, max_iter=20), (
                regime,
                o,
            )
        both = [torch.cat([d[regime][o] for o in outputs], 1) for d in (tr, te)]
        assert res[regime]["all"] == linear_probe(both[0], ytr, both[1], yte, num_classes=3, max_iter=20)

    heads = zorro_models.SupervisedHeads(32, 3)
    batches = _batches(n=3)
    scores = evaluate_heads(model, heads, _Pre(), batches, multi_label=False)
    model.eval()
    with torch.no_grad():
        for regime, modalities in REGIMES.items():
            logits = [heads(*model.forward_features(**{m: b[m] for m in modalities})[:2]) for b in batches if b["size"]]
            y = torch.cat([b["label"] for b in batches if b["size"]])
            want = {
                h: accuracy(torch.cat([lg[h] for lg in logits]), y)
                for h in logits[0]
                if h == "mean" or h in REGIME_OUTPUTS[regime]
            }
            assert scores[regime] == want, regime
    assert len({v for r in scores.values() for v in r.values()}) > 1  # not one constant score everywhere
    multi = evaluate_heads(model, heads, _Pre(), _batches(multi=True), multi_label=True, regimes=("video-only",))
    assert set(multi) == {"video-only"} and all(0.0 < v <= 1.0 for v in multi["video-only"].values())
