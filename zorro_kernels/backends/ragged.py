"""Ragged batches on the CPU segment path: per-sample length patterns grouped into padded buckets.

A batch whose samples have different ``lengths`` has one plan pattern per distinct lengths row, so the segment path
(:mod:`.segments`) makes one set of small calls per sample: at B=256 that is hundreds of calls whose fixed costs
(gathers, scatters, kernel setup) outweigh the attention itself when the samples are small. Here the patterns are
sorted by their work and cut into *buckets*; a bucket of several patterns runs the plan of its elementwise-largest
lengths once, batched over its samples, each sample's padding hidden inside the call:

- keys a sample may not attend (its padding inside the bucket's ranges) are zero-filled in the gathered copy
  (``masked_fill``: selected away, never multiplied by 0) and given a ``-inf`` per-sample key bias, so they take no
  weight and carry no NaN;
- query rows a sample does not have (or whose keys in the step are all padding) are zero-filled before the backward
  and their results selected to 0, and so are the key gradients of a sample none of whose rows attends the step.

Inside a bucket of the whole batch (small samples: one bucket wins, read as views), a step of one query and one key
segment (audio x audio, video x video) still pays for every sample's padding up to the longest sample; such a step
runs in *pieces*: its samples grouped by their own lengths in that step, each piece gathered up to its longest
sample and run as one call, the rows and keys past that cut never read (padding for those samples: their outputs
and dq set to 0, and their dK/dV where this step is the first to write them).

This is exact under the mask's semantics: a sample's mask is the bucket's mask with its own padding removed from the
query and the key side, and every row of a plain step sees every key of the step. Buckets of one pattern, and
buckets whose plan has steps other than plain ones (band edges, causal blocks, fused runs), run the exact per-pattern
plan of :mod:`.segments`. Only the CPU path without a bias uses buckets.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..reference import expand_kv_heads
from .segments import (
    Pattern,
    Plan,
    Step,
    _bwd_cpu,
    _complement_np,
    _fwd_cpu,
    _pattern_steps,
    _zero,
    build_plan,
    cpu_backward,
    cpu_forward,
    segment_attention,
)

__all__ = ["RaggedPlan", "ragged_plan", "ragged_calls", "cpu_forward_mask", "cpu_backward_mask", "ragged_attention"]

# One plan step's fixed cost on the CPU path (gathers, kernel setup, scatters), in attended (query, key) pairs of one
# sample: a bucket pays it per step, so many small patterns are worth padding to one bucket, large ones are not.
STEP_COST_PAIRS = 3000
# Copying one token's row out of q, k or v for a bucket of some of the samples (one whole-batch bucket reads views),
# in the same units.
COPY_PAIRS = 8
# at most this many runs of equal-work patterns are considered as bucket edges (the grouping is quadratic in them)
MAX_EDGES = 64
# the same for a step's pieces: one length per sample, so fewer atoms cut as well, and the plan (built per mask, a
# new one per batch in training) stays a few ms
PIECE_EDGES = 16
# A bucket step with at most this many query rows (per query head) runs its backward as batched matmuls
# (:func:`_matmul_backward`): ATen's CPU flash backward zeroes and writes dK/dV for every key of the step in its own
# layout, to be added into dk/dv after, which costs far more than the few rows' attention (the fusion step at the
# demo's size, 4 rows x 100 keys, B=256, H=4, D=32: 15.6 ms against 11.1; at 32 rows x 32 keys the flash kernel wins,
# 10.4 ms against 15.0; BENCHMARKS.md).
FEW_ROWS = 8
# A whole-batch bucket's step whose rows and keys are one segment each (valid tokens a prefix per sample: audio x
# audio, video x video) runs in *pieces*: its samples sorted by their own lengths and cut (the
# same dynamic programme as the buckets, this as the per-piece cost) so each piece runs at its longest sample's
# length: the pairs saved outweigh gathering the piece's rows and keys and scattering its results (forward and
# backward; BENCHMARKS.md).
PIECE_COST_PAIRS = 12000


class PaddedStep(NamedTuple):
    """A plain step of a bucket's plan with its samples' padding (bool masks over the gathered rows / keys; None
    where nothing is marked)."""

    q_ranges: tuple
    k_ranges: tuple
    k_writes: tuple
    # (m, C): keys a sample does not have: ``-inf`` bias (and zero-filled when an input is not finite)
    hidden_keys: Optional[torch.Tensor]
    # (m, C): keys whose gradients from this step are 0 (hidden, or the sample has no live row in the step: only
    # NaN/Inf could make them nonzero)
    no_grad_keys: Optional[torch.Tensor]
    # (sample, first row, end row) in the gathered rows: rows that return 0 (padding, or no valid key in the step)
    dead: tuple
    # several key ranges are read as the one range spanning them when the keys in between (padding, or segments the
    # rows may not see) cost less to score than to copy out: ``(start, stop)``, its bool (m, stop - start) hidden
    # keys and keys with no gradient from the step, or None (then the masks above are over ``k_ranges``)
    span: Optional[tuple[int, int]]
    span_hidden: Optional[torch.Tensor]
    span_no_grad: Optional[torch.Tensor]
    # the step's pieces (see ``PIECE_COST_PAIRS``), or () where it runs whole
    pieces: tuple = ()


class Piece(NamedTuple):
    """Some samples of a whole-batch bucket's step, grouped by their lengths: ``step`` is the
    step cut to their longest rows and keys (None where none of them attends anything), over the samples ``batch``
    (gathered); ``q_rest``/``k_rest``: the step's rows past the cut (dq 0) and the keys past it that the step writes
    first (dK/dV 0) for those samples."""

    batch: torch.Tensor
    step: Optional[PaddedStep]
    q_rest: tuple
    k_rest: tuple


class Bucket(NamedTuple):
    batch: torch.Tensor  # int64 sample indices
    steps: tuple[PaddedStep, ...]
    q_uncovered: tuple
    k_uncovered: tuple
    dead: tuple[torch.Tensor, torch.Tensor]  # int64 (sample, query row) of every dead row of its steps
    whole: bool  # the whole batch in order: steps read views of the inputs, nothing is gathered


class RaggedPlan(NamedTuple):
    exact: Plan  # the patterns that run as the segment path runs them (each with its samples)
    buckets: tuple[Bucket, ...]
    dead: tuple[torch.Tensor, torch.Tensor]  # every bucket's dead rows


def _work(runs, lq: np.ndarray, lk: np.ndarray, copied: bool = False) -> np.ndarray:
    """Attended pairs per lengths row (no band): ``(P, Sq)``, ``(P, Sk)`` -> ``(P,)``; ``copied``: plus the cost of
    copying the rows and keys out for a bucket (an upper bound: keys shared by query segments counted for each)."""
    cum = np.concatenate([np.zeros((lk.shape[0], 1), dtype=np.int64), np.cumsum(lk, 1)], 1)
    keys = cum[:, runs.c1] - cum[:, runs.c0]
    work = (lq[:, runs.row] * keys).sum(1)
    return work + COPY_PAIRS * (lq.sum(1) + 2 * keys.sum(1)) if copied else work


def _cuts(
    work: np.ndarray, count: np.ndarray, lq, lk, runs, step_cost: int, max_edges: int = MAX_EDGES
) -> Optional[list[tuple[int, int]]]:
    """Contiguous groups of the patterns (sorted by work, largest first) minimising the padded work of each group
    plus its copies plus ``step_cost`` per group: a dynamic programme over at most ``max_edges`` atoms (runs of
    patterns). None when one bucket of the whole batch, which copies nothing, costs less."""
    p = len(work)
    edges = np.unique(np.linspace(0, p, min(p, max_edges) + 1).round().astype(np.int64))
    n = len(edges) - 1
    # the elementwise maximum and the sample count of every atom range [i, j)
    lq_atom = np.stack([lq[edges[a] : edges[a + 1]].max(0) for a in range(n)])
    lk_atom = np.stack([lk[edges[a] : edges[a + 1]].max(0) for a in range(n)])
    cnt = np.concatenate([[0], np.cumsum([count[edges[a] : edges[a + 1]].sum() for a in range(n)])])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        # ranges [i, j) for every i < j: running maxima from atom j - 1 back to 0
        mq = np.maximum.accumulate(lq_atom[j - 1 :: -1], 0)
        mk = np.maximum.accumulate(lk_atom[j - 1 :: -1], 0)
        i = np.arange(j - 1, -1, -1)
        cost = best[i] + (cnt[j] - cnt[i]) * _work(runs, mq, mk, copied=True) + step_cost
        b = int(np.argmin(cost))
        best[j], back[j] = cost[b], i[b]
    whole = cnt[n] * _work(runs, lq_atom.max(0, keepdims=True), lk_atom.max(0, keepdims=True))[0] + step_cost
    if whole <= best[n]:
        return None
    out, j = [], n
    while j > 0:
        out.append((int(edges[back[j]]), int(edges[j])))
        j = int(back[j])
    return out[::-1]


def _plain(steps) -> bool:
    return all(st.mask is None and not st.causal and st.index is None and st.blocks == 1 for st in steps)


def _cols(x: torch.Tensor, ranges) -> torch.Tensor:
    """Columns ``ranges`` of ``x (m, N)`` (slices: advanced indexing costs far more)."""
    return x[:, ranges[0][0] : ranges[0][1]] if len(ranges) == 1 else torch.cat([x[:, s:e] for s, e in ranges], 1)


def _runs_of(dead: torch.Tensor) -> tuple:
    """``(sample, start, stop)`` for every run of True in the rows of bool ``(m, R)``."""
    d = np.zeros((dead.shape[0], dead.shape[1] + 2), dtype=np.int8)
    d[:, 1:-1] = dead.numpy()
    edge = np.diff(d, axis=1)
    b0, r0 = np.nonzero(edge == 1)
    _, r1 = np.nonzero(edge == -1)
    return tuple(zip(b0.tolist(), r0.tolist(), r1.tolist()))


def _span(st, valid_k: torch.Tensor):
    """The step's key span and its hidden keys (see :class:`PaddedStep`), or ``(None, None)``."""
    if len(st.k_ranges) < 2:
        return None, None
    s0, s1 = st.k_ranges[0][0], st.k_ranges[-1][1]
    gap = (s1 - s0) - sum(e - s for s, e in st.k_ranges)
    rows = sum(e - s for s, e in st.q_ranges)
    if rows * gap > 2 * (s1 - s0):
        return None, None
    seen = torch.zeros(s1 - s0, dtype=torch.bool)
    for s, e in st.k_ranges:
        seen[s - s0 : e - s0] = True
    return (s0, s1), ~(valid_k[:, s0:s1] & seen)


