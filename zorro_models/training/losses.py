"""Losses: supervised (single-label cross-entropy, multi-label BCE) over per-output logits, and the contrastive
InfoNCE loss between pairs of outputs with a learnable temperature.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import OUTPUTS

__all__ = ["SupervisedLoss", "ZorroContrastiveLoss", "info_nce", "DEFAULT_PAIRS"]

#: audio <-> video, and each unimodal output <-> fusion (ours; the paper's exact pairs are not at hand).
DEFAULT_PAIRS = (("audio", "video"), ("audio", "fusion"), ("video", "fusion"))


class SupervisedLoss(nn.Module):
    """Classification loss over the logits of :class:`~zorro_models.models.heads.SupervisedHeads`.

    Args:
        multi_label: False: softmax cross-entropy, targets int ``(B,)`` class indices (or float ``(B, C)``
            probabilities). True: sigmoid BCE, targets float ``(B, C)`` in [0, 1] (AudioSet).
        on: ``"each"`` (default) averages the loss of every output's own logits, so every classifier learns to
            predict alone; ``"mean"`` computes one loss on the averaged logits.
        label_smoothing: for single-label cross-entropy.

    Forward: ``logits`` (the heads' dict) and ``target`` -> scalar loss.
    """

    def __init__(self, multi_label: bool = False, on: str = "each", label_smoothing: float = 0.0):
        super().__init__()
        if on not in ("each", "mean"):
            raise ValueError(f"on must be 'each' or 'mean', got {on!r}")
        self.multi_label = multi_label
        self.on = on
        self.label_smoothing = label_smoothing

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one ``(B, C)`` logits tensor."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
        if self.multi_label:
            if target.shape != logits.shape:
                raise ValueError(
                    f"multi-label target must be (B, C) = {tuple(logits.shape)}, got {tuple(target.shape)}"
                )
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        if target.ndim == 1:
            if target.shape[0] != logits.shape[0] or target.is_floating_point():
                raise ValueError(
                    f"single-label target must be int (B,) = ({logits.shape[0]},) class indices, "
                    f"got {target.dtype} {tuple(target.shape)}"
                )
        elif target.shape != logits.shape:
            raise ValueError(
                f"single-label target must be (B,) indices or (B, C) probabilities, got "
                f"{tuple(target.shape)} for logits {tuple(logits.shape)}"
            )
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def per_output(self, logits: dict, target: torch.Tensor) -> dict:
        """Loss of each output's logits alone (``"mean"`` included when present)."""
        return {name: self.single(lg, target) for name, lg in logits.items()}

    def forward(self, logits: dict, target: torch.Tensor) -> torch.Tensor:
        if self.on == "mean":
            return self.single(logits["mean"], target)
        names = [n for n in logits if n != "mean"]
        if not names:
            raise ValueError(f"logits hold no per-output entries (keys: {sorted(logits)})")
        return torch.stack([self.single(logits[n], target) for n in names]).mean()


def info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned embeddings: sample i of ``a`` and of ``b`` are the positive pair, the
    other samples of the batch the negatives.

    Args:
        a, b: ``(B, P)`` (normalised here).
        logit_scale: scalar, 1 / temperature.
        valid: bool ``(B,)`` or None — samples to use (e.g. those that have both modalities).

    Returns:
        scalar ``(CE(s, arange) + CE(s^T, arange)) / 2`` with ``s = logit_scale * a_n @ b_n^T``; 0 (with a graph)
        when fewer than 2 samples are valid.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must both be (B, P), got {tuple(a.shape)} and {tuple(b.shape)}")
    if valid is not None:
        valid = valid.to(a.device)
        a, b = a[valid], b[valid]
    if a.shape[0] < 2:
        return (a.sum() + b.sum()) * 0.0
    s = logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(s, target) + F.cross_entropy(s.T, target)) / 2


class ZorroContrastiveLoss(nn.Module):
    """InfoNCE over pairs of outputs with a learnable temperature (ours: pairs and temperature are configurable).

    Args:
        pairs: pairs of output names; default :data:`DEFAULT_PAIRS` (audio<->video, audio<->fusion,
            video<->fusion).
        temperature: initial temperature tau (logits are ``cos_sim / tau``).
        learnable_temperature: learn ``log(1 / tau)`` (a parameter of this module: give the loss's parameters to
            the optimizer too).
        max_logit_scale: clamp of ``1 / tau`` (CLIP's 100), against instability.

    Forward: ``projections`` (dict output -> ``(B, P)``, e.g. from
    :class:`~zorro_models.models.heads.ContrastiveHeads`), optional ``present`` (dict output -> bool ``(B,)``, as
    ``forward_features`` returns; a pair uses only the samples where both outputs are present) -> scalar: the mean of
    the pairs' losses.
    """

    def __init__(
        self,
        pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS,
        temperature: float = 0.1,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        pairs = tuple(tuple(p) for p in pairs)
        if not pairs:
            raise ValueError("pairs must hold at least one pair of outputs")
        for p in pairs:
            if len(p) != 2 or p[0] == p[1] or any(o not in OUTPUTS for o in p):
                raise ValueError(f"each pair must be two different outputs from {OUTPUTS}, got {p!r}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.pairs = pairs
        self.max_logit_scale = max_logit_scale
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale().detach())

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def per_pair(self, projections: dict, present: Optional[dict] = None) -> dict:
        """The loss of each pair, keyed ``"a-b"``."""
        scale = self.logit_scale()
        out = {}
        for x, y in self.pairs:
            for o in (x, y):
                if o not in projections:
                    raise KeyError(f"pair ({x!r}, {y!r}) needs projection {o!r}; got {sorted(projections)}")
            valid = None
            if present is not None:
                valid = present[x].bool() & present[y].bool()
            out[f"{x}-{y}"] = info_nce(projections[x], projections[y], scale, valid)
        return out

    def forward(self, projections: dict, present: Optional[dict] = None) -> torch.Tensor:
        return torch.stack(list(self.per_pair(projections, present).values())).mean()
