"""The card session's benchmark: fractions of ideal, ratios to the peers, and what the compiler made of the kernels.

One process runs the whole card session as a list of **stages in order of value**, each written to ``--out`` the moment
it finishes (``perf.json``, ``perf.md`` for BENCHMARKS.md, ``perf_table.txt``; written whole and renamed, so a kill
loses nothing finished):

    tests       pytest -m gpu over tests/test_triton*.py (autotune off): the kernels against the oracles, capped
    rows        Figure-2 Zorro layout (B=8, H=12, N=1896) fp16 D=64; the same proportions at 16k (B=1, H=12) fp16
                D=64; then bf16 D=64, fp16 D=128, bf16 D=128 (Figure-2 before 16k each): triton, sdpa_full (the
                ideal: unmasked SDPA x attended fraction) and segments, each checked against fp32 first
    report      one line per compiled variant of the Triton kernels (registers, spills, blocks/SM, HGMMA count) and
                the autotuner's choices
    swin        benchmarks/test_swin_bias.py: the Swin relative-bias row with and without the bias (capped)
    variants    triton_tiles (the forward over the uniform tile plan) and triton_det (the deterministic backward)
    flex        compiled FlexAttention, last and in its own process capped by what is left (its cold compiles take
                30-90 s a row): Figure-2 fp16 D=64 first

A stage starts only if its estimate fits in what is left after the reserve of the stages that must run (the report
and the headline flex row); rows pass their deadline on, so peers past it are skipped. ``--quick`` is the 4-minute
subset (the two fp16 D=64 rows, the report, the headline flex row). ``plan`` and ``run_stages`` take no GPU: the tests
run them on a simulated clock.

    python3 benchmarks/gpu_perf.py --out gpu_out --budget 460          # what gpu_perf.sh runs (8 minutes)
    python3 benchmarks/gpu_perf.py --out gpu_out --budget 225 --quick  # 4 minutes
    python3 benchmarks/gpu_perf.py --cpu-smoke --out /tmp/smoke        # every code path on CPU, no timing value
"""

from __future__ import annotations

import os
import sys
import time

T0 = time.monotonic()  # the budget counts from here: the imports below take seconds on a cold machine

if "--cpu-smoke" in sys.argv:  # before anything imports Triton: its interpreter is chosen at import
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench  # noqa: E402
import torch  # noqa: E402

SHAPES = {  # layout: (audio, video, fusion, B, H)
    "fig2": (320, 1568, 8, 8, 12),
    "16k": (2752, 13568, 64, 1, 12),
}
SMOKE_SHAPES = {"fig2": (20, 30, 4, 1, 2), "16k": (28, 44, 4, 1, 2)}
PEERS = ["triton", "sdpa_full", "flex", "segments", "triton_tiles", "triton_det"]  # the tables' columns
MAIN_PEERS = ("triton", "sdpa_full", "segments")
VARIANT_PEERS = ("triton_tiles", "triton_det")  # fp16 D=64 Figure-2 only
GRAD_CHECK = ("triton", "triton_tiles", "triton_det")
# rows in order of value: the headline fp16 D=64 pair, then bf16, then D=128
ROW_ORDER = [
    (lay, dt, d)
    for d, dt in ((64, "float16"), (64, "bfloat16"), (128, "float16"), (128, "bfloat16"))
    for lay in ("fig2", "16k")
]


def row_key(layout: str, dtype, d: int) -> str:
    return f"{layout}/{str(dtype).replace('torch.', '')}/D{d}"


HEADLINE = row_key("fig2", "float16", 64)
ROWS: dict = {}  # row_key -> (audio, video, fusion, B, H, D), gpu_bench.bench_row's layouts


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Stage:
    """One step of the card session. ``est_s``: what it is expected to take on an H100/H200, compiles included (it
    starts only if that fits; a ``capped`` stage is killed at it, the others get what is left); ``keep``: its estimate
    is reserved while earlier stages run; ``rows``: the row keys it measures (``peers`` on each)."""

    name: str
    kind: str  # tests | row | report | swin | flex
    est_s: float
    rows: tuple = ()
    peers: tuple = ()
    keep: bool = False
    capped: bool = False


