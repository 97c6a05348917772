"""Training: contrastive pre-training and supervised training / fine-tuning of Zorro models, one process or many.

    python -m zorro_models.train --config run.yaml train.steps=1000 optim.lr=3e-4
    torchrun --nproc_per_node=4 -m zorro_models.train --config run.yaml          # DDP, one process per device

Pipeline per step: a global batch of ``train.batch_size`` clips is split over the ranks (a
:class:`ResumableSampler` shards an epoch-seeded permutation) and over ``train.grad_accum`` micro-batches; each
micro-batch goes through :class:`~zorro_models.data.AVPreprocessor` (log-mel, normalisation, missing modalities),
the task module (model + heads + loss; bf16 autocast on CUDA), backward; then gradient clipping, AdamW and the
warm-up + cosine schedule.

Contrastive task: projections of the paired outputs are gathered from every rank *with gradients*
(:func:`~zorro_models.training.distributed.gather_with_grad`), so each rank computes the InfoNCE of the whole global
(micro-)batch; with DDP's gradient averaging the update equals one process training on the global batch. Supervised
task: a classifier per output, cross-entropy (or BCE for multi-label data) averaged over the outputs.

Only rank 0 writes: checkpoints (:mod:`zorro_models.training.checkpoint`), ``metrics.jsonl``, ``config.yaml`` and the
training-curve plot, all under ``train.out``; when its checkpoint write or validation fails, every rank raises (see
:func:`~zorro_models.training.distributed.on_main_rank`), as every rank does when one rank's clip raises
(``data.on_error=raise``). ``train.resume=true`` continues from the latest checkpoint there exactly
as the uninterrupted run would have (same data order, optimizer and scheduler state, RNG).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..data import collate
from ..utils.reporting import MetricsLogger, plot_training_curves, read_metrics
from .build import build_dataset, build_model, build_preprocessor, build_task, eval_loader, with_resolved_lr
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    stored_config,
)
from .config import (
    Config,
    config_to_yaml,
    data_workers,
    machine_threads,
    save_config,
)
from .distributed import DistEnv, fail_together, init_distributed, on_main_rank
from .evaluate import evaluate_heads
from .runlock import RunLock

__all__ = [
    "Trainer",
    "ResumableSampler",
    "warmup_cosine",
    "param_groups",
    "run_training",
    "progress_line",
    "summary_line",
    "RESUMABLE_CHANGES",
    "RUN_FILES",
    "run_contents",
    "config_changes",
    "UNREADABLE_SHARE",
    "UNREADABLE_WINDOW",
    "ClipLedger",
    "CollapseWatch",
]

#: What a run writes into ``train.out`` (``train.overwrite=true`` deletes these and nothing else).
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "config.yaml",
    "resumes.jsonl",
    "training_curves.png",
    "eval.json",
    "eval.png",
)
#: Settings a resumed run may change (a key, or a whole section): how long it runs, how often and where it writes,
#: where the files are, what it evaluates with — not what it learns. Any other change is refused. A longer
#: ``train.steps`` stretches the cosine schedule from the resumed step on. Every config key is reviewed against this
#: list by tests/test_run_safety.py: a key added here, or to the config, needs that review too.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.resume",
    "train.overwrite",
    "train.out",
    "train.init_from",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.progress",
    "train.plot",
    "train.device",
    "data.num_workers",
    "data.root",
    "data.val_csv",
    "data.val_size",
    "probe",
)
#: Training stops when at least this share of the last ``UNREADABLE_WINDOW`` clips, or of an epoch's clips, could not
#: be read: a clip list that is mostly unreadable is a broken setup, not bad luck (and one that is all unreadable
#: would otherwise loop forever, skipping every batch).
UNREADABLE_SHARE = 0.5
UNREADABLE_WINDOW = 256


def run_contents(out: Path) -> list[str]:
    """What of a run ``out`` holds (empty: no run there), e.g. ``["checkpoints (newest step_00000004)",
    "metrics.jsonl"]``."""
    found = []
    for name in RUN_FILES:
        path = out / name
        if name == "checkpoints" and path.is_dir():
            steps = sorted(p.name for p in path.glob("step_*"))
            if steps or any(path.iterdir()):
                found.append(f"checkpoints (newest {steps[-1]})" if steps else "checkpoints")
        elif path.exists():
            found.append(name)
    return found


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model.kwargs":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(stored: dict, cfg: Config) -> dict:
    """``{key: [stored value, new value]}`` for the settings ``cfg`` changes relative to a run's ``stored`` config (a
    plain dict, as read from its ``config.yaml``). Raises ValueError naming every change outside
    :data:`RESUMABLE_CHANGES`. Keys only one side knows (settings added or removed since) are not compared."""
    old, new = _flat(stored), _flat(yaml.safe_load(config_to_yaml(cfg)))
    changes = {k: [old[k], new[k]] for k in new if k in old and old[k] != new[k]}
    refused = {k: v for k, v in changes.items() if not any(k == a or k.startswith(a + ".") for a in RESUMABLE_CHANGES)}
    if refused:
        what = ", ".join(f"{k}={a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(
            f"train.resume: cannot change {what}: that alters the run (a resumed run may change only "
            f"{', '.join(RESUMABLE_CHANGES)}); start a new run in another train.out, or start over "
            f"with train.overwrite=true"
        )
    return changes


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up ``(step + 1) / warmup`` for the first ``warmup`` steps,
    then a cosine from 1 down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weights of the linear maps only; not biases, norms, position embeddings, learned
    tokens, latents and queries, relative-position tables or the temperature (decaying those only shrinks them towards
    arbitrary values).

    The rule reads the module type, not parameter names or shapes: a name list missed HiP's ``*_latents`` and Swin's
    ``rel_tables``, which are 2-D and 3-D."""
    linear = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if id(p) in linear else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ResumableSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` (epoch-seeded shuffle, rank ``r`` takes positions ``r::W``)
    that can start part-way through an epoch, so a resumed run reads exactly the clips the uninterrupted run would.

    With a per-rank batch of ``b``, step ``s`` of an epoch reads positions ``[s*W*b, (s+1)*W*b)`` of the permutation
    across all ranks together — the same clips one process with batch ``W*b`` reads at step ``s``.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Begin epoch ``epoch`` at this rank's ``start``-th index."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Builds everything from a :class:`~zorro_models.training.config.Config` and runs :meth:`fit`.

    Attributes after construction: ``model`` (the backbone), ``task`` (model + heads + loss), ``preprocess``,
    ``optimizer``, ``scheduler``, ``step`` (optimizer steps done), ``env`` (:class:`DistEnv`), ``out`` (run folder),
    ``clips`` (:class:`ClipLedger`: the clips skipped, and the decisions on unreadable ones, the same on every rank).
    """

    def __init__(self, cfg: Config, env: Optional[DistEnv] = None):
        # the learning rate as a number before anything compares or records the config (a resume's check, config.yaml)
        self.cfg = cfg = with_resolved_lr(cfg)
        t = cfg.train
        if t.task not in ("contrastive", "supervised"):
            raise ValueError(f"train.task must be 'contrastive' or 'supervised', got {t.task!r}")
        if t.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', got {t.amp!r}")
        if t.grad_accum < 1 or t.steps < 0 or t.batch_size < 1:
            raise ValueError(
                f"need train.batch_size >= 1, train.grad_accum >= 1 and train.steps >= 0, got "
                f"{t.batch_size}, {t.grad_accum} and {t.steps}"
            )
        if t.resume and t.overwrite:
            raise ValueError("train.resume and train.overwrite exclude each other: continue the run or start over")
        if t.eval_every > 0 and t.task != "supervised":
            raise ValueError(
                "train.eval_every is for supervised runs (validation accuracy / mAP of the heads); "
                "evaluate contrastive checkpoints with linear probes: zorro eval RUN"
            )
        threads = machine_threads() if t.threads is None else t.threads
        if threads > 0:
            torch.set_num_threads(threads)
        self.env = env or init_distributed(t.device)
        world = self.env.world_size
        if t.batch_size % (world * t.grad_accum) != 0:
            raise ValueError(
                f"train.batch_size={t.batch_size} must be divisible by world_size x grad_accum = "
                f"{world} x {t.grad_accum}"
            )
        self.micro_batch = t.batch_size // (world * t.grad_accum)
        self.device = self.env.device
        self.out = Path(t.out)
        self._lock, self._owned = None, False
        self._take_lock()
        try:
            self._build()
        except BaseException:
            self.close()  # a Trainer that failed to build never holds its folder
            raise

    def _take_lock(self) -> None:
        """Rank 0 takes the run folder's lock (:class:`~zorro_models.training.runlock.RunLock`) before anything
        reads or writes the run; when another process owns it, every rank raises with the line naming the owner."""
        what = f"train.out={self.out}"
        self._lock = on_main_rank(self.env, lambda: RunLock.acquire(self.out, what=what, say=self._say), what)
        self._owned = True  # on every rank alike (only rank 0 holds a lock), so every rank takes the same path

    def close(self) -> None:
        """Release the run folder (its lock), as :meth:`fit` does when it ends; idempotent."""
        lock, self._lock, self._owned = getattr(self, "_lock", None), None, False
        if lock is not None:
            lock.release()

    def _build(self) -> None:
        cfg, t, world = self.cfg, self.cfg.train, self.env.world_size
        ckpt = self._claim_run_folder()
        use_amp = t.amp == "bf16" or (t.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_amp else None

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg)
        self.train_set = build_dataset(cfg, self.model, "train")
        self.task = build_task(cfg, self.model, self.train_set).to(self.device)
        self.preprocess = build_preprocessor(cfg, self.model).to(self.device)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.task, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.steps, o.warmup_steps, o.min_lr_ratio)
        )
        self.sampler = ResumableSampler(self.train_set, world, self.env.rank, shuffle=True, seed=t.seed)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.clips = ClipLedger(dist.all_reduce if self.env.distributed else None, self.device)
        self._val_set = None
        self._log_window = []

        if ckpt is not None:
            state = load_checkpoint(ckpt, self.task, self.optimizer, self.scheduler, verified=True)
            self.step = state["step"]
            self.epoch = state["extra"]["epoch"]
            self.batch_in_epoch = state["extra"]["batch_in_epoch"]
            self.clips.skipped = state["extra"].get("skipped", 0)
            self.clips.dropped = state["extra"].get("dropped", 0)
            self._log_window = list(state["extra"].get("log_window", []))
            self._say(
                f"resumed from {ckpt} at step {self.step}"
                + "".join(f"; {k}: {a!r} -> {b!r}" for k, (a, b) in self.resume_changes.items() if k != "train.resume")
            )
        elif t.resume:
            self._say(f"train.resume: no intact checkpoint in {self.out / 'checkpoints'}; starting from step 0")
        if ckpt is None and t.init_from:
            load_weights(self.task.model, t.init_from, prefix="model.")
            self._say(f"backbone initialised from {t.init_from}")
        self.ddp = self.task
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.task, device_ids=ids)
        self.logger = MetricsLogger(self.out / "metrics.jsonl") if self.env.is_main else None

    def _claim_run_folder(self) -> Optional[Path]:
        """Before anything is built: refuse a ``train.out`` that holds a run unless resuming or overwriting; when
        resuming, find the newest intact checkpoint (saying which it skipped) and refuse config changes that alter
        the run. Returns the checkpoint to resume from, or None."""
        t = self.cfg.train
        self.resume_changes, self._overwrite = {}, []
        existing = run_contents(self.out)
        if existing and not t.resume:
            if not t.overwrite:
                raise FileExistsError(
                    f"train.out={self.out} already holds a run ({', '.join(existing)}); continue it with "
                    f"train.resume=true (zorro train --resume), start over with train.overwrite=true (zorro train "
                    f"--overwrite; deletes that run), or choose another train.out"
                )
            self._overwrite = existing  # deleted by rank 0 when training starts
        if not t.resume:
            return None
        skipped = []
        ckpt = latest_checkpoint(self.out, skipped)
        for line in skipped:
            self._say(f"train.resume: {line}")
        if ckpt is not None:
            # the config the checkpoint was saved under (else another intact copy of the run's): what a resume may
            # not change is judged against it; with none readable, refuse rather than resume unchecked or start over
            notes = []
            try:
                stored, _ = stored_config(ckpt, notes)
            except CheckpointError as e:
                raise CheckpointError(
                    f"train.resume: {ckpt} is intact but {e}; without the run's configuration the resume cannot "
                    f"check that it continues the same run, so nothing was changed: restore a config.yaml (the "
                    f"run's, or any checkpoint's copy), or start over with train.overwrite=true"
                ) from None
            for line in notes:
                self._say(f"train.resume: {line}")
            self.resume_changes = config_changes(stored, self.cfg)
        return ckpt

    def _open_run(self) -> None:
        """Rank 0, before the first step: delete the run ``train.overwrite`` replaces, drop the metric records of
        steps a resumed run redoes (logged after its checkpoint, before the crash), note the resume in
        ``resumes.jsonl`` (step, changed settings), write ``config.yaml``."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self._overwrite:
            for name in RUN_FILES:
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            self._say(f"train.overwrite: deleted the run in {self.out} ({', '.join(self._overwrite)})")
            self._overwrite = []
        if self.cfg.train.resume:
            dropped = _drop_metrics_after(self.out / "metrics.jsonl", self.step)
            if dropped:
                self._say(
                    f"train.resume: dropped {dropped} metric record(s) of steps after {self.step} from "
                    f"metrics.jsonl (those steps are trained again)"
                )
            MetricsLogger(self.out / "resumes.jsonl").log(
                {
                    "step": self.step,
                    "changed": {k: v for k, v in self.resume_changes.items() if k != "train.resume"},
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
        save_config(self.cfg, self.out / "config.yaml")

    #: the tag of this run's lines (``[zorro] step 20/200 ...``); a caller running several runs in one process (the
    #: demo, the ablation grid) names each run by its mask or cell instead
    label: str = "zorro"

    def _say(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[{self.label}] {msg}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------------------------------------- data
    def _loader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=data_workers(self.cfg),
            collate_fn=collate,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    @property
    def skipped(self) -> int:
        """Training clips passed over so far, over all ranks (see :class:`ClipLedger`)."""
        return self.clips.skipped

    def batches(self) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch, starting at the saved position; batches whose every clip
        failed to decode (on any rank) are counted and passed over by every rank."""
        if len(self.sampler) // self.micro_batch == 0 and self.batch_in_epoch == 0:
            raise ValueError(
                f"the training set ({len(self.train_set)} clips) is smaller than one global micro-batch "
                f"({self.micro_batch} x {self.env.world_size} ranks)"
            )
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * self.micro_batch)
            self.clips.start_epoch()
            loader = iter(self._loader())
            while True:
                batch, error = {"size": 0, "num_skipped": 0}, None
                try:
                    batch = next(loader)
                except StopIteration:  # every rank at the same micro-batch: their shards are equally long
                    break
                except Exception as e:  # noqa: BLE001 - a raising clip (data.on_error=raise): every rank stops with it
                    error = e
                self.batch_in_epoch += 1
                if self.clips.admit(batch["size"], batch["num_skipped"], error):
                    yield batch
            self.clips.end_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0

    # -------------------------------------------------------------------------------------------- steps
    def _micro_step(self, batch: dict, last: bool):
        inputs = self.preprocess(batch)
        target = batch["label"].to(self.device, non_blocking=True)
        sync = last or not self.env.distributed
        ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
        with ctx:
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
            ):
                loss, logs = self.ddp(inputs, target)
            (loss / self.cfg.train.grad_accum).backward()
        return loss.detach(), logs

    def train_step(self, data: Iterator[dict]) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the step's logs (tensors)."""
        accum = self.cfg.train.grad_accum
        losses, logs = [], {}
        for k in range(accum):
            loss, lg = self._micro_step(next(data), last=k == accum - 1)
            losses.append(loss)
            for key, v in lg.items():
                logs[key] = logs.get(key, 0) + v / accum
        clip = self.cfg.optim.clip_grad_norm
        if clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.task.parameters(), clip).detach()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        logs["loss"] = torch.stack(losses).mean()
        return logs

    def _reduce(self, logs: dict) -> dict:
        """Average logged scalars over ranks (a collective: every rank calls it at the same steps)."""
        keys = sorted(logs)
        vec = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=self.device).reshape(()) for k in keys])
        if self.env.distributed:
            dist.all_reduce(vec)
            vec /= self.env.world_size
        return dict(zip(keys, vec.tolist()))

    def validate(self) -> Optional[dict]:
        """Supervised runs: score the heads on the validation split under each input regime (rank 0 evaluates, the
        others wait; when it fails, every rank raises); logged as ``{"split": "val", "step": ..., "<regime>/<head>":
        metric}``. Returns the scores on rank 0, None elsewhere."""

        def evaluate() -> dict:
            if self._val_set is None:
                self._val_set = build_dataset(self.cfg, self.model, "val")
            scores = evaluate_heads(
                self.task.model,
                self.task.heads,
                self.preprocess,
                eval_loader(self.cfg, self._val_set),
                multi_label=self.task.multi_label,
                amp_dtype=self.amp_dtype,
                progress=lambda line: self._say(f"validating at step {self.step}: {line}"),
            )
            self.task.train()
            self.logger.log(
                {"split": "val", "step": self.step, **{f"{r}/{h}": v for r, d in scores.items() for h, v in d.items()}}
            )
            return scores

        return on_main_rank(self.env, evaluate, f"validating at step {self.step}")

    def save(self) -> Optional[Path]:
        """Checkpoint the current state (rank 0 writes; every rank returns after the write, or raises when it
        failed)."""
        window = self._log_window_state()
        return on_main_rank(
            self.env,
            lambda: save_checkpoint(
                self.out,
                self.step,
                self.task,
                self.optimizer,
                self.scheduler,
                extra={
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "skipped": self.clips.skipped,
                    "dropped": self.clips.dropped,
                    "log_window": window,
                },
                config_yaml=config_to_yaml(self.cfg),
                keep=self.cfg.train.keep_checkpoints,
            ),
            f"writing the checkpoint of step {self.step}",
        )

    def _log_window_state(self) -> list:
        """The logs of the steps since the last logged one, averaged over the ranks (a collective: every rank saves
        at the same steps), as floats: what :meth:`fit` averages into the next record. One process: the very values
        it would average, so the record of a resumed run is bitwise the uninterrupted run's."""
        if not self._log_window:
            return []
        keys = sorted(self._log_window[0])
        rows = torch.stack(
            [
                torch.stack([torch.as_tensor(w[k], dtype=torch.float32, device=self.device).reshape(()) for k in keys])
                for w in self._log_window
            ]
        )
        if self.env.distributed:
            dist.all_reduce(rows)
            rows /= self.env.world_size
        return [dict(zip(keys, row)) for row in rows.tolist()]

    def _collapse_watch(self) -> Optional["CollapseWatch"]:
        """The watch on the logged loss and gradient norm (:class:`CollapseWatch`): chance is ``ln(global batch)``
        for the contrastive loss (per micro-batch: its projections are gathered over the ranks), ``ln(classes)`` for
        single-label cross-entropy; multi-label BCE has no such level, only the gradient is watched."""
        t = self.cfg.train
        after = max(self.cfg.optim.warmup_steps, t.log_every)
        if t.task == "contrastive":
            return CollapseWatch(self.micro_batch * self.env.world_size, "InfoNCE over the batch", after=after)
        classes = 1 if self.task.multi_label else self.task.heads.num_classes
        return CollapseWatch(classes, f"cross-entropy over {classes} classes", after=after)

    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train until ``train.steps`` optimizer steps (or ``stop_at``, for tests that interrupt a run), checkpoint,
        and return ``{"step", "loss", "seconds", "checkpoint", "skipped"}``. The run folder's lock is released when
        it returns or raises (and taken again by a later call)."""
        if not self._owned:
            self._take_lock()
        try:
            return self._fit(stop_at)
        finally:
            self.close()

    def _fit(self, stop_at: Optional[int]) -> dict:
        t = self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        on_main_rank(self.env, self._open_run, f"preparing train.out={self.out}")
        self.task.train()
        data = self.batches()
        bar = None
        if t.progress and self.env.is_main:
            from tqdm.auto import tqdm

            # disable=None: a bar on terminals, nothing in logs and CI output (where it would be a wall of \r lines)
            bar = tqdm(
                total=t.steps,
                initial=self.step,
                desc=f"{t.task} {self.cfg.model.mask}",
                dynamic_ncols=True,
                leave=False,
                disable=None,
            )
        # the logs since the last logged step, carried by checkpoints: a resumed run averages the same steps
        start, window, last, first = time.perf_counter(), self._log_window, {}, self.step
        warned = self.skipped
        watch = self._collapse_watch()
        while self.step < end:
            logs = self.train_step(data)
            window.append(logs)
            if bar is not None:
                bar.update(1)
            if t.log_every > 0 and (self.step % t.log_every == 0 or self.step == end):
                avg = {k: sum(torch.as_tensor(w[k]).float() for w in window) / len(window) for k in window[0]}
                last = self._reduce(avg)
                last.update(
                    step=self.step,
                    lr=self.scheduler.get_last_lr()[0],
                    skipped=self.skipped,
                    seconds=round(time.perf_counter() - start, 3),
                )
                if self.logger is not None:
                    self.logger.log(last)
                if bar is not None and not bar.disable:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                elif bar is not None:  # not a terminal (a log file, CI): a line per logged step instead of a bar
                    print(
                        progress_line(
                            self.step - first,
                            end - first,
                            self.step,
                            end,
                            last["loss"],
                            time.perf_counter() - start,
                            label=self.label,
                        ),
                        flush=True,
                    )
                window = self._log_window = []
                alarm = watch.update(self.step, last["loss"], last.get("grad_norm")) if watch else None
                if alarm:
                    self._say(f"warning: {alarm}")
                if self.skipped > warned:
                    warnings.warn(self.clips.summary(), RuntimeWarning, stacklevel=2)
                    warned = self.skipped
            if t.eval_every > 0 and self.step % t.eval_every == 0:
                self.validate()
            if t.ckpt_every > 0 and self.step % t.ckpt_every == 0 and self.step < end:
                self.save()
        if bar is not None:
            bar.close()
        path = self.save()
        if self.env.is_main and t.plot and (self.out / "metrics.jsonl").exists():
            plot_training_curves(
                {self.cfg.model.mask: read_metrics(self.out / "metrics.jsonl")},
                self.out / "training_curves.png",
                keys=("loss", "lr"),
                title=f"{t.task} training ({self.cfg.model.name})",
            )
        return {
            "step": self.step,
            "loss": last.get("loss"),
            "seconds": round(time.perf_counter() - start, 3),
            "checkpoint": str(path) if path else None,
            "skipped": self.skipped,
        }


def progress_line(done: int, todo: int, step: int, end: int, loss: float, seconds: float, label: str = "zorro") -> str:
    """``[zorro] step 20/200  loss 4.084  2.91 it/s  ETA 62 s``: ``done`` of this run's ``todo`` steps took
    ``seconds``."""
    rate = done / seconds if seconds > 0 else float("nan")
    eta = (todo - done) / rate if done else float("nan")
    eta_text = "?" if math.isnan(eta) else f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min"
    return f"[{label}] step {step}/{end}  loss {loss:.3f}  {rate:.2f} it/s  ETA {eta_text}"


def summary_line(summary: dict) -> str:
    """The last line of a run: ``[zorro] done: step 200, loss 4.084, checkpoint ...`` (the :meth:`Trainer.fit`
    summary)."""
    loss = "n/a" if summary["loss"] is None else f"{summary['loss']:.3f}"
    return f"[zorro] done: step {summary['step']}, loss {loss}, checkpoint {summary['checkpoint']}"


class ClipLedger:
    """Counts of the training clips read and unreadable, the same on every rank, and the data decisions taken from
    them: whether to train on a micro-batch, and whether to stop because too many clips were unreadable.

    Under DDP every rank must take the same decision at the same micro-batch: a rank that stops alone leaves the
    others waiting in their next gradient all-reduce until the process group times out (a hang, not the error), and a
    rank that skips a micro-batch alone averages its gradients with the others' next micro-batch and moves its data
    position ahead of theirs. So each micro-batch's counts are summed over the ranks first, by ``all_reduce`` (an
    in-place sum over the ranks, :func:`torch.distributed.all_reduce`, of a tensor on ``device``); with
    ``all_reduce=None`` (one process) the counts are this process's and no collective is called. The same sum carries
    whether a rank could not read its micro-batch at all (an exception: a clip with ``data.on_error=raise``): then
    every rank raises, through ``fail_together`` (:func:`~zorro_models.training.distributed.fail_together`).
    """

    def __init__(
        self,
        all_reduce: Optional[Callable[[torch.Tensor], object]] = None,
        device: Optional[torch.device] = None,
        fail_together: Callable[[Optional[BaseException], str], object] = fail_together,
    ):
        self.all_reduce, self.device, self.fail_together = all_reduce, device, fail_together
        self.skipped = 0  # clips not trained on, over all ranks: the unreadable ones and the dropped ones
        self.dropped = 0  # readable clips of micro-batches that another rank could not fill (skipped too)
        self._recent = collections.deque()  # (clips, unreadable) of the last batches, UNREADABLE_WINDOW clips or more
        self._epoch = [0, 0]  # clips, unreadable in this (part of an) epoch

    def start_epoch(self) -> None:
        self._epoch = [0, 0]

    def admit(self, size: int, num_skipped: int, error: Optional[BaseException] = None) -> bool:
        """Count a micro-batch of ``size`` readable and ``num_skipped`` unreadable clips on this rank (all ranks
        call this at the same micro-batch), or the ``error`` that reading it raised; raise that error (on every rank)
        or if too many clips were unreadable; return whether to train on the micro-batch."""
        counts = [size + num_skipped, num_skipped, int(size == 0), int(error is not None)]
        if self.all_reduce is not None:
            vec = torch.tensor(counts, dtype=torch.int64, device=self.device)
            self.all_reduce(vec)
            counts = vec.tolist()
        clips, bad, empty, failed = counts
        if failed and self.all_reduce is None:
            raise error
        if failed:
            self.fail_together(error, "reading its training clips")
        # A micro-batch that some rank could not fill at all is skipped on every rank: the other ranks' readable clips
        # of it are dropped with it, and counted as skipped (one process: an empty batch has none to drop).
        dropped = clips - bad if empty else 0
        self.skipped += bad + dropped
        self.dropped += dropped
        self._epoch = [self._epoch[0] + clips, self._epoch[1] + bad]
        self._recent.append((clips, bad))
        while sum(n for n, _ in self._recent) - self._recent[0][0] >= UNREADABLE_WINDOW:
            self._recent.popleft()
        _check_unreadable(
            sum(n for n, _ in self._recent),
            sum(b for _, b in self._recent),
            UNREADABLE_WINDOW,
            self.skipped - self.dropped,
            "clips",
        )
        return not empty

    def end_epoch(self) -> None:
        """Raise if too many of this epoch's clips were unreadable (clip lists shorter than the window)."""
        _check_unreadable(*self._epoch, 1, self.skipped - self.dropped, "clips of this epoch")

    def summary(self) -> str:
        """The warning at a log step after clips were skipped."""
        if not self.dropped:
            return (
                f"{self.skipped} clip(s) could not be read and were skipped so far "
                f"(see the warnings above; training continues)"
            )
        return (
            f"{self.skipped} clip(s) were skipped so far: {self.skipped - self.dropped} could not be read (see "
            f"the warnings above) and {self.dropped} readable one(s) were dropped with a micro-batch that another "
            f"rank could not read at all (training continues)"
        )


def _check_unreadable(clips: int, bad: int, at_least: int, total: int, what: str) -> None:
    """Raise if at least ``at_least`` clips were read and :data:`UNREADABLE_SHARE` of them or more were unreadable."""
    if clips >= at_least and bad >= UNREADABLE_SHARE * clips:
        readable = "none" if bad == clips else f"only {clips - bad}"
        raise ValueError(
            f"{bad} of the last {clips} training {what} could not be read ({readable} could; {total} "
            f"unreadable in all): stopping, as at least {UNREADABLE_SHARE:.0%} unreadable means a "
            f"broken clip list or data.root, not bad luck (the skipping-clip warnings give causes)"
        )


def _drop_metrics_after(path: Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` without the records of steps after ``step`` (atomically); returns how many went."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):  # a torn last line from the crash
            continue
        if record_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    try:
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a full disk: no half-written copy stays behind, and the line names the file
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not rewrite {path} without the records after step {step}: {e.strerror}") from e
    return len(lines) - len(keep)


