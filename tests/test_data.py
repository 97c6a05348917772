"""Data: the synthetic generator (determinism, separability, difficulty knobs), real mp4 clips through PyAV (round
trip, missing audio, corrupt and missing files, multi-label CSVs), batching and the model-input preprocessor."""

import math
import warnings

import pytest
import torch

from zorro_models.data import (
    AVPreprocessor,
    ClipDataset,
    ClipError,
    SyntheticAVConfig,
    SyntheticAVDataset,
    collate,
    read_clip,
)
from zorro_models.data.audio import LogMelSpectrogram

from .helpers import write_clip

pytest.importorskip("av")


# ------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_per_clip_not_per_batch():
    ds = SyntheticAVDataset(100, seed=7)
    batch = ds.generate([3, 42, 9])
    alone = ds[42]
    again = SyntheticAVDataset(100, seed=7).generate([42])
    for key in ("waveform", "video", "label"):
        assert torch.equal(batch[key][1], alone[key])
        assert torch.equal(again[key][0], alone[key])
    other_seed = SyntheticAVDataset(100, seed=8)[42]
    assert not torch.equal(other_seed["video"], alone["video"])
    assert ds.label(42) == int(alone["label"])


def test_synthetic_shapes_ranges_and_items():
    cfg = SyntheticAVConfig(num_classes=5, num_frames=3, image_size=24, sample_rate=6000, duration=0.5)
    ds = SyntheticAVDataset(64, cfg, seed=0)
    items = ds.__getitems__(list(range(64)))
    b = collate(items)
    assert b["video"].shape == (64, 3, 3, 24, 24) and b["waveform"].shape == (64, 3000)
    assert b["video"].min() >= 0 and b["video"].max() <= 1
    assert b["label"].dtype == torch.long and set(b["label"].tolist()) <= set(range(5))
    assert len(set(b["label"].tolist())) == 5  # 64 clips cover all 5 classes
    assert b["audio_present"].all() and b["video_present"].all() and b["size"] == 64 and b["num_skipped"] == 0
    assert torch.isfinite(b["waveform"]).all()
    with pytest.raises(IndexError):
        ds[64]


def _cue_features(ds):
    """Hand-made coarse cues: the mean log-mel spectrum, and the mean colour of pixels far from the clip's median."""
    b = ds.generate(list(range(len(ds))))
    audio = LogMelSpectrogram(8000, 256, 125, n_mels=32)(b["waveform"]).mean(-1)
    v = b["video"]
    far = ((v - v.flatten(3).median(-1).values[..., None, None]).abs().sum(2, keepdim=True) > 0.15).float()
    video = (v * far).sum((1, 3, 4)) / far.sum((1, 3, 4)).clamp(min=1)
    return audio, video, b["label"]


def _nearest_mean_accuracy(train, test, k):
    (xtr, ytr), (xte, yte) = train, test
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    centres = torch.stack([((xtr - mu) / sd)[ytr == c].mean(0) for c in range(k)])
    return float((torch.cdist((xte - mu) / sd, centres).argmin(1) == yte).float().mean())


def test_classes_are_separable_and_dropout_hides_them():
    """A nearest-class-mean classifier on trivial features reads the class from either modality well above chance
    (1/8); with the modality dropped out in every clip it falls to near chance."""
    results = {}
    for name, cfg in (
        ("default", SyntheticAVConfig()),
        ("dropped", SyntheticAVConfig(audio_dropout=1.0, video_dropout=1.0)),
    ):
        a1, v1, y1 = _cue_features(SyntheticAVDataset(256, cfg, seed=1))
        a2, v2, y2 = _cue_features(SyntheticAVDataset(256, cfg, seed=2))
        results[name] = (_nearest_mean_accuracy((a1, y1), (a2, y2), 8), _nearest_mean_accuracy((v1, y1), (v2, y2), 8))
    (da, dv), (xa, xv) = results["default"], results["dropped"]
    assert da > 0.3 and dv > 0.3, results
    assert xa < da - 0.15 and xv < dv - 0.15, results


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=17), "num_classes"),
        (dict(image_size=8), "image_size"),
        (dict(audio_dropout=1.5), "audio_dropout"),
        (dict(sample_rate=2000), "sample_rate"),
        (dict(num_frames=2.0), "num_frames must be an int"),
    ],
)
def test_synthetic_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SyntheticAVConfig(**kwargs)


# ------------------------------------------------------------------------------------------------- real clips
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_clip(d / "a.mp4", tone_hz=440.0)
    write_clip(d / "b.mp4", tone_hz=1000.0)
    write_clip(d / "silent.mp4", audio=False)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return d


