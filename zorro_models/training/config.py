"""Run configuration: dataclasses, loadable from YAML, with ``section.key=value`` overrides from the command line.

    cfg = load_config("run.yaml", ["optim.lr=3e-4", "model.mask=full", "model.kwargs.depth=2"])
    cfg.to_dict()      # plain dict, stored in every checkpoint and in results.json

Every key is checked: an unknown section or field raises ValueError listing the valid ones, and values are converted to
the field's type (YAML syntax: ``true``, ``1e-3``, ``[audio, video]``, ``{depth: 2}``).

Sizes that belong to the model (frames, image size, mel bins, spectrogram frames) are not repeated here: the data
pipeline reads them from the model built by ``model.name`` + ``model.kwargs``, so the two can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = [
    "ModelConfig",
    "AudioConfig",
    "SyntheticConfig",
    "DataConfig",
    "OptimConfig",
    "DEFAULT_LR",
    "TrainConfig",
    "ProbeConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "from_dict",
    "config_to_yaml",
    "save_config",
    "machine_threads",
    "machine_workers",
    "data_workers",
    "add_config_args",
    "add_run_folder_args",
    "run_folder_overrides",
]


@dataclass
class ModelConfig:
    """``create_model(name, mask=mask, **kwargs)``.

    ``mask`` is one of :data:`~zorro_models.models.base.MASK_KINDS` (every family accepts each). ``kwargs`` holds the
    family's own settings (ViT ``depth``, Swin ``depths`` / ``video_window``, HiP ``latents`` / ``groups``, ...);
    the family checks them and an unknown one is an error listing the valid keywords."""

    name: str = "zorro_vit_demo"
    mask: str = "zorro"
    kwargs: dict = field(default_factory=dict)


@dataclass
class AudioConfig:
    """The log-mel front-end (:class:`~zorro_models.data.audio.LogMelSpectrogram`) and the spectrogram normalisation.
    ``n_mels`` comes from the model. Defaults suit the synthetic data (8 kHz, 1 s -> 65 frames of 16 ms hops)."""

    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 125
    win_length: Optional[int] = None
    f_min: float = 0.0
    f_max: Optional[float] = None
    log_offset: float = 1e-6
    mean: float = 2.0
    std: float = 2.0


@dataclass
class SyntheticConfig:
    """Classes and difficulty of the embedded dataset (:class:`~zorro_models.data.SyntheticAVConfig`; its frame count,
    image size, sample rate and duration come from the model and ``data.audio`` / ``data.duration``)."""

    num_classes: int = 8
    audio_dropout: float = 0.2
    video_dropout: float = 0.2
    distractor_prob: float = 0.5


@dataclass
class DataConfig:
    """Where clips come from.

    ``kind="synthetic"``: the embedded dataset; ``train_size`` / ``val_size`` clips from split seeds derived from
    ``seed``. ``kind="clips"``: CSV lists of video files (:mod:`zorro_models.data.clips`): ``train_csv``, ``val_csv``,
    paths relative to ``root`` (default: each CSV's folder). Both: ``duration`` seconds of audio per clip at
    ``audio.sample_rate``; frames per clip and image size come from the model. ``num_workers`` DataLoader processes
    (0: load in the training process; None: from the machine, :func:`machine_workers`).
    """

    kind: str = "synthetic"
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_size: int = 1_000_000
    val_size: int = 1024
    train_csv: Optional[str] = None
    val_csv: Optional[str] = None
    root: Optional[str] = None
    multi_label: Optional[bool] = None
    duration: float = 1.0
    on_error: str = "skip"
    num_workers: Optional[int] = None
    audio: AudioConfig = field(default_factory=AudioConfig)
    video_mean: float = 0.45
    video_std: float = 0.225


#: the learning rate of a run that sets no ``optim.lr``, for a preset that names none
DEFAULT_LR = 1e-3


@dataclass
class OptimConfig:
    """AdamW, linear warm-up to ``lr`` over ``warmup_steps`` then cosine decay to ``lr * min_lr_ratio`` at the last
    step; gradient-norm clipping (``clip_grad_norm <= 0`` disables it). ``lr`` None (the default): the model preset's
    learning rate where it names one (``zorro_swin_tiny``: 1e-4), else ``DEFAULT_LR``; the run's ``config.yaml``
    records the number used."""

    lr: Optional[float] = None
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    clip_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    """The training run.

    Attributes:
        task: ``"contrastive"`` (pre-training: InfoNCE between output pairs) or ``"supervised"`` (classifiers on the
            outputs; with ``init_from`` this is fine-tuning).
        steps: optimizer steps. batch_size: the global batch per step (split over ranks and ``grad_accum``
            micro-batches; must divide evenly).
        amp: ``"auto"`` (bf16 autocast on CUDA, off on CPU), ``"bf16"`` or ``"off"``.
        out: run folder (checkpoints, metrics.jsonl, plots). resume: continue from the newest intact checkpoint in
            ``out``. overwrite: start afresh in an ``out`` that holds a run, deleting that run (without ``resume`` or
            ``overwrite``, a run folder that holds a run is refused).
        init_from: a checkpoint (folder or ``model.safetensors``) whose backbone weights start the run.
        log_every / eval_every / ckpt_every: in steps; 0 = never (a checkpoint is always written at the end).
        keep_checkpoints: how many step checkpoints to keep (oldest deleted first).
        threads: ``torch.set_num_threads`` (0 = leave PyTorch's default; None = from the machine,
            :func:`machine_threads`).
        progress, plot: a tqdm progress bar on terminals, elsewhere a line per logged step (step, loss, it/s, ETA);
            a ``training_curves.png`` at the end (rank 0).
        pairs, temperature, proj_dim: contrastive loss settings (see :class:`~zorro_models.ZorroContrastiveLoss`).
        supervised_outputs: outputs that get a classifier (supervised task).
    """

    task: str = "contrastive"
    steps: int = 200
    batch_size: int = 64
    grad_accum: int = 1
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/zorro"
    resume: bool = False
    overwrite: bool = False
    init_from: Optional[str] = None
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    threads: Optional[int] = None
    progress: bool = True
    plot: bool = True
    pairs: list = field(default_factory=lambda: [["audio", "video"]])
    temperature: float = 0.1
    proj_dim: int = 64
    supervised_outputs: list = field(default_factory=lambda: ["audio", "video", "fusion", "global"])


@dataclass
class ProbeConfig:
    """Linear probes on frozen embeddings. Synthetic data: ``train_size`` clips fit the probes, ``test_size`` other
    clips score them (their own seeds). Clips: fitted on ``data.train_csv``, scored on ``data.val_csv`` (the sizes do
    not apply). Full-batch L-BFGS on standardised features with L2 ``weight_decay``; ``batch_size`` for embedding."""

    train_size: int = 2048
    test_size: int = 1024
    weight_decay: float = 1e-3
    max_iter: int = 200
    batch_size: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ machine defaults
def machine_threads() -> int:
    """Compute threads when ``train.threads`` is unset: one per two cores, at least 1. The data workers render or
    decode clips on the other cores; on a 2-core machine two compute threads contend with the worker and run several
    times slower than one (the measurement: BENCHMARKS.md, "Where the code's constants come from")."""
    return max(1, (os.cpu_count() or 2) // 2)


def machine_workers() -> int:
    """DataLoader processes when ``data.num_workers`` is unset: the cores the compute threads leave, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) - machine_threads()))


