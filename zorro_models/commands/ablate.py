"""``zorro ablate``: the paper's ablations as one command — attention mask x parameter sharing x objective, each cell
trained on the same data with the same seeds, scored under audio-only, video-only and audio-visual inputs.

    zorro ablate --out ablation                                            # the default grid, embedded data
    zorro ablate --out ablation --seeds 3 --grid mask=zorro,full objective=contrastive
    zorro ablate --out ablation --config run.yaml                          # your clips, your model and schedule

Grid axes (``--grid axis=v1,v2 ...``; an axis not named keeps all its values):

- ``mask``: ``zorro`` | ``bottleneck`` | ``full`` -> ``model.mask``;
- ``sharing``: ``shared`` | ``separate`` -> ``model.kwargs.shared_weights`` (one set of block weights for every
  stream, or one per stream);
- ``objective``: ``contrastive`` | ``supervised`` -> ``train.task``.

Each (cell, seed) is one ordinary training run (:class:`~zorro_models.training.trainer.Trainer`, seed ``train.seed +
k``) in ``<out>/cells/<cell>/seed<k>/``, evaluated with the existing machinery: contrastive cells with linear probes on
the frozen backbone (:func:`~zorro_models.training.evaluate.run_probes`; the table shows the audio output's probe under
audio-only input, the video output's under video-only, all four outputs concatenated under audio-visual, as ``zorro
demo`` does), supervised cells with their heads on the validation split (:meth:`Trainer.validate`; the table shows the
averaged prediction of the heads, every head is in ``results.json``) and the unimodal-inference gaps (audio-visual
minus audio-only, audio-visual minus video-only). Metric: top-1 accuracy, or mAP on multi-label data.

Resuming: a run that finished wrote ``result.json`` with its configuration and is reused when that configuration is
unchanged; a run interrupted after a checkpoint resumes from it (``train.resume``); one interrupted before any
checkpoint starts over (``train.overwrite``: the trainer deletes the dead run's files first). A run folder holding a
*different* configuration (a changed ``--config`` or override) is never reused nor silently replaced: the command
stops and names it, and ``--overwrite`` retrains it. Settings that change how a run executes but not its numbers
(threads, workers, logging, checkpoint cadence, device) are not compared.

Outputs in ``<out>``: ``results.json`` (every number, per seed and summarised, with timings, machine and config),
``table.md`` (mean ± std over seeds), ``ablate.png`` (bars with error bars), ``ablate.json`` (the plan). A grid that
leaves out cells or seeds of the one ``<out>`` already tabulates reuses its runs but writes these four files to
``<out>/subsets/<cells>-cells-<seeds>-seeds-<hash>/``, keeping the wider table. The default grid, measured, and what
it shows: docs/ablate.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from ..models.registry import model_config
from ..training.build import build_model, with_resolved_lr
from ..training.checkpoint import latest_checkpoint, stored_config
from ..training.config import Config, config_to_yaml, from_dict, load_config, machine_threads
from ..training.evaluate import REGIMES, evaluate_run
from ..training.runlock import LOCK_FILE, RunLock
from ..training.trainer import Trainer, run_contents
from ..utils.reporting import draw_grouped_bars, format_table, pyplot, write_json
from .demo import TABLE_COLUMNS

__all__ = ["AXES", "DEFAULTS", "Cell", "parse_grid", "grid_cells", "run_ablate"]

#: grid axis -> its values, in table order
AXES = {
    "mask": ("zorro", "bottleneck", "full"),
    "sharing": ("shared", "separate"),
    "objective": ("contrastive", "supervised"),
}

#: settings of the default run on the embedded data (on top of :class:`~zorro_models.training.config.Config`'s
#: defaults, which are the demo's): 24 runs of ``zorro_vit_demo`` (times: docs/ablate.md). Not applied under
#: ``--config``: a config file is used as ``zorro train`` would use it.
DEFAULTS = ("train.steps=80", "probe.train_size=1024", "probe.test_size=512", "data.val_size=512")

#: settings that change how a run is executed or logged, not its numbers: not compared when reusing a run
_EXECUTION_ONLY = {
    "train": (
        "out",
        "resume",
        "overwrite",
        "progress",
        "plot",
        "threads",
        "device",
        "log_every",
        "ckpt_every",
        "keep_checkpoints",
    ),
    "data": ("num_workers",),
    "probe": ("batch_size",),
}
#: bump when what a finished run's result.json holds or means changes: older results are then stale
PROTOCOL = 1
RESULT = "result.json"
PLAN = "ablate.json"
COLUMNS = tuple(TABLE_COLUMNS)  # audio-only, video-only, audio-visual
GAPS = {"AV − A": "audio-only", "AV − V": "video-only"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    mask: str
    sharing: str
    objective: str

    @property
    def name(self) -> str:
        return f"{self.mask}-{self.sharing}-{self.objective}"

    def overrides(self, model_name: str) -> list[str]:
        """The settings of this cell for preset ``model_name``. A model without a ``shared_weights`` argument (Swin,
        HiP) has one set of block weights for every stream: it is a "shared" cell as it is, and cannot be a
        "separate" one."""
        sharing = []
        try:
            model_config(model_name, shared_weights=True)
            sharing = [f"model.kwargs.shared_weights={'true' if self.sharing == 'shared' else 'false'}"]
        except TypeError:
            if self.sharing == "separate":
                raise ValueError(
                    f"{model_name} has no per-stream weights (no shared_weights argument); restrict the "
                    f"grid with --grid sharing=shared"
                ) from None
        return [f"model.mask={self.mask}", *sharing, f"train.task={self.objective}"]


def parse_grid(items: Sequence[str] = ()) -> dict:
    """``["mask=zorro,full", "objective=contrastive"]`` -> ``{axis: values}`` for every axis of :data:`AXES` (an axis
    not named keeps all its values). Raises ValueError naming the bad axis or value."""
    grid = dict(AXES)
    seen = set()
    for item in items:
        axis, sep, text = item.partition("=")
        axis = axis.strip()
        if not sep or axis not in AXES:
            raise ValueError(f"--grid entries look like axis=v1,v2 with axis one of {list(AXES)}, got {item!r}")
        if axis in seen:
            raise ValueError(f"--grid names axis {axis!r} twice")
        seen.add(axis)
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in AXES[axis]]
        if not values or bad or len(set(values)) != len(values):
            raise ValueError(f"--grid {axis}= takes distinct values from {list(AXES[axis])}, got {text!r}")
        grid[axis] = tuple(v for v in AXES[axis] if v in values)  # table order, whatever order they were given in
    return grid


def grid_cells(grid: dict) -> list[Cell]:
    """Every cell of ``grid``, objective-major (the table's row order)."""
    return [Cell(m, s, o) for o, m, s in itertools.product(grid["objective"], grid["mask"], grid["sharing"])]


# ------------------------------------------------------------------------------------------------ one run
def _fingerprint(cfg: Config) -> dict:
    """What a run's numbers depend on: its config without the execution-only settings, plus :data:`PROTOCOL`; plain
    values (lists, not tuples), so it compares equal to itself read back from JSON."""
    d = yaml.safe_load(config_to_yaml(with_resolved_lr(cfg)))  # the learning rate the run trains at, as recorded
    for section, keys in _EXECUTION_ONLY.items():
        for k in keys:
            d[section].pop(k, None)
    return {"protocol": PROTOCOL, **d}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _stored_fingerprint(run: Path, overwrite: bool = False) -> Optional[dict]:
    """The fingerprint of whatever run ``run`` holds: from its result.json, else its config.yaml; None if neither (or,
    with ``overwrite``, when a run without checkpoints has a config.yaml that cannot be read)."""
    if (run / RESULT).is_file():
        return json.loads((run / RESULT).read_text(encoding="utf-8"))["fingerprint"]
    if (run / "config.yaml").is_file():
        ckpt = latest_checkpoint(run)
        if ckpt is not None:  # the config its checkpoint was saved under, from any intact copy (damaged ones named)
            notes = []
            data, _ = stored_config(ckpt, notes)
            for line in notes:
                print(f"[ablate] {line}", file=sys.stderr)
        else:
            try:
                data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                if overwrite:  # nothing of it can be resumed: retrained from scratch
                    return None
                raise ValueError(
                    f"{run / 'config.yaml'} cannot be read ({type(e).__name__}) and the run has no checkpoint; "
                    f"rerun with --overwrite to retrain it"
                ) from None
        return _fingerprint(from_dict(Config, data, where=str(run / "config.yaml")))
    return None


def _prepare(run: Path, fingerprint: dict, overwrite: bool) -> str:
    """What to do with run folder ``run``: ``"reuse"`` its result, ``"resume"`` its checkpoint (``train.resume``),
    ``"overwrite"`` a run that died before its first checkpoint (``train.overwrite``: the trainer deletes it, so no
    log line of the dead run mixes in), or start ``"fresh"``. A folder holding another configuration raises
    ValueError, unless ``overwrite``: its result is deleted here and its run by the trainer."""

    stored = _stored_fingerprint(run, overwrite)
    if stored is not None and stored != fingerprint:
        if not overwrite:
            diff = _differences(stored, fingerprint)
            raise ValueError(
                f"{run} holds a run of another configuration ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}); rerun with --overwrite to retrain it, or choose "
                f"another --out"
            )
        (run / RESULT).unlink(missing_ok=True)
    elif (run / RESULT).is_file():
        return "reuse"
    elif latest_checkpoint(run) is not None:
        return "resume"
    return "overwrite" if run_contents(run) else "fresh"


def _scores(cfg: Config, trainer, say) -> dict:
    """Evaluate a trained run with :func:`~zorro_models.training.evaluate.evaluate_run`: ``{"kind": "probes" | "heads",
    "metric", "num_classes", "results": {regime: {output or head: value}}, "columns": {column: value}, "gaps": {gap:
    value}}``."""
    report = evaluate_run(cfg, trainer.task, device=trainer.device, progress=say)
    if "heads" in report:
        res = report["heads"]["results"]
        out = {
            "kind": "heads",
            "metric": report["heads"]["metric"],
            "num_classes": trainer.task.heads.num_classes,
            "results": res,
            "columns": {c: res[r]["mean"] for c, (r, _) in TABLE_COLUMNS.items()},
        }
        out["gaps"] = {g: out["columns"]["audio-visual"] - out["columns"][c] for g, c in GAPS.items()}
        return out
    probes = report["probes"]
    res = probes["results"]
    return {
        "kind": "probes",
        "metric": probes["metric"],
        "num_classes": probes["num_classes"],
        "results": res,
        "columns": {c: res[r][o] for c, (r, o) in TABLE_COLUMNS.items()},
        "gaps": {},
    }


def _train_and_score(cfg: Config, how: str, say, label: str = "zorro") -> dict:

    if how in ("resume", "overwrite"):  # the run-folder rule: a folder that holds a run is resumed or replaced
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{how: True}))
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.label = label  # the cell's lines say which cell (a full-attention cell is not "[zorro]")
    summary = trainer.fit()
    t1 = time.perf_counter()
    scores = _scores(cfg, trainer, say)
    t2 = time.perf_counter()
    return {"train": summary, **scores, "seconds": {"train": round(t1 - t0, 1), "eval": round(t2 - t1, 1)}}