# ------------------------------------------------------------------------------------------------ entry point
def run_training(cfg: Config) -> dict:
    """Train with ``cfg`` in this process (joining the torchrun process group if there is one)."""
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return summary


class CollapseWatch:
    """Says, once per kind, when training has stopped learning — the two signatures of a collapsed run:

    - the loss **sits at the chance level** ``ln(n)``: the InfoNCE of embeddings that do not depend on the input is
      exactly ``ln(global batch)``, the cross-entropy of a classifier that ignores its input ``ln(classes)``;
    - the **gradient norm vanishes**: below ``vanish`` times the first one logged.

    A loss near ``ln(n)`` at initialisation is normal (a fresh classifier's logits are near zero), so the loss is judged
    only from step ``after`` on (the end of the warm-up), and only when ``patience`` logged values in a row sit within
    ``tolerance`` (relative) of ``ln(n)``: a collapsed run sits there to the third decimal, while a run that learns
    slowly near chance wanders by more. :meth:`update` takes each logged step and returns the warning line, or None.
    """

    def __init__(
        self,
        chance_n: int,
        what: str,
        *,
        after: int = 0,
        patience: int = 3,
        tolerance: float = 0.001,
        vanish: float = 1e-3,
    ):
        self.chance = math.log(chance_n) if chance_n > 1 else None
        self.chance_n, self.what = chance_n, what
        self.after, self.patience, self.tolerance, self.vanish = after, patience, tolerance, vanish
        self.at_chance = 0
        self.first_grad: Optional[float] = None
        self.said: set = set()

    def update(self, step: int, loss: float, grad_norm: Optional[float] = None) -> Optional[str]:
        lines = []
        if self.chance is not None and step >= self.after and math.isfinite(loss):
            self.at_chance = self.at_chance + 1 if abs(loss - self.chance) <= self.tolerance * self.chance else 0
            if self.at_chance >= self.patience and "loss" not in self.said:
                self.said.add("loss")
                lines.append(
                    f"the loss sits at {loss:.4f} = ln({self.chance_n}), chance for {self.what}: the outputs no "
                    f"longer depend on the input (collapsed; try a lower optim.lr)"
                )
        if grad_norm is not None and math.isfinite(grad_norm):
            if self.first_grad is None:
                self.first_grad = grad_norm
            elif grad_norm < self.vanish * self.first_grad and "grad" not in self.said:
                self.said.add("grad")
                lines.append(
                    f"the gradient norm vanished: {grad_norm:.2g} at step {step}, {self.first_grad:.2g} when "
                    f"training began (nothing is learning)"
                )
        return "; ".join(lines) or None
