"""Multi-process training helpers: process-group set-up from torchrun's environment, and a differentiable all-gather.

``torchrun --nproc_per_node=N -m zorro_models.train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` reads them and starts a process group (gloo on CPU, nccl on
CUDA). Without them everything runs as one process and every helper here is the identity.

A rank that fails alone must not leave the others waiting for it in their next collective (a hang under nccl until the
process-group timeout, an unrelated "Connection closed by peer" under gloo): :func:`on_main_rank` runs rank-0-only
work and :func:`fail_together` makes every rank raise once a collective has shown that one failed.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, NoReturn, Optional, TypeVar

import torch
import torch.distributed as dist

from ..utils.errors import RankFailure, error_line

__all__ = [
    "DistEnv",
    "init_distributed",
    "gather_with_grad",
    "all_gather_nograd",
    "RankFailure",
    "fail_together",
    "on_main_rank",
]

T = TypeVar("T")


class DistEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``), else describe a single process.

    ``device``: ``"auto"`` (CUDA ``LOCAL_RANK`` when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:i"``.
    Backend: nccl for CUDA devices, gloo for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def fail_together(error: Optional[BaseException], what: str) -> NoReturn:
    """Every rank calls this once a collective has shown that some rank failed ``what`` (e.g. ``"writing the
    checkpoint of step 4"``); ``error`` is this rank's exception, None where it did not fail. The ranks exchange their
    errors as one line each (an all-gather of objects, only on this failure path) and raise: a rank that failed its
    own ``error``, the others a :class:`RankFailure` ``"rank R failed WHAT: LINE"`` for the first rank that failed."""

    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, None if error is None else error_line(error))
    if error is not None:
        raise error
    rank = next(r for r, line in enumerate(lines) if line is not None)
    raise RankFailure(f"rank {rank} failed {what}: {lines[rank]}")


def on_main_rank(env: DistEnv, fn: Callable[[], T], what: str) -> Optional[T]:
    """``fn()`` on rank 0 only (its result there, None on the other ranks), which every rank waits for; when it raises,
    every rank raises (:func:`fail_together`: rank 0 its exception, the others a :class:`RankFailure` with its line)
    instead of the others waiting for a rank that has gone. The wait is one all-reduce of a failed flag, in place of
    a barrier. One process: ``fn()``, no collective."""
    if not env.distributed:
        return fn()
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            error = e
    failed = torch.tensor([int(error is not None)], dtype=torch.int64, device=env.device)
    dist.all_reduce(failed)
    if failed.item():
        fail_together(error, what)
    return result


def _gather_parts(x: torch.Tensor) -> tuple[list, list]:
    """All-gather ``x (n_r, ...)`` from every rank, where ``n_r`` may differ by rank (a batch that lost clips to
    decode errors): sizes are exchanged first and tensors padded to the largest. Returns (parts, sizes)."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return [p[:s] for p, s in zip(parts, sizes)], sizes


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the gradient of its own slice, summed over ranks.

    Every rank computes a loss on the gathered tensor; rank r's slice influences every rank's loss, so its gradient is
    the sum of what all ranks send back — an all-reduce, then the slice. Combined with DDP's gradient averaging, a
    loss computed identically on every rank (the global-batch loss) yields the gradient of one process seeing the
    whole batch. Written out here because some backends (gloo) lack the reduce-scatter that
    ``torch.distributed.nn.all_gather`` relies on, and because ranks may hold different numbers of samples.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts, sizes = _gather_parts(x)
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        sizes, longest = ctx.sizes, max(ctx.sizes)
        # lay the gradient out as (world, longest, ...) so every rank reduces tensors of the same shape
        padded = grad.new_zeros(len(sizes), longest, *grad.shape[1:])
        for r, chunk in enumerate(grad.split(sizes)):
            padded[r, : sizes[r]] = chunk
        dist.all_reduce(padded, op=dist.ReduceOp.SUM)
        return padded[ctx.rank, : sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(n_r, ...)`` on each rank -> ``(sum_r n_r, ...)`` in rank order, differentiable (see
    :class:`_GatherWithGrad`). Identity without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (labels, flags, evaluation outputs); ranks may hold different
    numbers of rows. Identity without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(_gather_parts(x.detach())[0], 0)
