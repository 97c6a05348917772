"""Tokenizers: spectrogram patches, video patches (per-frame 2-D or tubelets), with learned position embeddings.

Both are "patchify, then one linear map" — identical to a convolution whose stride equals its kernel, written with
einops so the token order is explicit. Token order is **time-major** for both modalities (audio ``(t, f)``, video
``(t, h, w)``): a clip shorter than the configured maximum, or the valid prefix of a padded clip, is then a prefix of
the token sequence, which is exactly what :class:`~zorro_kernels.ZorroMask` lengths describe.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = ["AudioPatchEmbed", "VideoPatchEmbed", "to_pair", "to_triple"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_batch_and_dtype(x: torch.Tensor, name: str, weight: torch.Tensor) -> None:
    """At least one sample, and the weights' dtype (outside autocast, which casts for each op): a mismatch would
    otherwise fail deep inside the first matmul, without naming the input."""
    if x.shape[0] == 0:
        raise ValueError(f"{name} has batch size 0 (shape {tuple(x.shape)}); the model needs at least one sample")
    if x.dtype != weight.dtype and weight.device.type != "meta" and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} is {x.dtype} but the model's weights are {weight.dtype}: pass {name}.to("
            f"{weight.dtype}), convert the model with model.to({x.dtype}), or run under torch.autocast"
        )


def to_pair(value: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    """``int -> (v, v)``; a 2-sequence is checked and returned as a tuple of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(_positive_int(v, name) for v in value)  # type: ignore[return-value]


