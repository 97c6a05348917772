"""Preset report: parameter counts for every registered model, and CPU forward / forward+backward times.

    python -m zorro_models.report                       # counts for all presets, timings for *_demo / *_tiny
    python -m zorro_models.report --time all --threads 2 --batch 2 --repeats 5

Counts are taken on the meta device (no memory, no init). Times are the median over ``--repeats`` runs after one
warm-up, batch ``--batch``, on CPU with ``torch.set_num_threads(--threads)``; the backward is of the sum of the four
outputs. They are measurements for this machine, not guarantees.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import create_model, list_models

__all__ = ["count_row", "time_preset", "main"]


def count_row(name: str) -> dict:
    """Parameter count and token counts of preset ``name`` (built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name)
    a, v = model.audio_embed, model.video_embed
    return {"name": name, "params": model.num_params(), "audio_tokens": a.max_tokens, "video_tokens": v.max_tokens,
            "embed_dim": model.embed_dim}


def time_preset(name: str, batch: int = 2, repeats: int = 5) -> dict:
    """Median forward and forward+backward wall time (seconds) of preset ``name`` on CPU."""
    torch.manual_seed(0)
    model = create_model(name)
    x = model.example_inputs(batch_size=batch, generator=torch.Generator().manual_seed(0))

    def fwd():
        with torch.no_grad():
            model(**x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        out = model(**x)
        sum(o.sum() for o in out.values()).backward()

    res = {}
    for key, fn in (("fwd_s", fwd), ("fwd_bwd_s", fwd_bwd)):
        fn()  # warm-up: masks and plans are built and cached here
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[key] = statistics.median(times)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", default="small", choices=["small", "all", "none"],
                   help="which presets to time: *_demo and *_tiny (small), all, or none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, batch {args.batch}\n")
    print("| preset | parameters | audio tokens | video tokens | width | fwd (s) | fwd+bwd (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in list_models():
        row = count_row(name)
        timed = args.time == "all" or (args.time == "small" and name.endswith(("_demo", "_tiny")))
        t = time_preset(name, args.batch, args.repeats) if timed else None
        ts = f"{t['fwd_s']:.3f} | {t['fwd_bwd_s']:.3f}" if t else "- | -"
        print(f"| `{name}` | {row['params']:,} | {row['audio_tokens']} | {row['video_tokens']} | "
              f"{row['embed_dim']} | {ts} |", flush=True)


if __name__ == "__main__":
    main()