def _padded_step(st, valid_q: torch.Tensor, valid_k: torch.Tensor) -> PaddedStep:
    """Step ``st`` over samples whose valid tokens are ``valid_q (m, Nq)``, ``valid_k (m, Nk)``."""
    vk = _cols(valid_k, st.k_ranges)
    vq = _cols(valid_q, st.q_ranges)
    seen = vk.any(1, keepdim=True)
    live = vq & seen  # a row whose keys in its step are all padding sees nothing
    attends = live.any(1, keepdim=True)
    span, span_hidden = _span(st, valid_k)
    span_no_grad = None if span is None else span_hidden | ~attends
    return PaddedStep(
        st.q_ranges,
        st.k_ranges,
        st.k_writes,
        None if bool(vk.all()) else ~vk,
        None if bool((vk & attends).all()) else ~(vk & attends),
        _runs_of(~live),
        span,
        span_hidden,
        span_no_grad,
    )


def _prefix_lengths(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Per row of bool ``x (m, R)``, its count of True where they are a prefix; None where some row's are not."""
    n = x.sum(1)
    return n if torch.equal(x, torch.arange(x.shape[1]) < n[:, None]) else None


def _pieces(st, valid_q: torch.Tensor, valid_k: torch.Tensor) -> tuple:
    """The pieces of a whole-batch step (see ``PIECE_COST_PAIRS``), or () where it runs whole: steps
    of one query and one key range whose valid tokens are prefixes, cut where that pays."""
    if len(st.q_ranges) != 1 or len(st.k_ranges) != 1 or sum(e - s for s, e in st.q_ranges) <= FEW_ROWS:
        return ()
    r, c = _prefix_lengths(_cols(valid_q, st.q_ranges)), _prefix_lengths(_cols(valid_k, st.k_ranges))
    if r is None or c is None:
        return ()
    none = (r == 0) | (c == 0)  # nothing attended: no rows, no keys to compute
    r, c = r.masked_fill(none, 0), c.masked_fill(none, 0)
    uniq, inverse, count = torch.unique(torch.stack([r, c], 1), dim=0, return_inverse=True, return_counts=True)
    u, count = uniq.numpy(), count.numpy()
    runs = _OneCell(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64))
    order = np.argsort(-(u[:, 0] * u[:, 1]), kind="stable")
    groups = _piece_groups(u[order, 0] * u[order, 1], count[order], u[order, :1], u[order, 1:], runs)
    if groups is None:
        return ()
    (qs, qe), (ks, _) = st.q_ranges[0], st.k_ranges[0]
    by_pattern = torch.argsort(inverse, stable=True).split(torch.from_numpy(count).tolist())
    out = []
    for a, b in groups:
        members = order[a:b]
        batch = torch.cat([by_pattern[x] for x in members.tolist()]).sort().values
        rows, keys = (int(u[members, i].max()) for i in (0, 1))
        cut = Step(
            ((qs, qs + rows),),
            ((ks, ks + keys),),
            k_writes=tuple((s0, min(e0, ks + keys), o, acc) for s0, e0, o, acc in st.k_writes if s0 < ks + keys),
        )
        step = None if rows == 0 else _padded_step(cut, valid_q.index_select(0, batch), valid_k.index_select(0, batch))
        k_rest = tuple((max(s0, ks + keys), e0) for s0, e0, _, acc in st.k_writes if not acc and e0 > ks + keys)
        q_rest = ((qs + rows, qe),) if qs + rows < qe else ()
        out.append(Piece(batch, step, q_rest, k_rest))
    return tuple(out)