# ------------------------------------------------------------------------------------------------ summaries
def _mean_std(values: list) -> dict:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _summary(runs: list) -> dict:
    keys = list(COLUMNS) + [g for g in GAPS if g in runs[0]["gaps"]]
    return {k: _mean_std([r["columns"].get(k, r["gaps"].get(k)) for r in runs]) for k in keys}


def _cell_text(s: Optional[dict], signed: bool = False) -> str:
    if s is None:
        return "-"
    mean = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    return mean if s["n"] < 2 else f"{mean} ± {s['std']:.3f}"


def _tables(cells: list, summaries: dict, metric: str, markdown: bool) -> str:
    parts = []
    for objective, title, keys in (
        ("contrastive", f"Contrastive pre-training, then linear probes on the frozen backbone ({metric})", COLUMNS),
        (
            "supervised",
            f"Supervised training, the heads' averaged prediction ({metric}); unimodal-inference gaps",
            COLUMNS + tuple(GAPS),
        ),
    ):
        rows = {
            f"{c.mask}, {c.sharing}": {k: _cell_text(summaries[c.name].get(k), k in GAPS) for k in keys}
            for c in cells
            if c.objective == objective
        }
        if rows:
            head = f"### {title}" if markdown else title
            parts.append(f"{head}\n\n" + format_table(rows, keys, row_header="mask, parameters", markdown=markdown))
    return "\n\n".join(parts)


