"""Costs that must grow with the work (issues 21 and 23), on CPU, each row measured side by side in one run.

    python -m benchmarks.cpu_costs                 # every section
    python -m benchmarks.cpu_costs build docs      # some of: build docs causal ragged ragged-demo full

- ``build``  — describing and planning packed documents of random lengths summing to 16k (1000, 5000, 8000 docs):
  ``ZorroMask.packed``, ``build_plan``, ``tile_map(64, 64)``, ``attended()``, each on a fresh mask.
- ``docs``   — attention over those documents (1000 and 5000; B=1, H=4, D=64): zorro's segment path against SDPA with
  the dense block-diagonal mask and against *hand-batched* SDPA (documents grouped by length, each group one batched
  SDPA call on gathered rows, scattered back), forward and forward+backward.
- ``causal`` — the benchmark suite's packed-causal layout (8 sequences of 256..900 tokens, B=1, H=4, D=64): zorro
  against one SDPA call with the dense block-diagonal causal mask.
- ``ragged`` — a Zorro batch (160 audio / 784 video / 8 fusion, B=256, H=4, D=32) with random lengths per sample:
  zorro against SDPA with ``mask.to_dense()``, against the segment path with one plan pattern per sample
  (``per-pattern``, what ran before buckets) and against zorro on the same batch without lengths; the plan's build
  time beside. ``ragged-demo``: the same at the demo's size (32 / 64 / 4).
- ``full``   — ``ZorroMask.full`` at 16k (B=1, H=4, D=64): zorro (auto) against one unmasked SDPA call, with peak
  memory.
- ``gemma3`` — issue 20's Gemma-3-like row: 1024 text tokens with 4 images of 256 at different positions per sample
  (per-sample segment sizes, causal text cells, bidirectional images; B=2, H=8, D=64): zorro against SDPA with the
  dense mask and against the ideal (one unmasked SDPA call x the attended fraction), and the mask + plan build time.

``gemma3``, ``ragged`` and ``ragged-demo`` also time zorro forced onto the segment path (``zorro-segments``) and onto
the compiled interval kernel (``zorro-intervals``, where it builds here).

One thread (``--threads N`` for more). Each figure is the minimum over a few calls after a warm-up of the process's
CPU time (``time.process_time``: on a shared, loaded machine wall-clock time mostly measures the other tenants), with
the median wall-clock time beside it; the rounds of one row alternate between its peers, so a load change hits them
alike. Ratios are peer / zorro, on CPU time (> 1: zorro faster). Correctness is the tests' business
(tests/test_plan_costs.py); each row checks once that zorro's output agrees with its peer's.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.measure import peak_memory
from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.backends import _cpp
from zorro_kernels.backends.ragged import ragged_calls, ragged_plan
from zorro_kernels.backends.segments import build_plan, segment_attention


def doc_lengths(n_docs: int, total: int = 16384, seed: int = 0) -> list[int]:
    """``n_docs`` random positive lengths summing to ``total`` (random cut points)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=g)[: n_docs - 1].add(1).sort().values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])).tolist()


def paired(fns: dict, rounds: int, backward: bool, inputs) -> dict:
    """Median seconds per peer, the peers' calls interleaved round by round."""
    q, k, v, g = inputs
    times: dict = {name: [] for name in fns}
    walls: dict = {name: [] for name in fns}

    def call(fn):
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        torch.autograd.grad(out, (qq, kk, vv), g)
        return out

    outs = {name: call(fn).detach() for name, fn in fns.items()}  # warm-up
    first = next(iter(outs.values()))
    for name, out in outs.items():
        err = (out - first).abs().max().item()
        assert err < 1e-3, f"{name} disagrees with {next(iter(outs))}: max error {err}"
    for _ in range(rounds):
        for name, fn in fns.items():
            t, w = time.process_time(), time.perf_counter()
            call(fn)
            times[name].append(time.process_time() - t)
            walls[name].append(time.perf_counter() - w)
    return {name: (min(times[name]), statistics.median(walls[name])) for name in fns}


def report(title: str, times: dict, base: str) -> None:
    z = times[base][0]
    parts = [f"{base} {z * 1e3:8.1f} ms (wall {times[base][1] * 1e3:.0f})"] + [
        f"{name} {t * 1e3:8.1f} ms (wall {w * 1e3:.0f}) {t / z:5.2f}x" for name, (t, w) in times.items() if name != base
    ]
    print(f"{title:44s} " + " | ".join(parts), flush=True)


