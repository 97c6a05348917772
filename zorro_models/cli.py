"""The ``zorro`` command.

    zorro demo  [--out DIR] [--model NAME] [--config YAML] [section.key=value ...]  # Zorro vs full attention
    zorro train [--config YAML] [section.key=value ...]                # contrastive or supervised training
    zorro eval  RUN_OR_CHECKPOINT [--probes] [--out DIR]               # heads and/or linear probes, 3 regimes
    zorro ablate [--out DIR] [--seeds N] [--grid axis=v1,v2 ...]       # mask x sharing x objective, table + chart
    zorro bench [--config YAML] [--masks zorro,full] [--steps N]       # training-step throughput per mask
    zorro show-mask [--model NAME] [--mask zorro|full|bottleneck]     # a model's attention layout, drawn

Errors are one line on stderr (``zorro: error: ...``) and exit status 1; ``--debug`` (or ``ZORRO_DEBUG=1``) shows the
traceback instead. Also ``python -m zorro_models.cli ...``. Multi-process training goes through torchrun with the training module:
``torchrun --nproc_per_node=N -m zorro_models.train ...`` (see docs/training.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .base import MASK_KINDS
from .config import add_config_args, add_run_folder_args, run_folder_overrides
from .distributed import RankFailure

__all__ = ["main", "build_parser", "error_line"]


def _add_debug(p: argparse.ArgumentParser, default) -> None:
    # on the top-level parser (zorro --debug CMD) and on each command (zorro CMD ... --debug); SUPPRESS keeps a
    # command's parser from resetting what the top level set
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the full traceback of an error (also: ZORRO_DEBUG=1)")


def _add_threads(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--threads", type=int, default=None, help=f"torch compute threads (default: {default_help})")


def _masks(text: str) -> list:
    masks = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in masks if m not in MASK_KINDS]
    if not masks or bad:
        raise argparse.ArgumentTypeError(f"masks must be a comma-separated subset of {', '.join(MASK_KINDS)}; "
                                         f"got {text!r}")
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
    parser = argparse.ArgumentParser(prog="zorro", description="Train, evaluate and inspect Zorro models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="contrastive pre-training of Zorro and of full attention on the embedded data, "
                                    "linear probes, a comparison table (CPU, minutes)")
    p.add_argument("--out", default="zorro_demo", help="output folder (default: %(default)s)")
    p.add_argument("--masks", type=_masks, default="zorro,full", help="comma-separated masks to compare "
                   f"({', '.join(MASK_KINDS)}; default: %(default)s)")
    p.add_argument("--model", help="the preset whose masks are compared (default: the config's model.name, "
                                   "zorro_vit_demo); same as model.name=NAME")
    _add_threads(p, "half the cores, at least 1")
    p.add_argument("--no-baseline", action="store_true", help="skip the probes of the untrained model")
    p.add_argument("--overwrite", action="store_true", help="replace the demo runs already in --out")
    add_config_args(p)

    p = sub.add_parser("train", help="train a model (one process; use torchrun -m zorro_models.train for DDP)")
    _add_threads(p, "train.threads, else half the cores, at least 1")
    add_config_args(p)
    add_run_folder_args(p)

    p = sub.add_parser("eval", help="evaluate a run or checkpoint: supervised heads and/or linear probes under "
                                    "audio-visual, audio-only and video-only inputs")
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--probes", action="store_true", help="also fit linear probes (always done for contrastive runs)")
    p.add_argument("--out", help="where to write eval.json and eval.png (default: the run folder)")
    _add_threads(p, "half the cores, at least 1")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="changes to the stored config, e.g. probe.train_size=512 data.val_csv=...")

    p = sub.add_parser("ablate", help="the paper's ablation grid (mask x parameter sharing x objective), every cell "
                                      "trained and scored under audio-only, video-only and audio-visual inputs; "
                                      "resumable (default: 24 runs, about 10 min on a quiet 2-core CPU; docs/ablate.md)")
    p.add_argument("--out", default="zorro_ablate", help="output folder; rerun to resume (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="runs per cell, seeds train.seed + 0..N-1 (default: 2)")
    p.add_argument("--grid", nargs="+", default=[], metavar="AXIS=V1,V2",
                   help="restrict axes: mask=zorro,bottleneck,full sharing=shared,separate "
                        "objective=contrastive,supervised (an axis not named keeps all its values)")
    _add_threads(p, "half the cores, at least 1")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain runs in --out whose configuration differs from this one (default: stop and say so)")
    add_config_args(p)

    p = sub.add_parser("bench", help="training-step and inference throughput of a config, per mask")
    p.add_argument("--masks", type=_masks, default="zorro,full", help="comma-separated masks (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=10, help="timed steps per mask (after 2 warm-up steps)")
    _add_threads(p, "PyTorch's")
    add_config_args(p)

    p = sub.add_parser("show-mask", help="draw every attention layout of a model: ViT's, Swin's windows and shifted "
                                         "windows per stage, HiP's groups per level, the readout")
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
    from .demo import run_demo

    overrides = [f"model.name={args.model}"] * bool(args.model) + list(args.overrides)
    results = run_demo(args.out, masks=args.masks, config=args.config, overrides=overrides,
                       threads=args.threads, baseline=not args.no_baseline, overwrite=args.overwrite)
    return 0 if results.get("verdict") is None or not results["verdict"].startswith("WARNING") else 1


def cmd_ablate(args) -> int:
    from .ablate import run_ablate

    # --grid's nargs="+" also swallows the section.key=value overrides after it; an axis name never has a dot
    grid = [g for g in args.grid if "." not in g.partition("=")[0]]
    overrides = [g for g in args.grid if g not in grid] + list(args.overrides)
    run_ablate(args.out, grid=grid, seeds=args.seeds, config=args.config, overrides=overrides, threads=args.threads,
               overwrite=args.overwrite)
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import run_training, summary_line

    threads = [f"train.threads={args.threads}"] if args.threads else []
    summary = run_training(load_config(args.config, list(args.overrides) + threads + run_folder_overrides(args)))
    print(summary_line(summary))
    return 0


def cmd_eval(args) -> int:
    from .build import load_run
    from .config import machine_threads
    from .evaluate import OUTPUT_ORDER, evaluate_run
    from .reporting import format_table

    torch.set_num_threads(args.threads or machine_threads())
    cfg, task, ckpt = load_run(args.checkpoint, args.overrides)
    print(f"[zorro eval] {ckpt}", flush=True)
    out = Path(args.out) if args.out else ckpt.parent.parent
    report = evaluate_run(cfg, task, probes=args.probes, out=out, label=ckpt.parent.parent.name or "model",
                          info={"checkpoint": str(ckpt)}, progress=lambda line: print(f"[zorro eval] {line}",
                                                                                     flush=True))
    for key, title in (("heads", "supervised heads"), ("probes", "linear probes")):
        if key in report:
            res, metric = report[key]["results"], report[key]["metric"]
            columns = sorted({c for row in res.values() for c in row}, key=OUTPUT_ORDER.index)
            print(f"\n{title} ({metric}), rows: input regime, columns: output")
            print(format_table(res, columns, row_header="input"))
    print(f"\nwrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench_training
    from .reporting import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    res = bench_training(args.config, args.overrides, args.masks, args.steps)
    print(f"{res['model']}, batch {res['batch_size']}, {res['threads']} thread(s), device {res['device']}; median "
          f"of {res['steps']} training steps (data, front-end, forward, backward, AdamW)")
    rows = res["rows"]
    print(format_table(rows, list(next(iter(rows.values()))), row_header="mask", fmt="{:.3f}"))
    return 0


def cmd_show_mask(args) -> int:
    from .registry import create_model, model_keywords

    if args.audio_only and args.video_only:
        raise ValueError("show-mask: choose at most one of --audio-only and --video-only")
    # Swin's relative position bias lives within a window and full attention crosses them (the masks are the same)
    no_bias = {"rel_pos_bias": False} if args.mask == "full" and model_keywords(args.model).get("rel_pos_bias") else {}
    torch.manual_seed(0)
    model = create_model(args.model, mask=args.mask, **no_bias).eval()
    inputs = model.example_inputs(batch_size=1)
    if args.audio_only:
        inputs.pop("video")
    if args.video_only:
        inputs.pop("audio")
    layouts = attention_layouts(model, inputs)
    print(f"{args.model}, mask={args.mask}: {len(layouts)} attention layout(s) on "
          f"{' + '.join(inputs)} input ({', '.join(f'{k} {tuple(v.shape[1:])}' for k, v in inputs.items())})")
    for label, mask in layouts:
        print(f"\n{label}: {_segment_summary(mask)}; {mask.sparsity():.1%} never computed")
        print(mask.draw())
    if args.png:
        _save_masks_png(layouts, args.png, f"{args.model} (mask={args.mask})")
        print(f"\nwrote {args.png}")
    return 0


def attention_layouts(model: torch.nn.Module, inputs: dict) -> list:
    """Every distinct mask the attention blocks of ``model`` use on ``inputs``, in order of first use, with the
    blocks that use it: ``[(label, ZorroMask)]`` — one for a ViT, windows and shifted windows per Swin stage, cross-
    and self-attention per HiP level, and the readout.

    A dry run: each block returns its input unchanged, so only the embeddings and the layouts are computed.
    """
    from zorro_kernels import ZorroMask

    from .layers import CrossBlock, ZorroBlock

    uses = {}  # id(mask) -> (mask, [block names]); models cache their masks, so blocks sharing a layout share one

    def dry(name):
        def forward(first, *args, **kwargs):
            mask = next(a for a in (*args, *kwargs.values()) if isinstance(a, ZorroMask))
            uses.setdefault(id(mask), (mask, []))[1].append(name)
            return first
        return forward

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (ZorroBlock, CrossBlock))]
    for name, block in blocks:
        block.forward = dry(name)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for _, block in blocks:
            del block.forward
    return [(_layout_label(names), mask) for mask, names in uses.values()]


def _layout_label(names: list) -> str:
    """Block names -> what they are: ``stages.0.blocks.1`` (Swin: odd blocks are the shifted ones), ``levels.2.cross``
    (HiP), ``blocks.3`` (ViT), ``readout.block``; other names are listed as they are."""
    import re

    if names == ["readout.block"]:
        return "readout (4 learned queries -> final tokens)"
    m = [re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)", n) for n in names]
    if all(m) and len({x[1] for x in m}) == 1:
        idx = [int(x[2]) for x in m]
        kind = "shifted windows" if idx[0] % 2 else "windows"
        return f"stage {m[0][1]}, block(s) {', '.join(map(str, idx))} ({kind})"
    m = [re.fullmatch(r"levels\.(\d+)\.(cross|blocks\.\d+)", n) for n in names]
    if all(m) and len({x[1] for x in m}) == 1:
        kind = ("cross-attention, latents -> inputs" if m[0][2] == "cross" else
                f"self-attention of the latents, {len(names)} block(s)")
        return f"level {m[0][1]} ({kind}, per group)"
    if all(re.fullmatch(r"blocks\.\d+", n) for n in names):
        return f"self-attention of every block ({len(names)})"
    return ", ".join(names)


def _segment_summary(mask) -> str:
    """``audio 16 x 32 tokens, video 8 x 64, fusion 8``: the segments grouped by modality (``audio/3`` is part of
    audio), with their count and sizes; queries -> keys when they differ."""
    def side(names, sizes):
        groups = {}
        for n, k in zip(names, sizes):
            groups.setdefault(n.split("/")[0], []).append(k)
        parts = []
        for g, ks in groups.items():
            size = f"{min(ks)}-{max(ks)}" if min(ks) != max(ks) else f"{ks[0]}"
            parts.append(f"{g} {size}" if len(ks) == 1 else f"{g} {len(ks)} x {size}")
        return ", ".join(parts)

    q = side(mask.q_names, mask.q_sizes)
    return q if mask.is_self else f"{q} -> {side(mask.kv_names, mask.kv_sizes)}"


def _save_masks_png(layouts: list, path: str, title: str) -> None:
    """One panel per layout: the dense mask (black = attended), or its tile map where the dense one is too large
    to draw; modality boundaries in red."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cols = min(3, len(layouts))
    rows = math.ceil(len(layouts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(layouts):]:
        ax.axis("off")
    for ax, (label, mask) in zip(axes.flat, layouts):
        scale = 1
        while mask.num_q * mask.num_kv / scale ** 2 > 2048 ** 2:
            scale *= 2
        if scale == 1:
            image = mask.to_dense()[0 if mask.batch_size else ...].float().numpy()
            note = "black = attended"
        else:
            kinds = mask.tile_map(scale, scale).kinds[0].float().numpy()
            image = kinds / 2.0
            note = f"tiles of {scale}x{scale}: black full, grey partial"
        ax.imshow(image, cmap="Greys", interpolation="nearest", vmin=0, vmax=1, aspect="auto")
        for axis, names, sizes, line in ((0, mask.q_names, mask.q_sizes, ax.axhline),
                                         (1, mask.kv_names, mask.kv_sizes, ax.axvline)):
            edges, ticks, labels, pos, prev = [], [], [], 0, None
            for n, k in zip(names, sizes):
                group = n.split("/")[0]
                if group != prev:
                    edges.append(pos)
                    ticks.append(pos)
                    labels.append(group)
                    prev = group
                pos += k
            for e in edges[1:]:
                line(e / scale - 0.5, color="tab:red", linewidth=0.8)
            centers = [(a + b) / 2 / scale for a, b in zip(ticks, ticks[1:] + [pos])]
            (ax.set_yticks if axis == 0 else ax.set_xticks)(centers)
            (ax.set_yticklabels if axis == 0 else ax.set_xticklabels)(labels)
        ax.set_xlabel("keys")
        ax.set_ylabel("queries")
        ax.set_title(f"{label}\n{note}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMMANDS = {"demo": cmd_demo, "ablate": cmd_ablate, "train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "show-mask": cmd_show_mask}


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


def run_reporting_errors(fn, debug: bool = False, prog: str = "zorro") -> int:
    """``fn()``'s exit status; an exception prints one line, ``{prog}: error: ...``, and returns 1 (an interrupt: 130),
    unless ``debug`` or ``ZORRO_DEBUG=1``, which let it propagate with its traceback."""
    debug = debug or os.environ.get("ZORRO_DEBUG", "") not in ("", "0")
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error reaches the user as one line; --debug keeps the traceback
        if debug:
            raise
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 1


def error_line(e: BaseException) -> str:
    """``e`` as one line: our errors (ValueError, TypeError, a missing file; another rank's error, which holds its
    line) speak for themselves; anything else is unexpected, so its type is named and the way to the traceback
    given."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (ValueError, TypeError, KeyError, OSError, RankFailure)):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