def to_triple(value: Union[int, Sequence[int]], name: str, *, int_means: str = "spatial") -> tuple[int, int, int]:
    """Video sizes ``(t, h, w)``. An int means ``(1, v, v)`` (per-frame 2-D patches, Figure 2) when
    ``int_means="spatial"``, or ``(v, v, v)`` when ``int_means="cube"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (1, value, value) if int_means == "spatial" else (value, value, value)
    value = tuple(value)
    if len(value) == 2:
        value = (1,) + value
    if len(value) != 3:
        raise ValueError(f"{name} must be an int, (h, w) or (t, h, w), got {value!r}")
    return tuple(_positive_int(v, name) for v in value)  # type: ignore[return-value]


class AudioPatchEmbed(nn.Module):
    """Log-mel spectrogram ``(B, n_mels, frames)`` -> patch tokens ``(B, Tp * Fp, dim)`` in time-major order.

    Args:
        n_mels: mel bins of the input (must be divisible by the patch's frequency size).
        max_frames: the longest spectrogram accepted; sets the size of the learned position embedding. Shorter
            inputs use its first ``ceil(frames / patch_t)`` time rows.
        patch: ``(patch_f, patch_t)`` or an int for square patches (Figure 2: 16).
        dim: token width.

    ``frames`` that is not a multiple of ``patch_t`` is zero-padded at the end. Frames at or after a sample's
    ``frame_lengths`` entry are zeroed before patching, so padding contents never reach the model.
    """

    def __init__(self, n_mels: int, max_frames: int, patch: Union[int, Sequence[int]], dim: int):
        super().__init__()
        self.n_mels = _positive_int(n_mels, "n_mels")
        self.max_frames = _positive_int(max_frames, "audio_frames")
        self.patch = to_pair(patch, "audio_patch")
        pf, pt = self.patch
        if n_mels % pf != 0:
            raise ValueError(f"n_mels={n_mels} must be divisible by the audio patch's frequency size {pf}")
        self.grid_f = n_mels // pf
        self.max_grid_t = -(-max_frames // pt)
        self.proj = nn.Linear(pf * pt, dim)
        self.pos_embed = nn.Parameter(torch.zeros(self.max_grid_t, self.grid_f, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def max_tokens(self) -> int:
        return self.max_grid_t * self.grid_f

    def grid(self, frames: int) -> tuple[int, int]:
        """Token grid ``(Tp, Fp)`` for a spectrogram of ``frames`` frames."""
        return -(-frames // self.patch[1]), self.grid_f

    def token_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames ``(B,)`` -> valid tokens ``(B,)``: every patch holding a valid frame is valid."""
        return torch.div(frame_lengths + self.patch[1] - 1, self.patch[1], rounding_mode="floor") * self.grid_f

    def check(self, audio, name: str = "audio") -> None:
        if not isinstance(audio, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, n_mels, frames), got {type(audio).__name__}")
        if not audio.is_floating_point():
            raise TypeError(f"{name} must be a float log-mel spectrogram, got dtype {audio.dtype}")
        if audio.ndim != 3:
            raise ValueError(f"{name} must be (B, n_mels={self.n_mels}, frames), got shape {tuple(audio.shape)}")
        if audio.shape[1] != self.n_mels:
            raise ValueError(
                f"{name} has {audio.shape[1]} mel bins but the model expects n_mels={self.n_mels} "
                f"(shape {tuple(audio.shape)})"
            )
        if not 1 <= audio.shape[2] <= self.max_frames:
            raise ValueError(
                f"{name} has {audio.shape[2]} frames; the model takes 1..{self.max_frames} "
                f"(audio_frames={self.max_frames})"
            )
        _check_batch_and_dtype(audio, name, self.proj.weight)

    def forward(
        self, audio: torch.Tensor, frame_lengths: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Returns ``(tokens (B, Tp * Fp, dim), (Tp, Fp))``."""
        if frame_lengths is not None:
            keep = torch.arange(audio.shape[2], device=audio.device)[None] < frame_lengths.to(audio.device)[:, None]
            audio = torch.where(keep[:, None, :], audio, 0.0)  # where, not *: NaN/inf padding must vanish too
        pf, pt = self.patch
        tp, fp = self.grid(audio.shape[2])
        audio = F.pad(audio, (0, tp * pt - audio.shape[2]))
        patches = rearrange(audio, "b (f pf) (t pt) -> b t f (pf pt)", pf=pf, pt=pt)
        x = self.proj(patches) + self.pos_embed[:tp].to(audio.dtype)
        return rearrange(x, "b t f c -> b (t f) c"), (tp, fp)


class VideoPatchEmbed(nn.Module):
    """Video frames ``(B, T, C, H, W)`` -> patch tokens ``(B, Tp * Hp * Wp, dim)`` in time-major order.

    Args:
        img_size: ``(H, W)`` or an int; inputs must match it exactly.
        num_frames: the most frames accepted; sets the learned position embedding's time extent.
        patch: ``(t, h, w)``; an int ``p`` means ``(1, p, p)`` — a 2-D patch per frame as in Figure 2; ``t > 1`` makes
            tubelets.
        dim: token width.
        in_chans: channels per frame (3).

    ``T`` that is not a multiple of the tubelet's time size is zero-padded at the end; frames at or after a sample's
    ``frame_lengths`` entry are zeroed before patching.
    """

    def __init__(
        self,
        img_size: Union[int, Sequence[int]],
        num_frames: int,
        patch: Union[int, Sequence[int]],
        dim: int,
        in_chans: int = 3,
    ):
        super().__init__()
        self.img_size = to_pair(img_size, "img_size")
        self.num_frames = _positive_int(num_frames, "num_frames")
        self.patch = to_triple(patch, "video_patch")
        self.in_chans = _positive_int(in_chans, "in_chans")
        pt, ph, pw = self.patch
        for size, p, axis in ((self.img_size[0], ph, "height"), (self.img_size[1], pw, "width")):
            if size % p != 0:
                raise ValueError(f"img_size {axis} {size} must be divisible by the video patch's {axis} {p}")
        self.grid_hw = (self.img_size[0] // ph, self.img_size[1] // pw)
        self.max_grid_t = -(-num_frames // pt)
        self.proj = nn.Linear(pt * ph * pw * in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(self.max_grid_t, *self.grid_hw, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def max_tokens(self) -> int:
        return self.max_grid_t * self.grid_hw[0] * self.grid_hw[1]

    def grid(self, frames: int) -> tuple[int, int, int]:
        """Token grid ``(Tp, Hp, Wp)`` for a clip of ``frames`` frames."""
        return -(-frames // self.patch[0]), *self.grid_hw

    def token_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames ``(B,)`` -> valid tokens ``(B,)``."""
        pt = self.patch[0]
        return torch.div(frame_lengths + pt - 1, pt, rounding_mode="floor") * (self.grid_hw[0] * self.grid_hw[1])

    def check(self, video, name: str = "video") -> None:
        want = f"(B, T, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]})"
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {want}, got {type(video).__name__}")
        if not video.is_floating_point():
            raise TypeError(f"{name} must hold float frames, got dtype {video.dtype}")
        if video.ndim != 5 or tuple(video.shape[2:]) != (self.in_chans, *self.img_size):
            raise ValueError(f"{name} must be {want}, got shape {tuple(video.shape)}")
        if not 1 <= video.shape[1] <= self.num_frames:
            raise ValueError(
                f"{name} has {video.shape[1]} frames; the model takes 1..{self.num_frames} "
                f"(num_frames={self.num_frames})"
            )
        _check_batch_and_dtype(video, name, self.proj.weight)

    def forward(
        self, video: torch.Tensor, frame_lengths: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Returns ``(tokens (B, Tp * Hp * Wp, dim), (Tp, Hp, Wp))``."""
        if frame_lengths is not None:
            keep = torch.arange(video.shape[1], device=video.device)[None] < frame_lengths.to(video.device)[:, None]
            video = torch.where(keep[:, :, None, None, None], video, 0.0)
        pt, ph, pw = self.patch
        tp, hp, wp = self.grid(video.shape[1])
        if tp * pt != video.shape[1]:
            video = F.pad(video, (0, 0, 0, 0, 0, 0, 0, tp * pt - video.shape[1]))
        patches = rearrange(video, "b (t pt) c (h ph) (w pw) -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        x = self.proj(patches) + self.pos_embed[:tp].to(video.dtype)
        return rearrange(x, "b t h w c -> b (t h w) c"), (tp, hp, wp)
