"""The attention layouts the benchmark suite measures, at the sizes of each tier.

A :class:`Layout` is a :class:`~zorro_kernels.ZorroMask` plus the shapes it is benchmarked at (batch, heads, head dim).
Seven families, each one builder below:

- ``figure2``  — the paper's Zorro-ViT (Figure 2): 320 audio + 1568 video + fusion tokens, Zorro rules.
- ``ragged``   — the same batch with the audio missing (length 0) for every other sample: per-sample lengths.
- ``swin``     — Swin-style windows: video in windows of 49 tokens (7 x 7 patches), audio in windows of 64, each
  window sees only itself; fusion rows see everything. *Ours*: the paper's Swin adaptation is not at hand.
- ``hip``      — HiP-style cross-attention: per input group a block of latents reads only its group's inputs;
  fusion latents read every input. *Ours*, like the Swin layout.
- ``packed``   — sequence packing: independent sequences of unequal length in one row (block-diagonal).
- ``packed-causal`` — the same, causal inside each sequence (packed language-model training).
- ``docs``     — many short documents of random lengths packed into one row of 16k tokens (equal lengths batched).
- ``scaling``  — N = 1k .. 16k tokens at 25 % audio, 70 % video, 5 % fusion.

Build a layout directly (``figure2()``, ``scaling(4096)``) or take the whole tier with :func:`suite`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zorro_kernels import ZorroMask

__all__ = ["Layout", "figure2", "ragged", "swin", "hip", "packed", "docs", "scaling", "suite", "TIERS"]

TIERS = ("full", "smoke")


@dataclass(frozen=True)
class Layout:
    """One benchmark case: the mask and the shapes of ``q (B, H, Nq, D)`` and ``k, v (B, H, Nk, D)``.

    Attributes:
        name: short id used in test ids, benchmark groups and the report (``figure2``, ``scaling-4096``, ...).
        family: the layout family (one of the builders of this module).
        title: one line saying what the layout is, for the report.
        mask: the layout; ``mask.num_q == Nq``, ``mask.num_kv == Nk``.
        batch, heads, head_dim: B, H, D.
        backward: whether the fwd+bwd direction is benchmarked for this layout at this tier (the largest sweep
            points are forward only on CPU, see :func:`suite`).
    """

    name: str
    family: str
    title: str
    mask: ZorroMask
    batch: int
    heads: int
    head_dim: int
    backward: bool = True

    @property
    def num_q(self) -> int:
        return self.mask.num_q

    @property
    def num_kv(self) -> int:
        return self.mask.num_kv

    def attended_pairs(self) -> int:
        """Attended (query, key) pairs summed over the batch (padding excluded), for one head."""
        per_sample = self.mask.attended()
        return int(per_sample.sum()) if per_sample.numel() == self.batch else int(per_sample.sum()) * self.batch

    def flops(self, direction: str) -> float:
        """FLOPs over attended entries only: fwd ``4 * H * D * attended``, bwd 2.5x fwd (flash-attention's
        convention), so ``fwd+bwd`` is 3.5x fwd."""
        fwd = 4.0 * self.heads * self.head_dim * self.attended_pairs()
        return fwd if direction == "fwd" else 3.5 * fwd

    def shape_str(self) -> str:
        kv = "" if self.num_kv == self.num_q else f"x{self.num_kv}"
        return f"B={self.batch} H={self.heads} N={self.num_q}{kv} D={self.head_dim}"


# ------------------------------------------------------------------------------------------------------ families
def figure2(
    audio: int = 320,
    video: int = 1568,
    fusion: int = 8,
    *,
    batch: int = 2,
    heads: int = 12,
    head_dim: int = 64,
    name: str = "figure2",
) -> Layout:
    """The paper's Figure-2 Zorro-ViT layout. The fusion count is *ours* (not given in the paper)."""
    mask = ZorroMask.zorro(audio=audio, video=video, fusion=fusion)
    return Layout(
        name,
        "figure2",
        f"Zorro-ViT, Figure 2: {audio} audio + {video} video + {fusion} fusion tokens",
        mask,
        batch,
        heads,
        head_dim,
    )


