"""``backend="auto"``: which backend runs an input, and why (:func:`explain` says it in words).

Only backends that take the input (no refusal reason) are candidates; nothing falls back silently.

**CUDA — measured.** Among the candidates (``triton``, ``segments``) auto times each once, on the first call with a
new *problem key* — ``(mask.key, B, H, Hkv, D, dtype, grad or not, device)``, where ``grad`` is whether autograd will
differentiate the call (forward+backward is timed then, forward alone otherwise) — and keeps the fastest, as
``torch.backends.cudnn.benchmark`` does (with a bias, its kind joins the key). The timing runs each candidate on the
caller's own tensors (detached; the backward with a gradient of ones), a warm-up call and then a few timed calls between
CUDA events; it draws no random numbers. It never times while ``torch.compile`` traces or while a CUDA graph is being
captured: those calls use a choice already measured for the key, else the static rule. Opt out with
``ZORRO_AUTO_BENCHMARK=0`` (read on first use) or :func:`set_benchmark`\\ ``(False)``; auto then uses the static rule:

- forward only: ``segments`` — the segment path's forward was the faster of the two at both ends of the range on
  the card we measured;
- forward+backward: ``triton`` when ``max(Nq, Nk) <= CUDA_GRAD_MAX_TOKENS``, else ``segments`` — Triton's is faster
  at Figure-2 size and slower at 16k tokens; the threshold is where the two measured ratios cross.

The measurements behind both, with the card: BENCHMARKS.md, "Where the code's constants come from".

**A candidate that fails is dropped, never surfaced.** If a candidate raises while auto times it or runs it (a Triton
compile or launch error, out of resources), it is dropped for that problem key with one ``RuntimeWarning`` naming the
backend and the error's first line, and the call runs on the next candidate; :func:`explain` lists it as dropped, and
nothing re-times or retries it until :func:`clear_cache`. The last candidate's own error is raised as it is, and a
forced ``backend="triton"`` raises ``KernelFailure`` naming the shapes and the first line. A backward that fails after
an untimed choice (timing off, or a rule's device) is not rerouted: the forward that saved its state has already run.

**CPU — a cost rule.** ``dense`` (one masked flash-attention call over the whole ``Nq x Nk`` matrix,
:mod:`zorro_kernels.backends.dense`) where its extra work costs less than the segment path's overheads, and never
past ``DENSE_MAX_CELLS`` of additive mask. Both sides in multiply-adds of the CPU flash kernel, from the segment
path's plan (O(segments), nothing ``N x N``)::

    Bm * Nq * Nk <= DENSE_MAX_CELLS  and
    B * H * D * (DENSE_PAIR_WORK * Nq * Nk - mean attended pairs per sample)
        <= g * (CPU_WORK_PER_CALL * (segment-path calls + CPU_FIXED_CALLS)
                + CPU_COPY_WORK * B * H * D * (query and key rows the steps copy; 0 for one call)
                + CPU_STRADDLE_WORK * B * H * (cells of the steps across a window edge or causal diagonal))

(a forward copies the output rows of every step, and the query and key rows only of steps it cannot read as
views: several ranges, a gather index, diagonal blocks, a ragged bucket; ``Bm`` = B with per-sample lengths, else 1;
``g`` = 2 for forward+backward, 1 for a forward: the segment path's backward makes its calls and copies everything
again, the dense one is one more masked call). The left side is the work the
dense call does on masked pairs (its masked kernel is a little slower per pair than the unmasked one:
``DENSE_PAIR_WORK``); the right side is what the segment path pays besides its attended pairs: a fixed cost per call
and per forward (Python, plan lookup, the NaN checks), gathering and scattering its steps' rows, and the masked
products of a step that straddles a window edge (elementwise passes over ``(B, H, rows, keys)``, ~300 flash
multiply-adds a cell). So a tiny problem goes to ``dense`` even when nothing is masked (one unmasked call on the
segment path costs ~2x the dense call at 1-14 tokens), sliding windows go to ``dense`` up to the cell bound, and
large or block-sparse problems to ``segments``. The constants are fitted to ``python -m benchmarks.cpu_auto_rule
--sweep`` (full, Zorro, packed, sliding-window and Swin layouts at 1 to 2k tokens, dense against segments, forward
and forward+backward; BENCHMARKS.md, "Where the code's constants come from"): below the cell bound the pick was the
faster backend or within 10% of it in every cell measured but three (at most 1.25x slower). Under
``torch.compile`` the plan is not built while tracing: the rule counts every pair as masked and one call per query
segment (it picks ``dense`` less often).

Where the compiled interval kernel builds (:mod:`zorro_kernels.backends.intervals`), the rule then weighs it against
that pick, all three in flash multiply-adds with the attended pairs included::

    intervals = B * H * D * INTERVAL_[GRAD_]PAIR_WORK * mean attended pairs per sample + INTERVAL_[GRAD_]CALL_WORK
    dense     = B * H * D * DENSE_PAIR_WORK * Nq * Nk
    segments  = B * H * D * (mean attended pairs per sample + SEGMENTS_CAUSAL_PAIR_WORK * those in causal calls)
                + (the segment path's work above)

and takes ``intervals`` when it costs less than the pick. The kernel skips what a row does not attend at about the
unmasked flash kernel's speed per pair, so it wins wherever something is masked and the problem is past tens of
tokens; ``dense`` keeps tiny problems (its fixed cost is lower, its backward especially) and ``segments`` large
unmasked forwards (one plain flash call, a few percent faster per pair; the kernel's backward is faster than
ATen's). Fitted to the same sweep with the kernel beside (BENCHMARKS.md). Not while ``torch.compile`` traces (its
cost needs the attended pairs): the rule is then as above. Where the kernel does not build, or
``ZORRO_CPU_KERNEL=0``, the rule is exactly as above.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import _ops
from ._checks import check_backend_name, check_inputs
from .backends import BACKENDS
from .backends.intervals import mean_attended as _interval_mean_attended
from .backends.ragged import ragged_plan
from .backends.segments import Step, build_plan
from .bias import bias_tensor

__all__ = [
    "explain",
    "select_backend",
    "Explanation",
    "set_benchmark",
    "clear_cache",
    "PRIORITY",
    "CPU_WORK_PER_CALL",
    "CPU_FIXED_CALLS",
    "CPU_COPY_WORK",
    "CPU_STRADDLE_WORK",
    "DENSE_PAIR_WORK",
    "DENSE_MAX_CELLS",
    "INTERVAL_PAIR_WORK",
    "INTERVAL_GRAD_PAIR_WORK",
    "INTERVAL_CALL_WORK",
    "INTERVAL_GRAD_CALL_WORK",
    "SEGMENTS_CAUSAL_PAIR_WORK",
    "CUDA_GRAD_MAX_TOKENS",
]

# candidates per device type, in the order ties are broken
PRIORITY = {"cuda": ("triton", "segments"), "cpu": ("dense", "intervals", "segments")}
# both from measurements (BENCHMARKS.md, "Where the code's constants come from"); the module docstring says why
CPU_WORK_PER_CALL = 400_000  # one segment-path call's fixed cost, in flash multiply-adds
CPU_FIXED_CALLS = 1  # the segment path's fixed cost per forward (and backward) beyond its calls, in calls
CPU_COPY_WORK = 20  # per element of a gathered query or key row (gather, scatter, their autograd)
CPU_STRADDLE_WORK = 300  # per (sample, head, cell) of a straddling step's element mask
DENSE_PAIR_WORK = 1.03  # the masked dense kernel's work per pair, against the unmasked kernel's
DENSE_MAX_CELLS = 1 << 20  # the dense backend's cached additive mask: at most this many (sample map, query, key) cells
INTERVAL_PAIR_WORK = 1.05  # the compiled interval kernel's work per attended pair (its tiles' masked pairs included)
INTERVAL_GRAD_PAIR_WORK = (
    0.92  # the same forward+backward, against ATen's flash forward+backward (its backward is faster)
)
INTERVAL_CALL_WORK = 90_000  # its fixed cost per forward beyond the dense call's, in flash multiply-adds
INTERVAL_GRAD_CALL_WORK = 700_000  # the same per forward+backward
SEGMENTS_CAUSAL_PAIR_WORK = 1.3  # what ATen's causal flash calls cost the segment path beyond an attended pair's work
CUDA_GRAD_MAX_TOKENS = 7500
_REPS = 5

_benchmark: Optional[bool] = None  # None: read ZORRO_AUTO_BENCHMARK on first use
_measured: dict = {}  # problem key -> {backend: ms}
_failed: dict = {}  # problem key -> {backend: the first line of the error it raised}: dropped for that key
_generation = [0]  # bumped when settings change: final choices cached on masks are then stale


def set_benchmark(enabled: bool) -> None:
    """Time the candidates on CUDA (the default) or use the static rule (``False``); see the module docstring."""
    global _benchmark
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _benchmark = enabled
    _generation[0] += 1


def clear_cache() -> None:
    """Forget every measured choice and every dropped candidate (the next call with each problem key times again)."""
    _measured.clear()
    _failed.clear()
    _generation[0] += 1


def _benchmark_enabled() -> bool:
    global _benchmark
    if _benchmark is None:
        _benchmark = os.environ.get("ZORRO_AUTO_BENCHMARK", "1") not in ("", "0")
    return _benchmark


def _measures(device: torch.device) -> bool:
    """Whether auto times candidates on this device (else a rule decides)."""
    return device.type == "cuda"


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _bias_kind(bias) -> Optional[str]:
    return None if bias is None else type(bias).__name__


def problem_key(q, k, mask, grad: bool, bias=None) -> tuple:
    """What a measured choice is kept under: layout, shapes, dtype, grad or not, device (and the bias's kind)."""
    b, h, _, d = q.shape
    return mask.key, b, h, k.shape[1], d, q.dtype, grad, str(q.device), _bias_kind(bias)


def wants_grad(q, k, v, bias=None) -> bool:
    """Whether autograd will differentiate a call on these tensors."""
    if not torch.is_grad_enabled():
        return False
    t = bias_tensor(bias)
    return q.requires_grad or k.requires_grad or v.requires_grad or (t is not None and t.requires_grad)


# ------------------------------------------------------------------------------------------------------ rules
def _plan_steps(mask) -> list:
    """The segment path's steps on CPU for this mask (over every length pattern; a ragged batch's buckets where it
    uses them, without building the per-pattern plan it does not run)."""
    rp = mask.derived(ragged_plan)
    if rp is not None:
        return [st for p in rp.exact.patterns for st in p.steps] + [st for b in rp.buckets for st in b.steps]
    return [st for p in mask.derived(build_plan).patterns for st in p.steps]


def _rows(ranges) -> int:
    return sum(e - s for s, e in ranges)


def _reads_a_view(st) -> bool:
    """Whether the forward reads the step's rows and keys as views of the inputs (one range each, no gather index,
    no diagonal blocks folded into heads, no bucket of the batch) rather than copying them."""
    return (
        isinstance(st, Step) and len(st.q_ranges) == 1 and len(st.k_ranges) == 1 and st.index is None and st.blocks == 1
    )


def _plan_costs(mask) -> tuple[int, int, int, int]:
    """``(calls, moved, moved_fwd, straddled)`` of the segment path on CPU: its attention calls; the query and key
    rows its steps gather and scatter, forward and backward (0 for one call: it reads the inputs as they are); those
    of the forward alone, which reads a one-range step as views and copies only its output rows; the cells of the
    element masks of steps across a window edge or causal diagonal (masked products, not a flash call)."""
    steps = _plan_steps(mask)
    if len(steps) < 2:
        moved = moved_fwd = 0
    else:
        moved = sum(_rows(st.q_ranges) + _rows(st.k_ranges) for st in steps)
        moved_fwd = sum(_rows(st.q_ranges) + (0 if _reads_a_view(st) else _rows(st.k_ranges)) for st in steps)
    straddled = sum(m.numel() * st.blocks for st in steps if (m := getattr(st, "mask", None)) is not None)
    return len(steps), moved, moved_fwd, straddled


def _mean_causal_pairs(mask) -> float:
    """Mean attended pairs per sample inside the segment path's causal flash calls (their squares below the diagonal),
    which ATen's CPU kernel runs at 0.36-0.44 of its plain calls' rate per pair (BENCHMARKS.md, Gemma-3 bounds)."""
    rp = mask.derived(ragged_plan)
    patterns = rp.exact.patterns if rp is not None else mask.derived(build_plan).patterns
    n = mask.batch_size or 1
    total = 0.0
    for p in patterns:
        share = 1.0 if p.batch is None else len(p.batch) / n
        for st in p.steps:
            if isinstance(st, Step) and st.causal:
                side = _rows(st.k_ranges) // st.blocks - st.prefix
                total += share * st.blocks * side * (side + 1) / 2
    return total


def _mean_attended(mask) -> float:
    a = mask.attended()
    return float(a.sum()) / a.numel()


def _interval_work(b: int, h: int, d: int, attended: float, grad: bool) -> float:
    """The compiled interval kernel's work in flash multiply-adds: its attended pairs plus a fixed cost."""
    if grad:
        return b * h * d * INTERVAL_GRAD_PAIR_WORK * attended + INTERVAL_GRAD_CALL_WORK
    return b * h * d * INTERVAL_PAIR_WORK * attended + INTERVAL_CALL_WORK


def _cpu_rule(q, k, mask, grad: bool = False, candidates: tuple = ("dense", "segments")) -> str:
    """The CPU pick among ``candidates`` (the backends that take the input; see the module docstring)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    # the dense backend's work, None past the cells it caches a mask for
    dense = b * h * d * DENSE_PAIR_WORK * nq * nk if (mask.batch_size or 1) * nq * nk <= DENSE_MAX_CELLS else None
    if "intervals" in candidates and not torch.compiler.is_compiling():
        # The kernel's cost needs only the attended pairs, which its own (cached) intervals count. Where it is below
        # the least the others can cost (dense's work; the segment path's pairs plus its fixed cost, with no call or
        # copy counted), the full rule below would pick it too: pick it without building the segment plan, so a fresh
        # mask pays for its intervals alone (the Gemma-3 row: mask + intervals 0.76 ms, with the plan 1.6 ms).
        attended = _interval_mean_attended(mask)
        if attended is not None:
            floor = b * h * d * attended + CPU_WORK_PER_CALL * CPU_FIXED_CALLS * (2 if grad else 1)
            if dense is not None:
                floor = min(floor, dense)
            if _interval_work(b, h, d, attended, grad) < floor:
                return "intervals"
    if torch.compiler.is_compiling():  # no plan while tracing: every pair counted as masked, a call per segment
        attended, (calls, moved, moved_fwd, straddled) = 0.0, (len(mask.q_sizes), 0, 0, 0)
    else:
        attended, (calls, moved, moved_fwd, straddled) = mask.derived(_mean_attended), mask.derived(_plan_costs)
    segments = (  # the segment path's work beside its attended pairs
        CPU_WORK_PER_CALL * (calls + CPU_FIXED_CALLS)
        + CPU_COPY_WORK * b * h * d * (moved if grad else moved_fwd)
        + CPU_STRADDLE_WORK * b * h * straddled
    )
    if grad:  # the backward makes the same calls and gathers again; the dense backward, one more masked call
        segments *= 2
    # each backend's work in flash multiply-adds, the attended pairs included
    costs = {"segments": b * h * d * attended + segments}
    if dense is not None:
        costs["dense"] = dense
    # dense against segments as without the kernel (dense on a tie), then the kernel where it costs less
    pick = "dense" if "dense" in costs and costs["dense"] <= costs["segments"] else "segments"
    if "intervals" not in candidates or torch.compiler.is_compiling():  # its cost needs the attended pairs
        return pick
    costs["intervals"] = _interval_work(b, h, d, attended, grad)
    # the segment path's causal calls, slow per pair (weighed here only: the dense/segments pick stays as fitted)
    costs["segments"] += b * h * d * SEGMENTS_CAUSAL_PAIR_WORK * mask.derived(_mean_causal_pairs)
    return "intervals" if costs["intervals"] < costs[pick] else pick


def _cuda_rule(q, k, grad: bool) -> str:
    if grad and max(q.shape[2], k.shape[2]) <= CUDA_GRAD_MAX_TOKENS:
        return "triton"
    return "segments"


def static_choice(q, k, mask, grad: bool, candidates: Optional[tuple] = None) -> str:
    """The rule's backend (which may still refuse the input; see :func:`_choose`). ``candidates``: the backends that
    take the input (by default those of ``PRIORITY`` that do not refuse it)."""
    if q.device.type == "cuda":
        return _cuda_rule(q, k, grad)
    if candidates is None:
        names = PRIORITY.get(q.device.type, ())
        candidates = tuple(n for n in names if n in BACKENDS and not BACKENDS[n].not_supported_reasons(q, k, k, mask))
    return _cpu_rule(q, k, mask, grad, candidates)


# ------------------------------------------------------------------------------------------------------ timing
def _time(name: str, q, k, v, mask, scale: float, grad: bool, bias=None) -> float:
    """Median milliseconds of one call (forward, or forward+backward when ``grad``) of backend ``name``."""
    backend = BACKENDS[name]
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))

    def call():
        with torch.set_grad_enabled(grad):
            if backend.eager is not None:
                out = backend.eager(q, k, v, mask, scale, bias)
            else:
                out = _ops.attention(q, k, v, mask, scale, name, bias)
            if grad:
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    call()  # warm-up: compiles kernels, builds plans
    times = []
    for _ in range(_REPS):
        if q.device.type != "cuda":  # (a device auto does not time, unless a test says otherwise)
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _drop(key: tuple, name: str, err: BaseException, when: str) -> None:
    """Drop candidate ``name`` for problem ``key`` after it raised ``err``: one warning, then never tried again for
    the key (until :func:`clear_cache`); choices cached on masks become stale."""
    line = _first_line(err)
    _failed.setdefault(key, {})[name] = line
    _generation[0] += 1
    warnings.warn(
        f"zorro_attention backend='auto': {name} failed {when} ({line}); dropped for this problem "
        f"(explain() shows it), the next candidate runs",
        RuntimeWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel that names the first frame outside zorro_kernels (the user's call)."""
    import sys

    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("zorro_kernels"):
        frame, level = frame.f_back, level + 1
    return level


def _time_all(names: list, key: tuple, q, k, v, mask, scale: float, grad: bool, bias=None) -> dict:
    """``{backend: ms}`` over ``names``; a candidate that raises is dropped for ``key`` (see :func:`_drop`). If every
    one raises, the last error is raised."""
    times = {}
    for i, n in enumerate(names):
        try:
            times[n] = _time(n, q, k, v, mask, scale, grad, bias)
        except Exception as err:  # noqa: BLE001 - compile/launch/resource errors: the next candidate runs
            if not times and i == len(names) - 1:
                raise
            _drop(key, n, err, "while auto timed it")
    return times


# ------------------------------------------------------------------------------------------------------ choice
@dataclass
class Explanation:
    """Why ``backend="auto"`` picks :attr:`chosen` for an input.

    Attributes:
        chosen: the backend's name.
        how: ``"measured"`` (fastest of the timed candidates), ``"rule"`` (the static rule; see
        :mod:`zorro_kernels.auto`),
            ``"only candidate"`` or ``"forced"``.
        reasons: backend name -> its refusal reasons (empty list: it takes the input), for every candidate.
        times_ms: backend name -> measured milliseconds (CUDA; empty when nothing was timed).
        key: the problem key measured choices are kept under.
        note: why the rule was used instead of timing, if it was.
        failed: backend name -> the first line of the error it raised on this problem (it is no longer tried for the
            problem key; :func:`clear_cache` forgets it).
    """

    chosen: str
    how: str
    reasons: dict
    times_ms: dict = field(default_factory=dict)
    key: tuple = ()
    note: str = ""
    failed: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"zorro_attention backend: {self.chosen} ({self.how}{'; ' + self.note if self.note else ''})"]
        for name, reasons in self.reasons.items():
            t = f", {self.times_ms[name]:.3f} ms" if name in self.times_ms else ""
            state = "takes it" if not reasons else "refuses: " + "; ".join(reasons)
            if name in self.failed:
                state = f"dropped for this problem: it failed ({self.failed[name]})"
            lines.append(f"  {name}: {state}{t}")
        return "\n".join(lines)

    __repr__ = __str__


