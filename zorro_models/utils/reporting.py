"""Run outputs: metrics as JSON lines, PNG plots (training curves, per-modality scores), result tables.

Every training run appends one JSON object per logged step to ``<run>/metrics.jsonl`` (``{"step": ..., "loss":
..., "lr": ..., ...}``); the plots are drawn from that file, so a run's curves can be redrawn at any time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = [
    "MetricsLogger",
    "read_metrics",
    "plot_training_curves",
    "plot_modality_scores",
    "draw_grouped_bars",
    "modality_scores_figure",
    "format_table",
    "write_json",
    "pyplot",
    "Heartbeat",
    "HEARTBEAT_SECONDS",
]

#: the longest a phase of a command stays silent, in seconds: long phases (embedding thousands of clips, a validation
#: pass, benchmark steps) say how far they are at least this often
HEARTBEAT_SECONDS = 20.0


class Heartbeat:
    """Progress lines for a long phase: call it after each unit of work (``beat(done)``); it passes
    ``"{what}: {done}/{total} ({elapsed} s into this phase)"`` to ``say`` when ``every`` seconds have passed since the
    phase began or since its last line. ``say=None`` makes it silent. The time in the line is this phase's, not the
    command's."""

    def __init__(self, say, what: str, total: Optional[int] = None, every: float = HEARTBEAT_SECONDS, clock=None):
        import time

        self.say, self.what, self.total, self.every = say, what, total, every
        self.clock = clock or time.perf_counter
        self.start = self.last = self.clock()

    def __call__(self, done: int) -> None:
        now = self.clock()
        if self.say is None or now - self.last < self.every:
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else ""
        self.say(f"{self.what}: {done}{of} ({now - self.start:.0f} s into this phase)")


class MetricsLogger:
    """Append-only JSON-lines writer (one object per call to :meth:`log`, flushed at once)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as e:  # a full disk's write error names no file
            raise OSError(e.errno, f"could not append to {self.path}: {e.strerror}") from e


def read_metrics(path: Union[str, Path]) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order (a torn last line from a crash is ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    runs: dict, path: Union[str, Path], keys: Sequence[str] = ("loss",), title: str = "training"
) -> Path:
    """One panel per key of ``keys``; one line per run. ``runs``: label -> list of metric records (with "step")."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, records in runs.items():
            pts = [(r["step"], r[key]) for r in records if key in r and r.get("split", "train") == "train"]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_modality_scores(
    results: dict,
    path: Union[str, Path],
    metric: str = "accuracy",
    chance: Optional[float] = None,
    title: str = "linear probes",
) -> Path:
    """Grouped bars: ``results`` is ``{model label: {column: value}}`` (e.g. columns audio-only, video-only,
    audio-visual)."""
    plt = pyplot()
    fig = modality_scores_figure(results, metric=metric, chance=chance, title=title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def modality_scores_figure(
    results: dict, metric: str = "accuracy", chance: Optional[float] = None, title: str = "linear probes"
):
    """The figure :func:`plot_modality_scores` saves (the caller closes it)."""
    columns = list(next(iter(results.values())))
    fig, ax = pyplot().subplots(figsize=(3.2 + 1.6 * len(columns), 3.8))  # room for the legend right of the bars
    draw_grouped_bars(ax, results, metric=metric, chance=chance, title=title)
    fig.tight_layout()
    return fig


def draw_grouped_bars(
    ax,
    results: dict,
    *,
    errors: Optional[dict] = None,
    metric: str = "accuracy",
    chance: Optional[float] = None,
    title: str = "",
    values: bool = True,
    legend_size: int = 8,
) -> None:
    """Draw ``results`` (``{label: {column: value}}``) on matplotlib axes ``ax``: a group of bars per column, a bar
    per label, with error bars from ``errors`` (the same shape) if given and the values written over the bars if
    ``values``; a dashed line at ``chance``."""
    labels = list(results)
    columns = list(next(iter(results.values())))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(columns))]
        vals = [results[label][c] for c in columns]
        err = [errors[label][c] for c in columns] if errors is not None else None
        bars = ax.bar(xs, vals, width, yerr=err, capsize=2 if err else 0, label=label)
        if values:
            for bar, v, e in zip(bars, vals, err or [0.0] * len(vals)):  # above the error bar, not through it
                ax.text(bar.get_x() + bar.get_width() / 2, v + e + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.set_title(title)
    # right of the axes: inside, wherever matplotlib puts it, it can cover a bar or its value (the demo's 0.92)
    ax.legend(
        fontsize=legend_size,
        ncol=1 if len(labels) < 5 else 2,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
    )


def format_table(
    rows: dict, columns: Sequence[str], row_header: str = "model", fmt: str = "{:.3f}", markdown: bool = False
) -> str:
    """A fixed-width text table: ``rows`` is ``{row label: {column: value}}``; missing values print as '-', strings as
    they are. ``markdown``: the same table with ``|`` separators (a GitHub-flavoured Markdown table)."""

    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v) if isinstance(v, (int, float)) else str(v)

    body = [[str(label)] + [cell(vals.get(c)) for c in columns] for label, vals in rows.items()]
    head = [row_header] + list(columns)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    sep, rule = (
        ("  ", ["-" * w for w in widths])
        if not markdown
        else (" | ", ["-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)])
    )

    def line(r):
        text = sep.join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
        return f"| {text} |" if markdown else text

    return "\n".join([line(head), line(rule)] + [line(r) for r in body])


def write_json(obj, path: Union[str, Path]) -> Path:
    """Write ``obj`` as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default), encoding="utf-8")
    tmp.replace(path)
    return path


def _default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"cannot serialise {type(x).__name__}")
