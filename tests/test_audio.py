"""The log-mel front-end against an independent numpy reference and against physics (a pure tone's mel bin)."""

import math

import numpy as np
import pytest
import torch

from zorro_models.data.audio import LogMelSpectrogram, hz_to_mel, mel_to_hz


def _numpy_log_mel(x: np.ndarray, sr, n_fft, hop, win, n_mels, f_min, f_max, offset):
    """Framing, windowing, DFT and filters written from the textbook definitions, sharing no code with the module."""
    pad = n_fft // 2
    x = np.pad(x, pad, mode="reflect")
    n = np.arange(win)
    window = np.zeros(n_fft)
    lo = (n_fft - win) // 2
    window[lo : lo + win] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)  # periodic Hann, centred in the FFT frame
    frames = np.stack([x[s : s + n_fft] * window for s in range(0, len(x) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, n_freqs)
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(f_min), mel(f_max), n_mels + 2) / 2595) - 1)
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        a, c, b = edges[m], edges[m + 1], edges[m + 2]
        for i, f in enumerate(freqs):
            if a < f <= c:
                fb[m, i] = (f - a) / (c - a)
            elif c < f < b:
                fb[m, i] = (b - f) / (b - c)
    return np.log(fb @ power.T + offset)  # (n_mels, frames)


@pytest.mark.parametrize(
    "n_fft,hop,win,n_mels,f_min,f_max",
    [
        (256, 128, None, 32, 0.0, None),
        (400, 160, 300, 40, 50.0, 7000.0),  # window shorter than the FFT, band-limited filterbank
    ],
)
def test_matches_numpy_reference(n_fft, hop, win, n_mels, f_min, f_max):
    sr = 16000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3001, generator=g, dtype=torch.float64)  # odd length: the last frame is partial
    lm = LogMelSpectrogram(sr, n_fft, hop, win, n_mels, f_min, f_max, log_offset=1e-6)
    out = lm(x)
    assert out.shape == (2, n_mels, 1 + 3001 // hop) and out.dtype == torch.float64
    for b in range(2):
        ref = _numpy_log_mel(x[b].numpy(), sr, n_fft, hop, win or n_fft, n_mels, f_min, f_max or sr / 2, 1e-6)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("band", [3, 17, 30, 52])
def test_pure_tone_peaks_in_its_mel_band(band):
    lm = LogMelSpectrogram(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=64)
    f = float(lm.center_frequencies()[band])
    t = torch.arange(16000) / 16000
    tone = torch.sin(2 * math.pi * f * t)
    out = lm(tone)
    assert out.shape == (64, 1 + 16000 // 256)
    inner = out[:, 2:-2]  # frames whose window lies fully inside the signal
    assert (inner.argmax(0) == band).all()
    # Parseval: a unit sine puts n_fft * sum(window^2) / 4 of power into the one-sided spectrum of a frame; the
    # band's triangle (peak 1 at the tone) keeps most of the Hann main lobe, and nothing can exceed the total
    power = float(torch.exp(inner[band]).mean())
    total = lm.n_fft * float(lm.window.square().sum()) / 4
    assert 0.6 * total < power <= total * (1 + 1e-4)


def test_batch_rows_are_independent_and_float32():
    lm = LogMelSpectrogram(sample_rate=8000, n_fft=256, hop_length=100, n_mels=24)
    x = torch.randn(4, 8000)
    out = lm(x)
    assert out.shape == (4, 24, 81) and out.dtype == torch.float32
    assert lm.num_frames(8000) == 81
    for b in range(4):
        torch.testing.assert_close(lm(x[b]), out[b])
    silence = lm(torch.zeros(1, 8000))
    torch.testing.assert_close(silence, torch.full_like(silence, math.log(1e-6)))


def test_no_center_frame_count_and_state_dict():
    lm = LogMelSpectrogram(sample_rate=8000, n_fft=256, hop_length=64, n_mels=16, center=False)
    assert lm(torch.randn(1000)).shape == (16, lm.num_frames(1000)) == (16, 1 + (1000 - 256) // 64)
    assert lm.state_dict() == {}  # buffers are derived from the arguments, never checkpointed


def test_autocast_keeps_fp32():
    lm = LogMelSpectrogram(sample_rate=8000, n_fft=256, hop_length=128, n_mels=16)
    x = torch.randn(2, 4000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, lm(x))


def test_mel_scale_round_trip():
    f = torch.tensor([0.0, 440.0, 1000.0, 8000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(f)), f)
    assert abs(hz_to_mel(1000.0) - 1000.0) < 0.1  # the HTK scale's anchor: 1 kHz is ~1000 mel


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_fft=0), "n_fft must be > 0"),
        (dict(n_fft=256, win_length=512), "win_length must be <= n_fft"),
        (dict(f_min=100.0, f_max=50.0), "f_min < f_max"),
        (dict(f_max=9000.0), "sample_rate / 2"),
        (dict(n_fft=64, n_mels=128), "contain no FFT bin"),
        (dict(log_offset=0.0), "log_offset"),
        (dict(hop_length=1.5), "hop_length must be an int"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LogMelSpectrogram(sample_rate=16000, **kwargs)


def test_bad_waveforms():
    lm = LogMelSpectrogram(sample_rate=8000, n_fft=256, hop_length=128, n_mels=16)
    with pytest.raises(ValueError, match="samples"):
        lm(torch.zeros(2, 3, 400))
    with pytest.raises(TypeError, match="floating point"):
        lm(torch.zeros(2, 400, dtype=torch.int16))
    with pytest.raises(ValueError, match="at least 129"):
        lm(torch.zeros(2, 100))