def data_workers(cfg: "Config") -> int:
    """``cfg.data.num_workers``, or :func:`machine_workers` when it is unset."""
    return machine_workers() if cfg.data.num_workers is None else cfg.data.num_workers


# ------------------------------------------------------------------------------------------------ dict <-> dataclass
def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tp(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (values in YAML syntax) and return a new, checked :class:`Config`."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                have = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"override {item!r}: no section {'.'.join(parts[: i + 1])!r}; valid: {have}")
            node = node[p]
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {'.'.join(parts[:-1])!r} is not a section")
        # dict-valued fields (model.kwargs) take new keys; dataclass sections are checked by from_dict below
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return from_dict(Config, data)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``--config YAML`` option and the ``section.key=value`` overrides (what :func:`load_config` takes), for
    every command that builds a run."""
    parser.add_argument("--config", help="YAML run configuration (sections model, data, optim, train, probe)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="settings in YAML syntax, e.g. train.steps=100 optim.lr=3e-4 model.mask=full",
    )


def add_run_folder_args(parser: argparse.ArgumentParser) -> None:
    """``--resume`` / ``--overwrite``: what to do with a ``train.out`` that already holds a run."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.out from its newest intact checkpoint (train.resume=true)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a train.out that holds a run, deleting that run (train.overwrite=true)",
    )


def run_folder_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides that ``--resume`` / ``--overwrite`` stand for."""
    return ["train.resume=true"] * bool(getattr(args, "resume", False)) + ["train.overwrite=true"] * bool(
        getattr(args, "overwrite", False)
    )


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    cfg = Config()
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        cfg = from_dict(Config, data, where=str(path))
    return apply_overrides(cfg, overrides)


def config_to_yaml(cfg: Config) -> str:
    """``cfg`` as YAML text (what :func:`load_config` reads back)."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def save_config(cfg: Config, path) -> None:
    """Write ``cfg`` as a YAML file (an OS error names the file: a full disk's write error alone does not)."""
    try:
        Path(path).write_text(config_to_yaml(cfg), encoding="utf-8")
    except OSError as e:
        raise OSError(e.errno, f"could not write {path}: {e.strerror}") from e


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