def _choose(q, k, v, mask, scale: float, grad: bool, bias=None, *, measure: bool = True) -> Explanation:
    names = PRIORITY.get(q.device.type, ("segments",))
    reasons = {
        n: (
            BACKENDS[n].not_supported_reasons(q, k, v, mask, bias=bias)
            if n in BACKENDS
            else ["not available in this install"]
        )
        for n in names
    }
    key = () if torch.compiler.is_compiling() else problem_key(q, k, mask, grad, bias)
    failed = dict(_failed.get(key, {}))
    ok = [n for n in names if not reasons[n] and n not in failed]
    if not ok:
        raise ValueError(
            "no zorro_attention backend supports this input:\n  "
            + "\n  ".join(
                f"{n}: " + ("failed on it: " + failed[n] if n in failed else "; ".join(r)) for n, r in reasons.items()
            )
        )
    if len(ok) == 1:
        return Explanation(ok[0], "only candidate", reasons, dict(_measured.get(key, {})), key, failed=failed)
    note = ""
    if _measures(q.device):
        if not key:
            note = "not timed while torch.compile traces"
        else:
            times = _measured.get(key)
            if times is None and not _benchmark_enabled():
                note = "timing is off (ZORRO_AUTO_BENCHMARK=0 or set_benchmark(False))"
            elif times is None and _capturing(q.device):
                note = "not timed during CUDA graph capture"
            elif times is None and measure:
                times = _measured[key] = _time_all(ok, key, q, k, v, mask, scale, grad, bias)
                failed = dict(_failed.get(key, {}))
                ok = [n for n in ok if n not in failed]
            if times is not None and set(ok) <= set(times):
                best = min(ok, key=lambda n: times[n])
                how = "measured" if len(ok) > 1 else "only candidate"
                return Explanation(best, how, reasons, dict(times), key, failed=failed)
    rule = static_choice(q, k, mask, grad, tuple(ok))
    chosen = rule if rule in ok else ok[0]
    return Explanation(chosen, "rule", reasons, dict(_measured.get(key, {})), key, note, failed)


