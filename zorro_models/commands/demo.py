"""``zorro demo``: the paper's point on a laptop CPU in a few minutes.

For each attention mask (``zorro``, then ``full`` — the paper's full-attention ablation), the same small Zorro-ViT
(``zorro_vit_demo``) is pre-trained contrastively (InfoNCE between its audio and video outputs) on the embedded
synthetic clips, frozen, and evaluated with linear probes:

- **audio-only**: the audio output, computed from audio alone (the video segment has length 0);
- **video-only**: the video output, computed from video alone;
- **audio-visual**: the four outputs concatenated, computed from both.

Zorro's audio output never sees video tokens, so contrastive training can only make it agree with the video output
through what both modalities share — the class. Under full attention both outputs read every token and agree on
per-clip nuisances instead (instance discrimination through a cross-modal shortcut); alone, each modality then tells
the probes much less. Expected: Zorro's unimodal probes clearly above the full model's.

An "untrained" row gives the same probes on the freshly initialised model: what pre-training added or took away.
The table is printed; ``<out>/results.json`` holds every number (all outputs x all regimes, timings, the config),
``<out>/probe_accuracy.png`` and ``<out>/training_curves.png`` the pictures, and ``<out>/<mask>/`` each run.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..training.build import build_model
from ..training.config import load_config, machine_threads
from ..training.evaluate import run_probes
from ..training.runlock import RunLock
from ..training.trainer import Trainer, run_contents
from ..utils.reporting import format_table, plot_modality_scores, plot_training_curves, read_metrics, write_json

__all__ = ["run_demo", "demo_overrides", "TABLE_COLUMNS", "LABELS"]

LABELS = {"zorro": "Zorro", "full": "full attention", "bottleneck": "bottleneck"}
#: table column -> (regime, output) of the probe it shows
TABLE_COLUMNS = {
    "audio-only": ("audio-only", "audio"),
    "video-only": ("video-only", "video"),
    "audio-visual": ("audio-visual", "all"),
}


def demo_overrides(out: Path, mask: str, threads: int) -> list[str]:
    """The settings the demo runs with, on top of :class:`~zorro_models.training.config.Config`'s defaults (which
    already describe the demo: ``zorro_vit_demo``, 200 steps of batch 64, InfoNCE audio<->video, probes on 2048 + 1024
    clips)."""
    return [
        f"model.mask={mask}",
        f"train.out={out / mask}",
        f"train.threads={threads}",
        "data.num_workers=1",
        "train.plot=false",
    ]


def run_demo(
    out: str = "zorro_demo",
    *,
    masks: Sequence[str] = ("zorro", "full"),
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    threads: Optional[int] = None,
    baseline: bool = True,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Train, probe and compare; returns the results dict also written to ``<out>/results.json``.

    ``config`` / ``overrides`` change any setting (e.g. ``train.steps=100``) for every run. Each run starts from the
    same seed, so the models differ only in their mask. ``baseline`` adds an "untrained" row: the probes on the first
    model before any training, which shows what pre-training added (or took away). An ``out`` that already holds
    demo runs is refused (FileExistsError) unless ``overwrite``, which replaces them.
    """
    out = Path(out)
    # one demo per --out (each of its runs is locked again by its Trainer): taken before anything is read or written
    with RunLock.acquire(out, what=f"--out {out}", say=lambda line: print(f"[demo] {line}", file=sys.stderr)):
        return _run_demo(out, masks, config, overrides, threads, baseline, overwrite, verbose)