def test_mp4_round_trip(clip_dir):
    clip = read_clip(str(clip_dir / "a.mp4"), num_frames=5, image_size=16, sample_rate=8000, duration=1.0)
    video, wave = clip["video"], clip["waveform"]
    assert video.shape == (5, 3, 16, 16) and video.dtype == torch.float32
    levels = video.mean((1, 2, 3)) * 255
    # frames sampled uniformly over the 10 encoded ones (levels 0, 20, ..., 180), up to codec error
    assert torch.all(levels[1:] > levels[:-1]) and levels[0] < 15 and levels[-1] > 165
    assert wave.shape == (8000,)
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 3  # 1 s at 8 kHz: bin k is k Hz; resampled, mono
    assert 0.3 < float(wave.abs().max()) < 0.7


def test_clip_dataset_single_label_missing_audio_and_bad_files(clip_dir):
    csv = clip_dir / "list.csv"
    csv.write_text("path,label\na.mp4,dog\nb.mp4,cat\nsilent.mp4,dog\ncorrupt.mp4,cat\nnowhere.mp4,cat\n")
    ds = ClipDataset(csv, num_frames=2, image_size=16, sample_rate=8000, duration=0.5)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5 and not ds.multi_label
    a, silent = ds[0], ds[2]
    assert a["audio_present"] and int(a["label"]) == 1 and a["waveform"].shape == (4000,)
    assert not silent["audio_present"] and torch.count_nonzero(silent["waveform"]) == 0
    assert silent["video_present"] and silent["video"].shape == (2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="corrupt.mp4: cannot decode"):
        assert ds[3] is None
    with pytest.warns(RuntimeWarning, match="nowhere.mp4: file not found"):
        assert ds[4] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = collate([ds[i] for i in range(5)])
    assert batch["size"] == 3 and batch["num_skipped"] == 2
    assert batch["audio_present"].tolist() == [True, True, False]
    assert collate([None, None]) == {"size": 0, "num_skipped": 2}

    strict = ClipDataset(csv, num_frames=2, image_size=16, sample_rate=8000, duration=0.5, on_error="raise")
    with pytest.raises(ClipError, match="corrupt.mp4"):
        strict[3]
    with pytest.raises(ClipError, match="file not found"):
        strict[4]


def test_clip_dataset_multi_label(clip_dir):
    csv = clip_dir / "multi.csv"
    csv.write_text('path,labels\na.mp4,"speech;music"\nb.mp4,music\n')
    ds = ClipDataset(csv, num_frames=2, image_size=16, sample_rate=8000, duration=0.5)
    assert ds.multi_label and ds.classes == ["music", "speech"]
    assert ds[0]["label"].tolist() == [1.0, 1.0] and ds[1]["label"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="not in the given class list"):
        ClipDataset(csv, classes=["music"])


@pytest.mark.parametrize(
    "text,match",
    [
        ("file,label\na.mp4,x\n", "'path' column"),
        ("path,tag\na.mp4,x\n", "'label' column"),
        ("path,label\n", "lists no clips"),
        ("path,label\na.mp4,\n", "empty 'label'"),
    ],
)
def test_clip_csv_errors(tmp_path, text, match):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=match):
        ClipDataset(csv)


# ------------------------------------------------------------------------------------------------- preprocessing
def test_preprocessor_normalises_and_marks_missing_modalities():
    mel = LogMelSpectrogram(8000, 256, 125, n_mels=16)
    pre = AVPreprocessor(mel, max_frames=48, audio_mean=2.0, audio_std=2.0, video_mean=0.5, video_std=0.25)
    batch = collate(SyntheticAVDataset(4, SyntheticAVConfig(num_frames=2, image_size=16)).__getitems__(range(4)))
    out = pre(batch)
    assert out["audio"].shape == (4, 16, 48) and out["video"].shape == (4, 2, 3, 16, 16)
    assert "audio_lengths" not in out and "video_lengths" not in out
    torch.testing.assert_close(out["video"], (batch["video"] - 0.5) / 0.25)
    torch.testing.assert_close(out["audio"], (mel(batch["waveform"])[..., :48] - 2.0) / 2.0)
    batch["audio_present"][1] = False
    out = pre(batch, ("audio",))
    assert set(out) == {"audio", "audio_lengths"} and out["audio_lengths"].tolist() == [48, 0, 48, 48]
    with pytest.raises(ValueError, match="subset"):
        pre(batch, ("text",))
    assert math.isfinite(float(out["audio"].abs().max()))
