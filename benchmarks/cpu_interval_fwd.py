"""The compiled CPU forward kernel (``zorro_cpu::interval_fwd``) against ATen's own CPU flash forward, one thread, fp32.

    python -m benchmarks.cpu_interval_fwd                  # B=1, H=4, N=2048, D=64, 5 rounds
    python -m benchmarks.cpu_interval_fwd 2 8 2048 64 7    # B H N D rounds

An unmasked square (one interval [0, N) per row) against ``_scaled_dot_product_flash_attention_for_cpu``: the per-pair
efficiency everything else starts from (the kernel must be about as fast as ATen's here for issue 20's 0.9 of ideal to
be reachable). A causal square (row i: [0, i + 1)) against ATen's causal call and against the ideal (half the
unmasked call). Outputs checked against ATen's first; peers interleaved (the order flips each round), each keeps its
minimum process CPU time. GFLOP/s per attended pair, 4 * D flops each.
"""

from __future__ import annotations

import sys
import time

import torch

from zorro_kernels.backends import _cpp


def main(argv: list[str]) -> None:
    b, h, n, d, rounds = (int(x) for x in argv) if argv else (1, 4, 2048, 64, 5)
    torch.set_num_threads(1)
    if not _cpp.load():
        sys.exit(_cpp.unavailable_reason())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    scale = d**-0.5
    lo = torch.zeros(b, n, 1, dtype=torch.int32)
    full = torch.full((b, n, 1), n, dtype=torch.int32)
    causal = (torch.arange(n, dtype=torch.int32) + 1).view(1, n, 1).expand(b, n, 1).contiguous()
    aten = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    fns = {
        "aten": lambda: aten(q, k, v, scale=scale)[0],
        "kernel": lambda: torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, full, scale)[0],
        "aten causal": lambda: aten(q, k, v, is_causal=True, scale=scale)[0],
        "kernel causal": lambda: torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, causal, scale)[0],
    }
    outs = {name: fn() for name, fn in fns.items()}
    for ref, got in (("aten", "kernel"), ("aten causal", "kernel causal")):
        err = (outs[ref] - outs[got]).abs().max().item()
        assert err < 1e-4, f"{got} disagrees with {ref}: max error {err}"
    best = {name: float("inf") for name in fns}
    for r in range(rounds):
        for name, fn in list(fns.items())[:: 1 if r % 2 else -1]:
            start = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - start)
    pairs = b * h * n * n
    for name, t in best.items():
        attended = pairs / 2 if "causal" in name else pairs
        print(f"{name:14s} {t * 1e3:8.2f} ms  {4 * d * attended / t / 1e9:6.1f} GFLOP/s per attended pair", flush=True)
    print(
        f"kernel / ATen, unmasked: {best['aten'] / best['kernel']:.3f}x the speed; causal: "
        f"{best['aten causal'] / best['kernel causal']:.3f}x ATen's causal, "
        f"{0.5 * best['aten'] / best['kernel causal']:.3f} of ideal (half the unmasked ATen call)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
