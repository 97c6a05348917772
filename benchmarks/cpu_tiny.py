"""Per-call cost of tiny problems on CPU: ``zorro_attention`` (auto) against one masked SDPA call.

    python benchmarks/cpu_tiny.py                      # the Zorro layout at 4+8+2 and 24+48+12 tokens, B=8, H=2, D=16
    python benchmarks/cpu_tiny.py 32,64,16             # other (audio, video, fusion) sizes instead

One thread; each figure is the minimum (and 25th percentile) over 300 calls after 30 warm-up calls, in microseconds,
forward and forward+backward, zorro and SDPA (with the mask as a bool ``attn_mask``) measured side by side, call
after call, so that load on the machine falls on both; ``x`` is SDPA's time over zorro's (above 1: zorro faster). This
is where host overhead shows: validation, backend choice, plan lookup and autograd glue are a large part of a call
this small. Which backend ``auto`` runs is printed with each row.
"""

from __future__ import annotations

import random
import sys
import time

import torch
import torch.nn.functional as F

from zorro_kernels import ZorroMask, explain, zorro_attention


def paired(fns: dict, n: int = 300) -> dict:
    """``{name: (min, p25)}`` in microseconds, the functions called in turn (shuffled each round) so that each
    round sees the same load."""
    for fn in fns.values():
        for _ in range(30):
            fn()
    times = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(n):
        rng.shuffle(order)  # a call right after another's backward finds cold caches: no function always pays it
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: (sorted(ts)[0] * 1e6, sorted(ts)[n // 4] * 1e6) for name, ts in times.items()}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    sizes = [tuple(int(x) for x in s.split(",")) for s in argv] or [(4, 8, 2), (24, 48, 12)]
    for audio, video, fusion in sizes:
        mask = ZorroMask.zorro(audio=audio, video=video, fusion=fusion)
        q, k, v = (torch.randn(8, 2, mask.num_q, 16) for _ in range(3))
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        dense = mask.to_dense()
        rows = paired(
            dict(
                zf=lambda: zorro_attention(q, k, v, mask),
                sf=lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                zb=lambda: zorro_attention(qg, kg, vg, mask).sum().backward(),
                sb=lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense).sum().backward(),
            )
        )
        picks = explain(q, k, v, mask).chosen, explain(qg, kg, vg, mask).chosen
        print(
            f"N={mask.num_q:4d} fwd zorro {rows['zf'][0]:7.1f} sdpa {rows['sf'][0]:7.1f} "
            f"x{rows['sf'][0] / rows['zf'][0]:.2f} | fwd+bwd zorro {rows['zb'][0]:7.1f} sdpa {rows['sb'][0]:7.1f} "
            f"x{rows['sb'][0] / rows['zb'][0]:.2f}  (min us; p25 {rows['zf'][1]:.0f} {rows['sf'][1]:.0f} "
            f"{rows['zb'][1]:.0f} {rows['sb'][1]:.0f}; auto: {picks[0]} / {picks[1]})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