def _heads_table(cells: list, records: dict, markdown: bool) -> Optional[str]:
    """Every supervised head under every regime, mean ± std over seeds."""
    sup = [c for c in cells if c.objective == "supervised"]
    if not sup:
        return None
    abbrev = {"audio-visual": "AV", "audio-only": "A", "video-only": "V"}
    keys = [(r, h) for r in REGIMES for h in records[sup[0].name][0]["results"][r]]
    rows = {
        f"{c.mask}, {c.sharing}": {
            f"{abbrev[r]}: {h}": _cell_text(_mean_std([run["results"][r][h] for run in records[c.name]]))
            for r, h in keys
        }
        for c in sup
    }
    text = format_table(rows, [f"{abbrev[r]}: {h}" for r, h in keys], row_header="mask, parameters", markdown=markdown)
    title = "Supervised cells, every head under every input (A audio-only, V video-only, AV audio-visual)"
    return f"### {title}\n\n{text}" if markdown else f"{title}\n\n{text}"


def _plot(cells: list, summaries: dict, path: Path, metric: str, chance: Optional[float]) -> None:
    """One panel per objective; per input regime, a bar per (mask, sharing) with its std as error bar."""
    plt = pyplot()
    objectives = [o for o in AXES["objective"] if any(c.objective == o for c in cells)]
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.5 * len(objectives), 4.6), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        rows = {f"{c.mask}, {c.sharing}": summaries[c.name] for c in cells if c.objective == objective}
        draw_grouped_bars(
            ax,
            {r: {k: s[k]["mean"] for k in COLUMNS} for r, s in rows.items()},
            errors={r: {k: s[k]["std"] for k in COLUMNS} for r, s in rows.items()},
            metric=metric,
            chance=chance,
            values=len(rows) <= 4,
            legend_size=7,
            title="contrastive: linear probes" if objective == "contrastive" else "supervised: mean of the heads",
        )
    # one legend for both panels, under them (the same bars, the same colours)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0]:
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("zorro ablate: mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the command
def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / PLAN).is_file():
        raise ValueError(f"--out {out} is not empty and holds no zorro ablate run (no {PLAN}); choose a new folder")