# Estimates (seconds on the card): a row's first triton call compiles 4 kernels x 1-2 autotune configs (2-4 s each);
# a 16k row after its Figure-2 twin reuses the binaries (only the autotuner's new shape bucket is timed); FlexAttention
# compiles forward and backward per shape (30-90 s cold). With them the full plan fills 460 s without the Swin and
# variant stages, which run when the rows go faster.
_ROW_EST = {"fig2": 45.0, "16k": 20.0}


def plan(quick: bool = False, tests_cap: Optional[float] = None, bf16: bool = True) -> list:
    """The stages in the order they run (see the module docstring); ``bf16=False`` leaves out the bf16 rows."""
    rows = [r for r in (ROW_ORDER[:2] if quick else ROW_ORDER) if bf16 or r[1] != "bfloat16"]
    stages = [Stage("tests", "tests", tests_cap or (40.0 if quick else 100.0), capped=True)]
    for lay, dt, d in rows:
        name = row_key(lay, dt, d)
        stages.append(Stage(f"row {name}", "row", _ROW_EST[lay], (name,), MAIN_PEERS))
    stages.append(Stage("report", "report", 10.0, keep=True))
    if not quick:
        stages.append(Stage("swin", "swin", 45.0, capped=True))
        stages.append(Stage(f"variants {HEADLINE}", "row", 40.0, (HEADLINE,), VARIANT_PEERS))
    flex_rows = tuple(row_key(lay, dt, d) for lay, dt, d in rows)
    stages.append(Stage("flex", "flex", 90.0, flex_rows, ("flex",), keep=True))
    return stages


def run_stages(
    stages: list, budget: float, execute: Callable, write: Callable, clock: Callable = time.monotonic
) -> list:
    """Run ``execute(stage, seconds)`` for each stage in order, ``write()`` after each, and return ``[(name, status,
    seconds)]``. A stage runs if its estimate fits in what is left minus the estimates of later ``keep`` stages; it
    gets that much time (``seconds``: its cap; rows pass it on as their deadline), a ``capped`` stage its estimate."""
    start = clock()
    done = []
    for i, st in enumerate(stages):
        reserve = sum(s.est_s for s in stages[i + 1 :] if s.keep)
        allowed = budget - (clock() - start) - reserve
        if allowed < st.est_s:
            done.append((st.name, "skipped: time budget", 0.0))
            log(f"stage {st.name}: skipped (needs ~{st.est_s:.0f}s, {allowed:.0f}s left after the reserve)")
            write(done)
            continue
        t0 = clock()
        try:
            execute(st, st.est_s if st.capped else allowed)
            status = "done"
        except Exception as err:  # noqa: BLE001 - one failing stage must not stop the next
            log(traceback.format_exc(limit=4))
            status = f"failed: {type(err).__name__}: {err}"[:300]
        done.append((st.name, status, round(clock() - t0, 1)))
        log(f"stage {st.name}: {status} in {clock() - t0:.0f}s")
        write(done)
    return done


# ------------------------------------------------------------------------------------------------ stages
def _run_capped(cmd: list, cap: float, log_path: Path, env: Optional[dict] = None) -> int:
    """``cmd`` with its output in ``log_path``, killed (its whole process group) after ``cap`` seconds: 124."""
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, cap))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n(killed after the {cap:.0f} s cap)\n")
            return 124
        except BaseException:  # this process is stopped (SIGTERM from the outer timeout, Ctrl-C): no orphan left
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def _xdist() -> list:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", str(min(8, os.cpu_count() or 1))]  # compiles are CPU-bound: in parallel on the card's cores


