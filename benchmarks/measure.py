"""What the benchmarks need besides pytest-benchmark: inputs, the correctness oracle, peak memory, device sync.

- :func:`make_inputs` — seeded ``q, k, v`` and the upstream gradient for a layout.
- :class:`Reference` — the fp64 oracle (and the same computation at the input precision, which the tolerance policy
  of ``zorro_kernels.testing`` compares against), computed once per layout, chunked over (sample, head) so that its
  memory stays small; for large layouts only on a fixed subset of query rows (out and dq then; dk/dv need every row).
- :func:`peak_memory` — bytes allocated above the starting point during one call (CUDA allocator stats; on CPU the
  profiler's allocation events, since the CPU allocator keeps no peak).
- :func:`sync` — what a timed call must end with on an asynchronous device.
- :func:`import_commit` — an older commit's ``zorro_kernels`` importable beside the working tree's (before/after runs
  in one process).
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Optional

import torch

from zorro_kernels.testing import policy_violation

from .layouts import Layout

__all__ = ["make_inputs", "Reference", "peak_memory", "sync", "run_once", "import_commit"]

# Above this many query rows the oracle uses a row subset (its cost and memory grow with rows x keys).
FULL_ORACLE_ROWS = 2048
SUBSET_ROWS = 384


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(layout: Layout, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``q (B, H, Nq, D)``, ``k, v (B, H, Nk, D)`` (leaf tensors, ``requires_grad=False``) and ``d_out`` like q."""
    gen = torch.Generator().manual_seed(seed)
    b, h, d = layout.batch, layout.heads, layout.head_dim

    def randn(n):
        return torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype)

    return randn(layout.num_q), randn(layout.num_kv), randn(layout.num_kv), randn(layout.num_q)


def run_once(fn: Callable, q, k, v, d_out, backward: bool):
    """One call of ``fn(q, k, v) -> out``; with ``backward`` also ``(dq, dk, dv)`` for upstream ``d_out``.

    Gradients come from ``torch.autograd.grad`` (fresh buffers each call, nothing accumulates into ``.grad``).
    """
    if not backward:
        with torch.no_grad():
            return fn(q, k, v), None
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), d_out)


class Reference:
    """The oracle for one layout and its inputs: out (and dq, dk, dv) in fp64 and at the input precision.

    Rows: every query row when ``Nq <= FULL_ORACLE_ROWS``, else a fixed subset (the first and last row of every
    segment plus evenly spread rows); then only out and dq are checked (a key's gradient depends on every row).
    """

    def __init__(self, layout: Layout, q, k, v, d_out, backward: bool):
        self.layout = layout
        self.backward = backward
        self.dtype = q.dtype
        nq = layout.num_q
        if nq <= FULL_ORACLE_ROWS:
            self.rows = None
        else:
            starts = torch.tensor((0,) + layout.mask.q_sizes).cumsum(0)
            edges = torch.cat([starts[:-1], starts[1:] - 1]).clamp(0, nq - 1)
            spread = torch.linspace(0, nq - 1, SUBSET_ROWS).round().long()
            self.rows = torch.unique(torch.cat([edges, spread]))
        dense = layout.mask.to_dense()
        dense = dense[None] if dense.ndim == 2 else dense  # (B|1, Nq, Nk)
        if self.rows is not None:
            dense = dense[:, self.rows]
        self.allowed = dense.to(q.device)
        self.ref = self._compute(q, k, v, d_out, torch.float64)
        self.same = self._compute(q, k, v, d_out, q.dtype)

    def _compute(self, q, k, v, d_out, dtype):
        scale = q.shape[-1] ** -0.5
        b, h = q.shape[:2]
        rows = self.rows
        out = torch.zeros(
            *q.shape[:2], q.shape[2] if rows is None else len(rows), q.shape[3], dtype=dtype, device=q.device
        )
        grads = (
            [
                torch.zeros_like(out),
                torch.zeros(k.shape, dtype=dtype, device=q.device),
                torch.zeros(v.shape, dtype=dtype, device=q.device),
            ]
            if self.backward
            else None
        )
        # heads per chunk so a chunk's (rows x keys) score block stays near 32 MiB
        per_head = out.shape[2] * k.shape[2] * torch.finfo(dtype).bits // 8
        hc = max(1, min(h, (32 << 20) // max(1, per_head)))
        for bi in range(b):
            allowed = self.allowed[min(bi, self.allowed.shape[0] - 1)]  # (R, Nk)
            live = allowed.any(-1)
            safe = allowed | ~live[:, None]
            for h0 in range(0, h, hc):
                sl = (bi, slice(h0, h0 + hc))
                qs = q[sl] if rows is None else q[sl][:, rows]
                qs, ks, vs = (t.detach().to(dtype).requires_grad_(self.backward) for t in (qs, k[sl], v[sl]))
                with torch.set_grad_enabled(self.backward):
                    s = (qs @ ks.transpose(-1, -2)) * scale
                    p = s.masked_fill(~safe, float("-inf")).softmax(-1)
                    o = (p @ vs).masked_fill(~live[:, None], 0.0)
                out[sl] = o.detach()
                if self.backward:
                    g = d_out[sl] if rows is None else d_out[sl][:, rows]
                    dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), g.to(dtype))
                    grads[0][sl], grads[1][sl], grads[2][sl] = dq, dk, dv
        return out, grads

    def violations(self, name: str, out: torch.Tensor, grads) -> list[str]:
        """``out`` (and ``grads = (dq, dk, dv)``) against the oracle under the project's tolerance rule: one line per
        tensor outside it, with its error and bound (empty: all within)."""
        rows = self.rows

        def pick(t):
            return t if rows is None else t[:, :, rows.to(t.device)]

        checks = [("out", pick(out), self.same[0], self.ref[0])]
        if grads is not None and self.backward:
            checks.append(("dq", pick(grads[0]), self.same[1][0], self.ref[1][0]))
            if rows is None:
                checks += [(w, grads[i], self.same[1][i], self.ref[1][i]) for w, i in (("dk", 1), ("dv", 2))]
        found = (policy_violation(f"{name} {what}", got, same, ref, self.dtype) for what, got, same, ref in checks)
        return [v for v in found if v is not None]


def peak_memory(call: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during ``call()`` above what was allocated when it started (None if unmeasurable)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = call()
        sync(device)
        del result
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
        del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def import_commit(commit: str, into: Path):
    """``commit``'s ``zorro_kernels`` (taken with ``git archive`` into the folder ``into``) imported as the package
    ``zorro_base``: its imports are relative, so it runs beside the working tree's ``zorro_kernels``. Call its backends
    directly rather than ``zorro_attention``: both packages would register the same ``zorro::`` custom ops."""
    root = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "-C", str(root), "archive", commit, "zorro_kernels"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(into)  # our own repository's files
    (into / "zorro_kernels").rename(into / "zorro_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("zorro_base")