def _piece_groups(work, count, lq, lk, runs) -> Optional[list[tuple[int, int]]]:
    """:func:`_cuts` of a step's length patterns (sorted by work, largest first) with the per-piece cost."""
    return _cuts(work, count, lq, lk, runs, PIECE_COST_PAIRS, PIECE_EDGES)


class _OneCell(NamedTuple):
    """The ``runs`` of one query segment seeing one key segment, for :func:`_work` over a step's own lengths."""

    row: np.ndarray
    c0: np.ndarray
    c1: np.ndarray


def _padded_bucket(batch, steps, q_unc, k_unc, valid_q: torch.Tensor, valid_k: torch.Tensor, whole: bool) -> Bucket:
    """The bucket of samples ``batch`` running ``steps`` (the plan of their largest lengths); ``valid_q (m, Nq)``,
    ``valid_k (m, Nk)``: their valid tokens."""
    out, dead_b, dead_r = [], [], []
    for st in steps:
        ps = _padded_step(st, valid_q, valid_k)
        if whole:
            ps = ps._replace(pieces=_pieces(st, valid_q, valid_k))
        dead = ~_cols(valid_q, st.q_ranges) | ~_cols(valid_k, st.k_ranges).any(1, keepdim=True)
        b, r = dead.nonzero().unbind(1)
        dead_b.append(batch[b])
        dead_r.append(torch.cat([torch.arange(s, e) for s, e in st.q_ranges])[r])
        out.append(ps)
    none = [torch.zeros(0, dtype=torch.int64)]  # a bucket with no step (no row sees anything): no dead row either
    return Bucket(batch, tuple(out), q_unc, k_unc, (torch.cat(dead_b or none), torch.cat(dead_r or none)), whole)


