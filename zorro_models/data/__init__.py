"""Audio-visual data for training and evaluating Zorro models.

- :class:`SyntheticAVDataset` — the embedded dataset: procedurally generated clips, no downloads (``synthetic.py``).
- :class:`ClipDataset` — real video files with audio tracks listed in a CSV, decoded with PyAV (``clips.py``).
- :func:`collate` — batches their samples, dropping (and counting) clips that failed to decode.
- :class:`AVPreprocessor` — a batch -> the model's keyword inputs: waveform -> normalised log-mel, frames ->
  normalised frames, missing modalities -> zero lengths.

Both datasets yield the same sample format: ``{"waveform": (samples,), "audio_present": bool, "video": (T, 3, H, W) in
[0, 1], "video_present": bool, "label": int64 scalar or (K,) float multi-hot, "index": int64}``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import default_collate

from .audio import LogMelSpectrogram
from .clips import ClipDataset, ClipError, read_clip
from .synthetic import SyntheticAVConfig, SyntheticAVDataset

__all__ = [
    "SyntheticAVDataset",
    "SyntheticAVConfig",
    "ClipDataset",
    "ClipError",
    "read_clip",
    "collate",
    "AVPreprocessor",
]


def collate(samples: Sequence[Optional[dict]]) -> dict:
    """Stack samples into a batch. ``None`` entries (clips a dataset skipped) are dropped and counted in
    ``batch["num_skipped"]``; ``batch["size"]`` is the number of samples kept (0: every clip failed, no tensors)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return {"size": 0, "num_skipped": len(samples)}
    batch = default_collate(kept)
    batch["size"] = len(kept)
    batch["num_skipped"] = len(samples) - len(kept)
    return batch


class AVPreprocessor(nn.Module):
    """A collated batch -> the keyword inputs of a Zorro model.

    Audio: the waveform ``(B, samples)`` goes through :class:`~zorro_models.data.audio.LogMelSpectrogram`, is cut to at
    most ``max_frames`` frames and standardised, ``(log_mel - audio_mean) / audio_std``. Video: frames ``(B, T, 3, H,
    W)`` in [0, 1] become ``(frames - video_mean) / video_std``. A sample whose ``audio_present`` (``video_present``)
    is False gets ``audio_lengths`` (``video_lengths``) 0: the model sees a zero-length segment for it.

    Args:
        mel: the log-mel front-end; its ``n_mels`` must equal the model's.
        max_frames: the model's ``audio_frames`` (longer spectrograms are cut, shorter ones passed as they are).
        audio_mean, audio_std, video_mean, video_std: normalisation constants.

    Forward: ``batch`` (from :func:`collate`), ``modalities`` (a subset of ``("audio", "video")``: which inputs to
    give the model — the others are left out, as in audio-only or video-only evaluation) -> dict with ``audio``
    ``(B, n_mels, frames)``, ``video`` ``(B, T, 3, H, W)`` and ``audio_lengths`` / ``video_lengths`` ``(B,)`` (only
    where some sample lacks that modality); tensors on this module's device.
    """

    def __init__(
        self,
        mel: LogMelSpectrogram,
        max_frames: int,
        audio_mean: float = 0.0,
        audio_std: float = 1.0,
        video_mean: float = 0.0,
        video_std: float = 1.0,
    ):
        super().__init__()
        if not (audio_std > 0 and video_std > 0):
            raise ValueError(f"audio_std and video_std must be > 0, got {audio_std}, {video_std}")
        self.mel = mel
        self.max_frames = int(max_frames)
        self.audio_mean, self.audio_std = float(audio_mean), float(audio_std)
        self.video_mean, self.video_std = float(video_mean), float(video_std)
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def forward(self, batch: dict, modalities: Sequence[str] = ("audio", "video")) -> dict:
        unknown = set(modalities) - {"audio", "video"}
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of ('audio', 'video'), got {tuple(modalities)}")
        dev = self.device
        out = {}
        if "audio" in modalities:
            wave = batch["waveform"].to(dev, non_blocking=True)
            mel = self.mel(wave)[..., : self.max_frames]
            out["audio"] = (mel - self.audio_mean) / self.audio_std
            present = batch.get("audio_present")
            if present is not None and not bool(present.all()):
                out["audio_lengths"] = torch.where(present.bool(), mel.shape[-1], 0)
        if "video" in modalities:
            video = batch["video"].to(dev, non_blocking=True)
            out["video"] = (video - self.video_mean) / self.video_std
            present = batch.get("video_present")
            if present is not None and not bool(present.all()):
                out["video_lengths"] = torch.where(present.bool(), video.shape[1], 0)
        return out
