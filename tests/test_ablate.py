"""``zorro ablate`` on a tiny 2-cell grid: table shape, reuse of finished runs, resume of interrupted ones, and refusal
to reuse a run trained under another configuration."""

import json
import shutil

import pytest

from zorro_models.cli import main
from zorro_models.commands.ablate import _cell_configs, grid_cells, parse_grid, run_ablate
from zorro_models.training import trainer as train

from .helpers import TINY

# one contrastive and one supervised cell: both evaluation paths, and the gap columns
GRID = ["mask=zorro", "sharing=shared", "objective=contrastive,supervised"]
FAST = [*TINY, "train.steps=2", "data.val_size=32", "probe.max_iter=20"]
CELLS = {"zorro-shared-contrastive", "zorro-shared-supervised"}


def _ablate(out, *overrides, seeds=2, **kw):
    return run_ablate(str(out), grid=GRID, seeds=seeds, overrides=[*FAST, *overrides], threads=1, verbose=False, **kw)


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train.Trainer, "fit", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-cell x 2-seed ablation, run through the CLI (``--grid`` followed by overrides)."""
    out = tmp_path_factory.mktemp("ablate") / "out"
    assert main(["ablate", "--out", str(out), "--seeds", "2", "--threads", "1", "--grid", *GRID, *FAST]) == 0
    return out


def test_outputs_and_table_shape(finished):
    results = json.loads((finished / "results.json").read_text())
    assert set(results["cells"]) == CELLS and results["metric"] == "accuracy" and results["runs_computed"] == 4
    sup = results["cells"]["zorro-shared-supervised"]
    assert set(sup["summary"]) == {"audio-only", "video-only", "audio-visual", "AV − A", "AV − V"}
    assert set(results["cells"]["zorro-shared-contrastive"]["summary"]) == {"audio-only", "video-only", "audio-visual"}
    assert all(s["n"] == 2 for c in results["cells"].values() for s in c["summary"].values())
    run = sup["runs"][0]
    assert set(run["results"]["audio-only"]) == {"audio", "fusion", "global", "mean"}  # every head is kept
    gap = run["columns"]["audio-visual"] - run["columns"]["audio-only"]
    assert run["gaps"]["AV − A"] == pytest.approx(gap)
    table = (finished / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| zorro, shared")]
    assert len(rows) == 3  # a contrastive row, a supervised row, a per-head row
    assert [r.count("±") for r in rows] == [3, 5, 13]  # mean ± std in every cell; gaps; 13 (regime, head) pairs
    assert (finished / "ablate.png").stat().st_size > 1000
    assert sorted(p.name for p in (finished / "cells" / "zorro-shared-supervised").iterdir()) == ["seed0", "seed1"]


def test_finished_runs_are_reused(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    _no_training(monkeypatch)
    again = _ablate(out)
    assert again["runs_computed"] == 0
    before = json.loads((finished / "results.json").read_text())
    assert again["cells"]["zorro-shared-supervised"]["summary"] == before["cells"]["zorro-shared-supervised"]["summary"]


def test_changed_config_is_never_silently_reused(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    plan = (out / "ablate.json").read_text()
    with pytest.raises(ValueError, match=r"another configuration \(train.steps: 2 -> 3\).*--overwrite"):
        _ablate(out, "train.steps=3", seeds=1)
    assert (out / "ablate.json").read_text() == plan  # refused before anything was touched
    results = _ablate(out, "train.steps=3", seeds=1, overwrite=True)
    assert results["runs_computed"] == 2
    assert all(r["train"]["step"] == 3 for c in results["cells"].values() for r in c["runs"])
    # settings that do not change the numbers (threads, logging, workers) do not make a run stale
    _no_training(monkeypatch)
    assert _ablate(out, "train.steps=3", "train.log_every=5", "probe.batch_size=7", seeds=1)["runs_computed"] == 0


def test_changed_grid_trains_only_the_new_cells(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    results = run_ablate(
        str(out),
        grid=["mask=zorro,full", "sharing=shared", "objective=contrastive"],
        seeds=1,
        overrides=FAST,
        threads=1,
        verbose=False,
    )
    assert set(results["cells"]) == {"zorro-shared-contrastive", "full-shared-contrastive"}
    assert results["runs_computed"] == 1  # full's; zorro's was reused
    # a narrower grid (no supervised cell, one seed of two): its table goes to a subset folder, the wider one stays
    (subset,) = (out / "subsets").iterdir()
    assert "full, shared" in (subset / "table.md").read_text() and "supervised" not in (subset / "table.md").read_text()
    assert (
        "supervised" in (out / "table.md").read_text().lower()
        and json.loads((out / "ablate.json").read_text())["seeds"] == 2
    )


def test_interrupted_runs_resume_or_restart(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    done = out / "cells" / "zorro-shared-supervised" / "seed1"
    (done / "result.json").unlink()  # stopped after its checkpoint, during evaluation
    early = out / "cells" / "zorro-shared-contrastive" / "seed0"
    (early / "result.json").unlink()
    shutil.rmtree(early / "checkpoints")  # stopped before its first checkpoint
    results = run_ablate(str(out), grid=GRID, seeds=2, overrides=FAST, threads=1)
    text = capsys.readouterr().out
    assert "zorro-shared-supervised seed 1: resuming" in text and "zorro-shared-contrastive seed 0: training" in text
    assert results["runs_computed"] == 2
    before = json.loads((finished / "results.json").read_text())["cells"]
    for cell in CELLS:  # CPU runs are deterministic: resumed and restarted runs give the same numbers
        assert results["cells"][cell]["summary"] == before[cell]["summary"]
    steps = [json.loads(line).get("step") for line in open(early / "metrics.jsonl")]
    assert steps == [1, 2]  # the restarted run's log holds one run, not the dead one's lines too


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path / "x"), "--grid", "mask=zorro,swin"]) == 1
    assert capsys.readouterr().err.strip().startswith("zorro: error: --grid mask= takes distinct values")
    with pytest.raises(ValueError, match="axis one of"):
        parse_grid(["masks=zorro"])
    with pytest.raises(ValueError, match=r"mask= takes distinct values from \['zorro', 'bottleneck', 'full'\]"):
        parse_grid(["mask=zorro,swin"])
    assert parse_grid(["mask=full,zorro"])["mask"] == ("zorro", "full")  # table order
    (tmp_path / "mine.txt").write_text("someone's work")
    with pytest.raises(ValueError, match="not empty and holds no zorro ablate run"):
        _ablate(tmp_path)
    with pytest.raises(ValueError, match="--seeds must be a positive int"):
        run_ablate(str(tmp_path / "new"), seeds=0)
    # Swin has one set of weights for every stream: its cells are "shared" ones, a "separate" cell is refused at once
    # (full attention crosses Swin's windows, so its window-only relative position bias is off)
    swin = ["model.name=zorro_swin_tiny", "model.kwargs.rel_pos_bias=false"]
    with pytest.raises(ValueError, match="grid cell full-separate-contrastive: zorro_swin_tiny has no per-stream"):
        run_ablate(str(tmp_path / "swin"), grid=["mask=full", "objective=contrastive"], overrides=swin, verbose=False)
    assert not (tmp_path / "swin").exists()
    cells = grid_cells(parse_grid(["mask=full", "sharing=shared"]))
    cfgs = _cell_configs(cells, 1, None, swin, tmp_path / "swin", 1)
    assert {(c.model.mask, c.train.task) for c in cfgs.values()} == {("full", "contrastive"), ("full", "supervised")}
    assert all("shared_weights" not in c.model.kwargs for c in cfgs.values())


def test_clips_from_a_config_multi_label(tmp_path):
    """Real mp4s listed in CSVs, set by --config (the DEFAULTS do not apply then): multi-label data gives mAP."""
    pytest.importorskip("av")
    from .helpers import write_clip

    for i in range(4):
        write_clip(tmp_path / f"c{i}.mp4", tone_hz=300.0 + 200 * i)
    (tmp_path / "train.csv").write_text('path,labels\nc0.mp4,"dog;bark"\nc1.mp4,cat\nc2.mp4,"cat;meow"\nc3.mp4,dog\n')
    (tmp_path / "val.csv").write_text('path,labels\nc0.mp4,"dog;bark"\nc1.mp4,cat\nc3.mp4,"dog;meow"\n')
    (tmp_path / "run.yaml").write_text(
        f"data: {{kind: clips, train_csv: {tmp_path / 'train.csv'}, "
        f"val_csv: {tmp_path / 'val.csv'}, duration: 0.5}}\ntrain: {{steps: 2}}\n"
    )
    results = run_ablate(
        str(tmp_path / "out"),
        grid=["mask=zorro", "sharing=shared"],
        seeds=1,
        config=str(tmp_path / "run.yaml"),
        overrides=[*TINY, "train.batch_size=2", "probe.max_iter=20"],
        threads=1,
        verbose=False,
    )
    assert results["metric"] == "mAP" and results["chance"] is None
    cfg = results["config"]
    assert cfg["data"]["kind"] == "clips" and cfg["train"]["steps"] == 2 and cfg["data"]["val_size"] == 1024
    assert all(0 < s["mean"] <= 1 for c in results["cells"].values() for k, s in c["summary"].items() if "−" not in k)
    assert "(mAP)" in (tmp_path / "out" / "table.md").read_text()
