"""Checkpoints: crash safety by fault injection (a crash at every write, fsync, rename and delete of a save), the
newest-intact rule, damaged files named in errors, a ``latest`` pointer that cannot lead outside the run, stale
temporary folders, and the RNG states restored by a load."""

import importlib
import os
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import zorro_models.training.checkpoint as ckpt_mod
from zorro_models.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


class Crash(Exception):
    """The process dies here (raised instead of kill -9: nothing after it runs, no cleanup is attempted)."""


def _torn(path_of):
    """A write that dies half-way: the original writes the file, then it is cut to half its size."""

    def after(args):
        path = pathlib.Path(path_of(args))
        if path.is_file():
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])

    return after


# (owner, attribute, kind, what a crash leaves behind besides stopping): every way a save touches the disk
CRASH_POINTS = [
    (ckpt_mod, "_write_file", "write", _torn(lambda a: a[0])),  # every file of a save, the pointer included
    (os, "fsync", "fsync", None),
    (os, "replace", "rename", None),
    (shutil, "rmtree", "delete", None),
]


class Injector:
    """Counts the calls of each kind in :data:`CRASH_POINTS`; with ``crash_at=(kind, i)`` the i-th call of that kind
    (0-based) dies: writes after tearing their file, renames and deletes before doing anything."""

    def __init__(self, monkeypatch, crash_at=None):
        self.counts, self.crash_at = {}, crash_at
        for owner, attr, kind, torn in CRASH_POINTS:
            if isinstance(owner, str):
                owner = importlib.import_module(owner)
            monkeypatch.setattr(owner, attr, self._wrap(getattr(owner, attr), kind, torn))

    def _wrap(self, original, kind, torn):
        def wrapper(*args, **kwargs):
            i = self.counts.get(kind, 0)
            self.counts[kind] = i + 1
            if self.crash_at == (kind, i):
                if torn is not None:
                    original(*args, **kwargs)
                    torn(args)
                raise Crash(f"{kind} #{i}")
            return original(*args, **kwargs)

        return wrapper


