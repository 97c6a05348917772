"""Every config shipped in configs/ parses and starts: a Trainer is built from it and takes a training step (on CPU,
shrunk only where the config is for a GPU, on clips written by examples/export_clips.py where it reads clips)."""

import importlib.util
from pathlib import Path

import pytest

from zorro_models.commands.demo import demo_overrides
from zorro_models.training.build import with_resolved_lr
from zorro_models.training.config import load_config
from zorro_models.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# A step at the config's own sizes, on this machine's CPU, in the fast tier; figure2_pretrain is for a GPU: the fast
# tier keeps its input sizes (the data pipeline at Figure-2 sizes) and shrinks the transformer and the batch.
SHRINK = {
    "figure2_pretrain.yaml": [
        "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
        "train.batch_size=2",
        "train.grad_accum=1",
    ],
}
SMALL = [
    "train.steps=1",
    "train.batch_size=4",
    "train.progress=false",
    "train.plot=false",
    "data.num_workers=0",
    "train.eval_every=0",
]


def test_the_configs_we_document_are_there():
    assert CONFIGS == ["clips.yaml", "cpu_short.yaml", "demo.yaml", "figure2_pretrain.yaml"]


def _export_clips(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("export_clips", ROOT / "examples" / "export_clips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.export(folder, train=8, val=4)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_and_starts(name, tmp_path):
    overrides = [f"train.out={tmp_path / 'run'}", *SMALL, *SHRINK.get(name, [])]
    cfg = load_config(ROOT / "configs" / name)
    if cfg.data.kind == "clips":
        pytest.importorskip("av")
        _export_clips(tmp_path / "clips")
        overrides += [
            f"data.train_csv={tmp_path / 'clips' / 'train.csv'}",
            f"data.val_csv={tmp_path / 'clips' / 'val.csv'}",
        ]
    trainer = Trainer(load_config(ROOT / "configs" / name, overrides))
    assert trainer.fit()["step"] == 1
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.full
def test_figure2_pretrain_steps_at_full_size(tmp_path):
    """The GPU config unshrunk: one optimizer step of zorro_vit_base at Figure-2 sizes (a micro-batch of 2)."""
    cfg = load_config(
        ROOT / "configs" / "figure2_pretrain.yaml",
        [
            f"train.out={tmp_path}",
            "train.steps=1",
            "train.batch_size=2",
            "train.grad_accum=1",
            "train.progress=false",
            "data.num_workers=0",
        ],
    )
    assert Trainer(cfg).fit()["step"] == 1


def test_demo_config_is_what_the_demo_runs():
    # as the trainer runs them: the learning rate a number (the demo sets none, so its preset's or the default)
    ours = with_resolved_lr(load_config(ROOT / "configs" / "demo.yaml")).to_dict()
    demo = with_resolved_lr(load_config(None, demo_overrides(Path("runs"), "zorro", threads=1))).to_dict()
    for cfg in (ours, demo):
        for key in ("out", "threads", "plot"):
            del cfg["train"][key]
    assert ours == demo