def run_tests(out: Path, cap: float, smoke: bool) -> dict:
    """The kernel tests against the oracles (``-m gpu``, autotune off), capped: exit code, summary, failures."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_triton.py", "tests/test_triton_bias.py", "-v"]
    cmd += ["-rfEs", "-p", "no:cacheprovider"] + ([] if smoke else _xdist())
    env = dict(os.environ, ZORRO_TRITON_AUTOTUNE="0", COLUMNS="200")
    rc = _run_capped(cmd, cap, out / "pytest_gpu.txt", env)
    text = (out / "pytest_gpu.txt").read_text(errors="replace").splitlines()
    failed = [line.strip()[:200] for line in text if line.startswith(("FAILED", "ERROR")) and "::" in line]
    return {"exit": rc, "summary": (text[-1].strip("= ") if text else "")[:200], "failed": failed[:30]}


def run_swin(out: Path, cap: float, smoke: bool) -> list:
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_swin_bias.py", "--benchmark-only", "-s", "-q"]
    cmd += ["-p", "no:cacheprovider"] + (["--bench-tier", "smoke"] if smoke else [])
    rc = _run_capped(cmd, cap, out / "swin_bias.txt", dict(os.environ, COLUMNS="200"))
    text = (out / "swin_bias.txt").read_text(errors="replace").splitlines()
    keep = [
        line[:250] for line in text if any(w in line for w in ("median", "bias costs", "passed", "failed", "Error"))
    ]
    return [f"exit {rc}"] + keep[:20]


def _empty_row(name: str) -> dict:
    a, v, f, b, h, d = ROWS[name]
    return {"layout": name, "N": a + v + f, "B": b, "H": h, "D": d, "density": 0.0, "peers": {}}


def merge_row(results: dict, new: dict) -> None:
    """Fold a stage's measurement of a row into ``results["rows"]`` (rows kept in plan order), then recompute the
    row's ratios from every peer it now has."""
    rows = results["rows"]
    old = next((r for r in rows if r["layout"] == new["layout"]), None)
    if old is None:
        rows.append(new)
        order = {row_key(*r): i for i, r in enumerate(ROW_ORDER)}
        rows.sort(key=lambda r: order.get(r["layout"], len(order)))
        old = new
    else:
        for key, val in new.items():
            if key == "peers":
                old["peers"].update(val)
            elif key not in old or not old[key]:
                old[key] = val
    for p in ("fwd_ms", "fwd_bwd_ms"):
        t, fl, full = (old["peers"].get(x, {}).get(p) for x in ("triton", "flex", "sdpa_full"))
        old[f"{p}_speedup_vs_flex"] = fl / t if t and fl else None
        old[f"{p}_fraction_of_ideal"] = full * old["density"] / t if t and full else None


def measure_row(name: str, peers: tuple, seconds: float) -> dict:
    dtype = getattr(torch, name.split("/")[1])
    row = gpu_bench.bench_row(
        name,
        dtype,
        time.time() + seconds,
        layouts=ROWS,
        peers_order=list(peers),
        grad_check=GRAD_CHECK,
        flag_failures=True,
    )
    if gpu_bench.DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


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
        cell = "-" if ms is None else f"{ms:.3f}" + (f" ({tf:.0f})" if tf is not None else "")
        out.append("ERR" if ms is None and "error" in res else cell)
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
    lines += ["```", *_status_lines(results), *results.get("kernels", []), "```", ""]
    return "\n".join(lines)


def _status_lines(results: dict) -> list:
    lines = []
    tests = results.get("tests")
    if tests:
        lines.append(f"kernel tests (pytest -m gpu tests/test_triton*.py): exit {tests['exit']}: {tests['summary']}")
        lines += [f"  {x}" for x in tests["failed"]]
    lines += [f"stage {name}: {status} ({sec:.0f}s)" for name, status, sec in results.get("stages", [])]
    if results.get("swin"):
        lines += ["swin relative-bias row (benchmarks/test_swin_bias.py):", *[f"  {x}" for x in results["swin"]]]
    return lines