def _model(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(step)
        m.bias.fill_(-step)
    return m


def _save(run, step, keep=2):
    model = _model(step)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    with torch.no_grad():  # after the update, so the weights still say which step they belong to
        model.weight.fill_(step)
        model.bias.fill_(-step)
    return save_checkpoint(run, step, model, opt, extra={"epoch": step}, config_yaml=f"step: {step}\n", keep=keep)


def _step_of(path) -> int:
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    state = load_checkpoint(path, m, opt, restore_rng=False)
    assert state["step"] == int(m.weight[0, 0]) == -int(m.bias[0]) == state["extra"]["epoch"]
    assert (path / "config.yaml").read_text() == f"step: {state['step']}\n"
    return state["step"]


# scenario -> (steps saved before, step being saved): a new step (pruning the oldest), and a step re-saved in place
SCENARIOS = {"new step": ([1, 2], 3), "re-save": ([1, 2, 3], 3)}


def _crash_points(monkeypatch, tmp_path, before, step):
    run = tmp_path / "count"
    for s in before:
        _save(run, s)
    with monkeypatch.context() as mp:
        counter = Injector(mp)
        _save(run, step)
    return [(kind, i) for kind, n in counter.counts.items() for i in range(n)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_crash_anywhere_in_a_save_loses_at_most_that_step(tmp_path, monkeypatch, scenario):
    """For every write (torn half-way), fsync, rename and delete of a save: after the crash the newest intact
    checkpoint is the step being saved or the one before, loads with its own weights, optimizer and config; the next
    save of that step succeeds and leaves no temporary folder behind; nothing outside the run is touched."""
    before, step = SCENARIOS[scenario]
    points = _crash_points(monkeypatch, tmp_path, before, step)
    kinds = {k for k, _ in points}
    assert {"write", "fsync", "rename", "delete"} <= kinds, kinds  # every kind of crash point is exercised
    for kind, i in points:
        run = tmp_path / f"{kind}{i}" / "run"
        for s in before:
            _save(run, s)
        with monkeypatch.context() as mp:
            Injector(mp, crash_at=(kind, i))
            with pytest.raises(Crash):
                _save(run, step)
        found = latest_checkpoint(run)
        assert found is not None and _step_of(found) >= before[-1] - (step == before[-1]), (kind, i)
        assert sorted(os.listdir(run.parent)) == ["run"]
        _save(run, step)  # the run goes on: the next save of that step (after a resume) works
        root = run / "checkpoints"
        assert _step_of(latest_checkpoint(run)) == step
        assert (root / "latest").read_text() == f"step_{step:08d}\n"
        assert sorted(os.listdir(root)) == ["latest", f"step_{step - 1:08d}", f"step_{step:08d}"], (kind, i)


def test_resaving_a_step_never_deletes_it_before_the_new_one_stands(tmp_path, monkeypatch):
    """The bug this replaces: re-saving removed the old folder first, so a crash before the rename left `latest`
    naming nothing and resume fell back to step 0 although older steps were intact."""
    for s in (1, 2):
        _save(tmp_path, s)
    with monkeypatch.context() as mp:
        Injector(mp, crash_at=("rename", 1))  # rename 0 moves the old step_2 aside, rename 1 would move the new in
        with pytest.raises(Crash):
            _save(tmp_path, 2)
    assert _step_of(latest_checkpoint(tmp_path)) == 1  # step 2 is aside, step 1 intact
    _save(tmp_path, 3)  # the next save (the same process after the crash, or another) puts step 2 back
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert _step_of(tmp_path / "checkpoints" / "step_00000002") == 2


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_are_removed_only_for_dead_processes(tmp_path):
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    dead, alive = _dead_pid(), os.getppid()
    for name in (f".tmp-step_00000002-{dead}", f".tmp-step_00000002-{alive}", f".old-step_00000001-{dead}"):
        (root / name).mkdir()
        (root / name / "state.pt").write_bytes(b"half")
    (root / f".latest-{dead}").write_text("step_00000002\n")
    (root / ".tmp-step_00000004-1x").mkdir()  # not ours: an odd name is never touched
    assert latest_checkpoint(tmp_path).name == "step_00000001"  # temporary folders are never candidates
    _save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == [
        ".tmp-step_00000002-" + str(alive),
        ".tmp-step_00000004-1x",
        "latest",
        "step_00000001",
        "step_00000002",
    ]


def test_resume_takes_the_newest_intact_checkpoint_and_says_what_it_skipped(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s, keep=0)
    root = tmp_path / "checkpoints"
    state = root / "step_00000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated (a full disk, a copy cut short)
    (root / "step_00000002" / "model.safetensors").unlink()
    skipped = []
    assert latest_checkpoint(tmp_path, skipped).name == "step_00000001"
    assert len(skipped) == 2 and "step_00000003" in skipped[0] and "state.pt is 100 bytes" in skipped[0]
    assert "model.safetensors is missing" in skipped[1]


def test_a_truncated_file_is_named_in_the_error(tmp_path):
    path = _save(tmp_path, 1)
    (path / "manifest.json").unlink()  # a checkpoint from before manifests: the damage shows only when read
    data = (path / "state.pt").read_bytes()
    for cut in (0, 10, len(data) // 2):  # 0 and 10 bytes gave a bare "OSError: [Errno 22]" before
        (path / "state.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"state\.pt cannot be read .*damaged or truncated"):
            load_checkpoint(path, _model(0), restore_rng=False)
    (path / "state.pt").write_bytes(data)
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    model = _model(7)
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
        load_checkpoint(path, model, restore_rng=False)
    assert model.weight[0, 0].item() == 7  # nothing was loaded


def test_latest_pointer_cannot_lead_outside_the_run(tmp_path):
    """A `latest` naming ../.. used to be followed: `zorro eval` then wrote eval.json into another run."""
    other = tmp_path / "other"
    _save(other, 5)
    run = tmp_path / "runs" / "mine"
    _save(run, 1)
    (run / "checkpoints" / "latest").write_text("../../../other/checkpoints/step_00000005\n")
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000001"
    (run / "checkpoints" / "step_00000001" / "state.pt").unlink()
    assert latest_checkpoint(run) is None


def test_loading_restores_every_rng(tmp_path):
    """Save, draw, load, draw again: the draws after the load repeat those after the save (torch, NumPy, random)."""
    model = _model(1)
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = save_checkpoint(tmp_path, 1, model)

    def draw():
        return (
            torch.rand(4).tolist(),
            np.random.rand(4).tolist(),
            np.random.randn(3).tolist(),
            [random.random() for _ in range(4)],
        )

    first = draw()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    load_checkpoint(path, model)
    assert draw() == first
    load_checkpoint(path, model, restore_rng=False)
    assert draw() != first


def test_load_weights_names_the_mismatch(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(ValueError, match="does not match"):
        load_weights(torch.nn.Linear(3, 4), path)
