"""The card session's benchmark: fractions of ideal, ratios to the peers, and what the compiler made of the kernels.

For the Figure-2 Zorro layout (B=8, H=12, N=1896) and the same proportions at N=16384 (B=1, H=12), in fp16 and bf16,
at D=64 and D=128, it times forward and forward+backward of

    triton      zorro's block-sparse kernels (autotuning num_warps/num_stages unless ZORRO_TRITON_AUTOTUNE=0): the
                forward over the segment-aligned range plan, the one-pass backward (atomic dQ)
    sdpa_full   unmasked SDPA: the ideal baseline (a perfect masked kernel takes sdpa_full x attended fraction)
    flex        FlexAttention compiled, BlockMask from the same segment rule
    segments    zorro's segment path: one unmasked SDPA (flash) call per segment group
    triton_tiles, triton_det (fp16, D=64 rows): the forward over the uniform tile plan; the deterministic backward

after checking each peer's output (and triton's dq/dk/dv) against an fp32 reference; rows run most informative first
under a time budget (a cut-short run keeps the headline rows). Then one line per compiled variant of the Triton
kernels: registers and spills from the driver, resident blocks per SM, the cubin summary, the autotuner's choices.
Writes ``perf.json``, ``perf.md`` (markdown tables for BENCHMARKS.md) and ``perf_table.txt`` to ``--out``.

    python3 benchmarks/gpu_perf.py --out gpu_out --budget 280   # about 5 minutes on an H100/H200, compiles included
    python3 benchmarks/gpu_perf.py --cpu-smoke                  # the script's code paths on CPU, no timing value
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before anything imports Triton: its interpreter is chosen at import
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench  # noqa: E402
import torch  # noqa: E402

SHAPES = {  # layout: (audio, video, fusion, B, H)
    "fig2": (320, 1568, 8, 8, 12),
    "16k": (2752, 13568, 64, 1, 12),
}
# (layout, dtype, head dim), most informative first: a run cut short by the budget still has the headline rows
PLAN = [(lay, dt, d) for d in (64, 128) for dt in (torch.float16, torch.bfloat16) for lay in ("fig2", "16k")]
SMOKE_PLAN = [("smoke", torch.float16, 16)]
SMOKE_SHAPES = {"smoke": (20, 30, 4, 1, 2)}
PEERS = [
    "triton",
    "sdpa_full",
    "flex",
    "segments",  # most important first: a cut-short row keeps these
    "triton_tiles",
    "triton_det",
]  # fp16 D=64 rows only: the forward over the uniform tile plan;
#                                                        the deterministic (atomic-free) backward
EXTRA_PEERS_ON = ("float16/D64", "smoke")


def row_key(layout: str, dtype, d: int) -> str:
    return f"{layout}/{str(dtype).replace('torch.', '')}/D{d}"


ROWS: dict = {}  # row_key -> (audio, video, fusion, B, H, D), gpu_bench.bench_row's layouts


def log(msg: str) -> None:
    print(msg, flush=True)


def run_row(name: str, dtype, deadline: float) -> dict:
    # gpu_check's row, on this script's rows and peers: triton's gradients checked too, failed checks flagged
    peers = PEERS if any(tag in name for tag in EXTRA_PEERS_ON) else PEERS[:4]
    return gpu_bench.bench_row(
        name,
        dtype,
        deadline,
        layouts=ROWS,
        peers_order=peers,
        grad_check=("triton", "triton_tiles", "triton_det"),
        flag_failures=True,
    )


def _constants(kernel, ck) -> dict:
    """Compile-time constants of a compiled variant by argument name (Triton keys them by index tuple, index or name
    depending on the version)."""
    consts = getattr(getattr(ck, "src", None), "constants", None) or {}
    names = list(getattr(kernel, "arg_names", []))
    out = {}
    for key, val in consts.items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        out[names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)] = val
    return out


def kernel_report() -> list:
    """One line per compiled variant of the Triton kernels: tiles, warps, stages, shared memory, registers and spills
    as the driver reports them, resident blocks per SM, and what the binary holds (``asm_summary`` of
    benchmarks/triton_compile_check.py: HGMMA = warpgroup MMA, cp.async16 = 16-byte async tile loads, ld.u16 = scalar
    16-bit loads, bufs = pipeline buffers); then the autotuner's choices per shape bucket."""
    from zorro_kernels.backends.triton import _bwd, _fwd, _launch

    try:
        from triton_compile_check import asm_summary, blocks_per_sm
    except Exception as err:  # noqa: BLE001 - the SASS summary is optional

        def asm_summary(ck, _err=err):
            return f"(no asm summary: {type(_err).__name__})"

        def blocks_per_sm(*_):
            return "?"

    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    lines = []
    for name, kernel in (
        ("fwd_ranges", _fwd._attn_fwd_ranges),
        ("fwd", _fwd._attn_fwd),
        ("dkdv", _bwd._attn_bwd_dkdv),
        ("dq", _bwd._attn_bwd_dq),
        ("preprocess", _bwd._bwd_preprocess),
    ):
        lines.append(f"kernel {name}: {gpu_bench.n_compiled(kernel)} compiled variant(s)")
        for ck in gpu_bench.compiled_kernels(kernel):
            md, consts = ck.metadata, _constants(kernel, ck)
            try:
                summary = asm_summary(ck)
            except Exception as err:  # noqa: BLE001
                summary = f"(asm summary failed: {type(err).__name__})"
            regs, warps, shared = getattr(ck, "n_regs", None), getattr(md, "num_warps", None), getattr(md, "shared", 0)
            occ = blocks_per_sm(regs, warps, shared, arch) if isinstance(regs, int) and warps else "?"
            lines.append(
                f"  {name:10s} blocks={consts.get('BLOCK_M', '?')}x{consts.get('BLOCK_N', '?')} "
                f"D={consts.get('HEAD_DIM', '?')} warps={warps} stages={getattr(md, 'num_stages', '?')} "
                f"shared={shared} n_regs={regs} n_spills={getattr(ck, 'n_spills', '?')} "
                f"blocks/SM={occ} | {summary}"
            )
    for (_kid, _cfg, bucket, consts), (warps, stages) in _launch._CHOSEN.items():
        d = dict(consts)
        lines.append(
            f"autotune blocks={d.get('BLOCK_M')}x{d.get('BLOCK_N')} D={d.get('HEAD_DIM')} bucket={bucket}: "
            f"num_warps={warps} num_stages={stages}"
        )
    return lines


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _cells(r: dict, p: str) -> list:
    out = []
    for x in PEERS:
        res = r["peers"].get(x, {})
        ms, tf = res.get(f"{p}_ms"), res.get(f"{p}_tflops")
        out.append(f"{ms:.3f} ({tf:.0f})" if ms is not None else ("ERR" if "error" in res else "-"))
    return out


