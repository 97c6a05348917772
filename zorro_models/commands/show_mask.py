"""``zorro show-mask``: every attention layout a model uses, drawn in the terminal (and as a PNG).

ViT has one layout; Swin has its windows and shifted windows per stage, HiP its cross- and self-attention groups per
level; every model has its readout. A dry run finds them: the blocks return their inputs, so nothing is attended.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch

from zorro_kernels import ZorroMask

from ..models.layers import CrossBlock, ZorroBlock
from ..models.registry import create_model, model_keywords

__all__ = ["show_mask", "attention_layouts"]


def show_mask(
    model_name: str, mask: str = "zorro", audio_only: bool = False, video_only: bool = False, png: Optional[str] = None
) -> int:
    """Print every attention layout of the preset ``model_name`` built with ``mask`` (and save them as one PNG)."""
    if audio_only and video_only:
        raise ValueError("show-mask: choose at most one of --audio-only and --video-only")
    # Swin's relative position bias lives within a window and full attention crosses them (the masks are the same)
    no_bias = {"rel_pos_bias": False} if mask == "full" and model_keywords(model_name).get("rel_pos_bias") else {}
    torch.manual_seed(0)
    model = create_model(model_name, mask=mask, **no_bias).eval()
    inputs = model.example_inputs(batch_size=1)
    if audio_only:
        inputs.pop("video")
    if video_only:
        inputs.pop("audio")
    layouts = attention_layouts(model, inputs)
    print(
        f"{model_name}, mask={mask}: {len(layouts)} attention layout(s) on "
        f"{' + '.join(inputs)} input ({', '.join(f'{k} {tuple(v.shape[1:])}' for k, v in inputs.items())})"
    )
    for label, layout in layouts:
        print(f"\n{label}: {_segment_summary(layout)}; {layout.sparsity():.1%} never computed")
        print(layout.draw())
    if png:
        _save_masks_png(layouts, png, f"{model_name} (mask={mask})")
        print(f"\nwrote {png}")
    return 0


def attention_layouts(model: torch.nn.Module, inputs: dict) -> list:
    """Every distinct mask the attention blocks of ``model`` use on ``inputs``, in order of first use, with the
    blocks that use it: ``[(label, ZorroMask)]`` — one for a ViT, windows and shifted windows per Swin stage, cross-
    and self-attention per HiP level, and the readout.

    A dry run: each block returns its input unchanged, so only the embeddings and the layouts are computed.
    """
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
    if names == ["readout.block"]:
        return "readout (4 learned queries -> final tokens)"
    m = [re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)", n) for n in names]
    if all(m) and len({x[1] for x in m}) == 1:
        idx = [int(x[2]) for x in m]
        kind = "shifted windows" if idx[0] % 2 else "windows"
        return f"stage {m[0][1]}, block(s) {', '.join(map(str, idx))} ({kind})"
    m = [re.fullmatch(r"levels\.(\d+)\.(cross|blocks\.\d+)", n) for n in names]
    if all(m) and len({x[1] for x in m}) == 1:
        kind = (
            "cross-attention, latents -> inputs"
            if m[0][2] == "cross"
            else f"self-attention of the latents, {len(names)} block(s)"
        )
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib only when a PNG is asked for

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cols = min(3, len(layouts))
    rows = math.ceil(len(layouts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(layouts) :]:
        ax.axis("off")
    for ax, (label, mask) in zip(axes.flat, layouts):
        scale = 1
        while mask.num_q * mask.num_kv / scale**2 > 2048**2:
            scale *= 2
        if scale == 1:
            image = mask.to_dense()[0 if mask.batch_size else ...].float().numpy()
            note = "black = attended"
        else:
            kinds = mask.tile_map(scale, scale).kinds[0].float().numpy()
            image = kinds / 2.0
            note = f"tiles of {scale}x{scale}: black full, grey partial"
        ax.imshow(image, cmap="Greys", interpolation="nearest", vmin=0, vmax=1, aspect="auto")
        for axis, names, sizes, line in (
            (0, mask.q_names, mask.q_sizes, ax.axhline),
            (1, mask.kv_names, mask.kv_sizes, ax.axvline),
        ):
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
