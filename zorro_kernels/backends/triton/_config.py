"""Block sizes and launch settings of the Triton kernels, chosen per (head dim, dtype) from a small table.

The tile map is built for a given ``(block_m, block_n)``, so block sizes are never autotuned: a table picks them, and
autotuning (when on) only chooses ``num_warps`` / ``num_stages`` among a few configs keyed on compile-time constants —
never on sequence lengths, which are runtime data. This module imports nothing from Triton.

Three kernels read three tile maps (all cached on the mask):

- ``fwd`` and ``dq`` step over kv tiles of ``block_n`` keys for a query tile of ``block_m`` rows;
- ``dkdv`` steps over query tiles of ``block_m`` rows for a kv tile of ``block_n`` keys (the transposed lists), so
  small ``block_m`` / large ``block_n`` suit it, as in flash-attention 2.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch

__all__ = [
    "KernelConfig",
    "Blocks",
    "padded_head_dim",
    "choose_blocks",
    "override_blocks",
    "use_fallback",
    "autotune_enabled",
    "interpreting",
    "MAX_HEAD_DIM",
    "forward_plan_kind",
    "override_plan",
]

MAX_HEAD_DIM = 256


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # extra (num_warps, num_stages) candidates tried when autotuning is on
    alternatives: tuple = ()


class Blocks(NamedTuple):
    fwd: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig
    # the forward over the segment-aligned range plan; None: as ``fwd``
    ranges: Optional[KernelConfig] = None

    def forward(self, ranges: bool) -> KernelConfig:
        """The forward's config for the range plan (``ranges``) or the tile plan."""
        return (self.ranges or self.fwd) if ranges else self.fwd


def padded_head_dim(d: int) -> int:
    """The head dim the kernels compute with: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def _k(bm, bn, warps, stages, *alts) -> KernelConfig:
    return KernelConfig(bm, bn, warps, stages, tuple(alts))


# Hopper/Ampere table for 16-bit inputs, keyed by the padded head dim's upper bound. Shared memory per stage is
# (block_m + 2 * block_n) * D * 2 bytes. Warps are chosen so that no variant spills registers on sm_90 (ptxas -v on
# the compiled kernels, `python benchmarks/triton_compile_check.py --regs`): the dK/dV kernel holds K, V and two
# (block_n, D) fp32 accumulators in registers, which four warps cannot hold at block_n = 128.
_TABLE_16BIT = (
    # D <= 64 from the block-size sweep (benchmarks/gpu_sweep.py; its numbers and card: BENCHMARKS.md, GPU run 3):
    # forward 128x64 with 4 warps; backward 32x64 dK/dV + 64x64 dQ with 4 warps, the fastest at both ends measured.
    # The one-pass dK/dV (atomic dQ, a fifth product) spills 40 B at 4 warps / 3 stages on sm_90 (offline compile):
    # 8 warps / 2 stages holds it in 236 registers, one block per SM (no longer tuned: see the rule below).
    # The range-plan forward (offline sm_90 compiles, fp16): at 128 x 64 it spills with 4 warps (255 regs + 56 B) and
    # needs 194 registers at 8 warps (1 block/SM); 64 x 64 with 4 warps holds it in 189, no spill, 2 blocks/SM — and
    # 64-row tiles waste less at group ends (BENCHMARKS.md, "Where the code's constants come from"). D = 128: 64 x 64
    # at 8 warps, 197 registers, no spill (4 warps spill).
    # Autotune candidates (beyond each first config) are only those that neither spill nor run fewer than 2 blocks
    # per SM on sm_90 (`triton_compile_check.py` flags the others TUNE-RULE): timing losers cost the card's minutes.
    # So the dK/dV (every config spills or runs 1 block/SM) and the tile forward are not tuned at D <= 64.
    (
        64,
        Blocks(
            _k(128, 64, 4, 3),
            _k(32, 64, 4, 3),
            _k(64, 64, 4, 3, (4, 4)),
            _k(64, 64, 4, 3, (4, 2)),
        ),
    ),
    # D = 128 dK/dV: since the NaN isolation of partial tiles (and the one-pass dQ product) 32 x 64 spills 176-288 B
    # at 8 warps (255 registers); 32 x 32 at 8 warps / 2 stages holds 186 (deterministic) / 236 (one-pass), no spill.
    # Every D = 128 config runs one block per SM: none is tuned.
    (128, Blocks(_k(128, 64, 8, 3), _k(32, 32, 8, 2), _k(128, 64, 8, 3), _k(64, 64, 8, 3))),
    (256, Blocks(_k(64, 32, 4, 2, (8, 2)), _k(32, 64, 4, 2, (8, 2)), _k(64, 32, 4, 2, (8, 2)))),
)
# fp32 (correctness, not speed): half the tiles of the 16-bit table, so the same shared memory.
_TABLE_FP32 = (
    (64, Blocks(_k(64, 32, 4, 2, (4, 1)), _k(32, 64, 4, 2, (4, 1)), _k(64, 32, 4, 2, (4, 1)))),
    (128, Blocks(_k(64, 32, 4, 2, (4, 1)), _k(32, 64, 4, 2, (4, 1)), _k(64, 32, 4, 2, (4, 1)))),
    (256, Blocks(_k(32, 32, 4, 1), _k(32, 32, 4, 1), _k(32, 32, 4, 1))),
)
# What a launch falls back to after Triton reports it out of resources (shared memory / registers) on a card.
_FALLBACK = Blocks(_k(64, 32, 4, 1), _k(32, 64, 4, 1), _k(64, 32, 4, 1))
_FALLBACK_256 = Blocks(_k(32, 32, 4, 1), _k(32, 32, 4, 1), _k(32, 32, 4, 1))
# Under TRITON_INTERPRET=1 the cost is per program step, so a few large tiles are cheapest; tests override this.
_INTERPRETER = Blocks(_k(32, 32, 4, 1), _k(32, 32, 4, 1), _k(32, 32, 4, 1))

_override: Optional[Blocks] = None
_fallen_back: set = set()
_chosen: dict = {}
_env: Optional[tuple] = None


def _settings() -> tuple:
    """(interpreting, autotune, blocks from ZORRO_TRITON_BLOCKS): environment read once, on first use — reading it
    on every call costs more than the rest of a launch's Python side."""
    global _env
    if _env is None:
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        tune = not interp and os.environ.get("ZORRO_TRITON_AUTOTUNE", "1") not in ("", "0")
        _env = (interp, tune, _env_override())
    return _env


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read when kernels are defined)."""
    return _settings()[0]


def autotune_enabled() -> bool:
    """Autotune num_warps/num_stages (on a GPU only). ``ZORRO_TRITON_AUTOTUNE=0`` uses the table's first config."""
    return _settings()[1]


