"""The ``zorro`` command end to end on tiny settings: train + eval on real mp4 clips (with a corrupt and a missing
file), the demo's outputs, bench and show-mask."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from zorro_models.cli import main
from zorro_models.models.registry import create_model

from .helpers import TINY, TINY_FAMILY, write_clip

ROOT = Path(__file__).resolve().parents[1]


def test_train_and_eval_on_clips_survive_bad_files(tmp_path, capsys):
    """Multi-label (AudioSet-style) supervised training on a CSV of real mp4s, two of which cannot be read: the run
    finishes, counts the skipped clips, and `zorro eval` reports mAP per regime and head."""
    pytest.importorskip("av")
    for i in range(4):
        write_clip(tmp_path / f"c{i}.mp4", tone_hz=300.0 + 200 * i, audio=i != 3)  # c3: no audio track
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (tmp_path / "train.csv").write_text(
        'path,labels\nc0.mp4,"dog;bark"\nc1.mp4,cat\nbroken.mp4,dog\nc2.mp4,"cat;meow"\nmissing.mp4,cat\nc3.mp4,dog\n'
    )
    (tmp_path / "val.csv").write_text('path,labels\nc0.mp4,"dog;bark"\nc1.mp4,cat\nc3.mp4,"dog;bark"\n')
    run = tmp_path / "run"
    data = [
        "data.kind=clips",
        f"data.train_csv={tmp_path / 'train.csv'}",
        f"data.val_csv={tmp_path / 'val.csv'}",
        "data.duration=0.5",
        "train.task=supervised",
        "train.batch_size=2",
        "train.steps=4",
        f"train.out={run}",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warnings are asserted through the metrics
        assert main(["train", *TINY, *data]) == 0
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert records[-1]["step"] == 4 and records[-1]["skipped"] >= 2  # 6 rows, 2 unreadable: one epoch = 3 steps
    assert (run / "checkpoints" / "latest").is_file()

    with pytest.warns(RuntimeWarning, match="skipping clip"):  # the probes read train.csv, bad rows included
        assert main(["eval", str(run), "--probes"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["heads"]["metric"] == "mAP"
    assert set(report["heads"]["results"]) == {"audio-visual", "audio-only", "video-only"}
    assert set(report["heads"]["results"]["audio-only"]) == {"audio", "fusion", "global", "mean"}
    assert all(0 < v <= 1 for r in report["heads"]["results"].values() for v in r.values())
    assert "all" in report["probes"]["results"]["video-only"]
    assert (run / "eval.png").is_file()
    assert "supervised heads (mAP)" in capsys.readouterr().out


@pytest.mark.full  # two tiny trainings and probes (minutes under load); CI runs the real demo after the tests
def test_demo_writes_table_results_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--threads", "1", *TINY, "train.steps=2", "data.num_workers=0"])
    text = capsys.readouterr().out
    assert "audio-only" in text and "Zorro" in text and "full attention" in text
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"untrained", "Zorro", "full attention"}
    assert set(results["table"]["Zorro"]) == {"audio-only", "video-only", "audio-visual"}
    assert results["runs"]["zorro"]["train"]["step"] == 2
    assert code in (0, 1)  # 2 steps prove nothing about the gap; the verdict line says which
    for name in ("probe_accuracy.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "zorro" / "checkpoints" / "latest").is_file() and (out / "full" / "metrics.jsonl").is_file()
    # a second demo into the same folder used to append to each run's metrics.jsonl: refused, unless --overwrite
    assert main(["demo", "--out", str(out), *TINY, "train.steps=3"]) == 1
    assert re.search(r"already holds demo runs .*zorro: checkpoints.*--overwrite", _one_error_line(capsys))
    assert [json.loads(line)["step"] for line in open(out / "zorro" / "metrics.jsonl")] == [1, 2]
    assert main(
        [
            "demo",
            "--out",
            str(out),
            "--overwrite",
            "--masks",
            "zorro",
            "--no-baseline",
            "--threads",
            "1",
            *TINY,
            "train.steps=1",
            "data.num_workers=0",
        ]
    ) in (0, 1)
    assert [json.loads(line)["step"] for line in open(out / "zorro" / "metrics.jsonl")] == [1]


def test_demo_refuses_a_mask_its_model_cannot_take_before_training(tmp_path, capsys):
    """Swin with its relative position bias cannot take mask=full: the demo said so only after training the Zorro
    run (8 minutes of zorro_swin_demo); now before anything runs. The Swin demo preset builds under every mask."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--threads", "1", *TINY_FAMILY["swin"], "train.steps=2"]) == 1
    assert "rel_pos_bias" in _one_error_line(capsys)
    assert not (out / "zorro").exists()
    for mask in ("zorro", "full", "bottleneck"):
        create_model("zorro_swin_demo", mask=mask)


