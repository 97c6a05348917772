"""GPU benchmark of the Triton backend against its peers, with a correctness check of every peer before timing.

Peers, on the same inputs and the same mask:
    triton      zorro's block-sparse kernels (this repo)
    segments    zorro's segment path on GPU: one unmasked SDPA (flash) call per segment group
    sdpa_mask   PyTorch SDPA with the dense boolean mask
    flex        FlexAttention, compiled, with a BlockMask built from the same segment rule (BLOCK_SIZE 128)
    sdpa_full   unmasked SDPA (flash): the ideal baseline — a perfect masked kernel would take
                sdpa_full x (attended fraction)

Layouts: the paper's Figure-2 Zorro layout (audio 320, video 1568, fusion 8) and the same proportions at N = 4096 and
16384; fp16 and bf16; forward and forward+backward. Medians over batches of back-to-back calls timed with CUDA
events (see :func:`cuda_time`). Also measured: how many Triton compilations a sweep over 50 different layouts
triggers.

    python3 benchmarks/gpu_bench.py --budget 300 --out gpu_out

Writes ``results.json`` (everything) and ``table.txt`` (the compact table, also printed last) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zorro_kernels import ZorroMask, zorro_attention  # noqa: E402
from zorro_kernels.testing import random_layout  # noqa: E402

LAYOUTS = {  # name: (audio, video, fusion, B, H, D)
    "fig2": (320, 1568, 8, 8, 12, 64),
    "4k": (688, 3392, 16, 4, 12, 64),
    "16k": (2752, 13568, 64, 1, 12, 64),
}
# most informative first: a run cut short by the budget still has the headline rows
PLAN = [
    ("fig2", torch.float16),
    ("4k", torch.float16),
    ("16k", torch.float16),
    ("fig2", torch.bfloat16),
    ("4k", torch.bfloat16),
    ("16k", torch.bfloat16),
]
SMOKE_LAYOUTS = {"fig2": (20, 30, 4, 1, 2, 16)}  # --cpu-smoke: the script's own code paths on CPU, no timing value
DEVICE = "cuda"
PEERS = ["triton", "segments", "sdpa_mask", "flex", "sdpa_full"]
TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


def log(msg: str) -> None:
    print(msg, flush=True)


def cuda_time(fn, budget_s: float = 0.4) -> float:
    """Milliseconds per call of ``fn()``: the median over a few batches of back-to-back calls timed with CUDA events.

    Calls are queued without synchronising in between, as inside a model, so host-side launch overhead is hidden
    whenever the GPU is the bottleneck (and shows when it is not).
    """
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-5)
    per_batch = int(min(50, max(1, 0.05 / est)))
    batches = int(min(10, max(3, budget_s / (per_batch * est))))
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(per_batch):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / per_batch)
    times.sort()
    return times[len(times) // 2]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def segment_ids(sizes) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def allow_recompiles(limit: int = 256) -> None:
    """Let dynamo keep one compiled flex_attention per (shape, dtype, requires_grad, block mask): its default
    recompile limit (8 per code object) is reached within a few benchmark rows, after which flex_attention silently
    runs unfused (the first GPU run measured that fallback in its bf16 rows). The setting's name varies by version."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def flex_peer(mask: ZorroMask):
    """Compiled FlexAttention with a BlockMask (BLOCK_SIZE 128) built from the mask's segment rule: fn(q, k, v)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    allow_recompiles()
    q_seg = segment_ids(mask.q_sizes).to(DEVICE)
    k_seg = segment_ids(mask.kv_sizes).to(DEVICE)
    allow = mask.allow.to(DEVICE)

    def mask_mod(b, h, q_idx, kv_idx):
        return allow[q_seg[q_idx], k_seg[kv_idx]]

    block_mask = create_block_mask(mask_mod, None, None, mask.num_q, mask.num_kv, device=DEVICE)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


@contextlib.contextmanager
def _deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _peer_context(peer: str):
    """What a triton variant peer runs under: ``triton_tiles`` forces the forward's uniform tile plan,
    ``triton_det`` the deterministic (atomic-free) backward; everything else runs as is."""
    if peer == "triton_tiles":
        from zorro_kernels.backends.triton._config import override_plan

        return override_plan("tiles")
    return _deterministic() if peer == "triton_det" else contextlib.nullcontext()


def make_peers(mask: ZorroMask, dtype):
    """name -> fn(q, k, v) for every peer that can be built; name -> error string for those that cannot."""
    peers, errors = {}, {}
    peers["triton"] = lambda q, k, v: zorro_attention(q, k, v, mask, backend="triton")
    peers["triton_tiles"] = peers["triton_det"] = peers["triton"]  # run under _peer_context
    peers["segments"] = lambda q, k, v: zorro_attention(q, k, v, mask, backend="segments")
    dense = mask.to_dense().to(DEVICE)
    peers["sdpa_mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    peers["sdpa_full"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    try:
        peers["flex"] = flex_peer(mask)
    except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
        errors["flex"] = f"{type(err).__name__}: {err}"[:300]
    return peers, errors


def check_grads(fn, q, k, v, g, dense) -> float:
    """Max abs error of dq/dk/dv on the first sample against fp32 SDPA with the dense mask."""
    q1, k1, v1 = (t[:1].detach().clone().requires_grad_() for t in (q, k, v))
    fn(q1, k1, v1).backward(g[:1])
    r = [t[:1].detach().float().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*r, attn_mask=dense).backward(g[:1].float())
    return max((a.grad.float() - b.grad).abs().max().item() for a, b in zip((q1, k1, v1), r))


GRAD_TOL = 3e-2  # fp16 dq/dk/dv vs fp32, max abs over unit-variance inputs (the tests hold the strict policy)


def bench_row(
    name: str,
    dtype,
    deadline: float,
    *,
    layouts: Optional[dict] = None,
    peers_order=None,
    grad_check: tuple = (),
    flag_failures: bool = False,
) -> dict:
    """Check, then time fwd and fwd+bwd of every peer on one layout.

    ``grad_check`` names peers whose dq/dk/dv are checked too; with ``flag_failures`` a failed check is recorded under
    ``"check"`` and the peer is still timed (a short GPU run wants the timings anyway), else the peer is skipped.
    """
    layouts = LAYOUTS if layouts is None else layouts
    peers_order = PEERS if peers_order is None else peers_order
    a, v_, f, b, h, d = layouts[name]
    mask = ZorroMask.zorro(audio=a, video=v_, fusion=f)
    n = mask.num_q
    density = mask.attended_fraction()
    row = {
        "layout": name,
        "N": n,
        "B": b,
        "H": h,
        "D": d,
        "dtype": str(dtype).replace("torch.", ""),
        "density": density,
        "peers": {},
    }
    try:
        from zorro_kernels.backends.triton._config import choose_blocks

        blk = choose_blocks(d, dtype).fwd
        row["tiles_fwd"] = {"blocks": [blk.block_m, blk.block_n], **mask.tile_map(blk.block_m, blk.block_n).counts()}
    except Exception as err:  # noqa: BLE001
        row["tiles_fwd"] = str(err)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3))
    g = torch.randn(b, h, n, d, device=DEVICE, dtype=dtype, generator=gen)
    # oracle on the first sample, fp32 (SDPA with the dense mask; no row of these layouts is fully masked)
    dense = mask.to_dense().to(DEVICE)
    ref = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), attn_mask=dense)
    pairs = float(mask.attended().sum()) * (b if mask.batch_size is None else 1)  # attended (q, k) pairs, batch
    flops_fwd = 4.0 * h * d * pairs
    peers, errors = make_peers(mask, dtype)
    for peer in peers_order:
        res = row["peers"].setdefault(peer, {})
        if peer in errors:
            res["error"] = errors[peer]
            continue
        if time.time() > deadline:
            res["error"] = "skipped: time budget"
            continue
        fn = peers[peer]
        work = 1.0 if peer != "sdpa_full" else 1.0 / density  # the unmasked peer computes every pair
        try:
            ctx = _peer_context(peer)
            ctx.__enter__()
            t0 = time.time()
            out = fn(q, k, v)
            sync()
            res["first_call_s"] = round(time.time() - t0, 2)
            failure = None
            if peer != "sdpa_full":
                err = (out[:1].float() - ref).abs().max().item()
                res["max_err"] = err
                if not err <= TOL[dtype]:
                    failure = f"wrong output: max error {err:.3e} > {TOL[dtype]:.0e}"
            if peer in grad_check:
                res["max_grad_err"] = check_grads(fn, q, k, v, g, dense)
                if not res["max_grad_err"] <= GRAD_TOL:
                    failure = f"wrong gradients: max error {res['max_grad_err']:.3e} > {GRAD_TOL:.0e}"
            if failure:
                res["check" if flag_failures else "error"] = failure
                if not flag_failures:
                    continue
            res["fwd_ms"] = cuda_time(lambda: fn(q, k, v))
            res["fwd_tflops"] = flops_fwd * work / res["fwd_ms"] / 1e9
            if time.time() > deadline:
                res["error"] = "fwd+bwd skipped: time budget"
                continue
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

            def fwd_bwd():
                for t in (qg, kg, vg):
                    t.grad = None
                fn(qg, kg, vg).backward(g)

            t0 = time.time()
            fwd_bwd()
            sync()
            res["first_bwd_call_s"] = round(time.time() - t0, 2)
            res["fwd_bwd_ms"] = cuda_time(fwd_bwd)
            res["fwd_bwd_tflops"] = 3.5 * flops_fwd * work / res["fwd_bwd_ms"] / 1e9
        except Exception as err:  # noqa: BLE001 - one failing peer must not stop the others
            res["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            log(traceback.format_exc(limit=3))
        finally:
            ctx.__exit__(None, None, None)
    for p in ("fwd_ms", "fwd_bwd_ms"):
        t, fl, full = (row["peers"].get(x, {}).get(p) for x in ("triton", "flex", "sdpa_full"))
        if t:
            row[f"{p}_speedup_vs_flex"] = fl / t if fl else None
            row[f"{p}_fraction_of_ideal"] = full * density / t if full else None
    return row


def n_compiled(kernel) -> int:
    """Compiled variants held by a Triton JIT function, or by the one an autotuner wraps, across Triton versions.

    A ``JITFunction`` keeps its binaries in ``device_caches[device][0]`` (Triton >= 3.2; a dict per device in
    ``cache`` before). Its own ``.fn`` is the undecorated Python function, so ``.fn`` is followed only from objects
    that hold no cache themselves (an ``Autotuner``); -1 if no cache is found."""
    obj = kernel
    for _ in range(4):
        caches = getattr(obj, "device_caches", None)
        if caches is not None:
            return sum(len(c[0] if isinstance(c, tuple) else c) for c in caches.values())
        cache = getattr(obj, "cache", None)
        if isinstance(cache, dict):
            return sum(len(c) for c in cache.values())
        obj = getattr(obj, "fn", None)
        if obj is None:
            break
    return -1


def compiled_kernels(kernel) -> list:
    """The ``CompiledKernel`` objects a JIT function holds (empty if its cache layout is unknown)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return [k for c in caches.values() for k in (c[0] if isinstance(c, tuple) else c).values()]
    cache = getattr(kernel, "cache", None)
    return [k for c in cache.values() for k in c.values()] if isinstance(cache, dict) else []


