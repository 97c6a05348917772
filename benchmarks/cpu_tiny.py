"""Per-call cost of tiny problems on CPU: ``zorro_attention`` (auto) against one masked SDPA call.

    python benchmarks/cpu_tiny.py                      # the Zorro layout 4 + 8 + 2 tokens, B=8, H=2, D=16
    python benchmarks/cpu_tiny.py 24,48,12 32,64,16    # more (audio, video, fusion) sizes

One thread; each figure is the minimum (and 25th percentile) over 300 calls after 30 warm-up calls, in microseconds,
forward and forward+backward, zorro and SDPA measured side by side. This is where host overhead shows: validation,
backend choice, plan lookup and autograd glue are a large part of a call this small. Which backend ``auto`` runs is
printed with each row.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from zorro_kernels import ZorroMask, explain, zorro_attention


def best(fn, n: int = 300) -> tuple[float, float]:
    for _ in range(30):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0] * 1e6, times[n // 4] * 1e6


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    sizes = [(4, 8, 2)] + [tuple(int(x) for x in s.split(",")) for s in argv]
    for audio, video, fusion in sizes:
        mask = ZorroMask.zorro(audio=audio, video=video, fusion=fusion)
        q, k, v = (torch.randn(8, 2, mask.num_q, 16) for _ in range(3))
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        dense = mask.to_dense()
        rows = dict(
            zf=best(lambda: zorro_attention(q, k, v, mask)),
            sf=best(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
            zb=best(lambda: zorro_attention(qg, kg, vg, mask).sum().backward()),
            sb=best(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense).sum().backward()),
        )
        picks = explain(q, k, v, mask).chosen, explain(qg, kg, vg, mask).chosen
        print(
            f"N={mask.num_q:4d} fwd zorro {rows['zf'][0]:7.1f} sdpa {rows['sf'][0]:7.1f} | fwd+bwd zorro "
            f"{rows['zb'][0]:7.1f} sdpa {rows['sb'][0]:7.1f}  (min us; p25 {rows['zf'][1]:.0f} {rows['sf'][1]:.0f} "
            f"{rows['zb'][1]:.0f} {rows['sb'][1]:.0f}; auto: {picks[0]} / {picks[1]})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