def test_bench_and_show_mask(tmp_path, capsys):
    assert main(["bench", "--steps", "1", "--masks", "zorro", *TINY]) == 0
    assert "clips/s (train)" in capsys.readouterr().out
    png = tmp_path / "mask.png"
    assert main(["show-mask", "--mask", "zorro", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "audio 32, video 64, fusion 4" in text and "readout" in text and png.stat().st_size > 1000
    assert main(["show-mask", "--audio-only"]) == 0
    assert "video 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model,expected",
    [
        (
            "zorro_swin_tiny",
            [
                "stage 0, block(s) 0 (windows): audio 8 x 64, video 16 x 32, fusion 8",
                "stage 0, block(s) 1 (shifted windows): audio 15 x 16-64",
                "stage 3",
                "readout",
            ],
        ),
        (
            "zorro_hip_tiny",
            [
                "level 0 (cross-attention, latents -> inputs, per group): audio 4 x 16, video 8 x 16",
                "level 2 (self-attention of the latents, 2 block(s), per group)",
                "readout",
            ],
        ),
    ],
)
def test_show_mask_draws_every_family(tmp_path, capsys, model, expected):
    """Swin and HiP change layouts per stage / level: one picture per layout (they used to crash)."""
    png = tmp_path / "masks.png"
    assert main(["show-mask", "--model", model, "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert all(e in text for e in expected), text
    assert png.stat().st_size > 10_000


def test_show_mask_takes_every_mask_kind_for_every_family(capsys):
    for model in ("zorro_vit_demo", "zorro_swin_tiny", "zorro_hip_tiny"):
        for kind in ("full", "bottleneck"):
            assert main(["show-mask", "--model", model, "--mask", kind]) == 0
            assert f"{model}, mask={kind}:" in capsys.readouterr().out


def test_show_mask_layouts_are_the_models_own():
    """The dry run records the masks the blocks really receive: for a ViT, its layout mask in every block."""
    from zorro_models import create_model
    from zorro_models.commands.show_mask import attention_layouts

    model = create_model("zorro_vit_demo")
    (label, mask), (readout_label, _) = attention_layouts(model, model.example_inputs(batch_size=1))
    assert label == "self-attention of every block (4)" and readout_label.startswith("readout")
    assert torch.equal(mask.to_dense(), model.layout_mask((32, 64, 4)).to_dense())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("zorro: error: "), err
    return err


def test_errors_are_one_line_with_the_choices(tmp_path, capsys):
    assert main(["train", "optim.learning_rate=1"]) == 1
    assert "unknown key(s) ['learning_rate']; valid keys: ['lr'," in _one_error_line(capsys)
    assert main(["show-mask", "--model", "nope"]) == 1
    assert "unknown model 'nope'; registered models: [" in _one_error_line(capsys)
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in _one_error_line(capsys)
    (tmp_path / "bad.yaml").write_text("train: {steps: many}\n")
    assert main(["eval", str(tmp_path)]) == 1
    assert "neither a checkpoint folder" in _one_error_line(capsys)
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 1
    assert "train.steps must be an int, got 'many'" in _one_error_line(capsys)


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(ValueError, match="unknown key"):
        main(["--debug", "train", "optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown model"):
        main(["show-mask", "--model", "nope", "--debug"])
    monkeypatch.setenv("ZORRO_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown key"):
        main(["train", "optim.learning_rate=1"])


def test_unexpected_errors_name_their_type(monkeypatch, capsys):
    import zorro_models.cli as cli

    def boom(args):
        raise RuntimeError("the kernel exploded")

    monkeypatch.setitem(cli.COMMANDS, "bench", boom)
    assert main(["bench"]) == 1
    assert _one_error_line(capsys).strip() == (
        "zorro: error: RuntimeError: the kernel exploded (run with --debug for the traceback)"
    )


def test_the_command_exits_nonzero_with_one_line():
    """The real process: exit status and stderr as a user sees them."""
    out = subprocess.run(
        [sys.executable, "-m", "zorro_models.cli", "show-mask", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("zorro: error: unknown model 'nope'") and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize(
    "world, prefix",
    [(None, "python -m zorro_models.train: error: "), ("2", "python -m zorro_models.train (rank 1): error: ")],
)
def test_the_torchrun_entry_point_errors_in_one_line(world, prefix):
    """``python -m zorro_models.train`` (what torchrun launches) speaks like ``zorro``: one line, naming the rank when
    there are several, exit status 1; ``--debug`` keeps the traceback."""
    import os

    env = dict(os.environ, **({"WORLD_SIZE": world, "RANK": "1"} if world else {}))
    args = [sys.executable, "-m", "zorro_models.train", "data.nonsense=1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 1
    assert out.stderr.startswith(prefix + "config.data: unknown key(s) ['nonsense']"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_train_logs_lines_when_not_on_a_terminal(tmp_path, capsys):
    """Without a terminal (pytest captures stdout) there is no progress bar: a line per logged step instead, with
    the step, the rounded loss, the speed and the time left; the thread count from --threads reaches the run."""
    run = tmp_path / "run"
    assert main(["train", "--threads", "1", *TINY, "train.steps=2", "train.progress=true", f"train.out={run}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [x for x in lines if x.startswith("[zorro] step ")]
    assert len(steps) == 2 and re.fullmatch(r"\[zorro\] step 2/2  loss \d+\.\d{3}  [\d.]+ it/s  ETA 0 s", steps[-1]), (
        steps
    )
    done = lines[-1]
    assert re.fullmatch(r"\[zorro\] done: step 2, loss \d+\.\d{3}, checkpoint .*", done), done
    assert "threads: 1" in (run / "config.yaml").read_text()


def test_bench_needs_a_step(capsys):
    """`zorro bench --steps 0` crashed with statistics.StatisticsError (the median of no timings)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--steps", "0", *TINY])
    assert exit_info.value.code == 2
    assert "argument --steps: must be an int >= 1, got 0" in capsys.readouterr().err


def test_settings_may_follow_flags(monkeypatch, capsys):
    """`zorro eval RUN --probes data.val_csv=...` was an argparse error: settings worked only before the flags."""
    import zorro_models.cli as cli

    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: seen.update(vars(args)) or 0)
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args: seen.update(vars(args)) or 0)
    assert main(["eval", "runs/x", "probe.max_iter=3", "--probes", "data.val_csv=v.csv", "--out", "o"]) == 0
    assert seen["overrides"] == ["probe.max_iter=3", "data.val_csv=v.csv"] and seen["probes"] and seen["out"] == "o"
    assert main(["train", "--resume", "train.steps=3"]) == 0
    assert seen["overrides"] == ["train.steps=3"] and seen["resume"] and not seen["overwrite"]
    for bad in (
        ["eval", "runs/x", "--probes", "--nope"],
        ["eval", "runs/x", "--probes", "stray"],
        ["show-mask", "train.steps=3"],
        ["train", "--resume", "--overwrite"],
    ):
        with pytest.raises(SystemExit):
            main(bad)
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_train_flags_resume_and_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.steps=1", f"train.out={run}"]) == 0
    assert main(["train", *TINY, "train.steps=2", f"train.out={run}"]) == 1
    err = _one_error_line(capsys)
    assert "already holds a run" in err and "(zorro train --resume)" in err and "--overwrite" in err
    assert main(["train", "--resume", *TINY, "train.steps=2", f"train.out={run}"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    assert main(["train", *TINY, "train.steps=1", f"train.out={run}", "--overwrite"]) == 0
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]


def test_probe_plot_legend_covers_no_bar_or_label():
    """The demo's table drawn as bars: the legend used to sit on the 0.92 label of the audio-visual group (the
    table before issue 23's initialisation, then the one after)."""
    from zorro_models.utils.reporting import modality_scores_figure

    before = {
        "untrained": {"audio-only": 0.732, "video-only": 0.398, "audio-visual": 0.772},
        "Zorro": {"audio-only": 0.783, "video-only": 0.794, "audio-visual": 0.920},
        "full attention": {"audio-only": 0.577, "video-only": 0.331, "audio-visual": 0.545},
    }
    after = {
        "untrained": {"audio-only": 0.735, "video-only": 0.781, "audio-visual": 0.875},
        "Zorro": {"audio-only": 0.824, "video-only": 0.836, "audio-visual": 0.967},
        "full attention": {"audio-only": 0.627, "video-only": 0.468, "audio-visual": 0.753},
    }
    for table in (before, after):
        _legend_covers_nothing(modality_scores_figure(table, chance=0.125))


def _legend_covers_nothing(fig):
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    covered = [t.get_text() for t in ax.texts if t.get_window_extent().overlaps(legend)]
    covered += [f"bar {p.get_height():.2f}" for p in ax.patches if p.get_window_extent().overlaps(legend)]
    assert covered == []