def write_outputs(results: dict, out: Path) -> None:
    """perf.json, perf.md and perf_table.txt as they stand (each written whole, then renamed over the old one)."""
    info = results["info"]
    text = (
        f"=== {info['card']} | {info['date']} | torch {info['torch']} | triton {info['triton']} | autotune "
        f"{info['autotune']} | {results.get('seconds', '?')}s\n"
        + "\n".join(_status_lines(results) + results.get("kernels", []))
        + "\n\n"
        + (table(results["rows"]) if results["rows"] else "no rows yet")
    )
    for name, body in (
        ("perf.json", json.dumps(results, indent=1, default=str)),
        ("perf.md", markdown(results)),
        ("perf_table.txt", text + "\n"),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        os.replace(tmp, out / name)


def flex_child(out: Path, names: list) -> int:
    """The flex stage's own process: FlexAttention on each row in order, each merged into perf.json and the tables
    as soon as it is measured (the parent may kill this process at its cap)."""
    results = json.loads((out / "perf.json").read_text())
    for name in names:
        t0 = time.time()
        try:
            row = measure_row(name, ("flex",), 1e9)  # the parent's cap bounds it
        except Exception as err:  # noqa: BLE001
            log(traceback.format_exc(limit=4))
            row = _empty_row(name)
            row["peers"]["flex"] = {"error": f"flex failed: {type(err).__name__}: {err}"[:300]}
        merge_row(results, row)
        write_outputs(results, out)
        log(f"row {name} flex done in {time.time() - t0:.0f}s: {row['peers'].get('flex')}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=460.0, help="seconds for every stage together")
    ap.add_argument("--quick", action="store_true", help="the 4-minute subset: fp16 D=64 rows, report, headline flex")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument(
        "--tests-cap", type=float, default=None, help="seconds for the kernel tests (default 120; 60 quick)"
    )
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every code path on CPU on tiny layouts (Triton in its interpreter); checks the script, measures "
        "nothing",
    )
    ap.add_argument("--flex-child", default=None, help=argparse.SUPPRESS)  # the flex stage's own process
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES
    if args.cpu_smoke:
        gpu_bench.DEVICE = "cpu"
        shapes = SMOKE_SHAPES
        gpu_bench.TOL[torch.float16] = 2e-2
    elif not torch.cuda.is_available():
        log("no CUDA device: nothing to measure")
        return 1
    for lay, dt, d in ROW_ORDER:
        ROWS[row_key(lay, dt, d)] = (*shapes[lay], d if not args.cpu_smoke else d // 4)
    if args.flex_child is not None:
        return flex_child(out, args.flex_child.split(","))
    # the outer timeout's SIGTERM unwinds (a stage's own process, in its own session, is killed on the way out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    import triton

    start = time.time()
    info = {
        "card": torch.cuda.get_device_name() if gpu_bench.DEVICE == "cuda" else "cpu smoke run",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "autotune": os.environ.get("ZORRO_TRITON_AUTOTUNE", "1"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "budget_s": args.budget,
        "quick": args.quick,
    }
    log(f"gpu_perf: {json.dumps(info)}")
    results = {"info": info, "rows": [], "stages": []}
    # bf16 arithmetic is wrong in the interpreter: the smoke run keeps the rows it can check
    stages = plan(args.quick, args.tests_cap, bf16=not args.cpu_smoke)

    def execute(st: Stage, seconds: float) -> None:
        if st.kind == "tests":
            results["tests"] = run_tests(out, seconds, args.cpu_smoke)
        elif st.kind == "row":
            for name in st.rows:
                merge_row(results, measure_row(name, st.peers, seconds))
        elif st.kind == "report":
            results["kernels"] = kernel_report()
        elif st.kind == "swin":
            results["swin"] = run_swin(out, seconds, args.cpu_smoke)
        elif st.kind == "flex":
            write_outputs(results, out)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--flex-child", ",".join(st.rows)]
            rc = _run_capped(cmd + (["--cpu-smoke"] if args.cpu_smoke else []), seconds, out / "flex_log.txt")
            kept = json.loads((out / "perf.json").read_text())  # what the child measured before it ended
            results["rows"] = kept["rows"]
            if rc != 0:
                raise RuntimeError(f"the flex process ended with {rc} (124: cut at its cap); flex_log.txt says why")

    def write(done: list) -> None:
        results["stages"] = done
        results["seconds"] = round(time.time() - start, 1)
        write_outputs(results, out)

    run_stages(stages, args.budget - (time.monotonic() - T0), execute, write)
    log(Path(out / "perf_table.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