def _valid(lengths: torch.Tensor, sizes) -> torch.Tensor:
    """bool ``(B, N)``: token valid per sample (the first ``lengths[b, s]`` tokens of each segment)."""
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    pos = torch.arange(int(sizes_t.sum())) - (torch.cumsum(sizes_t, 0) - sizes_t)[seg]
    return pos[None, :] < lengths[:, seg]


def ragged_plan(mask) -> Optional[RaggedPlan]:
    """Buckets for a batch of several length patterns (see the module docstring), or None where the segment path's
    per-pattern plan is used as is (one pattern, a band, a cross-attention mask with no lengths)."""
    # buckets pad each segment at its tail to the bucket's lengths: exact only for full cells over fixed segment
    # boundaries (a causal cell's diagonal moves with the sample's lengths, per-sample sizes move the boundaries)
    if mask.batch_size is None or mask.band() != (None, None) or mask.has_causal_cells or mask.per_sample:
        return None
    lq_all, lk_all = mask._q_lengths_or_sizes(), mask._kv_lengths_or_sizes()
    rows = torch.cat([lq_all, lk_all], 1)
    uniq, inverse, count = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    if uniq.shape[0] == 1:
        return None
    nq_seg = len(mask.q_sizes)
    u = uniq.numpy()
    lq, lk, count = u[:, :nq_seg], u[:, nq_seg:], count.numpy()
    runs = mask._runs
    work = _work(runs, lq, lk)
    order = np.argsort(-work, kind="stable")
    groups = _cuts(work[order], count[order], lq[order], lk[order], runs, STEP_COST_PAIRS * nq_seg)
    whole = groups is None
    groups = [(0, len(order))] if whole else groups

    q_size = np.asarray(mask.q_sizes, dtype=np.int64)
    k_size = np.asarray(mask.kv_sizes, dtype=np.int64)
    first = np.searchsorted(runs.row, np.arange(nq_seg + 1))
    q_start, k_start = np.cumsum(q_size) - q_size, np.cumsum(k_size) - k_size
    off = mask.num_kv - mask.num_q

    def steps_of(lq_row, lk_row):
        steps, q_cov, k_cov = _pattern_steps(
            mask, runs, first, lq_row, lk_row, q_start, k_start, k_size, off, None, None
        )
        return (
            steps,
            _complement_np(q_cov[:, 0], q_cov[:, 1], mask.num_q),
            _complement_np(k_cov[:, 0], k_cov[:, 1], mask.num_kv),
        )

    by_pattern = torch.argsort(inverse, stable=True).split(torch.from_numpy(count).tolist())
    exact, buckets = [], []
    valid_q = valid_k = None
    for a, b in groups:
        members = order[a:b]
        samples = [by_pattern[x] for x in members.tolist()]
        if len(members) > 1:
            steps, q_unc, k_unc = steps_of(lq[members].max(0), lk[members].max(0))
            if _plain(steps):
                batch = torch.cat(samples).sort().values
                if valid_q is None:
                    valid_q, valid_k = _valid(lq_all, mask.q_sizes), _valid(lk_all, mask.kv_sizes)
                vq, vk = valid_q.index_select(0, batch), valid_k.index_select(0, batch)
                buckets.append(_padded_bucket(batch, steps, q_unc, k_unc, vq, vk, whole))
                continue
        for x, batch in zip(members.tolist(), samples):
            steps, q_unc, k_unc = steps_of(lq[x], lk[x])
            exact.append(Pattern(batch, tuple(steps), q_unc, k_unc))
    dead = tuple(torch.cat([b.dead[i] for b in buckets] or [torch.zeros(0, dtype=torch.int64)]) for i in (0, 1))
    return RaggedPlan(Plan(tuple(exact), mask.num_q, mask.num_kv), tuple(buckets), dead)


def ragged_calls(mask) -> Optional[int]:
    """The number of kernel calls the CPU path makes for ``mask``'s forward with buckets (a step in pieces: one per
    piece that attends anything), or None where it uses none."""
    rp = mask.derived(ragged_plan)
    if rp is None:
        return None
    pieces = sum(sum(p.step is not None for p in st.pieces) if st.pieces else 1 for b in rp.buckets for st in b.steps)
    return sum(len(p.steps) for p in rp.exact.patterns) + pieces