def forced_backends(mask) -> dict:
    """zorro on the segment path and on the compiled interval kernel (where it builds here), by name."""
    names = ("segments", "intervals") if _cpp.load() else ("segments",)
    return {f"zorro-{n}": lambda q, k, v, n=n: zorro_attention(q, k, v, mask, backend=n) for n in names}


def block_diag(lens, causal: bool) -> torch.Tensor:
    return ZorroMask.packed(lens, causal=causal).to_dense()


def hand_batched(lens):
    """SDPA per group of equal-length documents, rows gathered into ``(B, H * n, L, D)`` and scattered back."""
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    groups: dict = {}
    for s, n in zip(starts.tolist(), lens):
        groups.setdefault(n, []).append(s)
    index = {n: (torch.tensor(ss)[:, None] + torch.arange(n)).flatten() for n, ss in groups.items()}

    def fn(q, k, v):
        b, h, _, d = q.shape
        out = q.new_empty(q.shape)
        for n, idx in index.items():
            fold = [x.index_select(2, idx).reshape(b, h * (len(idx) // n), n, d) for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*fold)
            out = out.index_copy(2, idx, o.reshape(b, h, -1, d))
        return out

    return fn


def inputs(b, h, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(4))


def section_build():
    for n_docs in (1000, 5000, 8000):
        lens = doc_lengths(n_docs)
        row = {}
        t = time.perf_counter()
        ZorroMask.packed(lens)
        row["packed"] = time.perf_counter() - t
        for name, fn in (
            ("build_plan", build_plan),
            ("tile_map(64,64)", lambda m: m.tile_map(64, 64)),
            ("attended()", lambda m: m.attended()),
        ):
            best = float("inf")
            for _ in range(5):
                m = ZorroMask.packed(lens)  # fresh: nothing cached
                t = time.perf_counter()
                fn(m)
                best = min(best, time.perf_counter() - t)
            row[name] = best
        print(f"{n_docs:5d} docs (16k tokens): " + " | ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in row.items()))


def section_docs():
    for n_docs in (1000, 5000):
        lens = doc_lengths(n_docs)
        mask = ZorroMask.packed(lens)
        dense = block_diag(lens, False)
        fns = {
            "zorro": lambda q, k, v: zorro_attention(q, k, v, mask),
            "sdpa-blockdiag": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
            "hand-batched": hand_batched(lens),
        }
        x = inputs(1, 4, mask.num_q, 64)
        calls = len(build_plan(mask).patterns[0].steps)
        for backward in (False, True):
            report(
                f"{n_docs} docs, 16k, {calls} calls, {'fwd+bwd' if backward else 'fwd'}",
                paired(fns, 2, backward, x),
                "zorro",
            )


def section_causal():
    lens = [300, 700, 450, 900, 256, 600, 390, 500]
    mask = ZorroMask.packed(lens, causal=True)
    dense = block_diag(lens, True)
    fns = {
        "zorro": lambda q, k, v: zorro_attention(q, k, v, mask),
        "sdpa-masked": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
    }
    x = inputs(1, 4, mask.num_q, 64)
    for backward in (False, True):
        report(f"packed-causal {mask.num_q}, {'fwd+bwd' if backward else 'fwd'}", paired(fns, 7, backward, x), "zorro")


def ragged_batch(b: int, a_n: int, v_n: int, f_n: int, seed: int = 0):
    """A Zorro mask with random per-sample lengths (audio may be empty, video at least 1 token) and the same layout
    without lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.stack(
        [
            torch.randint(0, a_n + 1, (b,), generator=g),
            torch.randint(1, v_n + 1, (b,), generator=g),
            torch.full((b,), f_n),
        ],
        1,
    )
    return ZorroMask.zorro(audio=a_n, video=v_n, fusion=f_n, lengths=lengths), ZorroMask.zorro(
        audio=a_n, video=v_n, fusion=f_n
    )


def ragged_rows(b: int, a_n: int, v_n: int, f_n: int, rounds: int) -> None:
    mask, plain = ragged_batch(b, a_n, v_n, f_n)
    dense = mask.to_dense()[:, None]
    live = dense.any(-1, keepdim=True)
    safe = dense | ~live
    fns = {
        "zorro": lambda q, k, v: zorro_attention(q, k, v, mask),
        "sdpa-masked": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=safe).masked_fill(~live, 0),
        # the segment path with one plan pattern per distinct lengths row (what zorro ran before buckets)
        "per-pattern": lambda q, k, v: segment_attention(q, k, v, mask, q.shape[-1] ** -0.5),
        **forced_backends(mask),
    }
    x = inputs(b, 4, mask.num_q, 32)
    pats = len(build_plan(mask).patterns)
    calls = ragged_calls(mask)
    t = time.process_time()
    ragged_plan(mask.with_lengths(mask.lengths))
    plan_ms = (time.process_time() - t) * 1e3
    t = time.process_time()
    build_plan(mask.with_lengths(mask.lengths))
    old_ms = (time.process_time() - t) * 1e3
    print(f"{a_n}/{v_n}/{f_n} B={b}: {pats} patterns, {calls} calls; plan {plan_ms:.1f} ms (per-pattern {old_ms:.1f})")
    for backward in (False, True):
        times = paired(fns, rounds, backward, x)
        # without lengths the output differs (padding attended): timed in its own rounds
        times["zorro-no-lengths"] = paired({"z": lambda q, k, v: zorro_attention(q, k, v, plain)}, rounds, backward, x)[
            "z"
        ]
        report(f"ragged {a_n}/{v_n}/{f_n} B={b}, {'fwd+bwd' if backward else 'fwd'}", times, "zorro")


def section_ragged():
    ragged_rows(256, 160, 784, 8, 2)


def section_ragged_demo():
    ragged_rows(256, 32, 64, 4, 7)


def section_full():
    n = 16384
    mask = ZorroMask.full(audio=n // 4, video=n - n // 4 - 64, fusion=64)
    fns = {
        "zorro": lambda q, k, v: zorro_attention(q, k, v, mask),
        "sdpa-nomask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    x = inputs(1, 4, n, 64)
    report(f"full {n}, fwd", paired(fns, 2, False, x), "zorro")
    q, k, v, _ = x
    with torch.no_grad():
        fresh = mask.with_lengths()
        mem = {
            "zorro": peak_memory(lambda: zorro_attention(q, k, v, fresh), torch.device("cpu")),
            "sdpa-nomask": peak_memory(lambda: F.scaled_dot_product_attention(q, k, v), torch.device("cpu")),
        }
    print(f"{'full 16384, fwd peak memory':44s} " + " | ".join(f"{k} {v / 2**20:.1f} MB" for k, v in mem.items()))


def gemma3_mask() -> ZorroMask:
    """Issue 20's layout: per sample, 5 text runs (1024 tokens in all) around 4 images of 256, images placed
    differently in the two samples."""
    text = [[100, 300, 200, 150, 274], [20, 500, 64, 400, 40]]
    names, sizes = [], []
    for i in range(5):
        names.append(f"t{i}")
        if i < 4:
            names.append(f"img{i}")
    for t in text:
        row = []
        for i in range(5):
            row.append(t[i])
            if i < 4:
                row.append(256)
        sizes.append(row)
    return ZorroMask.causal_with_blocks(
        list(zip(names, sizes[0])), ["img*"], sample_sizes=torch.tensor(sizes, dtype=torch.int64)
    )


def section_gemma3():
    best = {}
    for name, fn in (
        ("mask", gemma3_mask),
        ("mask+plan", lambda: build_plan(gemma3_mask())),
        ("mask+attended", lambda: gemma3_mask().attended()),
    ):
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        best[name] = min(ts)
    print(f"{'gemma3 build (best of 20, wall)':44s} " + " | ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items()))
    mask = gemma3_mask()
    frac = mask.attended_fraction()
    dense = mask.to_dense()[:, None]
    fns = {
        "zorro": lambda q, k, v: zorro_attention(q, k, v, mask),
        "sdpa-masked": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        **forced_backends(mask),
    }
    nomask = {"sdpa-nomask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    x = inputs(2, 8, mask.num_q, 64)
    steps = sum(len(p.steps) for p in build_plan(mask).patterns)
    for backward in (False, True):
        times = paired(fns, 3, backward, x)
        t, w = paired(nomask, 3, backward, x)["sdpa-nomask"]
        times["ideal"] = (t * frac, w * frac)
        report(
            f"gemma3 B=2 H=8 N=2048 ({frac:.1%} attended, {steps} steps), {'fwd+bwd' if backward else 'fwd'}",
            times,
            "zorro",
        )


SECTIONS = {
    "gemma3": section_gemma3,
    "build": section_build,
    "docs": section_docs,
    "causal": section_causal,
    "ragged": section_ragged,
    "ragged-demo": section_ragged_demo,
    "full": section_full,
}


def main(argv: list[str]) -> None:
    threads = 1
    if "--threads" in argv:
        i = argv.index("--threads")
        threads, argv = int(argv[i + 1]), argv[:i] + argv[i + 2 :]
    torch.set_num_threads(threads)
    for name in argv or list(SECTIONS):
        SECTIONS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
