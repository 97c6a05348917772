"""What every Zorro backbone shares: input checking, the input layer (patch embedding, ragged lengths, fusion
tokens), the masked readout, ``example_inputs``, and the mask kinds.

timm's way: the shared machinery lives here, only what differs in the variant. :meth:`ZorroModel.forward_features`
checks the inputs, builds a :class:`StreamLayout` (:meth:`ZorroModel.embed`), hands it to the backbone's
:meth:`~ZorroModel.encode` — which maps it to final tokens in stream order ``audio, video, fusion`` plus their sizes
and per-sample valid lengths (:class:`Encoded`) — and reads the four outputs out.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from zorro_kernels.caching import LRU, tensor_key
from zorro_kernels.mask import as_int_tensor

from .layers import MODALITIES, OUTPUTS, STREAMS, MaskedReadout
from .tokenizers import AudioPatchEmbed, VideoPatchEmbed

__all__ = ["ZorroModel", "ZorroFeatures", "StreamLayout", "Encoded", "MASK_KINDS", "mask_rules", "check_mask_kind"]

#: The attention masks a backbone can be built with (``mask=`` / ``model.mask``), the one list every family, the
#: config and the CLI read. Each family applies the kind to every attention call it makes (ViT's one mask, each Swin
#: block's windows, each HiP level's cross- and self-attention): see :func:`mask_rules`.
MASK_KINDS = {
    "zorro": "each modality (its windows, groups) sees itself only; fusion sees every token (the paper's model)",
    "full": "every token sees every token of the same attention call (the paper's full-attention ablation; "
    "no output is pure)",
    "bottleneck": "MBT-style: each modality (its windows, groups) sees itself and the fusion tokens, which see "
    "everything (the fusion tokens are the bottleneck; no output is pure)",
}


def check_mask_kind(mask, supported=tuple(MASK_KINDS)) -> str:
    """``mask`` if it is one of ``supported`` (a subset of :data:`MASK_KINDS`), else a ValueError naming both."""
    if mask not in supported:
        raise ValueError(f"mask must be one of {list(supported)}, got {mask!r}")
    return mask


def mask_rules(kind: str, local: Sequence[str]) -> dict:
    """:meth:`ZorroMask.from_segments` rules of mask ``kind`` over modality segments ``local`` (names or globs that
    match present segments: ``("audio", "video")`` in ViT, ``("audio/*", "video/*")`` for windows or groups) and a
    ``fusion`` segment.

    Modality segments see the key segment of their own name (``"self"``: in self-attention themselves, in a HiP
    cross-attention their own input group); under ``bottleneck`` also the ``fusion`` key segment.
    """
    check_mask_kind(kind)
    if kind == "full":
        return {"*": "*"}
    seen = "self" if kind == "zorro" else ["self", "fusion"]
    rules = {pattern: seen for pattern in local}
    rules["fusion"] = "*"
    return rules


class StreamLayout(NamedTuple):
    """The embedded inputs of one forward: what every backbone's :meth:`~ZorroModel.encode` starts from.

    tokens: modality -> ``(B, N_m, D)`` patch tokens (position embeddings added, frames past a sample's length
        zeroed) of each modality given, in the order audio, video; an absent modality has no entry.
    grids: modality -> its token grid, time first: audio ``(T, F)``, video ``(T, H, W)`` (``N_m`` = the product;
        tokens are in raster order of the grid).
    valid: modality -> int64 CPU ``(B,)`` valid tokens per sample (a time-major prefix of the grid), for each
        modality given with lengths; no entry = every token valid.
    fusion: ``(B, F, D)`` the learned fusion tokens over the batch, in ``dtype`` (``F = 0`` for a backbone whose
        fusion tokens do not enter with the input, e.g. HiP's per-level fusion latents).
    dtype: the inputs' dtype, which learned tokens and latents take (under autocast the patch tokens may differ).
    """

    tokens: dict
    grids: dict
    valid: dict
    fusion: torch.Tensor
    dtype: torch.dtype

    @property
    def batch(self) -> int:
        return self.fusion.shape[0]

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(n_audio, n_video, n_fusion)`` tokens (0 for an absent modality)."""
        return (*(self.tokens[m].shape[1] if m in self.tokens else 0 for m in MODALITIES), self.fusion.shape[1])

    @property
    def lengths(self) -> Optional[torch.Tensor]:
        """int64 ``(B, 3)`` valid tokens per stream (audio, video, fusion), or None when every token is valid."""
        return ZorroModel._stream_lengths(self.batch, self.sizes, [self.valid.get(m) for m in MODALITIES] + [None])

    def valid_rows(self, modality: str) -> Optional[torch.Tensor]:
        """int64 ``(B,)`` valid time rows of ``modality``'s grid per sample, or None (all valid)."""
        if modality not in self.valid:
            return None
        return self.valid[modality] // math.prod(self.grids[modality][1:])

    def concat(self) -> torch.Tensor:
        """``(B, N, D)``: audio, video and fusion tokens in stream order (an absent modality is empty)."""
        return torch.cat([self.tokens[m] for m in MODALITIES if m in self.tokens] + [self.fusion], dim=1)


class Encoded(NamedTuple):
    """A backbone's final tokens, before the readout.

    tokens: ``(B, N, C)`` in stream order audio, video, fusion.
    sizes: ``(n_audio, n_video, n_fusion)``, summing to N (0 for an absent modality).
    lengths: int64 ``(B, 3)`` valid tokens per stream per sample, or None when every token is valid.
    """

    tokens: torch.Tensor
    sizes: tuple[int, int, int]
    lengths: Optional[torch.Tensor]


class ZorroFeatures(NamedTuple):
    """Everything :meth:`ZorroModel.forward_features` computes.

    embeddings: output name -> ``(B, D)`` (the dict ``forward`` returns).
    present: output name -> bool ``(B,)``: False where that output saw no valid token (its embedding is then 0).
    tokens, sizes, lengths: the backbone's final tokens, as in :class:`Encoded`.
    """

    embeddings: dict
    present: dict
    tokens: torch.Tensor
    sizes: tuple[int, int, int]
    lengths: Optional[torch.Tensor]


def _check_lengths(lengths, batch: int, max_len: int, name: str) -> torch.Tensor:
    lengths = as_int_tensor(lengths, name, "(B,)")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    lengths = lengths.detach().to("cpu", torch.int64)
    bad = (lengths < 0) | (lengths > max_len)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {int(lengths[i])} is outside 0..{max_len} (the input's frame count)")
    return lengths


class ZorroModel(nn.Module):
    """Base class of the Zorro backbones (see :mod:`zorro_models.models.vit`, ``swin``, ``hip``).

    Subclasses set ``self.audio_embed`` (:class:`AudioPatchEmbed`), ``self.video_embed`` (:class:`VideoPatchEmbed`),
    ``self.readout`` (:class:`MaskedReadout`), ``self.embed_dim``, ``self.config``, ``self.mask_kind`` (one of
    :data:`MASK_KINDS`) and, if fusion tokens enter with the input, ``self.fusion_tokens`` ``(F, D)``; and implement
    :meth:`encode`.

    Inputs (keywords; either modality may be omitted or None, not both):
        audio: log-mel spectrogram ``(B, n_mels, frames)``, ``frames <= audio_frames``.
        video: frames ``(B, T, 3, H, W)``, ``T <= num_frames``, ``(H, W) == img_size``.
        audio_lengths: int ``(B,)`` valid spectrogram frames per sample (0 = this sample has no audio), or None.
        video_lengths: int ``(B,)`` valid video frames per sample (0 = no video), or None.

    A missing modality is a zero-length segment of the same masks (no separate code path). Frames past a sample's
    length are ignored: they are zeroed before patching and their tokens are masked out of every attention.
    """

    embed_dim: int
    config: dict
    mask_kind: str
    audio_embed: AudioPatchEmbed
    video_embed: VideoPatchEmbed
    readout: MaskedReadout
    fusion_tokens: nn.Parameter  # optional: a backbone without input fusion tokens does not set it

    def __init__(self):
        super().__init__()
        self._masks = LRU(64)

    # ------------------------------------------------------------------ to implement
    def encode(self, inputs: StreamLayout) -> Encoded:
        """The embedded inputs (:class:`StreamLayout`) -> final tokens; see :class:`Encoded`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the input layer
    def embed(
        self,
        audio: Optional[torch.Tensor],
        video: Optional[torch.Tensor],
        audio_lengths: Optional[torch.Tensor],
        video_lengths: Optional[torch.Tensor],
        batch: int,
    ) -> StreamLayout:
        """Checked inputs (frame lengths as int64 CPU ``(B,)`` or None) -> :class:`StreamLayout`: each modality
        patch-embedded, its valid frames turned into valid tokens, the fusion tokens expanded over the batch."""
        tokens, grids, valid = {}, {}, {}
        for m, x, frames, embed in (
            ("audio", audio, audio_lengths, self.audio_embed),
            ("video", video, video_lengths, self.video_embed),
        ):
            if x is None:
                continue
            tokens[m], grids[m] = embed(x, frames)
            if frames is not None:
                valid[m] = embed.token_lengths(frames)
        dtype = (audio if audio is not None else video).dtype
        fusion_tokens = getattr(self, "fusion_tokens", None)
        if fusion_tokens is None:
            first = next(iter(tokens.values()))
            fusion = first.new_zeros(batch, 0, first.shape[-1], dtype=dtype)
        else:
            fusion = fusion_tokens.to(dtype).expand(batch, -1, -1)
        return StreamLayout(tokens, grids, valid, fusion, dtype)

    # ------------------------------------------------------------------ public
    def forward(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        *,
        audio_lengths=None,
        video_lengths=None,
    ) -> dict:
        """Returns a dict ``"audio"``, ``"video"``, ``"fusion"``, ``"global"`` -> ``(B, embed_dim)`` embeddings.

        "audio" depends on the audio input only and "video" on the video only (bitwise, under the ``zorro`` mask);
        "fusion" and "global" see both. An output with nothing to attend for a sample (e.g. "video" in an
        audio-only call) is exactly 0 for that sample.
        """
        return self.forward_features(audio, video, audio_lengths=audio_lengths, video_lengths=video_lengths).embeddings

    def forward_features(
        self,
        audio: Optional[torch.Tensor] = None,
        video: Optional[torch.Tensor] = None,
        *,
        audio_lengths=None,
        video_lengths=None,
    ) -> ZorroFeatures:
        """Like :meth:`forward`, also returning presence flags and the final tokens (:class:`ZorroFeatures`)."""
        batch, audio_lengths, video_lengths = self._check_inputs(audio, video, audio_lengths, video_lengths)
        enc = self.encode(self.embed(audio, video, audio_lengths, video_lengths, batch))
        mask = self._masks.get(
            ("readout", enc.sizes, tensor_key(enc.lengths)), lambda: MaskedReadout.mask_for(enc.sizes, enc.lengths)
        )
        emb, present = self.readout(enc.tokens, enc.sizes, enc.lengths, mask=mask)
        return ZorroFeatures(
            {o: emb[:, i] for i, o in enumerate(OUTPUTS)},
            {o: present[:, i] for i, o in enumerate(OUTPUTS)},
            enc.tokens,
            enc.sizes,
            enc.lengths,
        )

    def example_inputs(
        self,
        batch_size: int = 2,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """Random inputs of the configured maximal sizes: ``{"audio": (B, n_mels, audio_frames),
        "video": (B, num_frames, 3, H, W)}`` (standard-normal values, as after input normalisation)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        a, v = self.audio_embed, self.video_embed
        audio = torch.randn(batch_size, a.n_mels, a.max_frames, generator=generator, dtype=dtype)
        video = torch.randn(batch_size, v.num_frames, v.in_chans, *v.img_size, generator=generator, dtype=dtype)
        return {"audio": audio.to(device), "video": video.to(device)}

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (elements)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ helpers for subclasses
    def _check_inputs(self, audio, video, audio_lengths, video_lengths):
        if audio is None and video is None:
            raise ValueError("pass audio=, video= or both; got neither")
        if audio is not None:
            self.audio_embed.check(audio)
        if video is not None:
            self.video_embed.check(video)
        if audio is not None and video is not None and audio.shape[0] != video.shape[0]:
            raise ValueError(f"audio and video disagree on the batch size: {audio.shape[0]} vs {video.shape[0]}")
        batch = (audio if audio is not None else video).shape[0]
        for name, x, lengths in (("audio", audio, audio_lengths), ("video", video, video_lengths)):
            if lengths is not None and x is None:
                raise ValueError(f"{name}_lengths was given but {name} is None")
        if audio_lengths is not None:
            audio_lengths = _check_lengths(audio_lengths, batch, audio.shape[2], "audio_lengths")
        if video_lengths is not None:
            video_lengths = _check_lengths(video_lengths, batch, video.shape[1], "video_lengths")
        return batch, audio_lengths, video_lengths

    @staticmethod
    def _stream_lengths(batch: int, sizes, per_stream) -> Optional[torch.Tensor]:
        """``(B, len(sizes))`` valid tokens per stream from per-stream ``(B,)`` tensors (None = full), or None if all
        are full."""
        if all(p is None for p in per_stream):
            return None
        cols = [
            torch.full((batch,), s, dtype=torch.int64) if p is None else p.to(torch.int64)
            for s, p in zip(sizes, per_stream)
        ]
        return torch.stack(cols, 1)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, streams={STREAMS}"
