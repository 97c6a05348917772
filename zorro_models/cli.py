"""The ``zorro`` command.

    zorro demo  [--out DIR] [--model NAME] [--config YAML] [section.key=value ...]  # Zorro vs full attention
    zorro train [--config YAML] [section.key=value ...]                # contrastive or supervised training
    zorro eval  RUN_OR_CHECKPOINT [--probes] [--out DIR]               # heads and/or linear probes, 3 regimes
    zorro ablate [--out DIR] [--seeds N] [--grid axis=v1,v2 ...]       # mask x sharing x objective, table + chart
    zorro bench [--config YAML] [--masks zorro,full] [--steps N]       # training-step throughput per mask
    zorro show-mask [--model NAME] [--mask zorro|full|bottleneck]     # a model's attention layout, drawn

Errors are one line on stderr (``zorro: error: ...``) and exit status 1; ``--debug`` (or ``ZORRO_DEBUG=1``) shows the
traceback instead. Also ``python -m zorro_models.cli ...``. Multi-process training goes through torchrun with the
training module: ``torchrun --nproc_per_node=N -m zorro_models.train ...`` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .models.base import MASK_KINDS
from .training.config import add_config_args, add_run_folder_args, run_folder_overrides
from .utils.errors import error_line, run_reporting_errors

__all__ = ["main", "build_parser", "error_line"]


def _add_debug(p: argparse.ArgumentParser, default) -> None:
    # on the top-level parser (zorro --debug CMD) and on each command (zorro CMD ... --debug); SUPPRESS keeps a
    # command's parser from resetting what the top level set
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of an error (also: ZORRO_DEBUG=1)",
    )


def _add_threads(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--threads", type=int, default=None, help=f"torch compute threads (default: {default_help})")


def _masks(text: str) -> list:
    masks = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in masks if m not in MASK_KINDS]
    if not masks or bad:
        raise argparse.ArgumentTypeError(
            f"masks must be a comma-separated subset of {', '.join(MASK_KINDS)}; got {text!r}"
        )
    return masks


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zorro",
        description="Train, evaluate and inspect Zorro models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo",
        help="contrastive pre-training of Zorro and of full attention on the embedded data, "
        "linear probes, a comparison table (CPU, minutes)",
    )
    p.add_argument("--out", default="zorro_demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--masks",
        type=_masks,
        default="zorro,full",
        help=f"comma-separated masks to compare ({', '.join(MASK_KINDS)}; default: %(default)s)",
    )
    p.add_argument(
        "--model",
        help="the preset whose masks are compared (default: the config's model.name, "
        "zorro_vit_demo); same as model.name=NAME",
    )
    _add_threads(p, "half the cores, at least 1")
    p.add_argument("--no-baseline", action="store_true", help="skip the probes of the untrained model")
    p.add_argument("--overwrite", action="store_true", help="replace the demo runs already in --out")
    add_config_args(p)

    p = sub.add_parser("train", help="train a model (one process; use torchrun -m zorro_models.train for DDP)")
    _add_threads(p, "train.threads, else half the cores, at least 1")
    add_config_args(p)
    add_run_folder_args(p)

    p = sub.add_parser(
        "eval",
        help="evaluate a run or checkpoint: supervised heads and/or linear probes under "
        "audio-visual, audio-only and video-only inputs",
    )
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--probes", action="store_true", help="also fit linear probes (always done for contrastive runs)")
    p.add_argument("--out", help="where to write eval.json and eval.png (default: the run folder)")
    _add_threads(p, "half the cores, at least 1")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="changes to the stored config, e.g. probe.train_size=512 data.val_csv=...",
    )

    p = sub.add_parser(
        "ablate",
        help="the paper's ablation grid (mask x parameter sharing x objective), every cell "
        "trained and scored under audio-only, video-only and audio-visual inputs; "
        "resumable (default: 24 runs, about 10 min on a quiet 2-core CPU; docs/ablate.md)",
    )
    p.add_argument("--out", default="zorro_ablate", help="output folder; rerun to resume (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="runs per cell, seeds train.seed + 0..N-1 (default: 2)")
    p.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="AXIS=V1,V2",
        help="restrict axes: mask=zorro,bottleneck,full sharing=shared,separate "
        "objective=contrastive,supervised (an axis not named keeps all its values)",
    )
    _add_threads(p, "half the cores, at least 1")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain runs in --out whose configuration differs from this one (default: stop and say so)",
    )
    add_config_args(p)

    p = sub.add_parser("bench", help="training-step and inference throughput of a config, per mask")
    p.add_argument("--masks", type=_masks, default="zorro,full", help="comma-separated masks (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=10, help="timed steps per mask (after 2 warm-up steps)")
    _add_threads(p, "PyTorch's")
    add_config_args(p)

    p = sub.add_parser(
        "show-mask",
        help="draw every attention layout of a model: ViT's, Swin's windows and shifted "
        "windows per stage, HiP's groups per level, the readout",
    )
    p.add_argument("--model", default="zorro_vit_demo", help="a preset (see zorro_models.list_models())")
    p.add_argument("--mask", default="zorro", choices=list(MASK_KINDS))
    p.add_argument("--audio-only", action="store_true", help="the layout of an audio-only call")
    p.add_argument("--video-only", action="store_true", help="the layout of a video-only call")
    p.add_argument("--png", help="also save the dense mask as an image")
    for p in sub.choices.values():
        _add_debug(p, argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ commands
def cmd_demo(args) -> int:
    from .commands.demo import run_demo

    overrides = [f"model.name={args.model}"] * bool(args.model) + list(args.overrides)
    results = run_demo(
        args.out,
        masks=args.masks,
        config=args.config,
        overrides=overrides,
        threads=args.threads,
        baseline=not args.no_baseline,
        overwrite=args.overwrite,
    )
    return 0 if results.get("verdict") is None or not results["verdict"].startswith("WARNING") else 1


def cmd_ablate(args) -> int:
    from .commands.ablate import run_ablate

    # --grid's nargs="+" also swallows the section.key=value overrides after it; an axis name never has a dot
    grid = [g for g in args.grid if "." not in g.partition("=")[0]]
    overrides = [g for g in args.grid if g not in grid] + list(args.overrides)
    run_ablate(
        args.out,
        grid=grid,
        seeds=args.seeds,
        config=args.config,
        overrides=overrides,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    return 0


def cmd_train(args) -> int:
    from .training.config import load_config
    from .training.trainer import run_training, summary_line

    threads = [f"train.threads={args.threads}"] if args.threads else []
    summary = run_training(load_config(args.config, list(args.overrides) + threads + run_folder_overrides(args)))
    print(summary_line(summary))
    return 0


def cmd_eval(args) -> int:
    from .training.build import load_run
    from .training.config import machine_threads
    from .training.evaluate import OUTPUT_ORDER, evaluate_run
    from .utils.reporting import format_table

    torch.set_num_threads(args.threads or machine_threads())
    cfg, task, ckpt = load_run(
        args.checkpoint, args.overrides, say=lambda line: print(f"[zorro eval] {line}", file=sys.stderr, flush=True)
    )
    print(f"[zorro eval] {ckpt}", flush=True)
    out = Path(args.out) if args.out else ckpt.parent.parent
    report = evaluate_run(
        cfg,
        task,
        probes=args.probes,
        out=out,
        label=ckpt.parent.parent.name or "model",
        info={"checkpoint": str(ckpt)},
        progress=lambda line: print(f"[zorro eval] {line}", flush=True),
    )
    for key, title in (("heads", "supervised heads"), ("probes", "linear probes")):
        if key in report:
            res, metric = report[key]["results"], report[key]["metric"]
            columns = sorted({c for row in res.values() for c in row}, key=OUTPUT_ORDER.index)
            print(f"\n{title} ({metric}), rows: input regime, columns: output")
            print(format_table(res, columns, row_header="input"))
    print(f"\nwrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 0


def cmd_bench(args) -> int:
    from .commands.bench import bench_training
    from .utils.reporting import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    res = bench_training(
        args.config,
        args.overrides,
        args.masks,
        args.steps,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(
        f"{res['model']}, batch {res['batch_size']}, {res['threads']} thread(s), device {res['device']}; median "
        f"of {res['steps']} training steps (data, front-end, forward, backward, AdamW)"
    )
    rows = res["rows"]
    print(format_table(rows, list(next(iter(rows.values()))), row_header="mask", fmt="{:.3f}"))
    return 0


def cmd_show_mask(args) -> int:
    from .commands.show_mask import show_mask

    return show_mask(args.model, args.mask, audio_only=args.audio_only, video_only=args.video_only, png=args.png)


COMMANDS = {
    "demo": cmd_demo,
    "ablate": cmd_ablate,
    "train": cmd_train,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "show-mask": cmd_show_mask,
}


def main(argv: Optional[list] = None) -> int:
    """Run a command; returns the exit status. An error prints one line, ``zorro: error: ...``, and returns 1 (argparse
    errors exit with 2); with ``--debug`` or ``ZORRO_DEBUG=1`` it propagates with its traceback instead."""
    parser = build_parser()
    # settings may follow flags too (`zorro eval RUN --probes data.val_csv=v.csv`): argparse hands the ones after a
    # flag back as unrecognised, and they join the command's overrides in the order given
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    return run_reporting_errors(lambda: COMMANDS[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
