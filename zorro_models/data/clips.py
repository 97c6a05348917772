"""Real audio-visual clips: video files with audio tracks listed in a CSV, decoded with PyAV.

CSV format (a header row is required; extra columns are ignored)::

    path,label                      # single-label (VGGSound, Kinetics style): one class per clip
    clips/abc.mp4,dog barking

    path,labels                     # multi-label (AudioSet style): classes separated by ';'
    clips/xyz.mp4,speech;music

Relative paths are resolved against ``root`` (default: the CSV's folder). Class names map to indices in sorted order
unless ``classes`` gives the list (pass the training set's ``classes`` to a validation set so indices agree).

Each clip is read in one pass: from a window of ``duration`` seconds (centred in the clip, or from its start), ``T``
video frames are sampled uniformly and resized to ``image_size`` (PyAV's swscale), and the audio is resampled to mono
float at ``sample_rate`` (PyAV's swresample) and cut or zero-padded to ``duration * sample_rate`` samples. The log-mel
front-end runs later, batched (see :class:`zorro_models.data.AVPreprocessor`).

A clip without an audio stream is an *audio-missing* sample (``audio_present = False``, silent waveform) and one
without a video stream a *video-missing* sample; the model then sees a zero-length segment for that modality. A file
that is missing or cannot be decoded raises :class:`ClipError` naming the file and the cause, or with
``on_error="skip"`` is dropped from its batch by :func:`~zorro_models.data.collate` and counted (the training loop
reports the count with a warning): one bad file never ends an epoch.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ClipDataset", "ClipError", "read_clip"]


class ClipError(RuntimeError):
    """A clip that cannot be read: the message names the file and the reason."""


def _window(total: float, duration: float, where: str) -> tuple[float, float]:
    if total <= duration or where == "start":
        return 0.0, duration
    start = (total - duration) / 2
    return start, start + duration


def read_clip(
    path: str, *, num_frames: int, image_size: int, sample_rate: int, duration: float, window: str = "center"
) -> dict:
    """Decode one clip. Returns ``{"video": (T, 3, S, S) float32 in [0, 1] or None, "waveform": (samples,) float32
    or None}`` (None = the file has no such stream). Raises :class:`ClipError`."""
    import av  # optional dependency (extra "models"); imported here so the package imports without it

    if not os.path.exists(path):
        raise ClipError(f"{path}: file not found")
    num_samples = int(round(sample_rate * duration))
    try:
        with av.open(path) as container:
            has_video = len(container.streams.video) > 0
            has_audio = len(container.streams.audio) > 0
            if not (has_video or has_audio):
                raise ClipError(f"{path}: no audio or video stream")
            total = (container.duration or 0) / 1e6  # microseconds -> s; 0 when the container does not say
            t0, t1 = _window(total, duration, window)
            streams = list(container.streams.video[:1]) + list(container.streams.audio[:1])
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate) if has_audio else None
            frames, audio, audio_start = [], [], None
            for frame in container.decode(*streams):
                if isinstance(frame, av.VideoFrame):
                    # a frame without a timestamp (rare, raw streams) is placed as if the video ran at 25 fps
                    t = frame.time if frame.time is not None else len(frames) / 25.0
                    if t0 - 1e-6 <= t < t1:
                        frames.append(frame.to_ndarray(format="rgb24", width=image_size, height=image_size))
                else:
                    for out in resampler.resample(frame):
                        if audio_start is None:
                            audio_start = out.time if out.time is not None else 0.0
                        audio.append(out.to_ndarray().reshape(-1))
            if resampler is not None:
                for out in resampler.resample(None):
                    audio.append(out.to_ndarray().reshape(-1))
    except ClipError:
        raise
    except Exception as e:  # PyAV raises a family of FFmpeg errors (InvalidDataError, ...) and OSError
        raise ClipError(f"{path}: cannot decode ({type(e).__name__}: {e})") from e

    video = None
    if has_video:
        if not frames:
            raise ClipError(f"{path}: the video stream holds no decodable frame in [{t0:.2f}, {t1:.2f}) s")
        pick = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)  # uniform; repeats if too few
        video = torch.from_numpy(np.stack([frames[i] for i in pick])).permute(0, 3, 1, 2).float().div_(255.0)
    waveform = None
    if has_audio:
        x = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        start = max(0, int(round((t0 - (audio_start or 0.0)) * sample_rate)))
        x = x[start : start + num_samples]
        waveform = torch.zeros(num_samples)
        waveform[: len(x)] = torch.from_numpy(np.ascontiguousarray(x))
    return {"video": video, "waveform": waveform}


class ClipDataset(Dataset):
    """Video files with audio listed in a CSV (see the module docstring for the format and decoding).

    Args:
        csv_path: the CSV file.
        num_frames, image_size: video samples are ``(num_frames, 3, image_size, image_size)`` in [0, 1].
        sample_rate, duration: audio samples are ``round(sample_rate * duration)`` mono float32 samples.
        root: folder that relative paths are relative to; default the CSV's folder.
        classes: class names in index order; default the sorted set of names in the CSV.
        multi_label: read a ``labels`` column of ';'-separated names and give multi-hot ``(K,)`` float targets;
            default: True iff the CSV has a ``labels`` column and no ``label`` column.
        on_error: ``"skip"`` (default: a bad file is dropped from its batch, counted and warned about) or
            ``"raise"`` (:class:`ClipError`).
        window: ``"center"`` or ``"start"``: where the ``duration``-second window sits in a longer clip.

    Items: ``{"video": (T, 3, S, S), "video_present": bool, "waveform": (samples,), "audio_present": bool,
    "label": int64 scalar or (K,) float32, "index": int64}``, or None for a skipped file.
    """

    def __init__(
        self,
        csv_path: str,
        *,
        num_frames: int = 8,
        image_size: int = 224,
        sample_rate: int = 16000,
        duration: float = 10.0,
        root: Optional[str] = None,
        classes: Optional[Sequence[str]] = None,
        multi_label: Optional[bool] = None,
        on_error: str = "skip",
        window: str = "center",
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if window not in ("center", "start"):
            raise ValueError(f"window must be 'center' or 'start', got {window!r}")
        for name, value in (("num_frames", num_frames), ("image_size", image_size), ("sample_rate", sample_rate)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {duration}")
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"clip list {csv_path} does not exist")
        self.root = Path(root) if root is not None else csv_path.parent
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
        if "path" not in fields:
            raise ValueError(f"{csv_path}: needs a header with a 'path' column, got columns {fields}")
        if multi_label is None:
            multi_label = "labels" in fields and "label" not in fields
        column = "labels" if multi_label else "label"
        if column not in fields:
            raise ValueError(
                f"{csv_path}: {'multi' if multi_label else 'single'}-label data needs a {column!r} "
                f"column, got columns {fields}"
            )
        if not rows:
            raise ValueError(f"{csv_path}: lists no clips")
        self.multi_label = multi_label
        names = [
            [n.strip() for n in row[column].split(";") if n.strip()] if multi_label else [row[column].strip()]
            for row in rows
        ]
        for i, n in enumerate(names):
            if not n or (not multi_label and not n[0]):
                raise ValueError(f"{csv_path}, row {i + 2}: empty {column!r}")
        self.classes = list(classes) if classes is not None else sorted({c for n in names for c in n})
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({c for n in names for c in n if c not in index})
        if unknown:
            raise ValueError(
                f"{csv_path}: classes {unknown[:5]} are not in the given class list ({len(self.classes)} classes)"
            )
        self.num_classes = len(self.classes)
        self.paths = [str(p if os.path.isabs(p) else self.root / p) for p in (row["path"] for row in rows)]
        self.targets = [[index[c] for c in n] for n in names]
        self.num_frames, self.image_size = num_frames, image_size
        self.sample_rate, self.duration = sample_rate, float(duration)
        self.num_samples = int(round(sample_rate * duration))
        self.on_error, self.window = on_error, window

    def __len__(self) -> int:
        return len(self.paths)

    def label_tensor(self, i: int) -> torch.Tensor:
        if self.multi_label:
            y = torch.zeros(self.num_classes)
            y[self.targets[i]] = 1.0
            return y
        return torch.tensor(self.targets[i][0], dtype=torch.long)

    def __getitem__(self, i: int) -> Optional[dict]:
        try:
            clip = read_clip(
                self.paths[i],
                num_frames=self.num_frames,
                image_size=self.image_size,
                sample_rate=self.sample_rate,
                duration=self.duration,
                window=self.window,
            )
        except ClipError as e:
            if self.on_error == "raise":
                raise
            warnings.warn(f"skipping clip {i}: {e}", RuntimeWarning, stacklevel=2)
            return None
        video, waveform = clip["video"], clip["waveform"]
        return {
            "video": video if video is not None else torch.zeros(self.num_frames, 3, self.image_size, self.image_size),
            "video_present": torch.tensor(video is not None),
            "waveform": waveform if waveform is not None else torch.zeros(self.num_samples),
            "audio_present": torch.tensor(waveform is not None),
            "label": self.label_tensor(i),
            "index": torch.tensor(i, dtype=torch.long),
        }
