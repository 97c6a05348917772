"""Zorro-ViT (Figure 2 of the paper): one transformer over ``[audio tokens | video tokens | fusion tokens]``.

::

    spectrogram (B, n_mels, frames) --patches--> audio tokens  (B, Na, D) + pos ┐
    frames (B, T, 3, H, W)          --patches--> video tokens  (B, Nv, D) + pos ├─ concat ─> L x ZorroBlock ─> norm
    learned fusion tokens                         fusion tokens (B, F, D)        ┘
        ─> MaskedReadout (4 queries) ─> {"audio", "video", "fusion", "global"}: (B, D)

Every block's self-attention uses one :class:`~zorro_kernels.ZorroMask` built once per forward (per layout and
lengths) and shared by all blocks. ``mask`` (one of :data:`~zorro_models.models.base.MASK_KINDS`, as in every family)
selects the paper's ablations:

- ``"zorro"``: audio sees audio, video sees video, fusion sees everything (the paper's model);
- ``"full"``: every token sees every token (vanilla ViT over the concatenation; no stream is pure);
- ``"bottleneck"``: MBT-style — each modality sees itself and the fusion tokens, which see everything.

``shared_weights=False`` gives each stream (audio, video, fusion) its own norms, attention projections and MLPs
("modality-specific" parameters); ``True`` shares them (the paper's "modality-level parameter sharing").
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from zorro_kernels import ZorroMask
from zorro_kernels.caching import tensor_key

from .base import Encoded, StreamLayout, ZorroModel, check_mask_kind, mask_rules
from .layers import STREAMS, MaskedReadout, StreamWise, ZorroBlock, init_weights
from .registry import register_model
from .tokenizers import AudioPatchEmbed, VideoPatchEmbed

__all__ = ["ZorroViT"]


class ZorroViT(ZorroModel):
    """Zorro-ViT. Inputs and outputs as :class:`~zorro_models.models.base.ZorroModel`.

    Args:
        img_size: video frame size ``(H, W)`` or int.
        num_frames: most video frames per clip.
        video_patch: int ``p`` (2-D ``p x p`` patches per frame, Figure 2) or ``(t, h, w)`` tubelets.
        n_mels: mel bins of the input spectrogram.
        audio_frames: most spectrogram frames per clip.
        audio_patch: int or ``(f, t)`` spectrogram patch.
        embed_dim: token width D (also the output embedding width).
        depth: number of Zorro blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        num_fusion: learned fusion tokens (bottleneck tokens under ``mask="bottleneck"``).
        mask: ``"zorro"``, ``"full"`` or ``"bottleneck"`` (see the module docstring).
        shared_weights: one set of block weights for all streams (True) or one per stream (False).
        qkv_bias: biases in the q/k/v projections.
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
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_fusion: int = 8,
        mask: str = "zorro",
        shared_weights: bool = True,
        qkv_bias: bool = True,
    ):
        super().__init__()
        check_mask_kind(mask)
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_fusion, bool) or not isinstance(num_fusion, int) or num_fusion < 0:
            raise ValueError(f"num_fusion must be an int >= 0, got {num_fusion!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.config = dict(
            img_size=img_size,
            num_frames=num_frames,
            video_patch=video_patch,
            n_mels=n_mels,
            audio_frames=audio_frames,
            audio_patch=audio_patch,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_fusion=num_fusion,
            mask=mask,
            shared_weights=shared_weights,
            qkv_bias=qkv_bias,
        )
        self.embed_dim = embed_dim
        self.mask_kind = mask
        self.num_fusion = num_fusion
        self.audio_embed = AudioPatchEmbed(n_mels, audio_frames, audio_patch, embed_dim)
        self.video_embed = VideoPatchEmbed(img_size, num_frames, video_patch, embed_dim)
        self.fusion_tokens = nn.Parameter(torch.zeros(num_fusion, embed_dim))
        self.blocks = nn.ModuleList(
            ZorroBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, streams=STREAMS, shared=shared_weights)
            for _ in range(depth)
        )
        self.norm = StreamWise(lambda: nn.LayerNorm(embed_dim), STREAMS, shared_weights)
        self.readout = MaskedReadout(embed_dim, num_heads, mlp_ratio)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.fusion_tokens, std=0.02)

    def layout_mask(self, sizes: tuple[int, int, int], lengths: Optional[torch.Tensor] = None) -> ZorroMask:
        """The self-attention mask of every block for stream sizes ``(n_audio, n_video, n_fusion)`` and optional
        ``lengths (B, 3)``."""
        segments = list(zip(STREAMS, sizes))
        return ZorroMask.from_segments(segments, mask_rules(self.mask_kind, STREAMS[:2]), lengths=lengths)

    def encode(self, inputs: StreamLayout) -> Encoded:
        x, sizes, lengths = inputs.concat(), inputs.sizes, inputs.lengths
        mask = self._masks.get(("self", sizes, tensor_key(lengths)), lambda: self.layout_mask(sizes, lengths))
        for block in self.blocks:
            x = block(x, mask, sizes)
        return Encoded(self.norm(x, sizes), sizes, lengths)


_FIG2 = dict(img_size=224, num_frames=8, video_patch=16, n_mels=128, audio_frames=640, audio_patch=16)
_SMALL_INPUTS = dict(img_size=64, num_frames=4, video_patch=16, n_mels=64, audio_frames=128, audio_patch=16)

register_model(
    "zorro_vit_demo",
    ZorroViT,
    "CPU demo size: width 64, 4 blocks; 4 frames of 32x32 (64 video tokens), 32x64 spectrogram (32 audio tokens)",
    img_size=32,
    num_frames=4,
    video_patch=8,
    n_mels=32,
    audio_frames=64,
    audio_patch=8,
    embed_dim=64,
    depth=4,
    num_heads=4,
    num_fusion=4,
)
register_model(
    "zorro_vit_tiny",
    ZorroViT,
    "ViT-Ti widths (192, 12 blocks, 3 heads) on small inputs: 4x64x64 video, 64x128 spectrogram",
    **_SMALL_INPUTS,
    embed_dim=192,
    depth=12,
    num_heads=3,
    num_fusion=8,
)
register_model(
    "zorro_vit_small",
    ZorroViT,
    "ViT-S widths (384, 12 blocks, 6 heads), Figure-2 inputs",
    **_FIG2,
    embed_dim=384,
    depth=12,
    num_heads=6,
    num_fusion=8,
)
register_model(
    "zorro_vit_base",
    ZorroViT,
    "Figure 2: 320 audio tokens (128x640 spectrogram), 1568 video tokens (8x224x224), width 768, 12 blocks, 12 heads",
    **_FIG2,
    embed_dim=768,
    depth=12,
    num_heads=12,
    num_fusion=8,
)
