"""Every family through the whole pipeline at a tiny size: ``zorro train`` (interrupted, then resumed), checkpoints,
``zorro eval``, for both tasks; ``zorro bench`` per family in the comprehensive tier.

Resume is checked bitwise against the uninterrupted run: same weights, same logged losses.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from zorro_models.cli import main
from zorro_models.models.base import MASK_KINDS
from zorro_models.training.build import build_model
from zorro_models.training.checkpoint import latest_checkpoint
from zorro_models.training.config import load_config
from zorro_models.training.trainer import Trainer

from .helpers import TINY_FAMILY, torchrun_train

FAMILIES = list(TINY_FAMILY)


def losses(run):
    return [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if r.get("split", "train") == "train"]


# fast tier: every family, contrastive (the pre-training the paper is about; eval = linear probes); supervised runs
# (eval = the heads) in the comprehensive tier
CASES = [(f, "contrastive") for f in FAMILIES] + [
    pytest.param(f, "supervised", marks=pytest.mark.full) for f in FAMILIES
]


@pytest.mark.parametrize("family, task", CASES)
def test_train_checkpoint_resume_eval(tmp_path, family, task):
    common = [
        *TINY_FAMILY[family],
        f"train.task={task}",
        "train.steps=3",
        "train.batch_size=4",
        "data.val_size=8",
        "probe.train_size=16",
        "probe.test_size=16",
        "probe.max_iter=5",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *common, f"train.out={straight}"]) == 0
    # interrupted after 2 steps (checkpoint), then `zorro train ... train.resume=true` finishes the run
    Trainer(load_config(None, [*common, f"train.out={resumed}"])).fit(stop_at=2)
    assert latest_checkpoint(resumed).name == "step_00000002"
    assert main(["train", *common, f"train.out={resumed}", "train.resume=true"]) == 0

    a = load_file(latest_checkpoint(straight) / "model.safetensors")
    b = load_file(latest_checkpoint(resumed) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{family}: resume is not exact"
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 3

    assert main(["eval", str(resumed)]) == 0
    report = json.loads((resumed / "eval.json").read_text())
    part = report["heads" if task == "supervised" else "probes"]
    assert set(part["results"]) == {"audio-visual", "audio-only", "video-only"}
    assert all(0 <= v <= 1 for r in part["results"].values() for v in r.values())
    assert report["checkpoint"].endswith("step_00000003")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_every_mask_from_the_config(family):
    """model.mask reaches every family (MASK_KINDS is the one list); family settings in model.kwargs are checked by
    the family, and the mask does not belong there."""
    for mask in MASK_KINDS:
        extra = ["model.kwargs.rel_pos_bias=false"] if (family, mask) == ("swin", "full") else []  # window-only bias
        model = build_model(load_config(None, [*TINY_FAMILY[family], f"model.mask={mask}", *extra]))
        assert model.mask_kind == mask
    with pytest.raises(ValueError, match="mask must be one of"):
        build_model(load_config(None, [*TINY_FAMILY[family], "model.mask=causal"]))
    with pytest.raises(ValueError, match="model.mask=full, not in model.kwargs"):
        build_model(load_config(None, [*TINY_FAMILY[family], "model.kwargs.mask=full"]))
    with pytest.raises(TypeError, match="unknown override"):
        build_model(load_config(None, [*TINY_FAMILY[family], "model.kwargs.no_such_setting=1"]))


@pytest.mark.full
@pytest.mark.parametrize("family", FAMILIES)
def test_bench_every_family(family, capsys):
    extra = ["model.kwargs.rel_pos_bias=false"] if family == "swin" else []  # full attention crosses its windows
    assert main(["bench", "--steps", "1", "--masks", ",".join(MASK_KINDS), *TINY_FAMILY[family], *extra]) == 0
    text = capsys.readouterr().out
    assert "clips/s (train)" in text and all(m in text for m in MASK_KINDS)


@pytest.mark.full
@pytest.mark.ddp
@pytest.mark.parametrize("family", ["swin", "hip"])
def test_demo_and_torchrun_every_family(tmp_path, family, capsys):
    """`zorro demo --model NAME` compares the masks on any family; `torchrun -m zorro_models.train` trains it (two
    gloo ranks on CPU)."""

    name, settings = TINY_FAMILY[family][0].split("=", 1)[1], TINY_FAMILY[family][1:]
    if family == "swin":  # the demo compares with full attention, which crosses the windows of Swin's bias
        settings = [*settings, "model.kwargs.rel_pos_bias=false"]
    code = main(
        [
            "demo",
            "--model",
            name,
            "--out",
            str(tmp_path / "demo"),
            "--threads",
            "1",
            "--no-baseline",
            *settings,
            "train.steps=2",
            "data.num_workers=0",
        ]
    )
    assert code in (0, 1)  # 2 steps prove nothing about the gap
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["config"]["model"]["name"] == name and set(results["table"]) == {"Zorro", "full attention"}

    out = tmp_path / "ddp"
    proc = torchrun_train([*TINY_FAMILY[family], "train.steps=2", "train.threads=1", f"train.out={out}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_checkpoint(out).name == "step_00000002"