def ragged(
    audio: int = 320,
    video: int = 1568,
    fusion: int = 8,
    *,
    batch: int = 2,
    heads: int = 12,
    head_dim: int = 64,
    name: str = "ragged",
) -> Layout:
    """Figure 2 with the audio missing (length 0) for the odd samples of the batch: per-sample ``lengths``."""
    if batch < 2:
        raise ValueError(f"ragged needs batch >= 2 so that some samples keep their audio, got batch={batch}")
    lengths = torch.tensor([[audio if b % 2 == 0 else 0, video, fusion] for b in range(batch)])
    mask = ZorroMask.zorro(audio=audio, video=video, fusion=fusion, lengths=lengths)
    return Layout(
        name, "ragged", f"Figure 2 with audio missing in {batch // 2} of {batch} samples", mask, batch, heads, head_dim
    )


def swin(
    audio_windows: int = 5,
    audio_window: int = 64,
    video_windows: int = 32,
    video_window: int = 49,
    fusion: int = 8,
    *,
    batch: int = 2,
    heads: int = 12,
    head_dim: int = 64,
    name: str = "swin",
) -> Layout:
    """Swin-style windowed attention with fusion rows.

    Each audio/video window attends only to itself (modality-pure, local); the fusion tokens attend to every token.
    The default sizes are Figure 2's token counts cut into windows: audio 40 x 8 patches in 8 x 8 windows, video
    8 frames x 14 x 14 patches in 7 x 7 windows. Shifted windows are the same structure with another token order.
    """
    segments = (
        [(f"a{i}", audio_window) for i in range(audio_windows)]
        + [(f"v{i}", video_window) for i in range(video_windows)]
        + [("fusion", fusion)]
    )
    n = len(segments)
    allow = torch.eye(n, dtype=torch.bool)
    allow[-1] = True
    mask = ZorroMask.from_allow(segments, allow)
    return Layout(
        name,
        "swin",
        f"Swin-style: {audio_windows}x{audio_window} audio + {video_windows}x{video_window} "
        f"video windows + {fusion} fusion rows seeing all",
        mask,
        batch,
        heads,
        head_dim,
    )


def hip(
    audio_groups: Sequence[int] = (160, 160),
    video_groups: Sequence[int] = (196,) * 8,
    fusion_inputs: int = 8,
    latents: int = 32,
    fusion_latents: int = 32,
    *,
    batch: int = 2,
    heads: int = 12,
    head_dim: int = 64,
    name: str = "hip",
) -> Layout:
    """HiP-style latent cross-attention (queries are latents, keys/values the inputs).

    Inputs are split into groups (default: the Figure-2 audio in 2 groups, the video in its 8 frames of 196
    patches, plus the fusion inputs). Each group has ``latents`` queries that read only that group; the
    ``fusion_latents`` read every input group, fusion inputs included.
    """
    kv = (
        [(f"a{i}", s) for i, s in enumerate(audio_groups)]
        + [(f"v{i}", s) for i, s in enumerate(video_groups)]
        + [("fusion", fusion_inputs)]
    )
    groups = len(kv) - 1
    q = [(f"lat_{name_}", latents) for name_, _ in kv[:-1]] + [("lat_fusion", fusion_latents)]
    allow = torch.zeros(len(q), len(kv), dtype=torch.bool)
    allow[torch.arange(groups), torch.arange(groups)] = True
    allow[-1] = True
    mask = ZorroMask.from_allow(q, allow, kv_segments=kv)
    return Layout(
        name,
        "hip",
        f"HiP-style cross-attention: {groups} groups x {latents} latents + {fusion_latents} "
        f"fusion latents over {sum(s for _, s in kv)} inputs",
        mask,
        batch,
        heads,
        head_dim,
    )


