"""Shared test helpers: a tiny model configuration, a writer of real mp4 clips, and switches for the Triton backend's
tests (whether it runs here, small tiles, its deterministic backward)."""

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

# A model small enough for CPU tests: 2 frames of 16x16 (8 video tokens), 16x16 spectrogram (4 audio tokens).
TINY = [
    "model.kwargs={img_size: 16, num_frames: 2, video_patch: 8, n_mels: 16, audio_frames: 16, audio_patch: 8, "
    "embed_dim: 32, depth: 1, num_heads: 2, num_fusion: 2}",
    "data.audio.hop_length=500",
    "data.train_size=48",
    "train.batch_size=8",
    "train.progress=false",
    "train.plot=false",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "train.proj_dim=16",
    "probe.train_size=32",
    "probe.test_size=32",
    "data.num_workers=0",
]

# The same inputs for every family, with each family's own settings in model.kwargs (TINY's last entries, which
# follow its model.kwargs, still apply). Swin: a 4x4 audio grid and a 2x4x4 video grid in 2x2 (1x2x2) windows, two
# stages; HiP: two levels of 2 -> 1 groups per modality.
_INPUTS = "img_size: 16, num_frames: 2, n_mels: 16, audio_frames: 16"
TINY_FAMILY = {
    "vit": TINY,
    "swin": [
        "model.name=zorro_swin_tiny",
        f"model.kwargs={{{_INPUTS}, video_patch: [1, 4, 4], audio_patch: 4, base_dim: 16, depths: [2, 2], "
        "num_heads: [2, 4], audio_window: 2, video_window: [1, 2, 2], num_fusion: 2}",
        *TINY[1:],
    ],
    "hip": [
        "model.name=zorro_hip_tiny",
        f"model.kwargs={{{_INPUTS}, video_patch: 8, audio_patch: 8, audio_groups: [2, 1], video_groups: [2, 1], "
        "latents: [4, 4], dims: [32, 64], depths: [1, 1], num_heads: [2, 4], num_fusion: 2}",
        *TINY[1:],
    ],
}


def write_clip(path, *, frames=10, fps=10, size=(48, 40), tone_hz=440.0, sample_rate=16000, seconds=1.0, audio=True):
    """A real mp4: H.264 video whose frame i is a flat grey of level 20 * i, and (optionally) an AAC sine tone."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        streams = [vs]
        if audio:
            a = c.add_stream("aac", rate=sample_rate)
            a.layout = "mono"
            streams.append(a)
        for i in range(frames):
            img = np.full((size[1], size[0], 3), 20 * i, np.uint8)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        if audio:
            t = np.arange(int(sample_rate * seconds)) / sample_rate
            x = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            for s in range(0, len(x), 1024):
                frame = av.AudioFrame.from_ndarray(x[None, s : s + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, s
                for pkt in a.encode(frame):
                    c.mux(pkt)
        for s in streams:
            for pkt in s.encode(None):
                c.mux(pkt)
    return Path(path)


# ------------------------------------------------------------------------------------------------ Triton
def triton_unavailable(device: str = "cpu") -> list:
    """Why the Triton backend cannot run on ``device`` tensors here (empty if it can: a GPU, or CPU tensors under
    ``TRITON_INTERPRET=1``, which conftest sets when there is no GPU)."""
    from zorro_kernels import ZorroMask
    from zorro_kernels.backends import BACKENDS

    probe = torch.zeros(1, 1, 1, 16, device=device)
    return BACKENDS["triton"].not_supported_reasons(probe, probe, probe, ZorroMask.packed([1]))


_OFF = triton_unavailable()
# "triton" as a backend parameter for tests on CPU tensors: skipped where the backend cannot take them
TRITON = pytest.param("triton", marks=pytest.mark.skipif(bool(_OFF), reason="; ".join(_OFF)))


@pytest.fixture
def small_triton_tiles():
    """16 x 16 Triton tiles for a test's whole run (forward and backward), so that small shapes still mix full,
    partial and empty tiles. Other backends ignore it."""
    from zorro_kernels.backends.triton._config import override_blocks

    with override_blocks((16, 16)):
        yield


@contextlib.contextmanager
def deterministic(on: bool = True):
    """``torch.use_deterministic_algorithms(on)`` for a block: on, the Triton backward runs its atomic-free kernels;
    off, the one-pass backward (atomic fp32 dQ)."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