def _final_choices(mask) -> dict:
    return {}


def choose(q, k, v, mask, scale: float, grad: bool, bias=None) -> str:
    """The backend ``"auto"`` runs for these (validated) inputs; ``grad``: whether autograd will differentiate the
    call. A choice that can no longer change (measured, only candidate, or a rule's on a device that is not timed) is
    kept on the mask under everything the candidates' refusals and the timing depend on, so a repeated call costs one
    lookup."""
    if torch.compiler.is_compiling():
        return _choose(q, k, v, mask, scale, grad, bias).chosen
    key = (
        q.shape,
        k.shape,
        q.stride(),
        k.stride(),
        v.stride(),
        q.dtype,
        q.device,
        grad,
        _bias_kind(bias),
        torch.are_deterministic_algorithms_enabled(),
        _generation[0],
        PRIORITY.get(q.device.type),
    )
    final = mask.derived(_final_choices)
    name = final.get(key)
    if name is None:
        e = _choose(q, k, v, mask, scale, grad, bias)
        name = e.chosen
        if e.how != "rule" or not _measures(q.device):
            final[key] = name
    return name


def run_guarded(q, k, v, mask, scale: float, grad: bool, bias, call):
    """``call(name)`` with auto's choice for these (validated) inputs. If the chosen backend raises and another
    candidate is left, the chosen one is dropped for the problem key (one warning; :func:`explain` shows it) and the
    call runs on the next; the last candidate's error is raised as it is. Eager calls only: under ``torch.compile`` the
    op runs later, inside the graph."""
    while True:
        name = choose(q, k, v, mask, scale, grad, bias)
        try:
            return call(name)
        except Exception as err:  # noqa: BLE001 - compile/launch/resource errors: the next candidate runs
            e = _choose(q, k, v, mask, scale, grad, bias, measure=False)
            if len([n for n, r in e.reasons.items() if not r and n not in e.failed]) <= 1 or not e.key:
                raise
            _drop(e.key, name, err, "when auto ran it")


