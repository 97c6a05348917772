"""The compiled CPU backward kernel (``zorro_cpu::interval_bwd``) beside its peers, one thread, fp32.

    python -m benchmarks.cpu_interval_bwd aten gemma demo     # any of them

- ``aten``  — the kernel alone on an unmasked and a causal square (B=2, H=8, N=2048, D=64) against ATen's own CPU flash
  backward (``_scaled_dot_product_flash_attention_for_cpu_backward``) on the same problem, its inputs from ATen's
  forward: the per-pair efficiency the interval kernel starts from.
- ``gemma`` — the Gemma-3-like row of issue 20 (1024 text tokens + 4 images of 256 per sample, causal text,
  bidirectional images, B=2, H=8, D=64) through ``zorro_attention(backend="intervals")``, forward and
  forward+backward, against the ideal: one unmasked SDPA call at that shape x the attended fraction.
- ``demo``  — issue 21's Zorro layout at the demo's size (32/64/4 tokens, B=256, H=4, D=32, random per-sample
  lengths) through the backend against one SDPA call with the dense mask.

Each case checks its gradients against the peer's before timing; peers run interleaved (the order flips each round)
and each keeps its best CPU time (``TIMER=wall``: wall time).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

import zorro_kernels
from benchmarks.cpu_costs import ragged_batch
from benchmarks.paired_gemma3 import gemma3_mask
from zorro_kernels import zorro_attention
from zorro_kernels.backends import _cpp


def best_times(fns: dict, rounds: int) -> dict:
    """Each peer's best CPU time (process time: one compute thread, so the time it ran, not the time it waited for a
    core on a shared machine); ``TIMER=wall`` takes wall time instead."""
    clock = time.perf_counter if os.environ.get("TIMER") == "wall" else time.process_time
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # warm-up: plans, caches, the first touch of buffers
    for r in range(rounds):
        for name, fn in list(fns.items())[:: 1 if r % 2 else -1]:
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def inputs(b: int, h: int, n: int, d: int):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=gen) for _ in range(4)]


def check_close(name: str, got, want) -> None:
    """fp32 sanity before timing: each gradient within 1e-4 of the peer's, relative to its largest entry."""
    for g, w, which in zip(got, want, ("dq", "dk", "dv")):
        err = (g - w).abs().max().item()
        bound = 1e-4 * max(1.0, w.abs().max().item())
        if not err <= bound:
            raise SystemExit(f"{name}: {which} differs from the peer's by {err:.3e} > {bound:.3e}")


def header(what: str) -> None:
    timer = "wall" if os.environ.get("TIMER") == "wall" else "CPU"
    print(f"{what} (fp32, {torch.get_num_threads()} thread, {timer} time, load {os.getloadavg()[0]:.1f})", flush=True)


def section_aten(rounds: int = 5) -> None:
    b, h, n, d = 2, 8, 2048, 64
    q, k, v, do = inputs(b, h, n, d)
    scale = d**-0.5
    header(f"interval_bwd vs ATen's flash backward, B={b} H={h} N={n} D={d}, min of {rounds}")
    for causal in (False, True):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        lo = torch.zeros(b, n, 1, dtype=torch.int32)
        ends = torch.arange(1, n + 1, dtype=torch.int32) if causal else torch.full((n,), n, dtype=torch.int32)
        hi = ends.expand(b, n)[..., None].contiguous()
        fns = {
            "ours": lambda: torch.ops.zorro_cpu.interval_bwd(do, q, k, v, out, lse, lo, hi, scale),
            "aten": lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, out, lse, 0.0, causal, scale=scale
            ),
        }
        check_close("causal" if causal else "unmasked", fns["ours"](), fns["aten"]())
        t = best_times(fns, rounds)
        flops = 2.5 * 4 * b * h * n * n * d * (0.5 if causal else 1.0)
        print(
            f"  {'causal' if causal else 'unmasked':8s} ours {t['ours'] * 1e3:7.1f} ms ({flops / t['ours'] / 1e9:5.1f} "
            f"GFLOP/s)  aten {t['aten'] * 1e3:7.1f} ms ({flops / t['aten'] / 1e9:5.1f})  aten/ours "
            f"{t['aten'] / t['ours']:.3f}",
            flush=True,
        )


def fwd(fn, x):
    def run():
        with torch.no_grad():
            fn(*x)

    return run


def fwd_bwd(fn, x, do):
    def run():
        leaves = [t.detach().requires_grad_() for t in x]
        return torch.autograd.grad(fn(*leaves), leaves, do)

    return run


def masked_case(name: str, mask, b: int, h: int, d: int, peer_mask: bool, rounds: int) -> None:
    n = mask.num_q
    q, k, v, do = inputs(b, h, n, d)
    x = (q, k, v)
    dense = mask.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense)[:, None]
    frac = dense.float().mean().item()

    def ours(q, k, v):
        return zorro_attention(q, k, v, mask, backend="intervals")

    def masked_sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    check_close(name, fwd_bwd(ours, x, do)(), fwd_bwd(masked_sdpa, x, do)())
    peer = masked_sdpa if peer_mask else F.scaled_dot_product_attention
    fns = {"ours fwd": fwd(ours, x), "ours fwd+bwd": fwd_bwd(ours, x, do)}
    fns.update({"sdpa fwd": fwd(peer, x), "sdpa fwd+bwd": fwd_bwd(peer, x, do)})
    t = best_times(fns, rounds)
    header(f"{name}: B={b} H={h} N={n} D={d}, attended {frac:.4f}, min of {rounds}")
    print("  " + ", ".join(f"{key} {val * 1e3:.1f} ms" for key, val in t.items()))
    for direction in ("fwd", "fwd+bwd"):
        mine, theirs = t[f"ours {direction}"], t[f"sdpa {direction}"]
        if peer_mask:
            print(f"  {direction}: SDPA with the dense mask / ours = {theirs / mine:.2f}x")
        else:
            print(f"  {direction}: ideal (unmasked SDPA x {frac:.4f}) / ours = {theirs * frac / mine:.3f}")
    sys.stdout.flush()


def section_gemma(rounds: int = 5) -> None:
    masked_case("gemma3-like", gemma3_mask(zorro_kernels), 2, 8, 64, peer_mask=False, rounds=rounds)


def section_demo(rounds: int = 9) -> None:
    masked_case("demo 32/64/4 ragged", ragged_batch(256, 32, 64, 4)[0], 256, 4, 32, peer_mask=True, rounds=rounds)


SECTIONS = {"aten": section_aten, "gemma": section_gemma, "demo": section_demo}


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(SECTIONS)
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not _cpp.load():
        raise SystemExit(_cpp.unavailable_reason())
    torch.set_num_threads(1)
    for name in names:
        SECTIONS[name]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
