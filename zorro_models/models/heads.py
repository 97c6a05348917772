"""Task heads on the four Zorro outputs: a classifier per output (supervised) and a projection MLP per output
(contrastive). Each output keeps its own head, so a unimodal prediction reads a unimodal embedding only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .layers import OUTPUTS, Mlp, init_weights

__all__ = ["SupervisedHeads", "ContrastiveHeads"]


def _check_outputs(outputs: Sequence[str], name: str = "outputs") -> tuple[str, ...]:
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    if not outputs:
        raise ValueError(f"{name} must name at least one of {OUTPUTS}")
    for o in outputs:
        if o not in OUTPUTS:
            raise ValueError(f"{name} contains unknown output {o!r}; choose from {OUTPUTS}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"{name} has duplicates: {outputs}")
    return outputs


def _get(embeddings: dict, name: str) -> torch.Tensor:
    if name not in embeddings or embeddings[name] is None:
        raise KeyError(f"the embeddings have no {name!r} output (keys: {sorted(embeddings)})")
    return embeddings[name]


class SupervisedHeads(nn.Module):
    """One linear classifier per output; the prediction is the average of their logits (the paper's supervised
    setting), and each output's logits are available alone (e.g. "audio" for audio-only evaluation).

    Args:
        dim: embedding width D.
        num_classes: classes C (527 for AudioSet).
        outputs: which outputs get a classifier (default all four).
        dropout: dropout on the embeddings before each classifier.

    Forward: ``embeddings`` (dict output -> ``(B, D)``, as the model returns) and optionally ``present`` (dict output
    -> bool ``(B,)``, from ``model.forward_features``) -> dict output -> logits ``(B, C)`` for each of ``outputs``,
    plus ``"mean"``: their average ``(B, C)`` — with ``present``, per sample over the outputs present for it (an
    audio-only sample then averages the audio, fusion and global heads, not the video head's bias).
    """

    def __init__(self, dim: int, num_classes: int, outputs: Sequence[str] = OUTPUTS, dropout: float = 0.0):
        super().__init__()
        for name, value in (("dim", dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.outputs = _check_outputs(outputs)
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleDict({o: nn.Linear(dim, num_classes) for o in self.outputs})
        self.apply(init_weights)

    def forward(self, embeddings: dict, present: Optional[dict] = None) -> dict:
        logits = {o: self.classifiers[o](self.dropout(_get(embeddings, o))) for o in self.outputs}
        stacked = torch.stack([logits[o] for o in self.outputs])  # (n_outputs, B, C)
        if present is None:
            logits["mean"] = stacked.mean(0)
        else:
            w = torch.stack([present[o] for o in self.outputs]).to(stacked.device, stacked.dtype)  # (n_outputs, B)
            logits["mean"] = (stacked * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]
        return logits


class ContrastiveHeads(nn.Module):
    """A projection MLP per output (``Linear -> GELU -> Linear``), feeding :class:`~zorro_models.training.losses.
    ZorroContrastiveLoss`. Projections are not normalised here; the loss normalises them.

    Args:
        dim: embedding width D.
        proj_dim: projection width P.
        hidden_dim: MLP hidden width (default ``dim``).
        outputs: which outputs get a projection (default all four).

    Forward: ``embeddings`` (dict output -> ``(B, D)``) -> dict output -> ``(B, P)`` for each of ``outputs``.
    """

    def __init__(
        self, dim: int, proj_dim: int = 128, hidden_dim: Optional[int] = None, outputs: Sequence[str] = OUTPUTS
    ):
        super().__init__()
        for name, value in (("dim", dim), ("proj_dim", proj_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.outputs = _check_outputs(outputs)
        self.proj_dim = proj_dim
        self.projections = nn.ModuleDict({o: Mlp(dim, hidden_dim or dim, proj_dim) for o in self.outputs})
        self.apply(init_weights)

    def forward(self, embeddings: dict) -> dict:
        return {o: self.projections[o](_get(embeddings, o)) for o in self.outputs}
