"""Where ``auto``'s CPU rule should send a mask: ``dense``, ``segments`` and ``intervals``, side by side.

    python -m benchmarks.cpu_auto_rule                 # masks that hide nothing: N = 1, 2048, 16384; B=1, H=4, D=64
    python -m benchmarks.cpu_auto_rule 1 64 512        # other token counts
    python -m benchmarks.cpu_auto_rule --sweep         # every layout family, forward and forward+backward (the fit)
    python -m benchmarks.cpu_auto_rule --sweep 84,292 1,4,64   # other token counts / (B, H, D)

``--sweep``: for full, Zorro, packed (4 documents), sliding-window (band of N/8 each way) and Swin (one shifted
block of ``zorro_swin``'s layout) masks at about 1, 14, 84, 150, 292, 600 and 2k tokens (Swin: 14, 84, 292, 2052,
16392), one thread, the two backends called in turn in a shuffled order (paired; minimum over up to 1.5 s of calls),
forward under ``no_grad`` and forward+backward (``.sum().backward()``); ``d/s`` is dense's time over the segment
path's (below 1: dense faster), ``i/s`` the compiled interval kernel's (where it builds), and ``auto`` the rule's
pick. Past 4096 tokens only the segment path runs (the dense
mask alone is GBs) and ``auto`` must say ``segments``.

For three layouts that mask nothing but padding-free rows — ``ZorroMask.full`` (Zorro segments, every pair allowed),
one segment, ``ZorroMask.packed([N])`` — each backend's forward is timed (minimum of a few calls after a warm-up; more
calls for small N) and its peak memory above the inputs measured (the profiler's allocation events, as the benchmark
suite does) over the first call on a fresh copy of the mask, so what a backend builds and keeps (the additive mask, the
plan) counts. The ``dense`` backend pays the ``N x N`` additive mask in memory and in work on every call; the segment
path makes one unmasked call. ``auto`` prints the backend the rule picks.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from benchmarks.measure import peak_memory
from zorro_kernels import ZorroMask, explain, zorro_attention
from zorro_kernels.backends import _cpp
from zorro_models.models.swin import swin_block_layout


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


def _swin(grid_a, grid_v, win_a, win_v, fusion: int) -> ZorroMask:
    windows = {"audio": win_a, "video": win_v}
    return swin_block_layout({"audio": grid_a, "video": grid_v}, windows, True, num_fusion=fusion).mask


SWIN = {  # tokens -> a shifted Swin block's mask (audio grid, video grid, their windows, fusion tokens)
    14: lambda: _swin((2, 2), (1, 2, 4), (2, 2), (1, 2, 2), 2),
    84: lambda: _swin((4, 4), (2, 4, 8), (2, 2), (2, 2, 2), 4),
    292: lambda: _swin((8, 8), (2, 8, 14), (4, 4), (2, 4, 7), 4),
    2052: lambda: _swin((16, 16), (4, 16, 28), (4, 4), (2, 7, 7), 4),
    16392: lambda: _swin((32, 64), (8, 32, 56), (8, 8), (2, 8, 8), 8),
}


def sweep_layouts(n: int) -> dict:
    audio = max(n // 6, 1) if n > 2 else 0
    video = n - audio - (2 if n > 3 else 0)
    fusion = n - audio - video
    doc = max(n // 7, 1)
    out = {"full": ZorroMask.full(audio=audio, video=video, fusion=fusion)}
    if n > 2:
        out["zorro"] = ZorroMask.zorro(audio=audio, video=video, fusion=fusion)
    if n > 4:
        out["packed"] = ZorroMask.packed([doc] * 3 + [n - 3 * doc])
    w = max(n // 8, 1)
    out["window"] = ZorroMask.from_segments([("x", n)], {"x": "*"}, window=(w, w))
    if n in SWIN:
        out["swin"] = SWIN[n]()
    return out


def paired_ms(fns: dict, budget_s: float) -> dict:
    """``{name: min ms}``, the functions called in turn, shuffled each round (the same load on each)."""
    for fn in fns.values():
        fn()  # warm-up: plans, the dense mask
    times: dict = {name: [] for name in fns}
    order, rng, spent, rounds = list(fns), random.Random(0), 0.0, 0
    while rounds < 3 or (spent < budget_s and rounds < 300):
        rng.shuffle(order)
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
            spent += times[name][-1]
        rounds += 1
    return {name: min(ts) * 1e3 for name, ts in times.items()}


def _backends() -> tuple:
    """dense and segments, and the compiled interval kernel where it builds here."""
    return ("dense", "segments") + (("intervals",) if _cpp.load() else ())


def sweep(sizes: list[int], shape: tuple[int, int, int]) -> None:
    b, h, d = shape
    print(f"B={b} H={h} D={d}, torch threads {torch.get_num_threads()}; ms, paired minimum")
    for n in sizes:
        for name, mask in sweep_layouts(n).items():
            q, k, v = (torch.randn(b, h, mask.num_q, d) for _ in range(3))
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            picks = explain(q, k, v, mask).chosen, explain(qg, kg, vg, mask).chosen
            row = f"N={mask.num_q:6d} {name:7s}"
            if mask.num_q > 4096:
                with torch.no_grad():
                    fns = {bk: lambda bk=bk: zorro_attention(q, k, v, mask, backend=bk) for bk in _backends()[1:]}
                    t = paired_ms(fns, 0)
                times = " ".join(f"{bk} {ms:9.1f}" for bk, ms in t.items())
                print(f"{row} fwd {times} (dense not run) | auto {picks[0]} / {picks[1]}", flush=True)
                continue
            for label, args, grad in (("fwd", (q, k, v), False), ("f+b", (qg, kg, vg), True)):

                def call(backend, args=args, grad=grad):
                    with torch.set_grad_enabled(grad):
                        out = zorro_attention(*args, mask, backend=backend)
                        if grad:
                            out.sum().backward()

                t = paired_ms({bk: lambda bk=bk: call(bk) for bk in _backends()}, 1.5)
                row += f" | {label} d {t['dense']:8.3f} s {t['segments']:8.3f} d/s {t['dense'] / t['segments']:5.2f}"
                if "intervals" in t:
                    row += f" i {t['intervals']:8.3f} i/s {t['intervals'] / t['segments']:5.2f}"
            print(f"{row} | auto {picks[0]} / {picks[1]}", flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sweep"]:
        torch.set_num_threads(1)
        sizes = [int(x) for x in argv[1].split(",")] if len(argv) > 1 else [1, 14, 84, 150, 292, 600, 2052, 16392]
        shape = tuple(int(x) for x in argv[2].split(",")) if len(argv) > 2 else (1, 4, 64)
        sweep(sizes, shape)
        return
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
