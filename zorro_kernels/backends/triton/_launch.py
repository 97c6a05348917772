"""Launching a kernel with the table's settings, or autotuning ``num_warps``/``num_stages`` among a few candidates.

Autotuning is keyed on the compile-time constants plus a **shape bucket** (powers of two of Nq, Nk and the program
count, see :func:`shape_bucket`): the best warps/stages for N = 1k and N = 16k differ, but lengths inside one bucket —
and segment sizes and per-sample lengths, which are runtime data — never trigger a retune. Tuning times several
launches and synchronises, which must never happen while a CUDA graph is being captured or ``torch.compile`` traces:
then the bucket's earlier choice is used if there is one, else the table's fixed config.
"""

from __future__ import annotations

import torch
import triton

from ._config import KernelConfig, autotune_enabled

_TUNERS: dict = {}  # (kernel id, config, bucket) -> triton Autotuner
_CHOSEN: dict = {}  # (kernel id, config, bucket, constexprs) -> (num_warps, num_stages) the tuner picked


def shape_bucket(nq: int, nk: int, programs: int) -> tuple:
    """Nq, Nk and the grid size rounded up to powers of two (at least 64): the autotune key's shape part."""
    return tuple(max(64, 1 << max(0, int(x) - 1).bit_length()) for x in (nq, nk, programs))


def _tuner(kernel, cfg: KernelConfig, bucket: tuple, key: list, restore: tuple = ()):
    tid = (id(kernel), cfg, bucket, restore)
    if tid not in _TUNERS:
        configs = [
            triton.Config({}, num_warps=w, num_stages=s)
            for w, s in dict.fromkeys(((cfg.num_warps, cfg.num_stages),) + tuple(cfg.alternatives))
        ]
        _TUNERS[tid] = triton.autotune(configs=configs, key=key, restore_value=list(restore) or None)(kernel)
    return _TUNERS[tid]


def tuning_forbidden() -> bool:
    """True while ``torch.compile`` traces or the current CUDA stream captures a graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch(
    kernel, grid, args: dict, constexprs: dict, cfg: KernelConfig, bucket: tuple = (), restore: tuple = ()
) -> None:
    """``kernel[grid](**args, **constexprs)`` with ``cfg``'s warps/stages, or autotuned over its alternatives for
    this shape ``bucket`` (see the module docstring). ``restore`` names arguments the kernel accumulates into (atomic
    adds): the tuner's trial launches restore them, so only the final launch counts."""
    if autotune_enabled() and cfg.alternatives:
        chosen = (id(kernel), cfg, bucket, tuple(sorted(constexprs.items())))
        if not tuning_forbidden():
            tuner = _tuner(kernel, cfg, bucket, sorted(constexprs), tuple(restore))
            tuner[grid](**args, **constexprs)
            best = tuner.best_config
            _CHOSEN[chosen] = (best.num_warps, best.num_stages)
            return
        warps, stages = _CHOSEN.get(chosen, (cfg.num_warps, cfg.num_stages))
    else:
        warps, stages = cfg.num_warps, cfg.num_stages
    kernel[grid](**args, **constexprs, num_warps=warps, num_stages=stages)


def is_out_of_resources(err: BaseException) -> bool:
    """Triton's "out of resources" (shared memory / registers) at compile or load time, across Triton versions."""
    from triton.runtime.errors import OutOfResources

    return isinstance(err, OutOfResources) or "out of resource" in str(err).lower()
