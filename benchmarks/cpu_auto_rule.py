"""Where ``auto``'s CPU rule should send a mask that hides nothing: ``dense`` against ``segments``, side by side.

    python benchmarks/cpu_auto_rule.py                 # N = 1, 2048, 16384; B=1, H=4, D=64
    python benchmarks/cpu_auto_rule.py 1 64 512        # other token counts

For three layouts that mask nothing but padding-free rows — ``ZorroMask.full`` (Zorro segments, every pair allowed),
one segment, ``ZorroMask.packed([N])`` — each backend's forward is timed (minimum of a few calls after a warm-up; more
calls for small N) and its peak memory above the inputs measured (the profiler's allocation events, as the benchmark
suite does) over the first call on a fresh copy of the mask, so what a backend builds and keeps (the additive mask, the
plan) counts. The ``dense`` backend pays the ``N x N`` additive mask in memory and in work on every call; the segment
path makes one unmasked call. ``auto`` prints the backend the rule picks.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.measure import peak_memory
from zorro_kernels import ZorroMask, explain, zorro_attention


def layouts(n: int) -> dict:
    audio = max(n // 4, 0)
    video = n - audio - (1 if n > 2 else 0)
    return {
        "full": ZorroMask.full(audio=audio, video=video, fusion=n - audio - video),
        "one segment": ZorroMask.from_segments([("x", n)], {"x": "*"}),
        "packed([N])": ZorroMask.packed([n]),
    }


def best_s(fn, budget_s: float = 3.0, max_calls: int = 200) -> float:
    fn()  # warm-up: builds plans / the dense mask
    times: list[float] = []
    spent = 0.0
    while len(times) < max_calls and (len(times) < 3 or spent < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return min(times)


def main(argv: list[str]) -> None:
    sizes = [int(x) for x in argv] or [1, 2048, 16384]
    b, h, d = 1, 4, 64
    print(f"B={b} H={h} D={d}, forward, torch threads {torch.get_num_threads()}")
    for n in sizes:
        for name, mask in layouts(n).items():
            q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
            row = [f"N={n:6d} {name:12s}"]
            with torch.no_grad():
                for backend in ("dense", "segments"):
                    t = best_s(lambda: zorro_attention(q, k, v, mask, backend=backend), budget_s=2.0 if n < 8192 else 0)
                    fresh = mask.with_lengths()  # its own caches: the first call's memory includes what it builds
                    mem = peak_memory(lambda: zorro_attention(q, k, v, fresh, backend=backend), torch.device("cpu"))
                    row.append(f"{backend} {t * 1e3:9.3f} ms {mem / 2**20:8.1f} MB")
                row.append(f"auto: {explain(q, k, v, mask).chosen}")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
