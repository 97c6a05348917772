"""Model benchmarks: a run's training-step and inference throughput per attention mask (``zorro bench``), and the
preset table of docs/models.md (parameter counts, CPU forward and forward+backward times).

    zorro bench [--config YAML] [--masks zorro,full] [--steps N] [section.key=value ...]
    python -m zorro_models.commands.bench         # preset table: counts for all, timings for *_demo / *_tiny
    python -m zorro_models.commands.bench --time all --threads 2 --batch 2 --repeats 5

Times are measurements on the machine at hand, not guarantees: compare masks measured side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..models.registry import create_model, list_models
from ..training.config import load_config
from ..training.trainer import Trainer

__all__ = ["bench_training", "count_row", "time_preset", "main"]


def bench_training(
    config: Optional[str],
    overrides: Sequence[str] = (),
    masks: Sequence[str] = ("zorro", "full"),
    steps: int = 10,
    warmup: int = 2,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Time ``steps`` training steps (after ``warmup``) and 3 inference batches of the run ``config`` +
    ``overrides``, once per mask of ``masks`` (the masks run one after the other in this process).

    A training step is what :meth:`~zorro_models.training.trainer.Trainer.train_step` does: data, front-end, forward,
    backward, AdamW. Returns ``{"model", "batch_size", "threads", "device", "steps", "rows": {mask: {column: value}}}``
    with columns ``train step (s)`` (median), ``clips/s (train)``, ``inference (s/batch)``, ``clips/s (inference)``.
    ``progress``, if given, gets a line as each mask's run is built and after every step (its own time).
    """

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    rows, cfg, trainer = {}, None, None
    say = progress or (lambda line: None)
    for mask in masks:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                config,
                list(overrides)
                + [
                    f"model.mask={mask}",
                    f"train.out={Path(tmp) / 'run'}",
                    "train.progress=false",
                    "train.plot=false",
                    "train.log_every=0",
                ],
            )
            say(f"[bench {mask}] building {cfg.model.name}")
            trainer = Trainer(cfg)
            trainer.label = f"bench {mask}"
            data = trainer.batches()
            for i in range(warmup):
                t0 = time.perf_counter()
                trainer.train_step(data)
                say(f"[bench {mask}] warm-up step {i + 1}/{warmup}: {time.perf_counter() - t0:.2f} s")
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                trainer.train_step(data)
                times.append(time.perf_counter() - t0)
                say(f"[bench {mask}] timed step {i + 1}/{steps}: {times[-1]:.2f} s")
            batch = next(data)
            inputs = trainer.preprocess(batch)
            trainer.model.eval()
            with torch.no_grad():
                trainer.model(**inputs)
                t0 = time.perf_counter()
                for _ in range(3):
                    trainer.model(**inputs)
                infer = (time.perf_counter() - t0) / 3
            step = statistics.median(times)
            rows[mask] = {
                "train step (s)": step,
                "clips/s (train)": cfg.train.batch_size / step,
                "inference (s/batch)": infer,
                "clips/s (inference)": batch["size"] / infer,
            }
    return {
        "model": cfg.model.name,
        "batch_size": cfg.train.batch_size,
        "threads": torch.get_num_threads(),
        "device": str(trainer.device),
        "steps": steps,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------ preset table
def count_row(name: str) -> dict:
    """Parameter count and token counts of preset ``name`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = create_model(name)
    a, v = model.audio_embed, model.video_embed
    return {
        "name": name,
        "params": model.num_params(),
        "audio_tokens": a.max_tokens,
        "video_tokens": v.max_tokens,
        "embed_dim": model.embed_dim,
    }


def time_preset(name: str, batch: int = 2, repeats: int = 5) -> dict:
    """Median forward and forward+backward wall time (seconds) of preset ``name`` on CPU, after one warm-up (which
    builds and caches the masks and plans); the backward is of the sum of the four outputs."""
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
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[key] = statistics.median(times)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m zorro_models.commands.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--time",
        default="small",
        choices=["small", "all", "none"],
        help="which presets to time: *_demo and *_tiny (small), all, or none",
    )
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
        print(
            f"| `{name}` | {row['params']:,} | {row['audio_tokens']} | {row['video_tokens']} | "
            f"{row['embed_dim']} | {ts} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
