"""Audio front-end: waveform -> log-mel spectrogram, in plain torch (no torchaudio, no librosa).

Zorro's audio stream reads a log-mel spectrogram ``(B, n_mels, frames)`` (Figure 2 of the paper: 128 mel bins). This
module turns mono waveforms into that, on any device, differentiably, so the same code serves the embedded synthetic
data, real clips decoded with PyAV, and a GPU training step.

The pipeline, for a waveform ``x`` sampled at ``sample_rate`` Hz::

    frames  = STFT(x, n_fft, hop_length, win_length, periodic Hann window, centred with reflect padding)
    power   = |frames| ** 2                                  (n_fft // 2 + 1 frequency bins)
    mel     = filterbank @ power                             (n_mels triangular filters, HTK mel scale)
    log_mel = log(mel + log_offset)

The filterbank has ``n_mels`` triangles whose centres are equally spaced on the HTK mel scale
``mel(f) = 2595 * log10(1 + f / 700)`` between ``f_min`` and ``f_max``; each triangle rises from its left neighbour's
centre to its own and falls to its right neighbour's, with peak 1 (no area normalisation, so a pure tone at a filter's
centre frequency yields that filter's largest response). With ``center=True`` a waveform of ``S`` samples gives
``1 + S // hop_length`` frames, frame ``t`` centred on sample ``t * hop_length``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["LogMelSpectrogram", "mel_filterbank", "hz_to_mel", "mel_to_hz"]


def hz_to_mel(f):
    """HTK mel scale: ``2595 * log10(1 + f / 700)``. Accepts a float or a tensor."""
    if isinstance(f, torch.Tensor):
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_to_hz(m):
    """Inverse of :func:`hz_to_mel`."""
    if isinstance(m, torch.Tensor):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: float, f_min: float, f_max: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triangular mel filters, ``(n_mels, n_freqs)``: row ``m`` weights the ``n_freqs = n_fft // 2 + 1`` STFT bins
    (bin ``i`` at ``i * sample_rate / n_fft`` Hz) for mel band ``m``. Peak 1 at the band's centre frequency
    (:meth:`LogMelSpectrogram.center_frequencies`)."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64))
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - left) / (center - left)
    down = (right - freqs[None]) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0).to(dtype)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class LogMelSpectrogram(nn.Module):
    """Mono waveform ``(B, samples)`` (or ``(samples,)``) -> log-mel spectrogram ``(B, n_mels, frames)``.

    Args:
        sample_rate: waveform sample rate in Hz (default 16 kHz, AudioSet/VGGSound practice).
        n_fft: FFT size in samples; the spectrum has ``n_fft // 2 + 1`` bins ``sample_rate / n_fft`` Hz apart.
        hop_length: samples between frame centres (default 160 = 10 ms at 16 kHz, so 1 s -> 101 frames).
        win_length: Hann window length in samples, ``<= n_fft`` (zero-padded to ``n_fft``); default ``n_fft``.
        n_mels: number of mel bands (the output's height).
        f_min, f_max: the filterbank's frequency range in Hz; ``f_max`` defaults to ``sample_rate / 2``.
        log_offset: added before the natural log so silence maps to ``log(log_offset)`` instead of ``-inf``.
        center: pad ``n_fft // 2`` samples (reflect) on both sides, so frame ``t`` is centred on sample
            ``t * hop_length`` and there are ``1 + samples // hop_length`` frames. Without it, frames start at sample 0
            and there are ``1 + (samples - n_fft) // hop_length``.

    The STFT runs in float32 (float64 inputs stay float64) outside autocast: half-precision FFTs are not supported
    everywhere and lose the dynamic range the log needs. The output has the computation's dtype. Buffers (window,
    filterbank) are derived from the arguments and are not saved in ``state_dict``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        hop_length: int = 160,
        win_length: Optional[int] = None,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: Optional[float] = None,
        log_offset: float = 1e-6,
        center: bool = True,
    ):
        super().__init__()
        self.sample_rate = _positive_int("sample_rate", sample_rate)
        self.n_fft = _positive_int("n_fft", n_fft)
        self.hop_length = _positive_int("hop_length", hop_length)
        self.win_length = self.n_fft if win_length is None else _positive_int("win_length", win_length)
        self.n_mels = _positive_int("n_mels", n_mels)
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length must be <= n_fft, got win_length={self.win_length}, n_fft={self.n_fft}")
        self.f_min = float(f_min)
        self.f_max = float(sample_rate / 2 if f_max is None else f_max)
        if not 0.0 <= self.f_min < self.f_max <= sample_rate / 2:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2}, "
                f"got f_min={self.f_min}, f_max={self.f_max}"
            )
        if not log_offset > 0:
            raise ValueError(f"log_offset must be > 0, got {log_offset}")
        self.log_offset = float(log_offset)
        self.center = bool(center)
        n_freqs = self.n_fft // 2 + 1
        # float64 buffers, cast per call: a float64 input then gets a float64-exact transform
        fb = mel_filterbank(n_freqs, self.n_mels, self.sample_rate, self.f_min, self.f_max, torch.float64)
        empty = (fb.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"mel bands {empty} contain no FFT bin: n_mels={self.n_mels} is too many for "
                f"n_fft={self.n_fft} over [{self.f_min}, {self.f_max}] Hz; lower n_mels or raise n_fft"
            )
        self.register_buffer("filterbank", fb, persistent=False)
        window = torch.hann_window(self.win_length, periodic=True, dtype=torch.float64)
        self.register_buffer("window", window, persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a waveform of ``num_samples`` samples."""
        if self.center:
            return 1 + num_samples // self.hop_length
        return 1 + (num_samples - self.n_fft) // self.hop_length if num_samples >= self.n_fft else 0

    def center_frequencies(self) -> torch.Tensor:
        """``(n_mels,)`` float64: the frequency (Hz) at which each mel band peaks."""
        m = torch.linspace(hz_to_mel(self.f_min), hz_to_mel(self.f_max), self.n_mels + 2, dtype=torch.float64)
        return mel_to_hz(m[1:-1])

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``waveform``: ``(B, samples)`` or ``(samples,)`` float. Returns ``(B, n_mels, frames)`` (or
        ``(n_mels, frames)`` for 1-D input), ``frames = self.num_frames(samples)``."""
        if not isinstance(waveform, torch.Tensor):
            raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
        if waveform.ndim not in (1, 2):
            raise ValueError(f"waveform must be (B, samples) or (samples,), got shape {tuple(waveform.shape)}")
        if not waveform.is_floating_point():
            raise TypeError(f"waveform must be floating point, got {waveform.dtype}")
        squeeze = waveform.ndim == 1
        x = waveform[None] if squeeze else waveform
        need = self.n_fft // 2 + 1 if self.center else self.n_fft
        if x.shape[-1] < need:
            # reflect padding needs more samples than the pad; a frameless spectrogram is never what a caller wants
            raise ValueError(f"waveform has {x.shape[-1]} samples; n_fft={self.n_fft} needs at least {need}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(
                x.to(dtype),
                self.n_fft,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window.to(dtype),
                center=self.center,
                pad_mode="reflect",
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()  # (B, n_freqs, frames)
            mel = torch.matmul(self.filterbank.to(dtype), power)  # (B, n_mels, frames)
            out = torch.log(mel + self.log_offset)
        return out[0] if squeeze else out

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"win_length={self.win_length}, n_mels={self.n_mels}, f_min={self.f_min}, f_max={self.f_max}, "
            f"log_offset={self.log_offset}, center={self.center}"
        )
