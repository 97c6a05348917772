"""Training says, in one line, when a run has collapsed: the loss sits at ln(batch) (InfoNCE) or ln(classes)
(cross-entropy), or the gradient norm has vanished."""

import math

import pytest
import torch

from zorro_models.training.config import load_config
from zorro_models.training.trainer import CollapseWatch, Trainer

from .helpers import TINY


def test_loss_at_chance_after_the_warmup_warns_once():
    watch = CollapseWatch(8, "InfoNCE", after=10, patience=2)
    assert watch.update(5, math.log(8)) is None  # at initialisation a loss near chance is normal
    assert watch.update(10, math.log(8) + 0.001) is None  # one logged value is not yet a plateau
    line = watch.update(20, math.log(8))
    assert line is not None and "ln(8)" in line and "\n" not in line
    assert watch.update(30, math.log(8)) is None  # said once


def test_a_learning_loss_or_a_loss_that_leaves_chance_does_not_warn():
    watch = CollapseWatch(8, "InfoNCE", after=0, patience=2)
    # near chance but wandering (a slow learner): 4.153 / 4.129 / 4.155 around ln(64) = 4.159 is no plateau
    slow = CollapseWatch(64, "InfoNCE", after=0)
    assert all(slow.update(s, x) is None for s, x in enumerate([4.153, 4.129, 4.155, 4.162, 4.140]))
    for step, loss in enumerate([2.6, 2.3, 2.079, 1.9, 2.079, 1.5, 1.2]):
        assert watch.update(step, loss) is None
    assert CollapseWatch(1, "one class").update(100, 0.0) is None  # ln(1) = 0 is no chance level


def test_vanishing_gradient_norm_warns():
    watch = CollapseWatch(8, "InfoNCE")
    assert watch.update(1, 3.0, grad_norm=50.0) is None
    assert watch.update(2, 2.5, grad_norm=1.0) is None
    line = watch.update(3, 2.4, grad_norm=1.4e-5)
    assert line is not None and "gradient norm vanished" in line and "1.4e-05" in line


def test_a_collapsed_contrastive_run_says_so_on_one_line(tmp_path, capsys):
    """A real run whose projections are constant (zeroed last layers, lr 0): its InfoNCE is exactly ln(batch)."""
    cfg = load_config(
        None, TINY + [f"train.out={tmp_path / 'run'}", "train.steps=4", "optim.lr=0", "optim.warmup_steps=1"]
    )
    trainer = Trainer(cfg)
    with torch.no_grad():
        for head in trainer.task.heads.projections.values():
            head.fc2.weight.zero_()
            head.fc2.bias.zero_()
    trainer.fit()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and "ln(8)" in lines[0], lines


def test_a_healthy_tiny_run_does_not_warn(tmp_path, capsys):
    Trainer(load_config(None, TINY + [f"train.out={tmp_path / 'run'}", "train.steps=4"])).fit()
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("task", ["supervised"])
def test_supervised_chance_is_ln_classes(tmp_path, task):
    trainer = Trainer(load_config(None, TINY + [f"train.out={tmp_path / 'run'}", f"train.task={task}"]))
    watch = trainer._collapse_watch()
    assert watch.chance == pytest.approx(math.log(trainer.task.heads.num_classes))
