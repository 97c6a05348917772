"""Issue 20's Gemma-3-like row, an older commit against the working tree, paired in one process (CPU, one thread).

    python -m benchmarks.paired_gemma3 b875e96            # build, forward and forward+backward
    python -m benchmarks.paired_gemma3 b875e96 --rounds 7 --only attention

The older commit's ``zorro_kernels`` is taken with ``git archive`` into a temporary folder and imported as the package
``zorro_base`` (its imports are relative), so both versions run side by side: their calls alternate round by round,
and a load change hits both alike. Each version runs its CPU segment path directly (``backends.ragged
.ragged_attention``, what ``zorro_attention`` dispatches this mask to on CPU), not through ``zorro_attention``: the two
packages would register the same ``zorro::`` custom ops. Layout as ``benchmarks.cpu_costs gemma3``: B=2, H=8, N=2048,
D=64, fp32.

Figures: build = best wall and CPU time of 300 rounds (mask, and mask + ``build_plan``); attention = minimum CPU time
(``time.process_time``) over the rounds after a warm-up, beside SDPA without a mask (ideal = that x the attended
fraction), SDPA with the dense bool mask and the working tree's compiled interval kernel (``backend="intervals"``,
where it builds). The peers' order flips each round (always first, the same mask code timed
15% slower). Each version's output is checked against the dense-mask SDPA first.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.cpu_costs import inputs
from benchmarks.measure import import_commit
from zorro_kernels import zorro_attention
from zorro_kernels.backends import _cpp

TEXT = ([100, 300, 200, 150, 274], [20, 500, 64, 400, 40])  # per sample: text runs around 4 images of 256


def gemma3_mask(pkg):
    """``benchmarks.cpu_costs.gemma3_mask`` built with package ``pkg`` (either version)."""
    names, sizes = [], []
    for i in range(5):
        names += [f"t{i}"] + ([f"img{i}"] if i < 4 else [])
    for t in TEXT:
        sizes.append([x for i in range(5) for x in ([t[i], 256] if i < 4 else [t[i]])])
    return pkg.ZorroMask.causal_with_blocks(
        list(zip(names, sizes[0])), ["img*"], sample_sizes=torch.tensor(sizes, dtype=torch.int64)
    )


def build(old, new) -> None:
    from zorro_kernels.backends.segments import build_plan

    old_plan = importlib.import_module("zorro_base.backends.segments").build_plan
    fns = {
        "mask, before": lambda: gemma3_mask(old),
        "mask, after": lambda: gemma3_mask(new),
        "mask + plan, before": lambda: old_plan(gemma3_mask(old)),
        "mask + plan, after": lambda: build_plan(gemma3_mask(new)),
    }
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for r in range(300):
        for k, f in list(fns.items())[:: 1 if r % 2 else -1]:  # the order flips each round: no peer always first
            w, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    for k in fns:
        print(
            f"build {k:20s} wall best {min(wall[k]) * 1e3:.3f} ms (median {statistics.median(wall[k]) * 1e3:.3f}), "
            f"CPU best {min(cpu[k]) * 1e3:.3f} ms",
            flush=True,
        )


def attention(old, new, rounds: int) -> None:
    old_ragged = importlib.import_module("zorro_base.backends.ragged").ragged_attention
    from zorro_kernels.backends.ragged import ragged_attention

    m_old, m_new = gemma3_mask(old), gemma3_mask(new)
    frac = m_new.attended_fraction()
    q, k, v, g = inputs(2, 8, m_new.num_q, 64)
    scale = 64**-0.5
    dense = m_new.to_dense()[:, None]
    fns = {
        "before": lambda q, k, v: old_ragged(q, k, v, m_old, scale),
        "after": lambda q, k, v: ragged_attention(q, k, v, m_new, scale),
        "sdpa-nomask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "sdpa-masked": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
    }
    if _cpp.load():  # the compiled interval kernel (the working tree's only), where it builds here
        fns["intervals"] = lambda q, k, v: zorro_attention(q, k, v, m_new, scale=scale, backend="intervals")
    for backward in (False, True):

        def call(fn):
            if not backward:
                with torch.no_grad():
                    return fn(q, k, v)
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = fn(qq, kk, vv)
            torch.autograd.grad(out, (qq, kk, vv), g)
            return out.detach()

        outs = {n: call(f) for n, f in fns.items()}  # warm-up and check
        for n in [x for x in ("before", "after", "intervals") if x in outs]:
            err = (outs[n] - outs["sdpa-masked"]).abs().max().item()
            assert err < 1e-4, f"{n} disagrees with SDPA + dense mask: max error {err}"
        times: dict = {n: [] for n in fns}
        for r in range(rounds):
            for n, f in list(fns.items())[:: 1 if r % 2 else -1]:
                t = time.process_time()
                call(f)
                times[n].append(time.process_time() - t)
        best = {n: min(x) for n, x in times.items()}
        ideal = best["sdpa-nomask"] * frac
        print(
            f"{'fwd+bwd' if backward else 'fwd':7s} before {best['before'] * 1e3:.1f} ms ({ideal / best['before']:.3f}"
            f" of ideal) | after {best['after'] * 1e3:.1f} ms ({ideal / best['after']:.3f}) | SDPA + dense mask "
            f"{best['sdpa-masked'] * 1e3:.1f} ms ({best['sdpa-masked'] / best['after']:.2f}x after) | ideal "
            f"{ideal * 1e3:.1f} ms (SDPA no mask {best['sdpa-nomask'] * 1e3:.1f} ms x {frac:.3f})",
            flush=True,
        )
        if "intervals" in best:
            b = best["intervals"]
            print(
                f"{'':7s} intervals {b * 1e3:.1f} ms ({ideal / b:.3f} of ideal; {best['after'] / b:.2f}x after, "
                f"{best['sdpa-masked'] / b:.2f}x SDPA + dense mask)",
                flush=True,
            )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("commit", help="the older commit (before)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=["build", "attention"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import zorro_kernels

    with tempfile.TemporaryDirectory() as tmp:
        old = import_commit(args.commit, Path(tmp))
        if args.only in (None, "build"):
            build(old, zorro_kernels)
        if args.only in (None, "attention"):
            attention(old, zorro_kernels, args.rounds)


if __name__ == "__main__":
    main()
