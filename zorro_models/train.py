"""Training: contrastive pre-training and supervised training / fine-tuning of Zorro models, one process or many.

    python -m zorro_models.train --config run.yaml train.steps=1000 optim.lr=3e-4
    torchrun --nproc_per_node=4 -m zorro_models.train --config run.yaml          # DDP, one process per device

Pipeline per step: a global batch of ``train.batch_size`` clips is split over the ranks (a
:class:`ResumableSampler` shards an epoch-seeded permutation) and over ``train.grad_accum`` micro-batches; each
micro-batch goes through :class:`~zorro_models.data.AVPreprocessor` (log-mel, normalisation, missing modalities),
the task module (model + heads + loss; bf16 autocast on CUDA), backward; then gradient clipping, AdamW and the
warm-up + cosine schedule.

Contrastive task: projections of the paired outputs are gathered from every rank *with gradients*
(:func:`~zorro_models.distributed.gather_with_grad`), so each rank computes the InfoNCE of the whole global
(micro-)batch; with DDP's gradient averaging the update equals one process training on the global batch. Supervised
task: a classifier per output, cross-entropy (or BCE for multi-label data) averaged over the outputs.

Only rank 0 writes: checkpoints (:mod:`zorro_models.checkpoint`), ``metrics.jsonl``, ``config.yaml`` and the
training-curve plot, all under ``train.out``. ``train.resume=true`` continues from the latest checkpoint there exactly
as the uninterrupted run would have (same data order, optimizer and scheduler state, RNG).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .build import build_dataset, build_model, build_preprocessor, eval_loader, num_classes_of
from .checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .config import Config, config_to_yaml, data_workers, load_config, machine_threads, save_config
from .data import collate
from .distributed import DistEnv, all_gather_nograd, gather_with_grad, init_distributed
from .evaluate import evaluate_heads
from .heads import ContrastiveHeads, SupervisedHeads
from .layers import OUTPUTS
from .losses import SupervisedLoss, ZorroContrastiveLoss
from .reporting import MetricsLogger, plot_training_curves, read_metrics

__all__ = ["Trainer", "ContrastiveTask", "SupervisedTask", "ResumableSampler", "warmup_cosine", "param_groups",
           "run_training", "progress_line", "summary_line", "main"]

def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up ``(step + 1) / warmup`` for the first ``warmup`` steps,
    then a cosine from 1 down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices; not biases, norms, position embeddings, learned tokens/queries or the
    temperature (decaying those only shrinks them towards arbitrary values)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in ("pos_embed", "fusion_tokens", "queries", "logit_scale"))
        (no_decay if skip else decay).append(p)
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
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


# ------------------------------------------------------------------------------------------------ tasks
class ContrastiveTask(nn.Module):
    """Backbone + projection heads + InfoNCE over ``pairs`` with a learnable temperature.

    Forward: model inputs (from :class:`AVPreprocessor`) -> ``(loss, logs)``. Projections are gathered from every
    rank with gradients, so the loss is the global batch's on each rank.
    """

    def __init__(self, model: nn.Module, pairs, proj_dim: int = 64, temperature: float = 0.1):
        super().__init__()
        pairs = [tuple(p) for p in pairs]
        outputs = [o for o in OUTPUTS if any(o in p for p in pairs)]
        self.model = model
        self.heads = ContrastiveHeads(model.embed_dim, proj_dim, outputs=outputs)
        self.loss = ZorroContrastiveLoss(pairs, temperature=temperature)

    def forward(self, inputs: dict, target: Optional[torch.Tensor] = None):
        feats = self.model.forward_features(**inputs)
        proj = {k: gather_with_grad(v.float()) for k, v in self.heads(feats.embeddings).items()}
        present = {k: all_gather_nograd(feats.present[k].to(v.device)) for k, v in proj.items()}
        per_pair = self.loss.per_pair(proj, present)
        loss = torch.stack(list(per_pair.values())).mean()
        logs = {f"loss_{k}": v.detach() for k, v in per_pair.items()}
        logs["temperature"] = torch.tensor(self.loss.temperature)
        return loss, logs


class SupervisedTask(nn.Module):
    """Backbone + a classifier per output (the prediction averages them), cross-entropy or multi-label BCE.

    Forward: model inputs and targets -> ``(loss, logs)``.
    """

    def __init__(self, model: nn.Module, num_classes: int, outputs=OUTPUTS, multi_label: bool = False):
        super().__init__()
        self.model = model
        self.heads = SupervisedHeads(model.embed_dim, num_classes, outputs=outputs)
        self.loss = SupervisedLoss(multi_label=multi_label)
        self.multi_label = multi_label

    def forward(self, inputs: dict, target: torch.Tensor):
        feats = self.model.forward_features(**inputs)
        logits = self.heads(feats.embeddings, feats.present)
        loss = self.loss({k: v.float() for k, v in logits.items() if k != "mean"}, target)
        logs = {}
        if not self.multi_label:
            logs["train_acc"] = (logits["mean"].argmax(1) == target).float().mean().detach()
        return loss, logs


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Builds everything from a :class:`~zorro_models.config.Config` and runs :meth:`fit`.

    Attributes after construction: ``model`` (the backbone), ``task`` (model + heads + loss), ``preprocess``,
    ``optimizer``, ``scheduler``, ``step`` (optimizer steps done), ``env`` (:class:`DistEnv`), ``out`` (run folder).
    """

    def __init__(self, cfg: Config, env: Optional[DistEnv] = None):
        self.cfg = cfg
        t = cfg.train
        if t.task not in ("contrastive", "supervised"):
            raise ValueError(f"train.task must be 'contrastive' or 'supervised', got {t.task!r}")
        if t.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', got {t.amp!r}")
        if t.grad_accum < 1 or t.steps < 0:
            raise ValueError(f"need train.grad_accum >= 1 and train.steps >= 0, got {t.grad_accum} and {t.steps}")
        if t.eval_every > 0 and t.task != "supervised":
            raise ValueError("train.eval_every is for supervised runs (validation accuracy / mAP of the heads); "
                             "evaluate contrastive checkpoints with linear probes: zorro eval RUN")
        threads = machine_threads() if t.threads is None else t.threads
        if threads > 0:
            torch.set_num_threads(threads)
        self.env = env or init_distributed(t.device)
        world = self.env.world_size
        if t.batch_size % (world * t.grad_accum) != 0:
            raise ValueError(f"train.batch_size={t.batch_size} must be divisible by world_size x grad_accum = "
                             f"{world} x {t.grad_accum}")
        self.micro_batch = t.batch_size // (world * t.grad_accum)
        self.device = self.env.device
        self.out = Path(t.out)
        use_amp = t.amp == "bf16" or (t.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_amp else None

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(cfg)
        self.train_set = build_dataset(cfg, self.model, "train")
        multi_label = bool(getattr(self.train_set, "multi_label", False))
        if t.task == "contrastive":
            self.task = ContrastiveTask(self.model, t.pairs, t.proj_dim, t.temperature)
        else:
            self.task = SupervisedTask(self.model, num_classes_of(self.train_set), t.supervised_outputs, multi_label)
        self.task.to(self.device)
        self.preprocess = build_preprocessor(cfg, self.model).to(self.device)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.task, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.steps, o.warmup_steps, o.min_lr_ratio))
        self.sampler = ResumableSampler(self.train_set, world, self.env.rank, shuffle=True, seed=t.seed)
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0
        self._val_set = None

        ckpt = latest_checkpoint(self.out) if t.resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.task, self.optimizer, self.scheduler)
            self.step = state["step"]
            self.epoch = state["extra"]["epoch"]
            self.batch_in_epoch = state["extra"]["batch_in_epoch"]
            self.skipped = state["extra"].get("skipped", 0)
            self._say(f"resumed from {ckpt} at step {self.step}")
        elif t.resume:
            self._say(f"train.resume: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
        if ckpt is None and t.init_from:
            load_weights(self.task.model, t.init_from, prefix="model.")
            self._say(f"backbone initialised from {t.init_from}")
        self.ddp = self.task
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.task, device_ids=ids)
        self.logger = MetricsLogger(self.out / "metrics.jsonl") if self.env.is_main else None

    def _say(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[zorro] {msg}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------------------------------------- data
    def _loader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.micro_batch, sampler=self.sampler, drop_last=True,
                          num_workers=data_workers(self.cfg), collate_fn=collate,
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def batches(self) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch, starting at the saved position; batches whose every clip
        failed to decode are counted and passed over."""
        if len(self.sampler) // self.micro_batch == 0 and self.batch_in_epoch == 0:
            raise ValueError(f"the training set ({len(self.train_set)} clips) is smaller than one global micro-batch "
                             f"({self.micro_batch} x {self.env.world_size} ranks)")
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * self.micro_batch)
            for batch in self._loader():
                self.batch_in_epoch += 1
                self.skipped += batch["num_skipped"]
                if batch["size"] == 0:
                    continue
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # -------------------------------------------------------------------------------------------- steps
    def _micro_step(self, batch: dict, last: bool):
        inputs = self.preprocess(batch)
        target = batch["label"].to(self.device, non_blocking=True)
        sync = last or not self.env.distributed
        ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
        with ctx:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
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
        vec = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=self.device).reshape(())
                           for k in keys])
        if self.env.distributed:
            dist.all_reduce(vec)
            vec /= self.env.world_size
        return dict(zip(keys, vec.tolist()))

    def validate(self) -> Optional[dict]:
        """Supervised runs: score the heads on the validation split under each input regime (rank 0 evaluates, the
        others wait); logged as ``{"split": "val", "step": ..., "<regime>/<head>": metric}``. Returns the scores on
        rank 0, None elsewhere."""
        scores = None
        if self.env.is_main:
            if self._val_set is None:
                self._val_set = build_dataset(self.cfg, self.model, "val")
            scores = evaluate_heads(self.task.model, self.task.heads, self.preprocess,
                                    eval_loader(self.cfg, self._val_set), multi_label=self.task.multi_label,
                                    amp_dtype=self.amp_dtype)
            self.task.train()
            self.logger.log({"split": "val", "step": self.step,
                             **{f"{r}/{h}": v for r, d in scores.items() for h, v in d.items()}})
        if self.env.distributed:
            dist.barrier()
        return scores

    def save(self) -> Optional[Path]:
        """Checkpoint the current state (rank 0 writes; every rank returns after the write)."""
        path = None
        if self.env.is_main:
            path = save_checkpoint(
                self.out, self.step, self.task, self.optimizer, self.scheduler,
                extra={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped": self.skipped},
                config_yaml=config_to_yaml(self.cfg), keep=self.cfg.train.keep_checkpoints)
        if self.env.distributed:
            dist.barrier()
        return path

    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train until ``train.steps`` optimizer steps (or ``stop_at``, for tests that interrupt a run), checkpoint,
        and return ``{"step", "loss", "seconds", "checkpoint", "skipped"}``."""
        t = self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        self.task.train()
        data = self.batches()
        bar = None
        if t.progress and self.env.is_main:
            from tqdm.auto import tqdm

            # disable=None: a bar on terminals, nothing in logs and CI output (where it would be a wall of \r lines)
            bar = tqdm(total=t.steps, initial=self.step, desc=f"{t.task} {self.cfg.model.mask}", dynamic_ncols=True,
                       leave=False, disable=None)
        start, window, last, first = time.perf_counter(), [], {}, self.step
        warned = self.skipped
        while self.step < end:
            logs = self.train_step(data)
            window.append(logs)
            if bar is not None:
                bar.update(1)
            if t.log_every > 0 and (self.step % t.log_every == 0 or self.step == end):
                avg = {k: sum(torch.as_tensor(w[k]).float() for w in window) / len(window) for k in window[0]}
                last = self._reduce(avg)
                last.update(step=self.step, lr=self.scheduler.get_last_lr()[0], skipped=self.skipped,
                            seconds=round(time.perf_counter() - start, 3))
                if self.logger is not None:
                    self.logger.log(last)
                if bar is not None and not bar.disable:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                elif bar is not None:  # not a terminal (a log file, CI): a line per logged step instead of a bar
                    print(progress_line(self.step - first, end - first, self.step, end, last["loss"],
                                        time.perf_counter() - start), flush=True)
                window = []
                if self.skipped > warned:
                    warnings.warn(f"{self.skipped} clip(s) could not be read and were skipped so far "
                                  f"(see the warnings above; training continues)", RuntimeWarning)
                    warned = self.skipped
            if t.eval_every > 0 and self.step % t.eval_every == 0:
                self.validate()
            if t.ckpt_every > 0 and self.step % t.ckpt_every == 0 and self.step < end:
                self.save()
        if bar is not None:
            bar.close()
        path = self.save()
        if self.env.is_main and t.plot and (self.out / "metrics.jsonl").exists():
            plot_training_curves({self.cfg.model.mask: read_metrics(self.out / "metrics.jsonl")},
                                 self.out / "training_curves.png", keys=("loss", "lr"),
                                 title=f"{t.task} training ({self.cfg.model.name})")
        return {"step": self.step, "loss": last.get("loss"), "seconds": round(time.perf_counter() - start, 3),
                "checkpoint": str(path) if path else None, "skipped": self.skipped}


def progress_line(done: int, todo: int, step: int, end: int, loss: float, seconds: float) -> str:
    """``[zorro] step 20/200  loss 4.084  2.91 it/s  ETA 62 s``: ``done`` of this run's ``todo`` steps took
    ``seconds``."""
    rate = done / seconds if seconds > 0 else float("nan")
    eta = (todo - done) / rate if done else float("nan")
    eta_text = "?" if math.isnan(eta) else f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min"
    return f"[zorro] step {step}/{end}  loss {loss:.4g}  {rate:.2f} it/s  ETA {eta_text}"


def summary_line(summary: dict) -> str:
    """The last line of a run: ``[zorro] done: step 200, loss 4.084, checkpoint ...`` (the :meth:`Trainer.fit`
    summary)."""
    loss = "n/a" if summary["loss"] is None else f"{summary['loss']:.4g}"
    return f"[zorro] done: step {summary['step']}, loss {loss}, checkpoint {summary['checkpoint']}"


# ------------------------------------------------------------------------------------------------ entry point
def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run configuration (sections model, data, optim, train, probe)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides in YAML syntax, e.g. optim.lr=3e-4 model.mask=full train.steps=100")


def run_training(cfg: Config) -> dict:
    """Train with ``cfg`` in this process (joining the torchrun process group if there is one)."""
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zorro_models.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