def packed(
    seq_lens: Sequence[int] = (300, 700, 450, 900, 256, 600, 390, 500),
    *,
    batch: int = 1,
    heads: int = 12,
    head_dim: int = 64,
    causal: bool = False,
    name: Optional[str] = None,
) -> Layout:
    """Sequence packing: ``len(seq_lens)`` independent sequences in one row, each attending only to itself (causally
    with ``causal=True``, family ``packed-causal``)."""
    mask = ZorroMask.packed(list(seq_lens), causal=causal)
    family = "packed-causal" if causal else "packed"
    return Layout(
        name or family,
        family,
        f"{'causal ' if causal else ''}packing: {len(seq_lens)} sequences of "
        f"{min(seq_lens)}..{max(seq_lens)} tokens in one row of {sum(seq_lens)}",
        mask,
        batch,
        heads,
        head_dim,
    )


def docs(
    n_docs: int = 1000,
    total: int = 16384,
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    backward: bool = True,
    seed: int = 0,
) -> Layout:
    """``n_docs`` documents of random lengths (random cut points) summing to ``total`` tokens, packed in one row."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=g)[: n_docs - 1].add(1).sort().values
    lens = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])).tolist()
    return Layout(
        f"docs-{n_docs}",
        "docs",
        f"{n_docs} documents of {min(lens)}..{max(lens)} tokens packed in one row of {total}",
        ZorroMask.packed(lens),
        batch,
        heads,
        head_dim,
        backward,
    )


def scaling(
    n: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64, backward: bool = True, name: Optional[str] = None
) -> Layout:
    """A Zorro layout of ``n`` tokens: 25 % audio, 70 % video, the rest (about 5 %) fusion."""
    audio, video = n // 4, (7 * n) // 10
    fusion = n - audio - video
    mask = ZorroMask.zorro(audio=audio, video=video, fusion=fusion)
    return Layout(
        name or f"scaling-{n}",
        "scaling",
        f"N={n}: {audio} audio + {video} video + {fusion} fusion",
        mask,
        batch,
        heads,
        head_dim,
        backward,
    )


# ------------------------------------------------------------------------------------------------------ tiers
def suite(tier: str = "full", device: str = "cpu") -> list[Layout]:
    """Every layout of a tier, in report order.

    ``full`` on CPU is sized so the whole suite stays within about 15 minutes on a 2-core machine: the fixed layouts
    at B=2, H=12 (the Figure-2 token counts), packing and the sweep at B=1, H=4, with fwd+bwd up to N=8192 (one
    dense fwd+bwd at 16k takes ~7 s there). On CUDA the batch grows so kernels, not launches, dominate. ``smoke`` runs
    every layout family at toy sizes in about a minute, so CI keeps the suite from rotting.
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    cuda = device == "cuda"
    if tier == "smoke":
        kw = dict(batch=2, heads=2, head_dim=32)
        return [
            figure2(32, 196, 4, **kw),
            ragged(32, 196, 4, **kw),
            swin(2, 16, 4, 49, 4, **kw),
            hip((16, 16), (49, 49), 4, 8, 8, **kw),
            packed((60, 100, 96), batch=1, heads=2, head_dim=32),
            packed((60, 100, 96), batch=1, heads=2, head_dim=32, causal=True),
            docs(40, 512, heads=2, head_dim=32),
            scaling(512, heads=2, head_dim=32),
        ]
    kw = dict(batch=16 if cuda else 2, heads=12, head_dim=64)
    out = [
        figure2(**kw),
        ragged(**kw),
        swin(**kw),
        hip(**kw),
        packed(batch=8 if cuda else 1, heads=16 if cuda else 4),
        packed(batch=8 if cuda else 1, heads=16 if cuda else 4, causal=True),
        # forward only on CPU: masked SDPA's fwd+bwd at 16k alone takes most of a minute (benchmarks/cpu_costs.py
        # measures both directions against hand-batched SDPA)
        docs(1000, batch=4 if cuda else 1, heads=16 if cuda else 4, backward=cuda),
    ]
    for n in (1024, 2048, 4096, 8192, 16384):
        out.append(scaling(n, batch=4 if cuda else 1, heads=16 if cuda else 4, backward=cuda or n <= 8192))
    return out