def compile_sweep(n_layouts: int = 50, max_size: int = 400, d: int = 64) -> dict:
    """fwd+bwd over ``n_layouts`` random layouts (segment counts, sizes, rules, per-sample lengths, N all vary)."""
    from zorro_kernels.backends.triton import _bwd, _fwd

    kernels = {
        "fwd_ranges": _fwd._attn_fwd_ranges,
        "fwd": _fwd._attn_fwd,
        "preprocess": _bwd._bwd_preprocess,
        "dkdv": _bwd._attn_bwd_dkdv,
        "dq": _bwd._attn_bwd_dq,
    }
    gen = torch.Generator().manual_seed(0)
    counts_after_first, t0 = None, time.time()
    for i in range(n_layouts):
        mask = random_layout(gen, max_size, lengths=i % 2 == 1)
        q, k, v = (
            torch.randn(2, 4, mask.num_q, d, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3)
        )
        zorro_attention(q, k, v, mask, backend="triton").sum().backward()
        if i == 0:
            sync()
            counts_after_first = {name: n_compiled(kr) for name, kr in kernels.items()}
    sync()
    counts = {name: n_compiled(kr) for name, kr in kernels.items()}
    return {
        "layouts": n_layouts,
        "compiled_after_first_layout": counts_after_first,
        "compiled_after_sweep": counts,
        "new_compilations_after_first": (
            sum(counts.values()) - sum(counts_after_first.values()) if min(counts.values()) >= 0 else None
        ),
        "seconds": round(time.time() - t0, 1),
    }


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def table(rows: list, sweep: dict) -> str:
    lines = []
    for p, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
        lines.append(f"{label} median ms (lower is better); x flex = flex/triton; ideal = sdpa_full*density/triton")
        lines.append(
            f"{'layout':6s} {'N':>6s} {'dtype':8s} {'dens':>5s} "
            + " ".join(f"{x:>9s}" for x in PEERS)
            + f" {'x flex':>7s} {'ideal':>6s}"
        )
        for r in rows:
            cells = []
            for x in PEERS:
                res = r["peers"].get(x, {})
                cells.append(f"{res[p]:9.3f}" if p in res else f"{'ERR' if 'error' in res else '-':>9s}")
            lines.append(
                f"{r['layout']:6s} {r['N']:6d} {r['dtype']:8s} {r['density']:5.2f} "
                + " ".join(cells)
                + f" {fmt(r.get(p + '_speedup_vs_flex')):>7s} {fmt(r.get(p + '_fraction_of_ideal')):>6s}"
            )
        lines.append("")
    errs = [
        f"  {r['layout']}/{r['dtype']}/{x}: {res['error']}"
        for r in rows
        for x, res in r["peers"].items()
        if "error" in res
    ]
    if errs:
        lines.append("errors / skips:")
        lines.extend(errs[:20])
    if sweep:
        lines.append(f"compile sweep: {json.dumps(sweep)}")
    lines.append("goals (measured, not asserted): fwd >= 1.2x flex, fwd+bwd >= 1.1x flex, >= 0.9 of ideal")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole script (rows past it skip)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--layouts", type=int, default=50, help="layouts in the compile-count sweep (0: skip)")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every code path on CPU on a tiny layout "
        "(Triton in its interpreter); checks the script, measures nothing",
    )
    ap.add_argument("--render", action="store_true", help="only print the table of --out's results.json")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.out)))
        return 0
    start = time.time()
    deadline = start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global DEVICE, PLAN
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, PLAN = "cpu", [("fig2", torch.float16)]
        LAYOUTS.update(SMOKE_LAYOUTS)
        TOL[torch.float16] = 2e-2
    elif not torch.cuda.is_available():
        log("no CUDA device: nothing to benchmark")
        return 1
    import triton

    info = {
        "card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu smoke run",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "autotune": os.environ.get("ZORRO_TRITON_AUTOTUNE", "1"),
    }
    log(f"gpu_bench: {json.dumps(info)}")
    results = {"info": info, "rows": [], "compile_sweep": None}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    try:
        sweep_args = (2, 20, 16) if args.cpu_smoke else (args.layouts,)
        results["compile_sweep"] = compile_sweep(*sweep_args) if args.layouts else None
        log(f"compile sweep: {json.dumps(results['compile_sweep'])}")
    except Exception as err:  # noqa: BLE001
        results["compile_sweep"] = {"error": f"{type(err).__name__}: {err}"[:400]}
        log(traceback.format_exc(limit=4))
    save()
    for name, dtype in PLAN:
        if time.time() > deadline - 20:
            log(f"skipping {name}/{dtype}: time budget")
            results["rows"].append(
                {
                    "layout": name,
                    "N": sum(LAYOUTS[name][:3]),
                    "dtype": str(dtype)[6:],
                    "density": 0.0,
                    "peers": {p: {"error": "skipped: time budget"} for p in PEERS},
                }
            )
            continue
        t0 = time.time()
        try:
            row = bench_row(name, dtype, deadline)
        except Exception as err:  # noqa: BLE001
            log(traceback.format_exc(limit=4))
            row = {
                "layout": name,
                "N": sum(LAYOUTS[name][:3]),
                "dtype": str(dtype)[6:],
                "density": 0.0,
                "peers": {p: {"error": f"row failed: {type(err).__name__}: {err}"[:300]} for p in PEERS},
            }
        results["rows"].append(row)
        save()
        log(
            f"row {name}/{row['dtype']} done in {time.time() - t0:.0f}s: "
            + ", ".join(f"{p}={r.get('fwd_ms', r.get('error', '?'))}" for p, r in row["peers"].items())
        )
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["seconds"] = round(time.time() - start, 1)
    save()
    log(render(out))
    return 0


def render(out: Path) -> str:
    """The compact table from ``out/results.json`` (also written to ``out/table.txt``)."""
    path = Path(out) / "results.json"
    if not path.exists():
        return f"no benchmark results: {path} was not written (see bench_log.txt beside it)"
    results = json.loads(path.read_text())
    info = results["info"]
    text = (
        f"=== {info['card']} | {info['date']} | torch {info['torch']} | triton {info['triton']} | "
        f"autotune {info['autotune']} | bench {results.get('seconds', '?')}s\n"
        + table(results["rows"], results["compile_sweep"])
    )
    (Path(out) / "table.txt").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