def _run_demo(
    out: Path,
    masks: Sequence[str],
    config: Optional[str],
    overrides: Sequence[str],
    threads: Optional[int],
    baseline: bool,
    overwrite: bool,
    verbose: bool,
) -> dict:
    """:func:`run_demo` once ``out`` is locked."""
    held = ["{}: {}".format(out / m, ", ".join(run_contents(out / m))) for m in masks if run_contents(out / m)]
    if held and not overwrite:
        raise FileExistsError(
            f"{out} already holds demo runs ({'; '.join(held)}); pass --overwrite (overwrite=True) "
            f"to replace them, or choose another --out"
        )
    threads = threads or machine_threads()
    for mask in masks[1:]:  # a model that cannot take a later mask fails now, not after the first run's training
        with torch.random.fork_rng():
            build_model(load_config(config, demo_overrides(out, mask, threads) + list(overrides)))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs, curves = {}, {}
    untrained = None
    cfg = None
    for mask in masks:
        cfg = load_config(
            config, demo_overrides(out, mask, threads) + list(overrides) + ["train.overwrite=true"] * overwrite
        )
        trainer = Trainer(cfg)
        trainer.label = LABELS.get(mask, mask)  # the full-attention run's lines are not "[zorro]"
        if baseline and untrained is None:
            if verbose:
                print(f"[untrained] linear probes on the freshly initialised {cfg.model.name}", flush=True)
            with torch.random.fork_rng():  # leave the RNG exactly as training would find it without the baseline
                untrained = run_probes(
                    cfg, trainer.model, device=trainer.device, progress=_progress("untrained", verbose)
                )["results"]
        t0 = time.perf_counter()
        if verbose:
            print(
                f"[{LABELS.get(mask, mask)}] contrastive pre-training: {cfg.train.steps} steps of "
                f"{cfg.train.batch_size} clips, {cfg.model.name} ({trainer.model.num_params():,} parameters)",
                flush=True,
            )
        summary = trainer.fit()
        t1 = time.perf_counter()
        if verbose:
            print(
                f"[{LABELS.get(mask, mask)}] linear probes on {cfg.probe.train_size} + {cfg.probe.test_size} clips",
                flush=True,
            )
        probes = run_probes(
            cfg, trainer.model, device=trainer.device, progress=_progress(LABELS.get(mask, mask), verbose)
        )
        t2 = time.perf_counter()
        runs[mask] = {
            "train": summary,
            "probes": probes["results"],
            "metric": probes["metric"],
            "num_classes": probes["num_classes"],
            "seconds": {"train": round(t1 - t0, 1), "probe": round(t2 - t1, 1)},
        }
        curves[LABELS.get(mask, mask)] = read_metrics(out / mask / "metrics.jsonl")
    metric = runs[masks[0]]["metric"]
    table = {LABELS.get(m, m): {col: runs[m]["probes"][r][o] for col, (r, o) in TABLE_COLUMNS.items()} for m in masks}
    if untrained is not None:
        table = {"untrained": {col: untrained[r][o] for col, (r, o) in TABLE_COLUMNS.items()}, **table}
    elapsed = time.perf_counter() - t_start
    results = {
        "table": table,
        "metric": metric,
        "columns": {c: {"regime": r, "output": o} for c, (r, o) in TABLE_COLUMNS.items()},
        "chance": 1.0 / runs[masks[0]]["num_classes"],
        "runs": runs,
        "untrained_probes": untrained,
        "seconds": round(elapsed, 1),
        "threads": threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "config": cfg.to_dict() if cfg is not None else None,
    }
    verdict = _verdict(table) if {"Zorro", "full attention"} <= set(table) else None
    results["verdict"] = verdict
    write_json(results, out / "results.json")
    plot_modality_scores(
        table,
        out / "probe_accuracy.png",
        metric=metric,
        chance=results["chance"],
        title=f"linear probes on frozen embeddings ({metric})",
    )
    plot_training_curves(curves, out / "training_curves.png", keys=("loss",), title="contrastive pre-training")
    if verbose:
        print()
        print(f"Linear-probe {metric} (chance {results['chance']:.3f}); {elapsed / 60:.1f} min on {threads} thread(s)")
        print(format_table(table, list(TABLE_COLUMNS)))
        if verdict:
            print()
            print(verdict)
        print(f"\nwrote {out / 'results.json'}, {out / 'probe_accuracy.png'}, {out / 'training_curves.png'}")
    return results


def _progress(label: str, verbose: bool):
    """The probes' phase lines, under the run's label (None: silent)."""
    return (lambda line: print(f"[{label}]   {line}", flush=True)) if verbose else None


def _verdict(table: dict) -> str:
    z, f = table["Zorro"], table["full attention"]
    gaps = {c: z[c] - f[c] for c in ("audio-only", "video-only")}
    line = ", ".join(f"{c} {z[c]:.2f} vs {f[c]:.2f} ({g:+.2f})" for c, g in gaps.items())
    if all(g > 0.05 for g in gaps.values()):
        return f"Zorro's unimodal embeddings beat full attention's: {line}."
    return f"WARNING: the expected gap did not show ({line}); see docs/training.md."