def _key_bias(hidden: torch.Tensor, dtype) -> torch.Tensor:
    """``(m, 1, 1, C)``: 0 for a key the sample has, ``-inf`` for one it does not."""
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))[:, None, None, :]


def _finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf: one sum and one read-back (IEEE arithmetic cannot lose a NaN or an Inf, and a
    finite sum that overflows only costs the careful recompute)."""
    total = t.sum() if t.dtype in (torch.float32, torch.float64) else t.sum(dtype=torch.float32)
    return math.isfinite(total.item())


def _take(x: torch.Tensor, ranges, batch: Optional[torch.Tensor], copy: bool = False) -> torch.Tensor:
    """Rows ``ranges`` (dim 2) of the samples ``batch`` of ``x`` (None: all, a view for one range unless
    ``copy``), as one tensor."""
    if batch is None:
        if len(ranges) == 1:
            t = x[:, :, ranges[0][0] : ranges[0][1]]
            return t.clone() if copy else t
        return torch.cat([x[:, :, s:e] for s, e in ranges], 2)
    if len(ranges) == 1:
        return x[:, :, ranges[0][0] : ranges[0][1]].index_select(0, batch)
    return torch.cat([x[:, :, s:e].index_select(0, batch) for s, e in ranges], 2)


def _put(dst: torch.Tensor, ranges, batch: Optional[torch.Tensor], src: torch.Tensor) -> None:
    """Inverse of :func:`_take`: ``src``'s rows into rows ``ranges`` of the samples ``batch`` of ``dst``."""
    off = 0
    for s, e in ranges:
        if batch is None:
            dst[:, :, s:e] = src[:, :, off : off + e - s]
        else:
            dst[:, :, s:e].index_copy_(0, batch, src[:, :, off : off + e - s])
        off += e - s


def _fill_rows(x: torch.Tensor, dead: tuple, value: float) -> torch.Tensor:
    for b, r0, r1 in dead:
        x[b, :, r0:r1] = value
    return x


def _keys(k, v, st: PaddedStep, batch, h: int, clean: bool):
    """The step's keys and values for the bucket (heads expanded for GQA) and their ``-inf`` bias. The careful path
    reads the same keys in the same order as the clean one (its results equal bit for bit where no poison goes)."""
    ranges, hidden = ((st.span,), st.span_hidden) if st.span is not None else (st.k_ranges, st.hidden_keys)
    kg, vg = (_take(x, ranges, batch) for x in (k, v))
    if not clean and hidden is not None:  # selected away: NaN there reaches nothing
        hide = hidden[:, None, :, None]
        kg, vg = kg.masked_fill(hide, 0), vg.masked_fill(hide, 0)
    bias = None if hidden is None else _key_bias(hidden, k.dtype)
    return expand_kv_heads(kg, h), expand_kv_heads(vg, h), bias


