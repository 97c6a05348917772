"""Turn a ``pytest benchmarks/ --benchmark-only --benchmark-json=results.json`` run into tables and a chart.

    python benchmarks/report.py results.json --out docs/benchmarks_cpu.md --png docs/benchmarks.png

The markdown names the machine (CPU model and cores, GPU, torch, dtype, date), gives zorro's fraction of the ideal
(dense cost x attended fraction) and every peer's time relative to zorro per layout, the scaling sweep, the mask
build times and the model step, and lists the peers that were skipped with their reasons. The PNG has three panels:
speedup over masked SDPA per layout (fwd, fwd+bwd) and forward time against N for the sweep.

Only the standard library is needed for the markdown; the chart needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

IDEAL, MASKED = "sdpa-nomask", "sdpa-masked"
DIRECTIONS = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------------------ helpers
def _ms(s: Optional[float]) -> str:
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _mib(b: Optional[int]) -> str:
    return "—" if b is None else f"{b / 2**20:.0f}"


def _zorro_rows(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r["peer"].startswith("zorro-")]


def _best_zorro(rows: list[dict]) -> Optional[dict]:
    z = _zorro_rows(rows)
    return min(z, key=lambda r: r["median_s"]) if z else None


def _cases(rows: list[dict]) -> "OrderedDict[tuple[str, str], list[dict]]":
    """Attention rows grouped by (layout, direction), in run order."""
    out: OrderedDict = OrderedDict()
    for r in rows:
        if r.get("kind", "attention") == "attention":
            out.setdefault((r["layout"], r["direction"]), []).append(r)
    return out


# ------------------------------------------------------------------------------------------------------ terminal
def summary_lines(rows: list[dict]) -> list[str]:
    """The closing table of a pytest run: one block per case, one line per peer."""
    lines = []
    for (layout, direction), group in _cases(rows).items():
        g0 = group[0]
        lines.append(f"{layout} {direction}  [{g0['shape']}, attended {g0['attended_fraction']:.1%}]")
        for r in group:
            frac = r.get("fraction_of_ideal")
            frac_s = (
                ""
                if frac is None
                else f"  {frac:5.2f} of ideal" + (" (paired)" if r.get("fraction_of_ideal_paired") else "")
            )
            sp = r.get("speedup_vs_masked_sdpa")
            lines.append(
                f"  {r['peer']:<16} {_ms(r['median_s']):>8} ms  {r['tflops']:7.3f} TFLOP/s"
                f"  {_x(sp):>7} vs masked SDPA{frac_s}" + (f"  {r['checked']}" if r.get("wrong_result") else "")
            )
    builds = [r for r in rows if r.get("kind") == "build"]
    if builds:
        lines.append("mask build (fresh layout each call)")
        for r in builds:
            lines.append(f"  {r['layout']:<14} {r['peer']:<18} {_ms(r['median_s']):>8} ms")
    for r in rows:
        if r.get("kind") == "model":
            lines.append(f"model step {r['layout']}: {r['peer']:<14} {_ms(r['median_s']):>8} ms")
    return lines


# ------------------------------------------------------------------------------------------------------ markdown
def _machine(info: dict) -> list[str]:
    gpu = info.get("zorro_gpu")
    return [
        f"- **Machine:** {info.get('zorro_cpu', info.get('cpu', {}).get('brand_raw', '?'))}"
        + (f"; GPU: {gpu}" if gpu else "; no GPU"),
        f"- **Device / dtype:** {info.get('zorro_device', '?')} / {info.get('zorro_dtype', '?')}; "
        f"torch {info.get('zorro_torch', '?')}; Python {info.get('python_version', '?')}",
        f"- **Tier:** {info.get('zorro_tier', '?')}; run {info.get('zorro_date', info.get('datetime', '?'))} to "
        f"{info.get('zorro_end', '?')}; "
        f"load average (1/5/15 min) {info.get('zorro_load_start', '?')} at the start, "
        f"{info.get('zorro_load_end', '?')} at the end",
    ]


def _headline(cases) -> list[str]:
    out = [
        "| case | zorro backend | zorro (ms) | TFLOP/s | ideal (ms) | fraction of ideal (best round) | masked SDPA "
        "| einsum | FlexAttention | xformers | segment path |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (layout, direction), group in cases.items():
        z = _best_zorro(group)
        if z is None:
            continue
        by = {r["peer"]: r for r in group}

        def rel(peer):
            if peer not in by:
                return "—"
            return "wrong result" if by[peer].get("wrong_result") else _x(by[peer]["median_s"] / z["median_s"])

        ideal = z.get("ideal_median_s")
        best = z.get("fraction_of_ideal_best")
        out.append(
            f"| {layout} {direction} | {z['peer'][6:]} | {_ms(z['median_s'])} | {z['tflops']:.1f} | "
            f"{_ms(ideal)} | {z.get('fraction_of_ideal', float('nan')):.2f}"
            + ("" if best is None else f" ({best:.2f})")
            + f" | {rel(MASKED)} | {rel('einsum')} | {rel('flex')} | {rel('xformers')} "
            f"| {rel('zorro-segments')} |"
        )
    return out


def _case_table(group: list[dict]) -> list[str]:
    z = _best_zorro(group)
    out = [
        "| peer | median (ms) | TFLOP/s (attended) | time / zorro's | fraction of ideal | peak memory (MiB) | "
        "mask metadata build (ms) | checked |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in group:
        rel = _x(r["median_s"] / z["median_s"]) if z is not None else "—"
        frac = r.get("fraction_of_ideal")
        out.append(
            f"| {r['peer']} | {_ms(r['median_s'])} | {r['tflops']:.3f} | {rel} | "
            f"{'—' if frac is None else f'{frac:.2f}'} | {_mib(r.get('peak_memory_bytes'))} | "
            f"{_ms(r.get('metadata_build_s'))} | {r.get('checked', '')} |"
        )
    return out


def _sweep_table(cases, direction: str) -> list[str]:
    sweep = [(k, g) for k, g in cases.items() if k[1] == direction and g[0]["family"] == "scaling"]
    if not sweep:
        return []
    peers = list(OrderedDict.fromkeys(r["peer"] for _, g in sweep for r in g))
    out = [f"| N | {' | '.join(peers)} | zorro fraction of ideal |", "|---:|" + "---:|" * (len(peers) + 1)]
    for (layout, _), g in sweep:
        by = {r["peer"]: r for r in g}
        z = _best_zorro(g)
        n = layout.split("-")[-1]
        cells = [_ms(by[p]["median_s"]) if p in by else "skipped" for p in peers]
        frac = "—" if z is None or z.get("fraction_of_ideal") is None else f"{z['fraction_of_ideal']:.2f}"
        out.append(f"| {n} | {' | '.join(cells)} | {frac} |")
    return out


def render_markdown(data: dict, command: str = "") -> str:
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("peer")]
    info = data.get("machine_info", {})
    cases = _cases(rows)
    md = ["# zorro attention benchmarks" + (f" — {info.get('zorro_gpu') or 'CPU'}" if info else ""), ""]
    md += _machine(info)
    if command:
        md.append(f"- **Command:** `{command}`")
    md += [
        "",
        "Times are medians. *Ideal* = SDPA without a mask on the same shapes x the attended fraction: what a "
        "dense kernel would cost for just the entries the mask lets through. *Fraction of ideal* = ideal / time "
        "(1.0 = as fast as the ideal); for zorro it comes from rounds interleaved with the ideal baseline. "
        "TFLOP/s count attended entries only (fwd 4·B·H·attended·D, bwd 2.5x fwd). Every peer's output "
        "(and gradients) passed the tolerance policy of `zorro_kernels.testing` before it was timed, except in rows "
        "marked WRONG RESULT: a peer that computes something else is recorded with its error, not compared.",
        "",
    ]
    md += [
        "## Headline",
        "",
        "zorro's time, its fraction of the ideal (median over paired rounds; in brackets best "
        "round against best round), and each peer's time as a multiple of zorro's (higher = zorro faster).",
        "",
    ]
    md += _headline(cases) + [""]
    md += ["## Layouts", ""]
    for (layout, direction), group in cases.items():
        if group[0]["family"] == "scaling":
            continue
        md += (
            [
                f"### {layout} — {direction}",
                "",
                f"{group[0]['title']}; {group[0]['shape']}; attended {group[0]['attended_fraction']:.1%}.",
                "",
            ]
            + _case_table(group)
            + [""]
        )
    for direction in DIRECTIONS:
        table = _sweep_table(cases, direction)
        if table:
            shape = next(g[0]["shape"].rsplit(" N=", 1)[0] for k, g in cases.items() if g[0]["family"] == "scaling")
            md += [f"## Scaling sweep — {direction} (ms; {shape}, 25/70/5 audio/video/fusion)", ""] + table + [""]
    builds = [r for r in rows if r.get("kind") == "build"]
    if builds:
        md += [
            "## Mask metadata build (fresh layout each call)",
            "",
            "| layout | builder | median (ms) | vs create_block_mask |",
            "|---|---|---:|---:|",
        ]
        cbm = {r["layout"]: r["median_s"] for r in builds if r["peer"] == "flex-create_block_mask"}
        for r in builds:
            ref = cbm.get(r["layout"])
            md.append(
                f"| {r['layout']} ({r['shape']}) | {r['peer']} | {_ms(r['median_s'])} | "
                f"{'—' if ref is None else _x(ref / r['median_s'])} |"
            )
        md.append("")
    models = [r for r in rows if r.get("kind") == "model"]
    if models:
        md += [
            "## Model: one training step",
            "",
            "| model | attention | median (ms) | vs masked SDPA |",
            "|---|---|---:|---:|",
        ]
        masked = {r["layout"]: r["median_s"] for r in models if r["peer"] == MASKED}
        for r in models:
            ref = masked.get(r["layout"])
            md.append(
                f"| {r['layout']} ({r['shape']}) | {r['peer']} | {_ms(r['median_s'])} | "
                f"{'—' if ref is None else _x(ref / r['median_s'])} |"
            )
        md.append("")
    skipped = data.get("zorro_skipped", [])
    if skipped:
        md += ["## Skipped", "", "| case | reason |", "|---|---|"]
        md += [f"| {s['case']} | {s['reason']} |" for s in skipped] + [""]
    return "\n".join(md)


# ------------------------------------------------------------------------------------------------------ chart
def render_png(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("peer")]
    cases = _cases(rows)
    info = data.get("machine_info", {})
    peers = [
        p
        for p in OrderedDict.fromkeys(r["peer"] for r in rows if r.get("kind", "attention") == "attention")
        if p not in (MASKED, IDEAL)
    ]
    colors = {p: plt.cm.tab10(i) for i, p in enumerate(peers)}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, direction in zip(axes[:2], DIRECTIONS):
        groups = [(k[0], g) for k, g in cases.items() if k[1] == direction and g[0]["family"] != "scaling"]
        groups += [(k[0], g) for k, g in cases.items() if k[1] == direction and k[0] == "scaling-4096"]
        width = 0.8 / max(1, len(peers) + 1)
        for i, (_layout, g) in enumerate(groups):
            by = {r["peer"]: r for r in g}
            if MASKED not in by:
                continue
            base = by[MASKED]["median_s"]
            for j, p in enumerate(peers):
                if p not in by:
                    continue
                ax.bar(
                    i + j * width,
                    base / by[p]["median_s"],
                    width,
                    color=colors[p],
                    label=p if i == 0 or p not in ax.get_legend_handles_labels()[1] else None,
                )
            z = _best_zorro(g)
            if z is not None and z.get("ideal_median_s"):
                ax.plot(
                    [i - width / 2, i + len(peers) * width - width / 2],
                    [base / z["ideal_median_s"]] * 2,
                    "k--",
                    lw=1,
                    label="ideal" if i == 0 else None,
                )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([i + width * (len(peers) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([lay for lay, _ in groups], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("speedup over SDPA + dense bool mask")
        ax.set_title(f"{direction}")
        ax.legend(fontsize=7)
    ax = axes[2]
    sweep = [(int(k[0].split("-")[-1]), g) for k, g in cases.items() if k[1] == "fwd" and g[0]["family"] == "scaling"]
    colors[MASKED] = "black"
    for p in [MASKED] + peers:
        pts = [(n, r["median_s"] * 1e3) for n, g in sweep for r in g if r["peer"] == p]
        if pts:
            ax.plot(*zip(*pts), "o-", label=p, color=colors.get(p, "black"))
    ideal = [(n, z["ideal_median_s"] * 1e3) for n, g in sweep if (z := _best_zorro(g)) and z.get("ideal_median_s")]
    if ideal:
        ax.plot(*zip(*ideal), "k--", label="ideal (dense x attended)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (25/70/5 audio/video/fusion)")
    ax.set_ylabel("forward time (ms)")
    ax.set_title("scaling sweep, fwd")
    ax.legend(fontsize=7)
    machine = info.get("zorro_gpu") or info.get("zorro_cpu", "")
    fig.suptitle(
        f"zorro attention vs peers — {machine}, {info.get('zorro_dtype', '')}, torch {info.get('zorro_torch', '')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="the file written by --benchmark-json")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--png", type=Path, help="chart to write (needs matplotlib)")
    parser.add_argument("--command", default="", help="the command that produced the JSON, quoted in the report")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text(encoding="utf-8"))
    if not data.get("benchmarks"):
        print(f"{args.json}: no benchmarks in this file (was it run with --benchmark-only?)", file=sys.stderr)
        return 1
    text = render_markdown(data, args.command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        render_png(data, args.png)
        rel = os.path.relpath(args.png.resolve(), args.out.resolve().parent)
        text += f"\n![benchmarks]({rel})\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
