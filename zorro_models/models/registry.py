"""Model registry: presets by name, built with keyword overrides (``create_model("zorro_vit_tiny", depth=2)``)."""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import torch.nn as nn

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "model_config",
    "model_keywords",
    "preset_lr",
    "Preset",
]


class Preset(NamedTuple):
    name: str
    cls: Callable[..., nn.Module]
    kwargs: dict
    description: str
    # the AdamW learning rate the preset trains at when the run names none (``optim.lr``); None: the config's default
    lr: Optional[float] = None


_REGISTRY: dict[str, Preset] = {}


def register_model(
    name: str, cls: Callable[..., nn.Module], description: str = "", *, lr: Optional[float] = None, **kwargs
) -> None:
    """Register preset ``name``: ``cls(**kwargs)``; ``lr``: the learning rate it trains at when the run sets no
    ``optim.lr`` (None: the config's default). Re-registering a name replaces it."""
    _REGISTRY[name] = Preset(name, cls, dict(kwargs), description, lr)


def preset_lr(name: str) -> Optional[float]:
    """The learning rate preset ``name`` trains at when the run sets none, or None (the config's default)."""
    return _preset(name).lr


def list_models(pattern: str = "") -> list[str]:
    """Registered preset names containing ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if pattern in n)


def _preset(name: str) -> Preset:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}")
    return _REGISTRY[name]


def model_keywords(name: str) -> dict:
    """Every keyword preset ``name`` takes, with the value it gets by default (the preset's, else the class's)."""
    preset = _preset(name)
    params = inspect.signature(preset.cls).parameters
    return {
        k: preset.kwargs.get(k, p.default)
        for k, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def model_config(name: str, **overrides) -> dict:
    """The keyword arguments ``create_model(name, **overrides)`` passes to the model class (checked)."""
    valid = model_keywords(name)
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        raise TypeError(f"{name} got unknown override(s) {unknown}; valid keywords: {sorted(valid)}")
    return {**_preset(name).kwargs, **overrides}


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword ``overrides`` replace the preset's arguments.

    Example::

        model = create_model("zorro_vit_tiny", depth=4, mask="full")
        x = model.example_inputs(batch_size=2)
        out = model(audio=x["audio"], video=x["video"])   # {"audio", "video", "fusion", "global"} -> (B, D)

    Raises ValueError for an unknown name (listing the registered ones) and TypeError for an unknown keyword
    (listing the valid ones).
    """
    preset = _preset(name)
    model = preset.cls(**model_config(name, **overrides))
    model.preset = name
    return model
