"""Zorro-HiP: a Hierarchical Perceiver (Carreira et al., 2022) whose groups, latents and masks keep audio and video
pure.

Design (ours; the paper's HiP adaptation is not at hand — docs/hip.md has the pictures):

- Level ``l`` splits each modality's input tokens into ``groups[l]`` contiguous groups (time-major token order, so a
  group is a stretch of the clip). Every group has its own ``latents[l]`` learned latent vectors; fusion has
  ``num_fusion`` learned latents per level.
- **Cross-attention** (one ``zorro_attention`` call): the latents of group ``g`` read only the inputs of group ``g``
  of their own modality (rules ``{"audio/*": "self", "video/*": "self"}``); the fusion latents read every input,
  including the previous level's fusion latents (``"fusion": "*"``).
- **Latent self-attention** (``depths[l]`` blocks, one call each): a group's latents see their own group only
  (HiP's block-diagonal processing); fusion latents see every latent.
- **Hierarchy**: the latents of level ``l`` are the inputs of level ``l + 1``, regrouped into fewer groups (each new
  group concatenates ``groups[l] / groups[l + 1]`` consecutive old groups of the same modality) and read by new,
  wider latents (the cross-attention maps width ``dims[l]`` to ``dims[l + 1]``). Regrouping concatenates latents of
  one modality only, so purity survives it.
- The last level's audio, video and fusion latents go to the shared masked readout (four queries).

Padding: a group with no valid input token for a sample has its latents marked as padding (a zero-length segment for
that sample), which propagates up the hierarchy; padding never changes a valid output.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from zorro_kernels import ZorroMask
from zorro_kernels.caching import tensor_key

from .base import Encoded, StreamLayout, ZorroModel, check_mask_kind, mask_rules
from .layers import MODALITIES, CrossBlock, MaskedReadout, ZorroBlock, init_weights
from .registry import register_model
from .tokenizers import AudioPatchEmbed, VideoPatchEmbed

__all__ = ["ZorroHiP", "GroupLayout", "split_sizes", "hip_level_masks"]


def split_sizes(n: int, groups: int) -> list[int]:
    """``n`` tokens into ``groups`` contiguous groups of near-equal size (the first ``n % groups`` one larger)."""
    return [n // groups + (1 if g < n % groups else 0) for g in range(groups)]


class GroupLayout(NamedTuple):
    """One modality's grouping at one level.

    sizes: tokens per group (static; 0 for an empty group).
    valid: int64 ``(B, groups)`` valid tokens per group per sample, or None (all valid). Valid tokens are a prefix of
        each group, and groups with valid tokens are a prefix of the groups (time-major order).
    """

    sizes: tuple[int, ...]
    valid: Optional[torch.Tensor]

    def latents(self, per_group: int) -> "GroupLayout":
        """The latents this grouping produces: ``per_group`` per non-empty group, valid where the group has any valid
        input."""
        sizes = tuple(per_group if s > 0 else 0 for s in self.sizes)
        valid = None if self.valid is None else (self.valid > 0).to(torch.int64) * per_group
        return GroupLayout(sizes, valid)

    def regroup(self, groups: int) -> "GroupLayout":
        """Merge consecutive groups into ``groups`` groups (the count must divide the current one)."""
        r = len(self.sizes) // groups
        sizes = tuple(sum(self.sizes[g * r : (g + 1) * r]) for g in range(groups))
        valid = None if self.valid is None else self.valid.reshape(self.valid.shape[0], groups, r).sum(-1)
        return GroupLayout(sizes, valid)


def initial_groups(n: int, groups: int, valid_tokens: Optional[torch.Tensor]) -> GroupLayout:
    """Level-0 grouping of ``n`` tokens whose first ``valid_tokens[b]`` are valid."""
    sizes = split_sizes(n, groups)
    valid = None
    if valid_tokens is not None:
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
        valid = torch.minimum((valid_tokens[:, None] - starts).clamp(min=0), torch.tensor(sizes))
    return GroupLayout(tuple(sizes), valid)


def _segments(layouts: dict, n_fusion: int) -> list:
    return [(f"{m}/{g}", s) for m in MODALITIES for g, s in enumerate(layouts[m].sizes)] + [("fusion", n_fusion)]


def _lengths(layouts: dict, n_fusion: int, batch: int) -> Optional[torch.Tensor]:
    if all(layouts[m].valid is None for m in MODALITIES):
        return None
    cols = [
        layouts[m].valid if layouts[m].valid is not None else torch.tensor(layouts[m].sizes).expand(batch, -1)
        for m in MODALITIES
    ]
    return torch.cat(cols + [torch.full((batch, 1), n_fusion)], dim=1)


def hip_level_masks(
    inputs: dict, latents: dict, n_fusion_in: int, n_fusion: int, batch: Optional[int], mask_kind: str = "zorro"
) -> tuple[ZorroMask, ZorroMask]:
    """The cross-attention mask (latents x inputs) and the latent self-attention mask of one level.

    Args:
        inputs, latents: modality -> :class:`GroupLayout` (same number of groups on both sides).
        n_fusion_in: fusion tokens among the inputs (the previous level's fusion latents; 0 at level 0).
        n_fusion: fusion latents of this level.
        batch: B (needed when any layout has per-sample ``valid``).
        mask_kind: one of :data:`~zorro_models.models.base.MASK_KINDS`, with groups as the modality segments: ``zorro``
            group-local; ``bottleneck`` group-local plus the fusion latents (in the cross-attention the previous
            level's fusion latents); ``full`` every latent reads every input and sees every latent.
    """
    rules = mask_rules(mask_kind, [f"{m}/*" for m in MODALITIES])
    q_segments, kv_segments = _segments(latents, n_fusion), _segments(inputs, n_fusion_in)
    q_lengths, kv_lengths = _lengths(latents, n_fusion, batch), _lengths(inputs, n_fusion_in, batch)
    if (q_lengths is None) != (kv_lengths is None):  # a cross mask needs both sides or neither
        q_lengths = q_lengths if q_lengths is not None else _full(q_segments, batch)
        kv_lengths = kv_lengths if kv_lengths is not None else _full(kv_segments, batch)
    cross = ZorroMask.from_segments(
        q_segments, rules, kv_segments=kv_segments, lengths=q_lengths, kv_lengths=kv_lengths
    )
    self_attn = ZorroMask.from_segments(q_segments, rules, lengths=q_lengths)
    return cross, self_attn


def _full(segments, batch: int) -> torch.Tensor:
    return torch.tensor([s for _, s in segments]).expand(batch, -1)


class HiPLevel(nn.Module):
    """One level: per-group latents (audio, video) and fusion latents, a cross-attention block reading the inputs,
    then ``depth`` latent self-attention blocks."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        depth: int,
        num_heads: int,
        audio_groups: int,
        video_groups: int,
        latents: int,
        num_fusion: int,
        mlp_ratio: float,
        qkv_bias: bool,
    ):
        super().__init__()
        self.latents_per_group = latents
        self.audio_latents = nn.Parameter(torch.zeros(audio_groups, latents, dim))
        self.video_latents = nn.Parameter(torch.zeros(video_groups, latents, dim))
        self.fusion_latents = nn.Parameter(torch.zeros(num_fusion, dim))
        for p in (self.audio_latents, self.video_latents, self.fusion_latents):
            nn.init.trunc_normal_(p, std=0.02)
        self.cross = CrossBlock(dim, num_heads, context_dim, mlp_ratio, qkv_bias=qkv_bias)
        self.blocks = nn.ModuleList(ZorroBlock(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth))

    def initial_latents(self, latents: dict, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """``(B, n_latents, dim)``: the learned latents of the non-empty groups, then the fusion latents."""
        parts = []
        for m, param in (("audio", self.audio_latents), ("video", self.video_latents)):
            keep = [g for g, s in enumerate(latents[m].sizes) if s > 0]
            if keep:
                parts.append(param[keep].flatten(0, 1))
        parts.append(self.fusion_latents)
        return torch.cat(parts).to(dtype).expand(batch, -1, -1)


class ZorroHiP(ZorroModel):
    """Zorro-HiP (see the module docstring and docs/hip.md). Inputs and outputs as
    :class:`~zorro_models.models.base.ZorroModel`; ``embed_dim`` is ``dims[-1]``.

    Args:
        img_size, num_frames, video_patch, n_mels, audio_frames, audio_patch: inputs, as in
            :class:`~zorro_models.models.vit.ZorroViT`. Tokens have width ``dims[0]``.
        audio_groups, video_groups: groups per level (non-increasing; each divides the previous one).
        latents: latents per group per level.
        dims: latent width per level.
        depths: latent self-attention blocks per level.
        num_heads: heads per level.
        num_fusion: fusion latents per level (int: the same at every level).
        mlp_ratio, qkv_bias: block sizes.
        mask: one of :data:`~zorro_models.models.base.MASK_KINDS`, applied at every level (see :func:`hip_level_masks`).
    """

    def __init__(
        self,
        *,
        img_size: Union[int, Sequence[int]] = 224,
        num_frames: int = 8,
        video_patch: Union[int, Sequence[int]] = 16,
        n_mels: int = 128,
        audio_frames: int = 640,
        audio_patch: Union[int, Sequence[int]] = 16,
        audio_groups: Sequence[int] = (16, 4, 1),
        video_groups: Sequence[int] = (16, 4, 1),
        latents: Sequence[int] = (32, 64, 128),
        dims: Sequence[int] = (256, 512, 768),
        depths: Sequence[int] = (2, 4, 6),
        num_heads: Sequence[int] = (4, 8, 12),
        num_fusion: Union[int, Sequence[int]] = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        mask: str = "zorro",
    ):
        super().__init__()
        self.mask_kind = check_mask_kind(mask)
        levels = len(dims)
        if isinstance(num_fusion, int) and not isinstance(num_fusion, bool):
            num_fusion = (num_fusion,) * levels
        per_level = dict(
            audio_groups=tuple(audio_groups),
            video_groups=tuple(video_groups),
            latents=tuple(latents),
            dims=tuple(dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            num_fusion=tuple(num_fusion),
        )
        for name, values in per_level.items():
            if len(values) != levels or levels == 0:
                raise ValueError(f"{name} needs one entry per level ({levels} levels from dims), got {values}")
            low = 0 if name in ("depths", "num_fusion") else 1
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ValueError(f"{name} must hold ints >= {low}, got {values}")
        for name in ("audio_groups", "video_groups"):
            g = per_level[name]
            for lv in range(1, levels):
                if g[lv - 1] % g[lv] != 0:
                    raise ValueError(
                        f"{name}: level {lv} has {g[lv]} groups, which must divide the previous "
                        f"level's {g[lv - 1]} (groups merge whole); got {g}"
                    )
        for lv, (d, h) in enumerate(zip(dims, num_heads)):
            if d % h != 0:
                raise ValueError(f"level {lv}: width {d} must be divisible by num_heads {h}")
        self.config = dict(
            img_size=img_size,
            num_frames=num_frames,
            video_patch=video_patch,
            n_mels=n_mels,
            audio_frames=audio_frames,
            audio_patch=audio_patch,
            **per_level,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            mask=mask,
        )
        self.groups = {"audio": per_level["audio_groups"], "video": per_level["video_groups"]}
        self.num_fusion = per_level["num_fusion"]
        self.embed_dim = dims[-1]
        self.audio_embed = AudioPatchEmbed(n_mels, audio_frames, audio_patch, dims[0])
        self.video_embed = VideoPatchEmbed(img_size, num_frames, video_patch, dims[0])
        self.levels = nn.ModuleList(
            HiPLevel(
                dims[lv],
                dims[lv - 1] if lv else dims[0],
                depths[lv],
                num_heads[lv],
                self.groups["audio"][lv],
                self.groups["video"][lv],
                latents[lv],
                self.num_fusion[lv],
                mlp_ratio,
                qkv_bias,
            )
            for lv in range(levels)
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.readout = MaskedReadout(dims[-1], num_heads[-1], mlp_ratio)
        self.apply(init_weights)

    def layouts(self, n_tokens: dict, valid_tokens: dict, batch: int) -> list:
        """Per level ``(inputs, latents, cross mask, self mask)`` for the given token counts (cached)."""
        key = ("hip", tuple(n_tokens.items()), tuple((m, tensor_key(v)) for m, v in valid_tokens.items()))

        def build():
            out, n_fusion_in = [], 0
            inputs = {m: initial_groups(n_tokens[m], self.groups[m][0], valid_tokens.get(m)) for m in MODALITIES}
            for lv, level in enumerate(self.levels):
                if lv > 0:
                    inputs = {m: out[-1][1][m].regroup(self.groups[m][lv]) for m in MODALITIES}
                latents = {m: inputs[m].latents(level.latents_per_group) for m in MODALITIES}
                cross, self_attn = hip_level_masks(
                    inputs, latents, n_fusion_in, self.num_fusion[lv], batch, self.mask_kind
                )
                out.append((inputs, latents, cross, self_attn))
                n_fusion_in = self.num_fusion[lv]
            return out

        return self._masks.get(key, build)

    def encode(self, inputs: StreamLayout) -> Encoded:
        batch = inputs.batch
        n_tokens = dict(zip(MODALITIES, inputs.sizes))
        x = torch.cat(list(inputs.tokens.values()), dim=1)  # level-0 inputs: audio groups, video groups, no fusion
        latents = None
        for level, (_, latents, cross, self_attn) in zip(self.levels, self.layouts(n_tokens, inputs.valid, batch)):
            z = level.initial_latents(latents, batch, inputs.dtype)
            z = level.cross(z, x, cross)
            for block in level.blocks:
                z = block(z, self_attn)
            x = z
        sizes = tuple(sum(latents[m].sizes) for m in MODALITIES) + (self.num_fusion[-1],)
        per_stream = [None if latents[m].valid is None else latents[m].valid.sum(1) for m in MODALITIES]
        lengths = self._stream_lengths(batch, sizes, per_stream + [None])
        return Encoded(self.norm(x), sizes, lengths)


register_model(
    "zorro_hip_demo",
    ZorroHiP,
    "CPU demo size (the inputs of zorro_vit_demo): 2 levels, groups audio 2-1 / video 4-1, 8-16 latents per group, "
    "widths 32-64, depths 1-2, 4 fusion latents; 32x64 spectrogram and 4x32x32 video with 8x8 patches (32 + 64 tokens)",
    img_size=32,
    num_frames=4,
    video_patch=8,
    n_mels=32,
    audio_frames=64,
    audio_patch=8,
    audio_groups=(2, 1),
    video_groups=(4, 1),
    latents=(8, 16),
    dims=(32, 64),
    depths=(1, 2),
    num_heads=(2, 4),
    num_fusion=4,
)
register_model(
    "zorro_hip_tiny",
    ZorroHiP,
    "3 levels: groups audio 4-2-1 / video 8-2-1, 16-32-64 latents per group, widths 96-192-384, "
    "depths 1-2-2; 64x128 spectrogram and 4x64x64 video with 8x8 patches (128 + 256 tokens); trains at lr 5e-5",
    # at 1e-3 its embeddings collapse to a constant within 15 steps of 64 clips, at 1e-4 they head there more slowly;
    # at 5e-5 the loss leaves ln 64 and every probe beats the untrained model's after 200 steps (docs/models.md)
    lr=5e-5,
    img_size=64,
    num_frames=4,
    video_patch=8,
    n_mels=64,
    audio_frames=128,
    audio_patch=8,
    audio_groups=(4, 2, 1),
    video_groups=(8, 2, 1),
    latents=(16, 32, 64),
    dims=(96, 192, 384),
    depths=(1, 2, 2),
    num_heads=(3, 6, 12),
    num_fusion=8,
)
register_model(
    "zorro_hip_base",
    ZorroHiP,
    "3 levels: groups 16-4-1 per modality, 32-64-128 latents per group, widths 256-512-768, depths 2-4-6; "
    "Figure-2 inputs (320 + 1568 tokens)",
    img_size=224,
    num_frames=8,
    video_patch=16,
    n_mels=128,
    audio_frames=640,
    audio_patch=16,
    audio_groups=(16, 4, 1),
    video_groups=(16, 4, 1),
    latents=(32, 64, 128),
    dims=(256, 512, 768),
    depths=(2, 4, 6),
    num_heads=(4, 8, 12),
    num_fusion=8,
)
