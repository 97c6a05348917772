"""The training tasks: a backbone with its heads and loss, one ``nn.Module`` whose forward returns ``(loss, logs)``.
Build one for a config with :func:`~zorro_models.training.build.build_task`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models.heads import ContrastiveHeads, SupervisedHeads
from ..models.layers import OUTPUTS
from .distributed import all_gather_nograd, gather_with_grad
from .losses import SupervisedLoss, ZorroContrastiveLoss

__all__ = ["ContrastiveTask", "SupervisedTask", "TASKS"]

#: ``train.task`` values
TASKS = ("contrastive", "supervised")


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
