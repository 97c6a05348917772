"""Launching a kernel with the table's settings, or autotuning ``num_warps``/``num_stages`` among a few candidates.

Autotuners are keyed on compile-time constants only (block sizes, head dim, flags) plus the tensor dtypes Triton adds
itself: sequence lengths, segment sizes and per-sample lengths never enter a key, so they never trigger a retune.
"""
from __future__ import annotations

import triton

from ._config import KernelConfig, autotune_enabled

_TUNERS: dict = {}


def _tuner(kernel, cfg: KernelConfig, key: list):
    tid = (id(kernel), cfg)
    if tid not in _TUNERS:
        configs = [triton.Config({}, num_warps=w, num_stages=s)
                   for w, s in dict.fromkeys(((cfg.num_warps, cfg.num_stages),) + tuple(cfg.alternatives))]
        _TUNERS[tid] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNERS[tid]


def launch(kernel, grid, args: tuple, constexprs: dict, cfg: KernelConfig) -> None:
    """``kernel[grid](*args, **constexprs)`` with ``cfg``'s warps/stages, or autotuned over its alternatives."""
    if autotune_enabled() and cfg.alternatives:
        _tuner(kernel, cfg, sorted(constexprs))[grid](*args, **constexprs)
    else:
        kernel[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def is_out_of_resources(err: BaseException) -> bool:
    """Triton's "out of resources" (shared memory / registers) at compile or load time, across Triton versions."""
    from triton.runtime.errors import OutOfResources

    return isinstance(err, OutOfResources) or "out of resource" in str(err).lower()
