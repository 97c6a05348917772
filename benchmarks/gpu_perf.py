"""Short GPU performance check of the Triton kernels: the headline numbers in about two minutes.

For the Figure-2 Zorro layout (B=8, H=12, D=64, N=1896) and the same proportions at N=16384 (B=1), fp16, it times
forward and forward+backward of

    triton      zorro's block-sparse kernels (autotuning num_warps/num_stages unless ZORRO_TRITON_AUTOTUNE=0)
    segments    zorro's segment path: one unmasked SDPA (flash) call per segment group
    flex        FlexAttention compiled, BlockMask from the same segment rule
    sdpa_full   unmasked SDPA: the ideal baseline (a perfect masked kernel takes sdpa_full x attended fraction)

after checking each peer's output (and, for triton on the Figure-2 row, dq/dk/dv) against an fp32 reference. It
then prints, for every compiled variant of the Triton kernels, the registers and spills the driver reports, the
autotuner's choices, and the table last. Writes ``perf.json`` and ``perf_table.txt`` to ``--out``.

    python3 benchmarks/gpu_perf.py --out gpu_out          # about 1-2 minutes on an H100, compilation included
    python3 benchmarks/gpu_perf.py --cpu-smoke            # the script's code paths on CPU, tiny shapes, no timing value
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

import torch  # noqa: E402

import gpu_bench  # noqa: E402

ROWS = {  # name: (audio, video, fusion, B, H, D)
    "fig2": (320, 1568, 8, 8, 12, 64),
    "16k": (2752, 13568, 64, 1, 12, 64),
}
SMOKE_ROWS = {"fig2": (20, 30, 4, 1, 2, 16)}
PEERS = ["triton", "sdpa_full", "flex", "segments"]  # most important first: a cut-short run keeps these


def log(msg: str) -> None:
    print(msg, flush=True)


def run_row(name: str, dtype, deadline: float) -> dict:
    # gpu_check's row, on this script's rows and peers: triton's gradients checked too, failed checks flagged
    return gpu_bench.bench_row(name, dtype, deadline, layouts=ROWS, peers_order=PEERS, grad_check=("triton",),
                               flag_failures=True)


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
    as the driver reports them, and what the binary holds (``asm_summary`` of benchmarks/triton_compile_check.py:
    HGMMA = warpgroup MMA, cp.async16 = 16-byte async tile loads, ld.u16 = scalar 16-bit loads, bufs = pipeline
    buffers); then the autotuner's choices."""
    from zorro_kernels.backends.triton import _bwd, _fwd, _launch

    try:
        from triton_compile_check import asm_summary
    except Exception as err:  # noqa: BLE001 - the SASS summary is optional
        def asm_summary(ck, _err=err):
            return f"(no asm summary: {type(_err).__name__})"
    lines = []
    for name, kernel in (("fwd", _fwd._attn_fwd), ("dkdv", _bwd._attn_bwd_dkdv), ("dq", _bwd._attn_bwd_dq),
                         ("preprocess", _bwd._bwd_preprocess)):
        lines.append(f"kernel {name}: {gpu_bench.n_compiled(kernel)} compiled variant(s)")
        for ck in gpu_bench.compiled_kernels(kernel):
            md, consts = ck.metadata, _constants(kernel, ck)
            try:
                summary = asm_summary(ck)
            except Exception as err:  # noqa: BLE001
                summary = f"(asm summary failed: {type(err).__name__})"
            lines.append(f"  {name:10s} blocks={consts.get('BLOCK_M', '?')}x{consts.get('BLOCK_N', '?')} "
                         f"D={consts.get('HEAD_DIM', '?')} warps={getattr(md, 'num_warps', '?')} "
                         f"stages={getattr(md, 'num_stages', '?')} shared={getattr(md, 'shared', '?')} "
                         f"n_regs={getattr(ck, 'n_regs', '?')} n_spills={getattr(ck, 'n_spills', '?')} | {summary}")
    for tuner in _launch._TUNERS.values():
        best = getattr(tuner, "best_config", None)
        fn = getattr(getattr(tuner, "fn", None), "__name__", "?")
        if best is not None:
            lines.append(f"autotune {fn}: num_warps={best.num_warps} num_stages={best.num_stages}")
    return lines


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list) -> str:
    lines = []
    for p, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
        lines.append(f"{label}: ms (TFLOP/s over attended pairs); x flex = flex/triton (goal >= "
                     f"{'1.2' if p == 'fwd' else '1.1'}); ideal = sdpa_full*density/triton (goal >= 0.9)")
        lines.append(f"{'layout':6s} {'N':>6s} {'B':>2s} " + " ".join(f"{x:>15s}" for x in PEERS)
                     + f" {'x flex':>7s} {'ideal':>6s}")
        for r in rows:
            cells = []
            for x in PEERS:
                res = r["peers"].get(x, {})
                ms, tf = res.get(f"{p}_ms"), res.get(f"{p}_tflops")
                cells.append(f"{ms:7.3f} ({tf:4.0f})" if ms is not None else f"{'ERR' if 'error' in res else '-':>15s}")
            lines.append(f"{r['layout']:6s} {r['N']:6d} {r['B']:2d} " + " ".join(cells)
                         + f" {fmt(r.get(p + '_ms_speedup_vs_flex')):>7s} {fmt(r.get(p + '_ms_fraction_of_ideal')):>6s}")
        lines.append("")
    errs = [f"  {r['layout']}/{x}: {res[key]}" for r in rows for x, res in r["peers"].items()
            for key in ("check", "error") if key in res]
    if errs:
        lines.append("failed checks / errors / skips:")
        lines.extend(errs)
    checks = [f"{r['layout']}/{x} {k}={res[k]:.1e}" for r in rows for x, res in r["peers"].items()
              for k in ("max_err", "max_grad_err") if k in res]
    lines.append("checked against fp32 (first sample): " + ", ".join(checks))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=140.0, help="seconds; peers past it are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--cpu-smoke", action="store_true", help="run every code path on CPU on a tiny layout "
                    "(Triton in its interpreter); checks the script, measures nothing")
    args = ap.parse_args()
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16
    if args.cpu_smoke:
        gpu_bench.DEVICE = "cpu"
        ROWS.clear()
        ROWS.update(SMOKE_ROWS)
        gpu_bench.TOL[dtype] = 2e-2
    elif not torch.cuda.is_available():
        log("no CUDA device: nothing to measure")
        return 1
    import triton

    info = {"card": torch.cuda.get_device_name() if gpu_bench.DEVICE == "cuda" else "cpu smoke run",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": triton.__version__, "autotune": os.environ.get("ZORRO_TRITON_AUTOTUNE", "1")}
    log(f"gpu_perf: {json.dumps(info)}")
    results = {"info": info, "rows": []}
    for name in ROWS:
        t0 = time.time()
        try:
            row = run_row(name, dtype, start + args.budget)
        except Exception as err:  # noqa: BLE001
            log(traceback.format_exc(limit=4))
            row = {"layout": name, "N": sum(ROWS[name][:3]), "B": ROWS[name][3], "density": 0.0,
                   "peers": {p: {"error": f"row failed: {type(err).__name__}: {err}"[:300]} for p in PEERS}}
        results["rows"].append(row)
        log(f"row {name} done in {time.time() - t0:.0f}s: " + ", ".join(
            f"{p}={r.get('fwd_ms', r.get('error', '?'))}" for p, r in row["peers"].items()))
        (out / "perf.json").write_text(json.dumps(results, indent=1, default=str))
        if gpu_bench.DEVICE == "cuda":
            torch.cuda.empty_cache()
    try:
        results["kernels"] = kernel_report()
    except Exception as err:  # noqa: BLE001 - the report is informative only
        results["kernels"] = [f"kernel report failed: {type(err).__name__}: {err}"]
    results["seconds"] = round(time.time() - start, 1)
    (out / "perf.json").write_text(json.dumps(results, indent=1, default=str))
    text = (f"=== {info['card']} | {info['date']} | torch {info['torch']} | triton {info['triton']} | autotune "
            f"{info['autotune']} | {results['seconds']}s\n" + "\n".join(results["kernels"]) + "\n\n" + table(results["rows"]))
    (out / "perf_table.txt").write_text(text + "\n")
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