def _fill_dead(out: torch.Tensor, lse: torch.Tensor, dead: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Select the dead rows (computed from a sample's padding) to out = 0, lse = +inf, every head, in place: one
    index fill over the flat rows of each buffer (both contiguous), touching only those rows."""
    b, r = dead
    if not len(b):
        return
    h, n = out.shape[1], out.shape[2]
    rows = ((b[:, None] * h + torch.arange(h)) * n + r[:, None]).flatten()
    out.view(-1, out.shape[3]).index_fill_(0, rows, 0)
    lse.view(-1).index_fill_(0, rows, float("inf"))


def _bucket_forward(q, k, v, bucket: Bucket, scale: float, out, lse, clean: bool, keep: Optional[dict] = None) -> None:
    """``keep``: where given, each piece's gathered ``(q rows, keys, values, bias)`` by ``id(piece)``, for the
    backward's clean pass (:func:`_piece_backward`)."""
    batch = None if bucket.whole else bucket.batch
    for st in bucket.steps:
        for piece in st.pieces or (Piece(batch, st, (), ()),):
            if piece.step is None:  # every row of its samples dead (_fill_dead)
                continue
            ps = piece.step
            kg, vg, bias = _keys(k, v, ps, piece.batch, q.shape[1], clean)
            qg = _take(q, ps.q_ranges, piece.batch)
            o, l = _fwd_cpu(qg, kg, vg, 0.0, False, attn_mask=bias, scale=scale)
            if keep is not None and st.pieces:
                keep[id(piece)] = (qg, kg, vg, bias)
            # dead rows too, and a piece's rows past its cut are dead: selected to 0 once all buckets ran
            # (_fill_dead)
            _put(out, ps.q_ranges, piece.batch, o)
            _put(lse, ps.q_ranges, piece.batch, l)
    for s, e in bucket.q_uncovered:
        for t in (out, lse):
            t[:, :, s:e].fill_(0) if batch is None else t[:, :, s:e].index_fill_(0, batch, 0)


def _mats(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t (B, H, R, D)`` as the view ``(B * H, R, D)`` (rows may be strided; the last dim is contiguous), or None
    where its batch and head strides do not merge (then no view exists)."""
    b, h, r, d = t.shape
    if t.stride(3) != 1 and d > 1:
        return None
    if h == 1:
        return t.as_strided((b, r, d), (t.stride(0), t.stride(2), 1))
    if b > 1 and t.stride(0) != h * t.stride(1):
        return None
    return t.as_strided((b * h, r, d), (t.stride(1), t.stride(2), 1))


def _few_rows(st: PaddedStep, q, dk, dv) -> bool:
    """Whether step ``st`` runs its backward as batched matmuls (see ``FEW_ROWS``): few rows, a dtype whose matmuls
    accumulate at full precision (half types go to the flash kernel, which accumulates in float32), and key
    gradient buffers that are one batch of matrices (else the gradients could not be added into them in place)."""
    rows = sum(e - s for s, e in st.q_ranges)
    return (
        rows <= FEW_ROWS
        and q.dtype in (torch.float32, torch.float64)
        and _mats(dk) is not None
        and _mats(dv) is not None
    )


def _matmul_backward(go, qg, og, lg, k, v, st: PaddedStep, batch, scale: float, dst, clean: bool) -> torch.Tensor:
    """The flash backward of one bucket step for its few rows, as batched matmuls in the inputs' dtype; dK/dV
    are added straight into ``dst = (dk, dv)`` (per ``st.k_writes``), dq rows ``(m, H, n, D)`` are returned.

    ``go, qg, og (m, H, n, D)``, ``lg (m, H, n)``: the step's rows (dead ones zero-filled on the careful path);
    ``k, v (B, Hkv, Nk, D)``. The query heads of a GQA group read one kv head, so their rows stack over it
    ``(m, Hkv, G * n, D)`` and the key gradients sum over the group inside the matmul. Scores get the ``-inf`` key
    bias added (not selected: a NaN score stays NaN, so the results check of :func:`cpu_backward_mask` sees
    whatever a hidden key or dead row read); weights ``exp(s - lse)`` are exactly 0 for hidden keys and dead rows
    (lse = +inf). The careful path computes the same sums and then selects the keys with no gradient from the step
    back to what ``dst`` held (or 0), so a finite clean result equals the careful one bit for bit."""
    m, h, n, d = qg.shape
    hkv = k.shape[1]
    grp = h // hkv
    kg, vg, bias = _keys(k, v, st, batch, hkv, clean)
    c = kg.shape[2]

    def rows(t):  # (m, H, n, X) -> (m * Hkv, G * n, X)
        t = t.reshape(m, hkv, grp * n, t.shape[-1])
        return _mats(t) if _mats(t) is not None else _mats(t.contiguous())

    q3, g3 = rows(qg), rows(go)
    k3, v3 = (x if x is not None else _mats(t.contiguous()) for x, t in ((_mats(kg), kg), (_mats(vg), vg)))
    s = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)  # (m * Hkv, G * n, C)
    if bias is not None:
        s.view(m, hkv, grp * n, c).add_(bias)
    p = s.sub_(rows(lg[..., None].to(s.dtype))).exp_()
    di = rows((go * og).sum(-1, keepdim=True))
    ds = torch.bmm(g3, v3.transpose(1, 2)).sub_(di).mul_(p)  # dS = P * (dO V^T - rowsum(dO * O))
    g_q = torch.bmm(ds, k3).mul_(scale).view(m, hkv, grp, n, d).reshape(m, h, n, d)
    span0 = None if st.span is None else st.span[0]
    no_grad = st.no_grad_keys if st.span is None else st.span_no_grad
    writes = _merged_writes(st.k_writes, span0)
    for weights, right, alpha, buf in ((p, g3, 1.0, dst[1]), (ds, q3, scale, dst[0])):
        for s0, e0, o, acc in writes:
            if acc is None:  # written first here, merged into an accumulating write: starts from 0
                buf[:, :, s0:e0].zero_()
                continue
            out3 = _mats(buf[:, :, s0:e0])
            left = weights.transpose(1, 2)[:, o : o + e0 - s0]
            careful = not clean and no_grad is not None
            if out3.is_contiguous() and not careful:  # in place: ATen loops matrix by matrix into a strided one
                out3.baddbmm_(left, right, beta=1 if acc else 0, alpha=alpha)
                continue
            new = torch.baddbmm(out3, left, right, beta=1 if acc else 0, alpha=alpha)
            if careful:
                keep = no_grad[:, None, o : o + e0 - s0, None].expand(m, hkv, e0 - s0, 1).reshape(m * hkv, -1, 1)
                new = torch.where(keep, out3 if acc else torch.zeros((), dtype=new.dtype), new)
            out3.copy_(new)
    return g_q


def _merged_writes(k_writes, span0: Optional[int]) -> list:
    """``st.k_writes`` as ``(start, stop, offset, acc)`` with adjacent writes (in dK/dV and in the step's keys)
    merged into one accumulating write, so that a step whose keys are a whole ``dk`` adds into it as one contiguous
    batch of matrices; the parts merged that were written first (not accumulated) come first with ``acc=None``:
    they are zeroed before the adds."""
    out, zero = [], []
    for s0, e0, o, acc in sorted(k_writes):
        o = o if span0 is None else s0 - span0
        if out and out[-1][1] == s0 and out[-1][2] + (out[-1][1] - out[-1][0]) == o:
            ps, _, po, pacc = out[-1]
            if not pacc:
                zero.append((ps, s0, None, None))
            if not acc:
                zero.append((s0, e0, None, None))
            out[-1] = (ps, e0, po, True)
        else:
            out.append((s0, e0, o, acc))
    return zero + out


def _flash_backward(go, qg, og, lg, k, v, st: PaddedStep, batch, scale: float, clean: bool, keys=None):
    """The flash backward of one bucket step on its gathered rows ``(m, H, n, D)`` (dead ones zero-filled on the
    careful path): ``(dq rows, dK, dV)``, dK/dV ``(m, Hkv, C, D)`` over the step's keys (its span where it has one),
    summed over each GQA group, those with no gradient from the step selected to 0 on the careful path. ``keys``:
    the step's ``(keys, values, bias)`` as the forward gathered them, or None."""
    h, hkv = qg.shape[1], k.shape[1]
    kg, vg, bias = keys if keys is not None else _keys(k, v, st, batch, h, clean)
    g_q, g_k, g_v = _bwd_cpu(go, qg, kg, vg, og, lg, 0.0, False, attn_mask=bias, scale=scale)
    if not clean:
        _fill_rows(g_q, st.dead, 0.0)
    no_grad = st.no_grad_keys if st.span is None else st.span_no_grad
    grads = []
    for g in (g_k, g_v):
        if not clean and no_grad is not None:
            g = g.masked_fill(no_grad[:, None, :, None], 0)
        if hkv != h:  # GQA: the query heads of a group all read one kv head
            g = g.unflatten(1, (hkv, h // hkv)).sum(2)
        grads.append(g)
    return g_q, *grads


def _piece_backward(grad_out, q, k, v, out, lse, piece: Piece, scale: float, grads, clean: bool, kept=None) -> None:
    """One piece of a whole-batch step's backward (see :class:`Piece`): its samples' rows and keys gathered up to
    the cut, dq and the first writes of dK/dV copied in by sample, later writes added; what lies past the cut is 0
    (rows: padding, their lse +inf; keys: hidden from every row of those samples). ``kept``: the clean pass's
    query rows, keys, values and bias as the forward gathered them (:func:`_bucket_forward`), or None."""
    dq, dk, dv = grads
    st, batch = piece.step, piece.batch
    if st is not None:
        go, og, lg = (_take(x, st.q_ranges, batch) for x in (grad_out, out, lse))
        qg = _take(q, st.q_ranges, batch) if kept is None else kept[0]
        if not clean:
            for t in (go, qg, og):
                _fill_rows(t, st.dead, 0.0)
        keys = None if kept is None else kept[1:]
        g_q, g_k, g_v = _flash_backward(go, qg, og, lg, k, v, st, batch, scale, clean, keys)
        _put(dq, st.q_ranges, batch, g_q)
        for g, dst in ((g_k, dk), (g_v, dv)):
            for s, e, o, acc in st.k_writes:
                part = g[:, :, o : o + e - s]
                dst[:, :, s:e].index_add_(0, batch, part) if acc else dst[:, :, s:e].index_copy_(0, batch, part)
    for s, e in piece.q_rest:
        dq[:, :, s:e].index_fill_(0, batch, 0)
    for s, e in piece.k_rest:
        for dst in (dk, dv):
            dst[:, :, s:e].index_fill_(0, batch, 0)


def _bucket_backward(
    grad_out, q, k, v, out, lse, bucket: Bucket, scale: float, grads, clean: bool, kept: Optional[dict] = None
) -> None:
    hkv = k.shape[1]
    batch = None if bucket.whole else bucket.batch
    dq, dk, dv = grads
    dkb, dvb = (dk, dv) if batch is None else (k.new_empty(len(batch), hkv, *k.shape[2:]) for _ in range(2))
    for st in bucket.steps:
        if st.pieces:  # a whole batch's step: dK/dV written into dk/dv themselves (dkb is dk)
            for piece in st.pieces:
                got = None if kept is None or not clean else kept.get(id(piece))
                _piece_backward(grad_out, q, k, v, out, lse, piece, scale, grads, clean, got)
            continue
        # copies where they are filled below; else views where the batch is whole: the kernel reads rows by their
        # strides and needs only the last dim contiguous, as in the whole tensors (copies cost a large share of
        # the kernel at small sizes; BENCHMARKS.md)
        go, og, lg = (_take(x, st.q_ranges, batch, not clean) for x in (grad_out, out, lse))
        qg = _take(q, st.q_ranges, batch, not clean)
        # a dead row has lse = +inf (_fill_dead): its weights exp(s - lse) are exactly 0, so with finite inputs it
        # adds exactly 0 to every gradient; with a non-finite one its q, dO and out are zero-filled too (and any
        # 0 * NaN its dq picks up from a NaN key is selected away below)
        if not clean:
            for t in (go, qg, og):
                _fill_rows(t, st.dead, 0.0)
        if _few_rows(st, q, dkb, dvb):
            g_q = _matmul_backward(go, qg, og, lg, k, v, st, batch, scale, (dkb, dvb), clean)
            if not clean:
                _fill_rows(g_q, st.dead, 0.0)
            _put(dq, st.q_ranges, batch, g_q)
            continue
        g_q, g_k, g_v = _flash_backward(go, qg, og, lg, k, v, st, batch, scale, clean)
        _put(dq, st.q_ranges, batch, g_q)
        span0 = None if st.span is None else st.span[0]
        for g, dst in ((g_k, dkb), (g_v, dvb)):
            for s, e, o, acc in st.k_writes:
                o = o if span0 is None else s - span0
                if acc:
                    dst[:, :, s:e] += g[:, :, o : o + e - s]
                else:
                    dst[:, :, s:e] = g[:, :, o : o + e - s]
    for s, e in bucket.q_uncovered:
        dq[:, :, s:e].fill_(0) if batch is None else dq[:, :, s:e].index_fill_(0, batch, 0)
    for t in (dkb, dvb):
        _zero(t, bucket.k_uncovered)
    if batch is not None:
        dk.index_copy_(0, batch, dkb)
        dv.index_copy_(0, batch, dvb)


def cpu_forward_mask(q, k, v, mask, scale: float, bias=None, keep: Optional[dict] = None):
    """:func:`.segments.cpu_forward` of ``mask``'s plan, with buckets where ``mask`` has a ragged plan and no bias.

    The buckets run first as they are, the hidden keys left in place: while everything they read is finite, their
    ``-inf`` bias gives them exactly zero weight. Anything non-finite read (or a score that overflows) makes some
    live row's output NaN (dead rows are selected to 0 before the check), so a finite output is the careful path's
    bit for bit; else the buckets are redone carefully (hidden keys zero-filled). ``keep``: a dict to fill with the
    clean pass's gathered pieces for :func:`cpu_backward_mask` (left empty where the careful pass ran)."""
    rp = mask.derived(ragged_plan) if bias is None else None
    if rp is None:
        return cpu_forward(q, k, v, mask.derived(build_plan), scale, bias)
    out, lse = cpu_forward(q, k, v, rp.exact, scale)  # allocates for the whole batch, fills the exact patterns
    for clean in (True, False):
        for bucket in rp.buckets:  # each bucket rewrites every live row it covers
            _bucket_forward(q, k, v, bucket, scale, out, lse, clean, keep if clean else None)
        _fill_dead(out, lse, rp.dead)  # before the check: a piece leaves the rows past its cut unwritten
        if clean and _finite(out):
            break
        if keep is not None:
            keep.clear()
    return out, lse


def cpu_backward_mask(grad_out, q, k, v, out, lse, mask, scale: float, bias=None, kept: Optional[dict] = None):
    """:func:`.segments.cpu_backward` matching :func:`cpu_forward_mask`, checked the same way: a finite dq means no
    gradient read anything non-finite it may not (every such path passes through a NaN/Inf ``dS`` of some pair, which
    dq sums: a hidden key's or dead row's zero weight times a NaN is NaN), so the buckets' dK/dV are the careful path's
    too; else everything is redone with the hidden keys, dead rows and their gradients zero-filled. ``kept``: the
    forward's gathered pieces (``keep`` of :func:`cpu_forward_mask`), read instead of gathering again on the clean
    pass."""
    rp = mask.derived(ragged_plan) if bias is None else None
    if rp is None:
        return cpu_backward(grad_out, q, k, v, out, lse, mask.derived(build_plan), scale, bias)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    for clean in (True, False):
        grads = cpu_backward(grad_out, q, k, v, out, lse, rp.exact, scale)  # dK/dV accumulate: from scratch
        for bucket in rp.buckets:
            _bucket_backward(grad_out, q, k, v, out, lse, bucket, scale, grads, clean, kept)
        if clean and _finite(grads[0]):
            break
    return grads


class _RaggedAttentionCPU(torch.autograd.Function):
    """Autograd around :func:`cpu_forward_mask` / :func:`cpu_backward_mask` (no bias)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float):
        # the pieces' gathered rows and keys are kept for the backward (about half of q, k and v at the demo's size:
        # the backward then gathers only dO, out and lse per piece)
        keep = {} if any(ctx.needs_input_grad[:3]) else None
        out, lse = cpu_forward_mask(q, k, v, mask, scale, keep=keep)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.kept = mask, scale, keep
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "zorro_attention: the segments backend's CPU backward cannot be differentiated (double "
                "backward, create_graph=True); use backend='reference' for higher-order gradients"
            )
        grads = cpu_backward_mask(grad_out, *ctx.saved_tensors, ctx.mask, ctx.scale, kept=ctx.kept)
        ctx.kept = None
        return (*grads, None, None)


def ragged_attention(q, k, v, mask, scale: float, bias=None) -> torch.Tensor:
    """:func:`.segments.segment_attention`, with buckets on CPU for a ragged batch without a bias."""
    if bias is None and q.device.type == "cpu" and mask.derived(ragged_plan) is not None:
        return _RaggedAttentionCPU.apply(q, k, v, mask, scale)
    return segment_attention(q, k, v, mask, scale, bias)