def _narrower_than_before(out: Path, cells: list, seeds: int) -> Optional[Path]:
    """Where this grid's table goes when it leaves out cells or seeds of the grid ``out`` already tabulates: a folder
    of its own under ``<out>/subsets/``, so that the wider table (results.json, table.md, ablate.png, the plan) stays.
    None when this grid covers the earlier one (its table replaces it) or there is none."""
    try:
        before = json.loads((out / PLAN).read_text(encoding="utf-8"))
        old = {c.name for c in grid_cells(before["grid"])}
        old_seeds = int(before["seeds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no earlier plan (or one this version cannot read): nothing to protect
    names = sorted(c.name for c in cells)
    if set(names) >= old and seeds >= old_seeds:
        return None
    tag = hashlib.sha1(",".join(names).encode()).hexdigest()[:8]
    return out / "subsets" / f"{len(cells)}-cells-{seeds}-seeds-{tag}"


def _cell_configs(
    cells: list, seeds: int, config: Optional[str], overrides: Sequence[str], out: Path, threads: int
) -> dict:
    """``{(cell name, k): Config}`` for every run, each checked by building its model on the meta device (an axis
    value the model does not support fails here, before any training)."""

    base = ([] if config is not None else list(DEFAULTS)) + list(overrides)
    base_cfg = load_config(config, base)
    cfgs = {}
    for cell in cells:
        try:
            cell_overrides = cell.overrides(base_cfg.model.name)
        except ValueError as e:
            raise ValueError(f"grid cell {cell.name}: {e}") from None
        for k in range(seeds):
            run = out / "cells" / cell.name / f"seed{k}"
            cfg = load_config(
                config,
                base
                + cell_overrides
                + [
                    f"train.seed={base_cfg.train.seed + k}",
                    f"train.out={run}",
                    f"train.threads={threads}",
                    "train.plot=false",
                ],
            )
            if k == 0:
                try:
                    with torch.device("meta"):
                        build_model(cfg)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"grid cell {cell.name}: {e}") from None
            cfgs[cell.name, k] = cfg
    return cfgs


def run_ablate(
    out: str = "zorro_ablate",
    *,
    grid: Sequence[str] = (),
    seeds: int = 2,
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    threads: Optional[int] = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Train and score every (cell, seed) of the grid (see the module docstring); returns the dict also written to
    ``<out>/results.json``.

    ``grid``: ``axis=v1,v2`` strings (:func:`parse_grid`). ``seeds``: runs per cell, seeds ``train.seed + k``.
    ``config`` / ``overrides``: the run settings (without ``config``, :data:`DEFAULTS` apply first). ``overwrite``:
    retrain runs whose stored configuration differs instead of stopping.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive int, got {seeds!r}")
    out = Path(out)
    axes = parse_grid(grid)
    cells = grid_cells(axes)
    threads = threads or machine_threads()
    _check_out(out)
    cfgs = _cell_configs(cells, seeds, config, overrides, out, threads)
    # one ablation per --out: a second `zorro ablate` (or a `zorro train` into one of its runs, which the trainer's
    # own lock stops) would interleave its cells with this one's
    with RunLock.acquire(out, what=f"--out {out}", say=lambda line: print(f"[ablate] {line}", file=sys.stderr)):
        return _run_plan(out, axes, cells, cfgs, seeds, config, overrides, threads, overwrite, verbose)


def _run_plan(
    out: Path,
    axes: dict,
    cells: list,
    cfgs: dict,
    seeds: int,
    config: Optional[str],
    overrides: Sequence[str],
    threads: int,
    overwrite: bool,
    verbose: bool,
) -> dict:
    """:func:`run_ablate` once ``out`` is locked."""
    subset = _narrower_than_before(out, cells, seeds)  # read under the lock: another ablation may be writing its plan
    plan = [(k, cell) for k in range(seeds) for cell in cells]  # seed-major: after one pass every cell has a number
    fps = {key: _fingerprint(cfg) for key, cfg in cfgs.items()}
    # every run folder is judged before anything trains: a stale one stops the command at once, not an hour in
    hows = {key: _prepare(Path(cfgs[key].train.out), fps[key], overwrite) for key in cfgs}
    out.mkdir(parents=True, exist_ok=True)
    tables = subset or out  # a narrower grid's table never replaces the wider one's
    tables.mkdir(parents=True, exist_ok=True)
    write_json({"grid": axes, "seeds": seeds, "config": config, "overrides": list(overrides)}, tables / PLAN)

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    first = cfgs[cells[0].name, 0]
    total = len(cfgs)
    reused = sum(h == "reuse" for h in hows.values())
    say(
        f"[ablate] {len(cells)} cells x {seeds} seed(s) = {total} runs into {out} ({reused} finished earlier): "
        f"{first.model.name}, {first.train.steps} steps of {first.train.batch_size} clips each, data "
        f"{first.data.kind}, {threads} thread(s)"
    )
    t_start = time.perf_counter()
    records = {c.name: [None] * seeds for c in cells}
    spent = {o: [] for o in AXES["objective"]}  # seconds per run computed now, for the ETA
    for i, (k, cell) in enumerate(plan):
        cfg, how = cfgs[cell.name, k], hows[cell.name, k]
        run = Path(cfg.train.out)
        tag = f"[ablate {i + 1}/{total}] {cell.name} seed {k}"
        if how == "reuse":
            record = json.loads((run / RESULT).read_text(encoding="utf-8"))["result"]
            say(f"{tag}: finished earlier, reused")
        else:
            say(
                f"{tag}: "
                + {
                    "resume": "resuming",
                    "overwrite": "training again (the last attempt stopped before its first checkpoint)",
                }.get(how, "training")
                + " ..."
            )
            t0 = time.perf_counter()
            record = _train_and_score(cfg, how, lambda line: say(f"{tag}:   {line}"), label=f"{cell.name} seed {k}")
            write_json({"fingerprint": fps[cell.name, k], "result": record}, run / RESULT)
            spent[cell.objective].append(time.perf_counter() - t0)
            pending = [c.objective for j, c in plan[i + 1 :] if hows[c.name, j] != "reuse"]
            cols = "  ".join(f"{c} {record['columns'][c]:.3f}" for c in COLUMNS)
            say(f"{tag}: {cols}  ({spent[cell.objective][-1]:.0f} s){_eta(spent, pending)}")
        records[cell.name][k] = record
    elapsed = time.perf_counter() - t_start

    metric = records[cells[0].name][0]["metric"]
    num_classes = records[cells[0].name][0]["num_classes"]
    chance = 1.0 / num_classes if metric == "accuracy" else None
    summaries = {c.name: _summary(records[c.name]) for c in cells}
    results = {
        "grid": axes,
        "seeds": [first.train.seed + k for k in range(seeds)],
        "metric": metric,
        "chance": chance,
        "columns": {
            c: {"regime": r, "probe output (contrastive)": o, "head (supervised)": "mean"}
            for c, (r, o) in TABLE_COLUMNS.items()
        },
        "gaps": {g: f"audio-visual minus {c}, supervised cells" for g, c in GAPS.items()},
        "cells": {
            c.name: {"axes": dataclasses.asdict(c), "summary": summaries[c.name], "runs": records[c.name]}
            for c in cells
        },
        "seconds": round(elapsed, 1),
        "runs_computed": sum(len(v) for v in spent.values()),
        "threads": threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": _load(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "device": "cuda" if torch.cuda.is_available() and first.train.device != "cpu" else "cpu",
        },
        "config": first.to_dict(),
    }
    write_json(results, tables / "results.json")
    md = _tables(cells, summaries, metric, markdown=True)
    heads = _heads_table(cells, records, markdown=True)
    std_note = f"mean ± sample std over {seeds} seeds" if seeds > 1 else "one seed: no spread"
    (tables / "table.md").write_text(
        f"## zorro ablate: {first.model.name}, {first.train.steps} steps of {first.train.batch_size} clips, "
        f"data {first.data.kind}; {std_note}\n\n{md}\n" + (f"\n{heads}\n" if heads else ""),
        encoding="utf-8",
    )
    _plot(cells, summaries, tables / "ablate.png", metric, chance)
    say(
        f"\n{_tables(cells, summaries, metric, markdown=False)}\n\n{std_note}; chance "
        f"{'-' if chance is None else f'{chance:.3f}'}; {elapsed / 60:.1f} min, {results['runs_computed']} of {total} "
        f"runs computed now\nwrote {tables / 'results.json'}, {tables / 'table.md'}, {tables / 'ablate.png'}"
        + (f" (a narrower grid than the one {out} tabulates: that table is kept)" if subset else "")
    )
    return results


def _eta(spent: dict, pending: list) -> str:
    """Seconds per run so far (of the same objective where there is one) x the runs still to compute."""
    every = [x for v in spent.values() for x in v]
    if not every or not pending:
        return ""
    secs = sum(statistics.fmean(spent[o] or every) for o in pending)
    return f"; ETA {secs / 60:.1f} min for {len(pending)} more run(s)"


def _load() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