def _ratios(r: dict, p: str) -> list:
    seg, t = r["peers"].get("segments", {}).get(f"{p}_ms"), r["peers"].get("triton", {}).get(f"{p}_ms")
    return [
        fmt(r.get(f"{p}_ms_fraction_of_ideal")),
        fmt(r.get(f"{p}_ms_speedup_vs_flex")),
        fmt(seg / t if seg and t else None),
    ]


_GOALS = {"fwd": "ideal >= 0.9", "fwd_bwd": "ideal >= 0.8, x flex >= 1.5"}


def table(rows: list) -> str:
    lines = []
    for p, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
        lines.append(
            f"{label}: ms (TFLOP/s over attended pairs); ideal = sdpa_full*density/triton, x flex = "
            f"flex/triton, x seg = segments/triton (goals: {_GOALS[p]}, x seg >= 1)"
        )
        lines.append(
            f"{'row':20s} {'N':>6s} {'B':>2s} "
            + " ".join(f"{x:>15s}" for x in PEERS)
            + f" {'ideal':>6s} {'x flex':>7s} {'x seg':>6s}"
        )
        for r in rows:
            lines.append(
                f"{r['layout']:20s} {r['N']:6d} {r['B']:2d} "
                + " ".join(f"{c:>15s}" for c in _cells(r, p))
                + " "
                + " ".join(f"{c:>6s}" for c in _ratios(r, p))
            )
        lines.append("")
    errs = [
        f"  {r['layout']}/{x}: {res[key]}"
        for r in rows
        for x, res in r["peers"].items()
        for key in ("check", "error")
        if key in res
    ]
    if errs:
        lines.append("failed checks / errors / skips:")
        lines.extend(errs)
    checks = [
        f"{r['layout']}/{x} {k}={res[k]:.1e}"
        for r in rows
        for x, res in r["peers"].items()
        for k in ("max_err", "max_grad_err")
        if k in res
    ]
    lines.append("checked against fp32 (first sample): " + ", ".join(checks))
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The same rows as markdown tables (for BENCHMARKS.md), then the kernel report in a code block."""
    info = results["info"]
    lines = [
        f"### {info['card']}, {info['date']} (torch {info['torch']}, triton {info['triton']}, autotune "
        f"{info['autotune']}, {results.get('seconds', '?')} s)",
        "",
    ]
    for p, label in (("fwd", "Forward"), ("fwd_bwd", "Forward + backward")):
        lines += [
            f"{label}: ms (TFLOP/s over attended pairs). ideal = sdpa_full x density / triton; x flex = "
            f"flex / triton; x seg = segments / triton. Goals: {_GOALS[p]}, x seg >= 1.",
            "",
            "| row | N | B | density | " + " | ".join(PEERS) + " | ideal | x flex | x seg |",
            "|---|---:|---:|---:|" + "---:|" * (len(PEERS) + 3),
        ]
        for r in results["rows"]:
            lines.append(
                f"| {r['layout']} | {r['N']} | {r['B']} | {r.get('density', 0):.3f} | "
                + " | ".join(_cells(r, p))
                + " | "
                + " | ".join(_ratios(r, p))
                + " |"
            )
        lines.append("")
    lines += ["```", *results.get("kernels", []), "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=280.0, help="seconds; rows and peers past it are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every code path on CPU on a tiny layout "
        "(Triton in its interpreter); checks the script, measures nothing",
    )
    args = ap.parse_args()
    start = time.time()
    deadline = start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan, shapes = PLAN, SHAPES
    if args.cpu_smoke:
        gpu_bench.DEVICE = "cpu"
        plan, shapes = SMOKE_PLAN, SMOKE_SHAPES
        gpu_bench.TOL[torch.float16] = 2e-2
    elif not torch.cuda.is_available():
        log("no CUDA device: nothing to measure")
        return 1
    import triton

    for layout, dtype, d in plan:
        ROWS[row_key(layout, dtype, d)] = (*shapes[layout], d)
    info = {
        "card": torch.cuda.get_device_name() if gpu_bench.DEVICE == "cuda" else "cpu smoke run",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "autotune": os.environ.get("ZORRO_TRITON_AUTOTUNE", "1"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    log(f"gpu_perf: {json.dumps(info)}")
    results = {"info": info, "rows": []}

    def save():
        (out / "perf.json").write_text(json.dumps(results, indent=1, default=str))

    for layout, dtype, d in plan:
        name = row_key(layout, dtype, d)
        a, v, f, b, _, _ = ROWS[name]
        if time.time() > deadline - 15:
            results["rows"].append(
                {
                    "layout": name,
                    "N": a + v + f,
                    "B": b,
                    "density": 0.0,
                    "peers": {p: {"error": "skipped: time budget"} for p in PEERS},
                }
            )
            continue
        t0 = time.time()
        try:
            row = run_row(name, dtype, deadline)
        except Exception as err:  # noqa: BLE001
            log(traceback.format_exc(limit=4))
            row = {
                "layout": name,
                "N": a + v + f,
                "B": b,
                "density": 0.0,
                "peers": {p: {"error": f"row failed: {type(err).__name__}: {err}"[:300]} for p in PEERS},
            }
        results["rows"].append(row)
        log(
            f"row {name} done in {time.time() - t0:.0f}s: "
            + ", ".join(f"{p}={r.get('fwd_ms', r.get('error', '?'))}" for p, r in row["peers"].items())
        )
        save()
        if gpu_bench.DEVICE == "cuda":
            torch.cuda.empty_cache()
    try:
        results["kernels"] = kernel_report()
    except Exception as err:  # noqa: BLE001 - the report is informative only
        results["kernels"] = [f"kernel report failed: {type(err).__name__}: {err}"]
    results["seconds"] = round(time.time() - start, 1)
    save()
    (out / "perf.md").write_text(markdown(results))
    text = (
        f"=== {info['card']} | {info['date']} | torch {info['torch']} | triton {info['triton']} | autotune "
        f"{info['autotune']} | {results['seconds']}s\n"
        + "\n".join(results["kernels"])
        + "\n\n"
        + table(results["rows"])
    )
    (out / "perf_table.txt").write_text(text + "\n")
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
