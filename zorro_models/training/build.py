"""Builders shared by training, evaluation, the demo and the benchmarks: the model, the task (model + heads + loss),
the input pipeline and the datasets of a :class:`~zorro_models.training.config.Config`, with every size the data needs
read from the model; and a stored run loaded back (:func:`load_run`).

    task = build_task(cfg)                 # ContrastiveTask or SupervisedTask; task.model is the backbone
    cfg, task, ckpt = load_run("runs/x")   # the run's config (plus overrides) and its latest checkpoint's weights
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import AVPreprocessor, ClipDataset, SyntheticAVConfig, SyntheticAVDataset, collate
from ..data.audio import LogMelSpectrogram
from ..models.registry import create_model, preset_lr
from .checkpoint import (
    MANIFEST,
    STATE,
    WEIGHTS,
    CheckpointError,
    check_checkpoint,
    latest_checkpoint,
    load_weights,
    stored_config,
)
from .config import DEFAULT_LR, Config, apply_overrides, data_workers, from_dict
from .tasks import TASKS, ContrastiveTask, SupervisedTask

__all__ = [
    "build_model",
    "with_resolved_lr",
    "build_task",
    "build_preprocessor",
    "build_dataset",
    "eval_loader",
    "num_classes_of",
    "resolve_checkpoint",
    "load_run",
    "SPLITS",
]

# split seeds of the synthetic dataset, offset from data.seed so that no two splits share a clip
SPLITS = {"train": 1, "val": 2, "probe_train": 3, "probe_test": 4}


# ------------------------------------------------------------------------------------------------ building blocks
def build_model(cfg: Config) -> nn.Module:
    """``create_model(cfg.model.name, mask=cfg.model.mask, **cfg.model.kwargs)``."""
    if "mask" in cfg.model.kwargs:
        raise ValueError(f"set the mask with model.mask={cfg.model.kwargs['mask']}, not in model.kwargs")
    return create_model(cfg.model.name, mask=cfg.model.mask, **cfg.model.kwargs)


def with_resolved_lr(cfg: Config) -> Config:
    """``cfg`` with ``optim.lr`` a number: as set, else the model preset's learning rate, else ``DEFAULT_LR`` (a copy;
    ``cfg`` is not changed)."""
    if cfg.optim.lr is not None:
        return cfg
    lr = preset_lr(cfg.model.name)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=DEFAULT_LR if lr is None else lr))


def build_task(cfg: Config, model: Optional[nn.Module] = None, dataset: Optional[Dataset] = None) -> nn.Module:
    """The module ``cfg.train.task`` trains: :class:`~zorro_models.training.tasks.ContrastiveTask` or
    :class:`~zorro_models.training.tasks.SupervisedTask` around ``model`` (default: :func:`build_model`).

    A supervised task takes its class count and multi-label flag from ``dataset`` (default: the training split).
    """
    t = cfg.train
    if t.task not in TASKS:
        raise ValueError(f"train.task must be one of {list(TASKS)}, got {t.task!r}")
    model = build_model(cfg) if model is None else model
    if t.task == "contrastive":
        return ContrastiveTask(model, t.pairs, t.proj_dim, t.temperature)
    dataset = build_dataset(cfg, model, "train") if dataset is None else dataset
    return SupervisedTask(
        model, num_classes_of(dataset), t.supervised_outputs, bool(getattr(dataset, "multi_label", False))
    )


def build_preprocessor(cfg: Config, model) -> AVPreprocessor:
    """The log-mel front-end and input normalisation of ``cfg.data``, with the mel bins and frame count the model
    expects."""
    a = cfg.data.audio
    mel = LogMelSpectrogram(
        a.sample_rate, a.n_fft, a.hop_length, a.win_length, model.audio_embed.n_mels, a.f_min, a.f_max, a.log_offset
    )
    need = mel.num_frames(int(round(a.sample_rate * cfg.data.duration)))
    if need < model.audio_embed.patch[1]:
        raise ValueError(
            f"data.duration={cfg.data.duration} s at hop {a.hop_length} gives {need} spectrogram frames, "
            f"fewer than one audio patch ({model.audio_embed.patch[1]} frames)"
        )
    return AVPreprocessor(mel, model.audio_embed.max_frames, a.mean, a.std, cfg.data.video_mean, cfg.data.video_std)


def _video_size(model) -> tuple[int, int]:
    v = model.video_embed
    return v.num_frames, v.img_size


def build_dataset(cfg: Config, model, split: str) -> Dataset:
    """The dataset of ``split`` (``"train"``, ``"val"``, ``"probe_train"``, ``"probe_test"``) shaped for ``model``.

    Synthetic data: ``train`` has ``data.train_size`` clips, ``val`` ``data.val_size``, the probe splits
    ``probe.train_size`` / ``probe.test_size``, each from its own seed. Clips: ``train`` and ``probe_train`` read
    ``data.train_csv``, ``val`` and ``probe_test`` read ``data.val_csv``.
    """
    d = cfg.data
    frames, (h, w) = _video_size(model)
    if d.kind == "synthetic":
        if h != w:
            raise ValueError(f"the synthetic data renders square frames; the model wants {h}x{w}")
        size = {
            "train": d.train_size,
            "val": d.val_size,
            "probe_train": cfg.probe.train_size,
            "probe_test": cfg.probe.test_size,
        }[split]
        sc = SyntheticAVConfig(
            num_classes=d.synthetic.num_classes,
            num_frames=frames,
            image_size=h,
            sample_rate=d.audio.sample_rate,
            duration=d.duration,
            audio_dropout=d.synthetic.audio_dropout,
            video_dropout=d.synthetic.video_dropout,
            distractor_prob=d.synthetic.distractor_prob,
        )
        return SyntheticAVDataset(size, sc, seed=d.seed * 16 + SPLITS[split])
    if d.kind == "clips":
        csv = d.train_csv if split in ("train", "probe_train") else d.val_csv
        if csv is None:
            raise ValueError(
                f"data.kind=clips needs data.{'train' if split in ('train', 'probe_train') else 'val'}"
                f"_csv for the {split!r} split"
            )
        if h != w:
            raise ValueError(f"clips are resized to square frames; the model wants {h}x{w}")
        classes = None
        if split != "train" and d.train_csv is not None:  # class indices must agree with training
            classes = ClipDataset(d.train_csv, root=d.root, multi_label=d.multi_label).classes
        return ClipDataset(
            csv,
            num_frames=frames,
            image_size=h,
            sample_rate=d.audio.sample_rate,
            duration=d.duration,
            root=d.root,
            classes=classes,
            multi_label=d.multi_label,
            on_error=d.on_error,
        )
    raise ValueError(f"data.kind must be 'synthetic' or 'clips', got {d.kind!r}")


def num_classes_of(dataset) -> int:
    return int(dataset.num_classes)


def eval_loader(cfg: Config, dataset: Dataset) -> DataLoader:
    """Sequential batches of ``probe.batch_size`` (no shuffle, last batch kept) for evaluation and probes."""
    return DataLoader(
        dataset, batch_size=cfg.probe.batch_size, shuffle=False, num_workers=data_workers(cfg), collate_fn=collate
    )


# ------------------------------------------------------------------------------------------------ stored runs
def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """``path`` if it is a checkpoint folder (whose weights and state pass their checksums), else the newest intact
    checkpoint of the run folder ``path``. Raises :class:`~zorro_models.training.checkpoint.CheckpointError` naming
    the damaged file, or saying why each of a run's checkpoints was passed over."""

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (give a run folder or one of its checkpoints/step_* folders)")
    if any((p / f).exists() for f in (STATE, WEIGHTS, MANIFEST)):
        check_checkpoint(p)
        return p
    skipped = []
    ckpt = latest_checkpoint(p, skipped)
    if ckpt is None and skipped:
        raise CheckpointError(f"{path} holds no intact checkpoint: {'; '.join(skipped)}")
    if ckpt is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    return ckpt


def load_run(
    path: Union[str, Path], overrides: Sequence[str] = (), say: Optional[Callable[[str], object]] = None
) -> tuple[Config, nn.Module, Path]:
    """A stored run back in memory: ``(cfg, task, checkpoint)``.

    ``path`` is a run folder (its newest intact checkpoint) or a checkpoint folder; ``cfg`` is the config stored with
    the checkpoint (or, when that copy is damaged, another copy of the run's: ``say`` gets a line naming the damaged
    one; default: a RuntimeWarning) plus ``overrides`` (``section.key=value``); ``task`` is :func:`build_task` with
    the checkpoint's weights (on CPU, in train mode). A file that cannot be read is named in the error.
    """

    ckpt = resolve_checkpoint(path)
    notes = []
    stored, source = stored_config(ckpt, notes)
    for line in notes:
        if say is None:
            warnings.warn(line, RuntimeWarning, stacklevel=2)
        else:
            say(line)
    cfg = apply_overrides(from_dict(Config, stored, where=str(source)), overrides)
    model = build_model(cfg)
    task = build_task(cfg, model, build_dataset(cfg, model, "val") if cfg.train.task == "supervised" else None)
    load_weights(task, ckpt)
    return cfg, task, ckpt