def _env_override() -> Optional[Blocks]:
    spec = os.environ.get("ZORRO_TRITON_BLOCKS")
    if not spec:
        return None
    try:
        bm, bn = (int(x) for x in spec.split(","))
    except ValueError as e:
        raise ValueError(f"ZORRO_TRITON_BLOCKS must be 'BM,BN' (e.g. '32,32'), got {spec!r}") from e
    return Blocks(_k(bm, bn, 4, 1), _k(bm, bn, 4, 1), _k(bm, bn, 4, 1))


def choose_blocks(head_dim: int, dtype: torch.dtype) -> Blocks:
    """Block sizes and launch settings for a head dim (any, <= 256) and dtype.

    Order of precedence: :func:`override_blocks` (tests), ``ZORRO_TRITON_BLOCKS=BM,BN``, the interpreter default, the
    fallback table after an out-of-resources launch, the table.
    """
    if _override is not None:
        return _override
    key = (head_dim, dtype)
    if key not in _chosen:
        _chosen[key] = _choose(head_dim, dtype)
    return _chosen[key]


def _choose(head_dim: int, dtype: torch.dtype) -> Blocks:
    interp, _, env = _settings()
    if env is not None:
        return env
    if interp:
        return _INTERPRETER
    d = padded_head_dim(head_dim)
    if (d, dtype) in _fallen_back:
        return _FALLBACK_256 if d > 128 else _FALLBACK
    table = _TABLE_FP32 if dtype == torch.float32 else _TABLE_16BIT
    for bound, blocks in table:
        if d <= bound:
            return blocks
    raise ValueError(f"head dim {head_dim} exceeds the Triton backend's maximum {MAX_HEAD_DIM}")


def use_fallback(head_dim: int, dtype: torch.dtype) -> bool:
    """Switch ``(head dim, dtype)`` to the fallback table; False if it already was (nothing smaller to try)."""
    key = (padded_head_dim(head_dim), dtype)
    if key in _fallen_back or _override is not None:
        return False
    _fallen_back.add(key)
    _chosen.clear()
    return True


@contextlib.contextmanager
def override_blocks(fwd=(32, 32), dkdv=None, dq=None, num_warps: int = 4, num_stages: int = 1):
    """Force block sizes (private; for tests): ``with override_blocks((16, 16)): ...``. ``dkdv``/``dq`` default to
    ``fwd``'s sizes."""
    global _override
    prev = _override
    cfg = [_k(bm, bn, num_warps, num_stages) for bm, bn in (fwd, dkdv or fwd, dq or fwd)]
    _override = Blocks(*cfg)
    try:
        yield _override
    finally:
        _override = prev


_PLAN_KINDS = ("auto", "ranges", "tiles")
_plan_override: Optional[str] = None


def forward_plan_kind() -> str:
    """Which plan the forward reads: ``"ranges"`` (segment-aligned query tiles), ``"tiles"`` (the uniform tile map),
    or ``"auto"`` (ranges unless the layout's query groups are too small to fill tiles). :func:`override_plan` (tests),
    else ``ZORRO_TRITON_PLAN``, else ``"auto"``."""
    if _plan_override is not None:
        return _plan_override
    kind = os.environ.get("ZORRO_TRITON_PLAN", "auto")
    if kind not in _PLAN_KINDS:
        raise ValueError(f"ZORRO_TRITON_PLAN must be one of {', '.join(_PLAN_KINDS)}, got {kind!r}")
    return kind


@contextlib.contextmanager
def override_plan(kind: str):
    """Force the forward's plan (private; for tests): ``with override_plan("tiles"): ...``."""
    global _plan_override
    if kind not in _PLAN_KINDS:
        raise ValueError(f"plan kind must be one of {', '.join(_PLAN_KINDS)}, got {kind!r}")
    prev, _plan_override = _plan_override, kind
    try:
        yield
    finally:
        _plan_override = prev