def select_backend(
    q, k, v, mask, backend: str = "auto", bias=None, scale: Optional[float] = None, grad: Optional[bool] = None
) -> str:
    """Name of the backend that will run (validated inputs); raises ValueError with every refusal's reasons if none
    can. ``"auto"`` is :mod:`zorro_kernels.auto`'s choice (see :func:`zorro_kernels.explain`); ``grad`` (default: what
    autograd will do with these tensors) says whether the call will be differentiated."""
    check_backend_name(backend)
    if backend == "auto":
        return choose(
            q,
            k,
            v,
            mask,
            q.shape[-1] ** -0.5 if scale is None else float(scale),
            wants_grad(q, k, v, bias) if grad is None else grad,
            bias,
        )
    reasons = BACKENDS[backend].not_supported_reasons(q, k, v, mask, bias=bias)
    if reasons:
        raise ValueError(f"backend {backend!r} cannot run this input: " + "; ".join(reasons))
    return backend


def explain(
    q, k, v, mask, *, bias=None, scale: Optional[float] = None, backend: str = "auto", grad: Optional[bool] = None
) -> Explanation:
    """Which backend :func:`zorro_kernels.zorro_attention` runs for these inputs, and why.

    Args:
        q, k, v, mask, bias, scale, backend: as :func:`~zorro_kernels.zorro_attention` (validated the same way).
        grad: explain a forward+backward call (True) or a forward (False); default: what autograd would do with these
            tensors now.

    Returns:
        an :class:`Explanation` (``print`` it): the chosen backend, how it was chosen (measured / rule / only
        candidate / forced), every candidate's refusal reasons and, on CUDA, the measured times. On CUDA this times
        the candidates if the key has not been timed yet, as the first ``auto`` call would.
    """
    check_inputs(q, k, v, mask, scale, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    grad = wants_grad(q, k, v, bias) if grad is None else bool(grad)
    check_backend_name(backend)
    if backend != "auto":
        reasons = BACKENDS[backend].not_supported_reasons(q, k, v, mask, bias=bias)
        return Explanation(backend, "forced" if not reasons else "forced, but it refuses", {backend: reasons})
    return _choose(q, k, v, mask, scale, grad, bias)
