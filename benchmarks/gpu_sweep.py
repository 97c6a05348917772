"""Block-size sweep of the Triton kernels on a GPU: which (block_m, block_n, warps, stages) the table should hold.

Block sizes are not autotuned at run time (the tile map depends on them), so they are chosen here, offline, per card:
for the Figure-2 layout (B=8) and N=16384 (B=1), fp16, D=64, every forward candidate is timed alone, and every
backward candidate (dK/dV and dQ blocks) is timed as forward+backward with the table's forward. Each candidate's
output is checked against the segment path first; a candidate that fails to compile (out of shared memory) or
disagrees is reported, not timed.

    python3 benchmarks/gpu_sweep.py --out gpu_out --budget 130
    python3 benchmarks/gpu_sweep.py --cpu-smoke          # code paths only, under the Triton interpreter
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["ZORRO_TRITON_AUTOTUNE"] = "0"  # each candidate runs exactly its own warps/stages

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench  # noqa: E402
import torch  # noqa: E402

from zorro_kernels import ZorroMask, zorro_attention  # noqa: E402
from zorro_kernels.backends.triton._config import override_blocks  # noqa: E402

# (fwd block_m, block_n, warps, stages)
FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3)]
# (dkdv blocks, dq blocks, warps, stages), forward fixed at the table's 128x64
BWD = [
    ((32, 128), (128, 64), 8, 3),
    ((64, 128), (128, 64), 8, 2),
    ((64, 64), (64, 64), 4, 3),
    ((32, 64), (64, 64), 4, 3),
    ((128, 128), (128, 128), 8, 2),
    ((64, 128), (128, 128), 8, 3),
]
ROWS = {"fig2": (320, 1568, 8, 8, 12, 64), "16k": (2752, 13568, 64, 1, 12, 64)}
SMOKE_ROWS = {"fig2": (20, 30, 4, 1, 2, 16)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--budget", type=float, default=130.0)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        gpu_bench.DEVICE = "cpu"
    deadline = time.time() + args.budget
    rows = SMOKE_ROWS if args.cpu_smoke else ROWS
    dtype = torch.float32 if args.cpu_smoke else torch.float16
    results = []
    for name, (a, v_, f, b, h, d) in rows.items():
        mask = ZorroMask.zorro(audio=a, video=v_, fusion=f)
        gen = torch.Generator(device=gpu_bench.DEVICE).manual_seed(0)
        q, k, v, g = (
            torch.randn(b, h, mask.num_q, d, device=gpu_bench.DEVICE, dtype=dtype, generator=gen) for _ in range(4)
        )
        ref = zorro_attention(q, k, v, mask, backend="segments")
        cases = [("fwd", fb, fb, fb, w, s) for *fb, w, s in FWD]
        cases += [("bwd", (128, 64), dk, dq, w, s) for dk, dq, w, s in BWD]
        for kind, fwd_b, dkdv_b, dq_b, warps, stages in cases:
            rec = {
                "row": name,
                "kind": kind,
                "fwd": list(fwd_b),
                "dkdv": list(dkdv_b),
                "dq": list(dq_b),
                "warps": warps,
                "stages": stages,
            }
            results.append(rec)
            if time.time() > deadline:
                rec["error"] = "skipped: time budget"
                continue
            try:
                with override_blocks(tuple(fwd_b), tuple(dkdv_b), tuple(dq_b), num_warps=warps, num_stages=stages):
                    fn = lambda: zorro_attention(q, k, v, mask, backend="triton")  # noqa: E731
                    err = (fn().float() - ref.float()).abs().max().item()
                    rec["max_err_vs_segments"] = err
                    if not err < 2e-2:
                        rec["error"] = f"WRONG OUTPUT: {err:.3e}"
                        continue
                    if kind == "fwd":
                        rec["ms"] = gpu_bench.cuda_time(fn)
                    else:
                        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

                        def fwd_bwd():
                            for t in (qg, kg, vg):
                                t.grad = None
                            zorro_attention(qg, kg, vg, mask, backend="triton").backward(g)

                        rec["ms"] = gpu_bench.cuda_time(fwd_bwd)
            except Exception as e:  # noqa: BLE001 - out of resources etc.: report and go on
                rec["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            print(json.dumps(rec), flush=True)
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=1))
    print("\nsweep (ms, lower is better):")
    for r in results:
        blocks = f"fwd {r['fwd']}" if r["kind"] == "fwd" else f"dkdv {r['dkdv']} dq {r['dq']}"
        val = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "?")[:60]
        print(f"{r['row']:5} {r['kind']:3} {blocks:32} w{r['warps']} s{r['stages']}  {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
