"""The embedded audio-visual dataset: procedurally generated clips, deterministic by ``(seed, index)``, no files.

Every clip belongs to one of ``K`` classes (``2 <= K <= 16``). Class ``k`` binds a visual event and an audio event,
each carrying the class through one *coarse* cue (readable from average colour or average spectrum) and two *fine*
cues (which need spatial or temporal structure):

=========  =======================================  =====================================================
           coarse cue                               fine cues
=========  =======================================  =====================================================
video      hue of a striped disc: ``k / K`` of the  stripe orientation ``(k % 4) * 45`` degrees; stripe
           colour wheel (jitter +-0.3 of a step)    period (``k // 4``: 15, 30, 20 or 40% of the frame)
audio      pitch register: base pitch in the        pitch contour (``k % 4``: flat, rising an octave,
           ``k``-th of K log-spaced bands over      falling an octave, vibrato); rhythm (``k // 4``: 1, 2,
           250-1000 Hz                              3 or 5 notes)
=========  =======================================  =====================================================

Everything else is nuisance, drawn independently per clip and per modality, so **the class is the only thing the
two modalities share**:

- video: background colour, disc radius (30-40% of the frame), position and slow drift, stripe phase and drift
  speed, pixel noise of random strength, and (``distractor_prob``) a small square of random colour on a random walk;
- audio: loudness, white noise of random level, and (``distractor_prob``) a 0.25 s pure tone at a random pitch
  (200-2000 Hz) and time.

Each modality is informative but noisy alone: with probability ``video_dropout`` the disc is drawn at 10% contrast,
and independently with probability ``audio_dropout`` the tone is played 20x quieter, buried in the noise. The other
modality still identifies such a clip, which is why audio-visual accuracy beats either unimodal accuracy.

Why this design shows the paper's point. The per-clip nuisances (background colour, loudness, noise...) tell clips
apart far more easily than their classes. A **full-attention** model trained contrastively (audio output vs video
output) lets its audio tokens read the video tokens and vice versa, so both outputs can agree on those nuisances —
instance discrimination solved without learning an event; given one modality alone, its "unimodal" outputs hold
little about the class. **Zorro**'s audio output can only see audio, so the one way it can agree with the video output
is the class: the coarse cues give contrastive learning a foothold from the first steps, and the fine cues are then
learned too. Measured in ``zorro demo`` (see docs/training.md).

Samples are dicts ``{"waveform": (samples,) float32, "audio_present": bool, "video": (T, 3, H, W) float32 in
[0, 1], "video_present": bool, "label": int64 scalar, "index": int64 scalar}``. Generation is vectorised over a batch:
a DataLoader fetches whole batches through :meth:`SyntheticAVDataset.__getitems__`, and clip ``i`` depends only on
``(seed, i)``, never on the batch it is rendered in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticAVConfig", "SyntheticAVDataset", "CONTOURS", "RHYTHMS", "PERIODS"]

CONTOURS = ("flat", "rising", "falling", "vibrato")
RHYTHMS = (1, 2, 3, 5)  # notes per clip
PERIODS = (0.15, 0.3, 0.2, 0.4)  # stripe period, fraction of the frame

# Per-clip uniform scalars, drawn in this order from the clip's own generator (appending keeps old clips unchanged;
# reordering changes every clip). "label" becomes the class.
_LATENTS = (
    "label",
    "bg_r",
    "bg_g",
    "bg_b",
    "hue",
    "angle",
    "period",
    "radius",
    "x0",
    "y0",
    "wander",
    "phase",
    "drift",
    "pix_noise",
    "v_drop",
    "has_square",
    "sq_x",
    "sq_y",
    "sq_r",
    "sq_g",
    "sq_b",
    "pitch",
    "loud",
    "a_noise",
    "a_drop",
    "has_tone",
    "tone_f",
    "tone_t",
    "tone_phase",
)


@dataclass
class SyntheticAVConfig:
    """Sizes and difficulty of the synthetic clips.

    Attributes:
        num_classes: K, 2 to 16.
        num_frames, image_size: video clips are ``(num_frames, 3, image_size, image_size)`` (the training pipeline
            sets both from the model).
        sample_rate, duration: audio clips hold ``round(sample_rate * duration)`` mono samples.
        audio_dropout, video_dropout: probability that a clip's audio / video event is nearly invisible.
        distractor_prob: probability of a distractor (a wandering square; a stray tone), per clip and modality.
    """

    num_classes: int = 8
    num_frames: int = 4
    image_size: int = 32
    sample_rate: int = 8000
    duration: float = 1.0
    audio_dropout: float = 0.2
    video_dropout: float = 0.2
    distractor_prob: float = 0.5

    def __post_init__(self):
        for name in ("num_classes", "num_frames", "image_size", "sample_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if not 2 <= self.num_classes <= 16:
            raise ValueError(f"num_classes must be in [2, 16], got {self.num_classes}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.sample_rate < 4000 or not self.duration > 0:
            raise ValueError(
                f"need sample_rate >= 4000 Hz (tones reach 2 kHz) and duration > 0, got "
                f"sample_rate={self.sample_rate}, duration={self.duration}"
            )
        for name in ("audio_dropout", "video_dropout", "distractor_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.duration))


def _clip_rng(seed: int, index: int) -> np.random.Generator:
    # SeedSequence hashes the pair (seed, index) with its full entropy into a PCG64 stream; torch's CPU generator
    # would keep only 32 bits of a combined seed, so distinct pairs could share a stream
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def _pick(options: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """``options (n, B, ...)``, ``which (B,)`` -> ``options[which[b], b]`` for each b: ``(B, ...)``."""
    idx = which.view(1, -1, *([1] * (options.ndim - 2))).expand(1, *options.shape[1:])
    return options.gather(0, idx)[0]


class SyntheticAVDataset(Dataset):
    """``length`` procedurally generated audio-visual clips (see the module docstring for the design).

    Args:
        length: number of clips; clip ``i`` depends only on ``(seed, i)``.
        config: sizes and difficulty; default :class:`SyntheticAVConfig`.
        seed: picks the split; use different seeds for training, validation and probe sets.
    """

    multi_label = False

    def __init__(self, length: int, config: Optional[SyntheticAVConfig] = None, seed: int = 0):
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= 2**32:
            raise ValueError(f"length must be an int in [1, 2**32], got {length!r}")
        self.length = length
        self.config = config or SyntheticAVConfig()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self.num_classes = self.config.num_classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        batch = self.generate(indices)
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

    def _latents(self, index: int) -> tuple[np.ndarray, np.random.Generator]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} clips")
        rng = _clip_rng(self.seed, index)
        u = rng.random(len(_LATENTS))
        u[0] = np.floor(u[0] * self.num_classes)
        return u, rng

    def label(self, index: int) -> int:
        """Clip ``index``'s class, without rendering it."""
        return int(self._latents(int(index))[0][0])

    def generate(self, indices: Sequence[int]) -> dict:
        """Render clips ``indices`` as one batch: ``{"waveform": (B, samples), "audio_present": (B,),
        "video": (B, T, 3, H, W), "video_present": (B,), "label": (B,), "index": (B,)}``."""
        cfg = self.config
        if len(indices) == 0:
            raise ValueError("indices must name at least one clip")
        lat, v_noise, walk, a_noise = [], [], [], []
        for i in indices:
            u, rng = self._latents(int(i))
            lat.append(u)
            # the noise fields come from the same per-clip stream, after the scalars
            v_noise.append(rng.standard_normal((cfg.num_frames, 3, cfg.image_size, cfg.image_size), np.float32))
            walk.append(rng.standard_normal((cfg.num_frames, 2), np.float32))
            a_noise.append(rng.standard_normal(cfg.num_samples, np.float32))
        u = dict(zip(_LATENTS, torch.from_numpy(np.stack(lat)).float().unbind(1)))
        label = u["label"].long()
        video = self._render_video(label, u, torch.from_numpy(np.stack(v_noise)), torch.from_numpy(np.stack(walk)))
        waveform = self._render_audio(label, u, torch.from_numpy(np.stack(a_noise)))
        present = torch.ones(len(indices), dtype=torch.bool)
        return {
            "waveform": waveform,
            "audio_present": present,
            "video": video,
            "video_present": present.clone(),
            "label": label,
            "index": torch.as_tensor([int(i) for i in indices], dtype=torch.long),
        }

    # ------------------------------------------------------------------------------------------------- video
    def _render_video(self, label, u, noise, walk) -> torch.Tensor:
        cfg = self.config
        b, t, s, k = label.shape[0], cfg.num_frames, cfg.image_size, self.num_classes
        frame = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1)
        grid = torch.arange(s, dtype=torch.float32) + 0.5
        xx, yy = grid.view(1, 1, 1, s), grid.view(1, 1, s, 1)

        def per_clip(x):  # (B,) -> (B, 1, 1, 1), broadcasting over (T, H, W)
            return x.view(b, 1, 1, 1)

        # the striped disc: class orientation and period, random phase and drift
        theta = (label % 4).float() * (math.pi / 4) + (u["angle"] - 0.5) * (math.pi / 18)  # +-5 degrees
        period = torch.tensor(PERIODS)[(label // 4) % 4] * s * (0.95 + 0.1 * u["period"])
        along = xx * per_clip(torch.cos(theta)) + yy * per_clip(torch.sin(theta))
        drift = (u["drift"] - 0.5) * math.pi  # rad per frame
        stripes = 0.5 + 0.5 * torch.sin(
            2 * math.pi * along / per_clip(period) + per_clip(drift) * frame + per_clip(2 * math.pi * u["phase"])
        )  # (B, T, H, W)
        radius = s * (0.3 + 0.1 * u["radius"])
        heading = 2 * math.pi * u["wander"]
        cx = per_clip(s * (0.35 + 0.3 * u["x0"])) + per_clip(torch.cos(heading)) * frame * (0.02 * s)
        cy = per_clip(s * (0.35 + 0.3 * u["y0"])) + per_clip(torch.sin(heading)) * frame * (0.02 * s)
        disc = torch.sigmoid(per_clip(radius) - torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2))  # ~1 px soft edge
        # colours: a random dim background; stripes of the class hue, faded towards it on a dropped-out clip
        bg = 0.1 + 0.4 * torch.stack([u["bg_r"], u["bg_g"], u["bg_b"]], 1)  # (B, 3)
        hue = (label.float() + 0.6 * (u["hue"] - 0.5)) / k
        fg = 0.5 + 0.5 * torch.cos(2 * math.pi * (hue[:, None] - torch.tensor([0.0, 1 / 3, 2 / 3])))
        contrast = torch.where(u["v_drop"] < cfg.video_dropout, 0.1, 1.0)
        fg = bg + contrast[:, None] * (fg - bg)
        alpha = (disc * stripes)[:, :, None]  # (B, T, 1, H, W)
        frames = bg[:, None, :, None, None] + alpha * (fg - bg)[:, None, :, None, None]
        # distractor: a small square of a random colour on a random walk, drawn over the disc
        has_sq = (u["has_square"] < cfg.distractor_prob).float()
        pos = torch.stack([u["sq_x"], u["sq_y"]], 1)[:, None] * s + walk.cumsum(1) * (0.05 * s)
        pos = pos.clamp(2, s - 2)  # (B, T, 2)
        half = 0.08 * s
        sq = torch.sigmoid(
            half - torch.maximum((xx - pos[..., 0, None, None]).abs(), (yy - pos[..., 1, None, None]).abs())
        )
        sq = (sq * per_clip(has_sq))[:, :, None]
        sq_colour = torch.stack([u["sq_r"], u["sq_g"], u["sq_b"]], 1)[:, None, :, None, None]
        frames = frames + sq * (sq_colour - frames)
        sigma = per_clip(0.02 + 0.08 * u["pix_noise"])[..., None]
        return (frames + sigma * noise).clamp(0, 1)

    # ------------------------------------------------------------------------------------------------- audio
    def _render_audio(self, label, u, noise) -> torch.Tensor:
        cfg = self.config
        b, n, sr, k = label.shape[0], cfg.num_samples, cfg.sample_rate, self.num_classes
        tau = torch.arange(n, dtype=torch.float32).expand(b, n) / n  # clip time in [0, 1)
        # pitch register: the k-th of K log-spaced bands over 250-1000 Hz, uniform inside it
        f0 = 250.0 * 4.0 ** ((label.float() + u["pitch"]) / k)
        octave = _pick(
            torch.stack([torch.zeros_like(tau), tau, -tau, 0.25 * torch.sin(2 * math.pi * 4.0 * tau)]), label % 4
        )  # contour, (B, N)
        freq = f0[:, None] * 2.0**octave  # instantaneous Hz
        phase = 2 * math.pi * torch.cumsum(freq / sr, 1)
        tone = torch.sin(phase) + 0.4 * torch.sin(2 * phase) + 0.2 * torch.sin(3 * phase)
        # rhythm: `notes` equal notes, each sounding for 70% of its slot, with 10 ms raised-cosine edges
        notes = torch.tensor(RHYTHMS, dtype=torch.float32)[(label // 4) % 4][:, None]
        within = torch.remainder(tau * notes, 1.0)
        edge = 0.01 * notes / cfg.duration
        env = torch.clamp(within / edge, 0, 1) * torch.clamp((0.7 - within) / edge, 0, 1)
        env = 0.5 - 0.5 * torch.cos(math.pi * env)
        gain = (0.3 + 0.7 * u["loud"]) * torch.where(u["a_drop"] < cfg.audio_dropout, 0.05, 1.0)
        wave = gain[:, None] * env * tone
        # distractor: a 0.25 s pure tone at a random pitch (200-2000 Hz) and time
        has_tone = (u["has_tone"] < cfg.distractor_prob).float()
        start = 0.75 * u["tone_t"][:, None]
        burst = ((tau >= start) & (tau < start + 0.25)).float()
        tf = 200.0 * 10.0 ** u["tone_f"]
        wave = wave + 0.5 * has_tone[:, None] * burst * torch.sin(
            2 * math.pi * (tf[:, None] * tau * cfg.duration + u["tone_phase"][:, None])
        )
        level = 0.02 + 0.3 * u["a_noise"]
        return wave + level[:, None] * noise
