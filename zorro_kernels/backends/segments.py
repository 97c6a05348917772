"""The segment backend: exact decomposition of masked attention into unmasked dense attention calls.

Rows of the same query segment see the same keys, so a Zorro mask is a handful of dense attention problems: for the
paper's layout, audio x audio, video x video and fusion x everything. This backend

1. builds a *plan* once per mask (cached on it): samples with identical ``lengths`` rows share a *pattern*; inside a
   pattern, query segments that see the same set of valid key ranges form a *group* (query and key ranges merged where
   adjacent, so contiguous runs are views, not copies); consecutive equal-size diagonal groups (windows, packed
   sequences) are fused into one *run* evaluated as a batch of small problems;
2. runs each group with PyTorch's fused attention on just its rows and keys, with no mask, writing into one
   preallocated output. Groups that straddle a causal diagonal or a sliding window's edge are cut into chunks of
   ``BAND_ROWS`` rows, keys trimmed to the band: on CPU the keys every row of the chunk sees go through the flash
   kernel and the few keys only some rows see through masked products with their non-finite rows zeroed, merged by
   log-sum-exp (:func:`_straddle_cpu_forward`); elsewhere, and with a bias, :func:`straddling_attention` selects
   per row. Either way NaN/Inf in a key a row may not attend never reaches that row (no ``0 * NaN``);
3. on CPU, does forward and backward itself in an autograd Function calling ATen's flash-attention-for-CPU kernels
   (``out``/``lse`` saved once for the whole output, grads accumulated in place), so it pays neither autograd's
   per-slice zero-filled gradient buffers nor a second copy of the output. Elsewhere it composes
   ``F.scaled_dot_product_attention`` under autograd.

Rows that see nothing are never computed: they stay 0, and their gradients are 0. Nothing a row may not attend is
read for it, forward or backward.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..bias import step_bias
from ..reference import expand_kv_heads
from ._blocks import BlockRanges

__all__ = [
    "segment_attention",
    "segment_attention_sdpa",
    "build_plan",
    "cpu_forward",
    "cpu_backward",
    "straddling_attention",
    "Plan",
    "Pattern",
    "Step",
    "BAND_ROWS",
]

Ranges = tuple[tuple[int, int], ...]
# query rows per chunk of a group that straddles a causal diagonal or window edge: bounds the (rows x keys x D)
# selections of straddling_attention (a chunk's keys that only some of its rows see number < 2 * BAND_ROWS)
BAND_ROWS = 64
_I64 = np.iinfo(np.int64)  # built once: np.iinfo costs microseconds a call, a plan's fixed cost
# up to this many ranges a plan's range arithmetic runs in Python: each numpy call costs about a microsecond, more
# than a Python loop over a few elements
_FEW = 32


class Step(NamedTuple):
    """One dense attention problem: gathered query rows x gathered key rows, as ``blocks`` independent diagonal
    blocks of equal size (``blocks > 1`` for windows / packed sequences / documents of equal length: a contiguous run
    of them is one range, a bucket of scattered ones lists each block's range and gathers by ``index``)."""

    q_ranges: Ranges
    k_ranges: Ranges
    blocks: int = 1
    # steps across a causal diagonal / window edge only: bool (rows, cols) mask of the gathered block
    mask: Optional[torch.Tensor] = None
    # filled by the plan: how this step's dK/dV land: (start, stop, offset in the gathered keys, accumulate?)
    k_writes: tuple = ()
    # every block is square and causal inside (key l visible to query l' iff l <= l'): one causal flash call
    causal: bool = False
    # buckets of scattered blocks: int64 (q rows, k rows) in gather order; their keys no other step reads, so dK/dV
    # are copied in (index_copy_)
    index: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    # causal steps of one block only: the first `prefix` gathered keys every row sees (a causal rule cell after full
    # ones, Gemma 3's text); the other S keys are a causal square on the step's last S rows (rows before those see
    # the prefix only: an image's rows joined to the text after it). Two flash calls, one plain on every row and
    # one causal on the square, merged by log-sum-exp
    prefix: int = 0


class Pattern(NamedTuple):
    batch: Optional[torch.Tensor]  # sample indices sharing these lengths; None = the whole batch
    steps: tuple[Step, ...]
    q_uncovered: Ranges  # query rows no step writes: they stay 0
    k_uncovered: Ranges  # key rows no step reads: their gradients are 0


class Plan(NamedTuple):
    patterns: tuple[Pattern, ...]
    num_q: int
    num_kv: int


def _merge(ranges) -> Ranges:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def _valid_ranges(sizes, lens) -> list[Optional[tuple[int, int]]]:
    out, start = [], 0
    for size, n in zip(sizes, lens):
        out.append((start, start + n) if n > 0 else None)
        start += size
    return out


def _band_block(q_ranges: Ranges, k_ranges: Ranges, offset: int, lo: Optional[int], hi: Optional[int]) -> torch.Tensor:
    """bool ``(rows, cols)``: ``lo <= j - i - offset <= hi`` over the gathered rows and columns (None: unbounded)."""
    rows = torch.cat([torch.arange(s, e) for s, e in q_ranges])
    cols = torch.cat([torch.arange(s, e) for s, e in k_ranges])
    d = cols[None, :] - rows[:, None] - offset
    m = torch.ones(d.shape, dtype=torch.bool)
    if lo is not None:
        m &= d >= lo
    if hi is not None:
        m &= d <= hi
    return m


def _chunks(r: tuple[int, int], size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, r[1])) for s in range(r[0], r[1], size)]


def _fuse_runs(steps: list[Step]) -> list[Step]:
    """Replace maximal runs (>= 2) of equal-size, adjacent, single-range, unmasked diagonal steps by one step of
    ``blocks`` blocks (windows and packed sequences become one batched call instead of hundreds of small ones)."""

    def simple(x):
        return x.mask is None and not x.causal and len(x.q_ranges) == 1 and len(x.k_ranges) == 1

    out, i = [], 0
    while i < len(steps):
        j = i + 1
        if simple(steps[i]):
            (q0, q1), (k0, k1) = steps[i].q_ranges[0], steps[i].k_ranges[0]
            while j < len(steps) and simple(steps[j]):
                (a0, a1), (c0, c1) = steps[j].q_ranges[0], steps[j].k_ranges[0]
                n = j - i
                if (a0, a1, c0, c1) != (
                    q0 + n * (q1 - q0),
                    q0 + (n + 1) * (q1 - q0),
                    k0 + n * (k1 - k0),
                    k0 + (n + 1) * (k1 - k0),
                ):
                    break
                j += 1
        if j - i >= 2:
            (q0, q1), (k0, k1) = steps[i].q_ranges[0], steps[i].k_ranges[0]
            out.append(Step(((q0, q0 + (j - i) * (q1 - q0)),), ((k0, k0 + (j - i) * (k1 - k0)),), j - i))
        else:
            out.append(steps[i])
            j = i + 1
        i = j
    return out


def _join_leading_rows(steps: list[Step]) -> list[Step]:
    """Fold each plain single-range step into the prefix step right after it when its keys are that step's prefix
    keys (Gemma 3: an image's rows see every key before its end, the next text run's prefix): one plain flash call
    over both row groups instead of two calls of fewer rows (ATen's CPU kernel is faster per pair on more rows), the
    causal square left on the text rows. ``steps`` sorted by query start."""
    out: list[Step] = []
    for st in steps:
        prev = out[-1] if out else None
        if (
            st.prefix
            and prev is not None
            and prev.mask is None
            and not prev.causal
            and prev.blocks == 1
            and prev.index is None
            and len(prev.q_ranges) == 1
            and prev.q_ranges[0][1] == st.q_ranges[0][0]
            and sum(e - s for s, e in st.k_ranges) - st.prefix == st.q_ranges[0][1] - st.q_ranges[0][0]
            and prev.k_ranges == _take(st.k_ranges, st.prefix)
        ):
            out[-1] = st._replace(q_ranges=((prev.q_ranges[0][0], st.q_ranges[0][1]),))
        else:
            out.append(st)
    return out


def _complement(ranges: Ranges, n: int) -> Ranges:
    out, pos = [], 0
    for s, e in _merge(ranges):
        if s > pos:
            out.append((pos, s))
        pos = e
    if pos < n:
        out.append((pos, n))
    return tuple(out)


def _schedule_key_writes(steps: list[Step]) -> list[Step]:
    """Give each step its dK/dV writes: the first step to touch a key row copies, later ones add. Buffers can then
    start uninitialised (no zero-fill pass over a fresh allocation, which on CPU costs page faults as well)."""
    starts: list[int] = []  # the rows written so far: disjoint, sorted, merged ranges [starts[i], ends[i])
    ends: list[int] = []
    out = []
    for st in steps:
        writes, off = [], 0
        for s, e in st.k_ranges:
            # split [s, e) into pieces already written (accumulate) and fresh (copy)
            i = bisect.bisect_right(ends, s)  # first written range ending after s
            pos = s
            while pos < e:
                if i < len(starts) and starts[i] <= pos:
                    b = min(e, ends[i])
                    writes.append((pos, b, off + pos - s, True))
                    i += 1
                else:
                    b = min(e, starts[i]) if i < len(starts) else e
                    writes.append((pos, b, off + pos - s, False))
                pos = b
            off += e - s
        for s, e in st.k_ranges:  # record them, merging with what they touch
            i = bisect.bisect_left(ends, s)
            j = bisect.bisect_right(starts, e)
            if i < j:
                s, e = min(s, starts[i]), max(e, ends[j - 1])
            starts[i:j], ends[i:j] = [s], [e]
        out.append(st._replace(k_writes=tuple(writes)))
    return out


def _band_steps(q_ranges: Ranges, keys: Ranges, off: int, lo, hi) -> list[Step]:
    """Steps of one group under a band: one step per query range, keys trimmed to the band; a range that straddles
    the band's edge is cut into chunks of BAND_ROWS rows, each with its own element mask."""

    def trim(qr):
        return _merge(
            (s if lo is None else max(s, qr[0] + off + lo), e if hi is None else min(e, qr[1] + off + hi))
            for s, e in keys
        )

    steps = []
    for r in q_ranges:
        if trim(r) and _band_block((r,), trim(r), off, lo, hi).all():
            steps.append(Step((r,), trim(r)))
            continue
        for qr in _chunks(r, BAND_ROWS):
            k_trim = trim(qr)
            if not k_trim:
                continue
            m = _band_block((qr,), k_trim, off, lo, hi)
            steps.append(Step((qr,), k_trim) if m.all() else Step((qr,), k_trim, 1, m))
    return steps


def _key_sets(runs, k_start, k_size, lk):
    """Per run: its valid keys as merged ranges when they are one range ``(start, stop)`` (stop = start: none), and
    which runs are not (padding inside them): ``(start, stop, single)`` int64/bool arrays ``(R,)``."""
    gap = np.concatenate([[0], np.cumsum(lk < k_size)])  # segments with padding before c
    valid = np.concatenate([[0], np.cumsum(lk)])
    c0, c1 = runs.c0, runs.c1
    # one range iff no segment but the last has padding (a padded segment ends its range)
    single = (gap[c1 - 1] - gap[c0]) == 0
    some = (valid[c1] - valid[c0]) > 0
    start = k_start[c0]
    stop = np.where(some, k_start[c1 - 1] + lk[c1 - 1], start)
    return start, stop, single


def _row_keys(a: int, runs, first: np.ndarray, kv) -> Ranges:
    """Merged valid key ranges of query segment ``a`` (the general case: padding inside runs, several runs)."""
    out = []
    for r in range(int(first[a]), int(first[a + 1])):
        out.extend(kv[c] for c in range(int(runs.c0[r]), int(runs.c1[r])) if kv[c] is not None)
    return _merge(out)


def _pattern_steps(mask, runs, first, lq, lk, q_start, k_start, k_size, off, lo, hi, cells=None):
    """The steps of one length pattern: query segments grouped by the keys they see (see the module docstring), and
    the query and key ranges they read (:func:`_bucket`). ``cells``: ``(all runs, their row starts, the query
    segments with a causal cell)`` or None; ``runs``/``first`` then hold the other segments' runs only."""
    k_start_r, k_stop_r, single = _key_sets(runs, k_start, k_size, lk)
    n_runs = first[1:] - first[:-1]
    live = lq > 0
    # rows whose keys are one range of one run: grouped by that range with numpy; the rest one by one
    simple = live & (n_runs == 1)
    r_of = np.minimum(first[:-1], max(len(runs.row) - 1, 0))
    simple &= single[r_of] if len(runs.row) else False
    ks = np.where(simple, k_start_r[r_of] if len(runs.row) else 0, 0)
    ke = np.where(simple, k_stop_r[r_of] if len(runs.row) else 0, 0)
    other: dict[Ranges, list] = {}
    kv = None
    for a in np.flatnonzero(live & ~simple & (n_runs > 0)).tolist():
        if kv is None:
            kv = _valid_ranges(mask.kv_sizes, lk.tolist())
        keys = _row_keys(a, runs, first, kv)
        if len(keys) == 1:  # one range after all: joins the vectorised rows
            simple[a], ks[a], ke[a] = True, keys[0][0], keys[0][1]
        elif keys:
            other.setdefault(keys, []).append((int(q_start[a]), int(q_start[a] + lq[a])))
    simple &= ke > ks
    rows = np.flatnonzero(simple)
    # merge the query ranges of each group of rows with equal keys (adjacent ranges become one)
    code = ks[rows] * (mask.num_kv + 1) + ke[rows]
    order = np.lexsort((q_start[rows], code))
    rows, code = rows[order], code[order]
    qs, qe = q_start[rows], q_start[rows] + lq[rows]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (code[1:] != code[:-1]) | (qs[1:] != qe[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(rows))[: len(starts)] - 1
    g_qs, g_qe, g_code = qs[starts], qe[ends], code[starts]
    g_ks, g_ke = ks[rows[starts]], ke[rows[starts]]
    # a group of several query ranges (non-adjacent rows seeing the same keys) is one step of gathered rows
    # g_code is sorted (rows were ordered by code): a code is shared iff a neighbour has it
    same = g_code[1:] == g_code[:-1]
    multi = np.zeros(len(g_code), dtype=bool)
    multi[1:] |= same
    multi[:-1] |= same
    shared = g_code[multi]
    for c in shared[np.append(True, shared[1:] != shared[:-1])[: len(shared)]].tolist():
        sel = np.flatnonzero(g_code == c)
        keys = ((int(g_ks[sel[0]]), int(g_ke[sel[0]])),)
        other[keys] = other.get(keys, []) + list(zip(g_qs[sel].tolist(), g_qe[sel].tolist()))
    one = ~multi
    g_qs, g_qe, g_ks, g_ke = g_qs[one], g_qe[one], g_ks[one], g_ke[one]
    steps: list[Step] = []
    causal = np.zeros(len(g_qs), dtype=bool)
    if lo is not None or hi is not None:
        # a square block on the diagonal of a causal mask is one causal call; the rest is chunked along the band
        if lo is None and hi == 0:
            causal = (g_ks == g_qs + off) & (g_ke >= g_qe + off)
            g_ke = np.where(causal, g_qe + off, g_ke)
        for i in np.flatnonzero(~causal).tolist():
            steps += _band_steps(((int(g_qs[i]), int(g_qe[i])),), ((int(g_ks[i]), int(g_ke[i])),), off, lo, hi)
        g_qs, g_qe, g_ks, g_ke = g_qs[causal], g_qe[causal], g_ks[causal], g_ke[causal]
        causal = causal[causal]
        causal &= (g_qe - g_qs) > 1  # one token sees itself: no diagonal to respect
    for keys, q_ranges in other.items():
        q_ranges = _merge(q_ranges)
        steps += [Step(q_ranges, keys)] if lo is None and hi is None else _band_steps(q_ranges, keys, off, lo, hi)
    if cells is not None:
        squares = []
        # Python ints for the per-cell loops: indexing numpy arrays element by element costs more than the loops
        all_runs = cells[0]
        cz_l = all_runs.causal.tolist() if all_runs.causal is not None else [False] * len(all_runs.row)
        run_l = (cells[1].tolist(), all_runs.c0.tolist(), all_runs.c1.tolist(), cz_l)
        gap = np.concatenate([[0], np.cumsum(lk < k_size)])  # segments with padding before c
        valid = np.concatenate([[0], np.cumsum(lk)])
        key_l = (lk.tolist(), k_start.tolist(), gap.tolist(), valid.tolist())
        lq_l, q_start_l = lq.tolist(), q_start.tolist()
        for a in cells[2].tolist():
            more, sq = _cell_steps(a, run_l, lq_l, q_start_l, key_l, off, lo, hi)
            steps += more
            squares += sq
        if squares:
            sq = np.array(squares, dtype=np.int64).reshape(-1, 4)
            g_qs, g_qe = np.concatenate([g_qs, sq[:, 0]]), np.concatenate([g_qe, sq[:, 1]])
            g_ks, g_ke = np.concatenate([g_ks, sq[:, 2]]), np.concatenate([g_ke, sq[:, 3]])
            causal = np.concatenate([causal, np.ones(len(sq), dtype=bool)])
    return _bucket(steps, g_qs, g_qe, g_ks, g_ke, causal)


def _cell_steps(a: int, runs, lq, q_start, keys, off, lo, hi) -> tuple[list[Step], list]:
    """Steps of query segment ``a``, which sees some keys through causal cells: ``(steps, squares)``, squares being
    ``(q0, q1, k0, k1)`` blocks that are exactly one causal cell with as many keys as queries and no band (one causal
    flash call each, bucketed with the plan's others). Otherwise the rows are cut into chunks of BAND_ROWS (the
    whole segment when every row sees every key it reads), each with the keys some row sees and, where rows differ,
    its element mask: as a band's chunks (:func:`_band_steps`), with a diagonal per causal cell.

    ``runs``: the rule table's runs as lists ``(first run of each row, c0, c1, causal)``; ``keys``: per key segment
    as lists ``(valid tokens, start, padded segments before it (cumulative), valid tokens before it (cumulative))``.
    """
    first, run_c0, run_c1, run_causal = runs
    lk, k_start, gap, valid = keys
    ql = int(lq[a])
    if ql == 0:
        return [], []
    q0, q1 = int(q_start[a]), int(q_start[a]) + ql
    big = _I64.max // 4
    starts, stops, upper = [], [], []  # key ranges, and per range the largest j - i it allows (big: any)
    for r in range(first[a], first[a + 1]):
        cz, c0, c1 = run_causal[r], run_c0[r], run_c1[r]
        if not cz and gap[c1 - 1] == gap[c0]:
            # a full run with no padding but in its last segment: one key range, whatever its length in segments
            # (Gemma 3's text rows see every earlier segment: a loop per segment would be quadratic in them)
            if valid[c1] > valid[c0]:
                starts.append(k_start[c0])
                stops.append(k_start[c1 - 1] + lk[c1 - 1])
                upper.append(big)
            continue
        for c in range(c0, c1):
            kl = int(lk[c])
            if kl:
                ks = int(k_start[c])
                starts.append(ks)
                stops.append(ks + kl)
                # key jl = j - ks visible to il = i - q0 iff jl <= il + kl - ql
                upper.append(ks - q0 + kl - ql if cz else big)
    if not starts:
        return [], []
    cz = [i for i, x in enumerate(upper) if x < big]
    if lo is None and hi is None and len(cz) == 1 and ql > 1:
        c = cz[0]
        kl = stops[c] - starts[c]
        if len(starts) == 1 and kl == ql:
            return [], [(q0, q1, starts[0], stops[0])]
        others = [(s_, e_) for i, (s_, e_) in enumerate(zip(starts, stops)) if i != c]
        if kl >= ql and all(e_ <= starts[c] for _, e_ in others):
            # the cell's first kl - ql keys every row sees: with the full ones before it, the prefix of one step
            sq = stops[c] - ql
            pre = _merge(others + [(starts[c], sq)])
            n_pre = sum(e_ - s_ for s_, e_ in pre)
            return [Step(((q0, q1),), _merge(list(pre) + [(sq, stops[c])]), causal=True, prefix=n_pre)], []
    order = np.argsort(starts)
    lens = np.asarray(stops)[order] - np.asarray(starts)[order]
    cols = _flat_rows(np.asarray(starts)[order], lens)
    u = np.repeat(np.asarray(upper, dtype=np.int64)[order], lens)

    def seen(r0, r1):  # per column: does some row of [r0, r1) see it, does every row?
        some, every = cols - (r1 - 1) <= u, cols - r0 <= u
        if hi is not None:
            some &= cols - (r1 - 1) - off <= hi
            every &= cols - r0 - off <= hi
        if lo is not None:
            some &= cols - r0 - off >= lo
            every &= cols - (r1 - 1) - off >= lo
        return some, every

    def ranges(c):
        if not len(c):
            return ()
        brk = np.flatnonzero(np.diff(c) != 1) + 1
        return tuple((int(x[0]), int(x[-1]) + 1) for x in np.split(c, brk))

    some, every = seen(q0, q1)
    if some.any() and every[some].all():
        return [Step(((q0, q1),), ranges(cols[some]))], []
    steps = []
    for r0, r1 in _chunks((q0, q1), BAND_ROWS):
        some, every = seen(r0, r1)
        if not some.any():
            continue
        c, uc = cols[some], u[some]
        if every[some].all():
            steps.append(Step(((r0, r1),), ranges(c)))
            continue
        rows = np.arange(r0, r1)[:, None]
        d = c[None, :] - rows
        m = d <= uc[None, :]
        if hi is not None:
            m &= d - off <= hi
        if lo is not None:
            m &= d - off >= lo
        steps.append(Step(((r0, r1),), ranges(c), 1, torch.from_numpy(m)))
    return steps, []


def _flat_rows(starts: np.ndarray, length: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n))`` over the ranges, as one int64 array."""
    total = int(length.sum())
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(length) - length), length)


def _bucket(steps: list[Step], qs, qe, ks, ke, causal) -> tuple[list[Step], np.ndarray, np.ndarray]:
    """Single-range steps (arrays) plus the rest: those whose keys no other step reads are put in buckets of equal
    (rows, keys, causal) and each bucket becomes one batched call (a view when its blocks are contiguous); the others
    join the rest, which is fused into runs and given its dK/dV write schedule. Also returns the query and key
    ranges every step reads, int64 ``(n, 2)``."""
    n = len(qs)
    other_q = np.array([r for st in steps for r in st.q_ranges], dtype=np.int64).reshape(-1, 2)
    other_k = np.array([r for st in steps for r in st.k_ranges], dtype=np.int64).reshape(-1, 2)
    q_cov = np.concatenate([np.stack([qs, qe], 1), other_q])
    k_cov = np.concatenate([np.stack([ks, ke], 1), other_k])
    all_s, all_e = k_cov[:, 0], k_cov[:, 1]
    order = np.argsort(all_s, kind="stable")
    s_sorted, e_sorted = all_s[order], all_e[order]
    prev_end = np.maximum.accumulate(np.concatenate([[_I64.min], e_sorted[:-1]]))
    next_start = np.concatenate([s_sorted[1:], [_I64.max]])
    alone = np.empty(len(all_s), dtype=bool)
    alone[order] = (prev_end <= s_sorted) & (next_start >= e_sorted)
    alone = alone[:n]
    if not alone.any():  # every step shares keys with another (causal text, images): nothing to bucket
        loose = list(steps) + [
            Step(((a, b),), ((c, d),), causal=z)
            for a, b, c, d, z in zip(qs.tolist(), qe.tolist(), ks.tolist(), ke.tolist(), causal.tolist())
        ]
        loose.sort(key=lambda st: st.q_ranges[0][0])
        return _schedule_key_writes(_fuse_runs(_join_leading_rows(loose))), q_cov, k_cov
    lq, lk = qe - qs, ke - ks
    key = np.where(alone, (lq * (lk.max(initial=0) + 1) + lk) * 2 + causal, -1)
    # members of a bucket adjacent in (key, query start) order
    order = np.lexsort((qs, key))
    key_o, qs_o, ks_o, lq_o, lk_o = key[order], qs[order], ks[order], lq[order], lk[order]
    first = np.ones(n, dtype=bool)
    first[1:] = key_o[1:] != key_o[:-1]
    starts = np.flatnonzero(first)
    stops = np.append(starts[1:], n)[: len(starts)]
    size = stops - starts
    # a bucket is contiguous (a view) when every member starts where the previous one ends, on both sides
    cont = np.ones(n, dtype=bool)
    cont[1:] = (qs_o[1:] == qs_o[:-1] + lq_o[:-1]) & (ks_o[1:] == ks_o[:-1] + lk_o[:-1])
    cont[first] = True
    contiguous = np.add.reduceat(~cont, starts) == 0 if n else np.zeros(0, dtype=bool)
    batched = (key_o[starts] >= 0) & (size >= 2)
    q_rows = k_rows = None  # the rows of gathered (non-contiguous) buckets, built only when one exists
    q_off = np.concatenate([[0], np.cumsum(lq_o)])
    k_off = np.concatenate([[0], np.cumsum(lk_o)])
    qs_l, qe_l, ks_l, ke_l = qs_o.tolist(), (qs_o + lq_o).tolist(), ks_o.tolist(), (ks_o + lk_o).tolist()
    causal_o = causal[order].tolist()
    out: list[Step] = []
    loose = list(steps)
    for g in range(len(starts)):
        a, b = int(starts[g]), int(stops[g])
        if not batched[g]:
            loose += [Step(((qs_l[i], qe_l[i]),), ((ks_l[i], ke_l[i]),), causal=causal_o[i]) for i in range(a, b)]
            continue
        m, cz = b - a, causal_o[a]
        if contiguous[g]:  # a view, as a fused run; its keys no other step reads: the dK/dV write is a copy
            k_r = ((ks_l[a], ke_l[b - 1]),)
            out.append(Step(((qs_l[a], qe_l[b - 1]),), k_r, m, k_writes=((*k_r[0], 0, False),), causal=cz))
            continue
        if q_rows is None:
            q_rows, k_rows = torch.from_numpy(_flat_rows(qs_o, lq_o)), torch.from_numpy(_flat_rows(ks_o, lk_o))
        index = (q_rows[int(q_off[a]) : int(q_off[b])], k_rows[int(k_off[a]) : int(k_off[b])])
        q_r, k_r = BlockRanges(qs_o[a:b], lq_o[a]), BlockRanges(ks_o[a:b], lk_o[a])  # equal blocks, no tuples
        out.append(Step(q_r, k_r, m, causal=cz, index=index))
    loose.sort(key=lambda st: st.q_ranges[0][0])
    return out + _schedule_key_writes(_fuse_runs(_join_leading_rows(loose))), q_cov, k_cov


def _complement_np(starts: np.ndarray, ends: np.ndarray, n: int) -> Ranges:
    """Rows of ``[0, n)`` covered by none of the ranges ``[starts, ends)``."""
    if len(starts) <= _FEW:  # a few ranges: Python's loop beats numpy's per-call costs
        return _complement(tuple(zip(starts.tolist(), ends.tolist())), n)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(np.concatenate([[0], ends]))  # covered up to here before each range
    nxt = np.concatenate([starts, [n]])
    gap = np.flatnonzero(nxt > reach)
    return tuple(zip(reach[gap].tolist(), nxt[gap].tolist()))


def build_plan(mask) -> Plan:
    """The execution plan of ``mask`` (see the module docstring): numpy over the rule table's runs, linear in them
    (Python per step only where a group is irregular: several query ranges, padding inside its keys, a band edge)."""
    if mask.per_sample:
        return _per_sample_plan(mask)
    q_size = np.asarray(mask.q_sizes, dtype=np.int64)
    k_size = np.asarray(mask.kv_sizes, dtype=np.int64)
    if mask.batch_size is None:
        uniq, inverse = np.concatenate([q_size, k_size])[None], None
    else:
        rows = torch.cat([mask._q_lengths_or_sizes(), mask._kv_lengths_or_sizes()], 1)
        uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
        uniq = uniq.numpy()
    runs = mask._runs
    nq_seg = len(mask.q_sizes)
    cells = None
    if runs.has_causal:
        # query segments with a causal cell are planned one by one (:func:`_cell_steps`); the rest as before
        cell_rows = np.zeros(nq_seg, dtype=bool)
        cell_rows[runs.row[runs.causal]] = True
        keep = ~cell_rows[runs.row]
        cells = (runs, np.searchsorted(runs.row, np.arange(nq_seg + 1)), np.flatnonzero(cell_rows))
        runs = type(runs)(runs.n_q, runs.n_kv, runs.row[keep], runs.c0[keep], runs.c1[keep])
    first = np.searchsorted(runs.row, np.arange(nq_seg + 1))  # runs of row a: first[a] .. first[a + 1]
    q_start, k_start = np.cumsum(q_size) - q_size, np.cumsum(k_size) - k_size
    off = mask.num_kv - mask.num_q
    lo, hi = mask.band()
    patterns = []
    for u in range(uniq.shape[0]):
        lq, lk = uniq[u, :nq_seg], uniq[u, nq_seg:]
        steps, q_cov, k_cov = _pattern_steps(mask, runs, first, lq, lk, q_start, k_start, k_size, off, lo, hi, cells)
        batch = None if uniq.shape[0] == 1 else (inverse == u).nonzero().flatten()
        patterns.append(
            Pattern(
                batch,
                tuple(steps),
                _complement_np(q_cov[:, 0], q_cov[:, 1], mask.num_q),
                _complement_np(k_cov[:, 0], k_cov[:, 1], mask.num_kv),
            )
        )
    return Plan(tuple(patterns), mask.num_q, mask.num_kv)


def _per_sample_plan(mask) -> Plan:
    """Per-sample segment sizes: samples with equal sizes and lengths share a pattern, planned from one of them as
    a mask of its own (:meth:`ZorroMask.sample`)."""
    parts = [t for t in (mask._sample_sizes, mask._kv_sample_sizes, mask._lengths, mask._kv_lengths) if t is not None]
    # grouped in Python, in torch.unique's (lexicographic) order: for a few samples torch.unique(dim=0) costs more
    rows = torch.cat(parts, 1).tolist()
    groups: dict[tuple, list[int]] = {}
    for b, row in enumerate(rows):
        groups.setdefault(tuple(row), []).append(b)
    patterns = []
    for key in sorted(groups):
        members = groups[key]
        (pat,) = build_plan(mask.sample(members[0])).patterns
        batch = None if len(members) == len(rows) else torch.tensor(members, dtype=torch.int64)
        patterns.append(pat._replace(batch=batch))
    return Plan(tuple(patterns), mask.num_q, mask.num_kv)


# ---------------------------------------------------------------------------------------------------------- gathers
def _gather(x: torch.Tensor, ranges: Ranges, blocks: int = 1, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``ranges`` of ``x (B, H, N, D)`` along dim 2 (a view for one range; ``index``, when given, lists the same
    rows); with ``blocks > 1`` the rows are split into equal diagonal blocks folded into the head dim:
    ``(B, H * blocks, rows / blocks, D)``."""
    if index is not None:
        x = x.index_select(2, index.to(x.device))
    elif len(ranges) == 1:
        s, e = ranges[0]
        x = x[:, :, s:e]
    else:
        x = torch.cat([x[:, :, s:e] for s, e in ranges], 2)
    if blocks > 1:
        x = x.reshape(x.shape[0], x.shape[1] * blocks, x.shape[2] // blocks, *x.shape[3:])
    return x


def _unfold(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of the block folding of :func:`_gather`: ``(B, H * blocks, L, ...) -> (B, H, blocks * L, ...)``."""
    return x.reshape(x.shape[0], heads, -1, *x.shape[3:])


def _scatter(dst: torch.Tensor, ranges: Ranges, src: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
    if index is not None:
        dst.index_copy_(2, index.to(dst.device), src)
        return
    off = 0
    for s, e in ranges:
        dst[:, :, s:e] = src[:, :, off : off + e - s]
        off += e - s


def _zero(dst: torch.Tensor, ranges: Ranges) -> None:
    for s, e in ranges:
        dst[:, :, s:e] = 0


def _step_bias(st: Step, bias, batch, heads: int, dtype) -> Optional[torch.Tensor]:
    """The step's bias, read only on its rows and columns (see :func:`zorro_kernels.bias.step_bias`), or None."""
    b = step_bias(bias, batch, st.q_ranges, st.k_ranges, st.blocks, heads, st.mask)
    return None if b is None else b.to(dtype)


def straddling_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one step across a causal diagonal or window edge; differentiable (twice, too) and NaN-safe.

    Args:
        q: ``(B, H, R, D)``; k, v: ``(B, H, C, D)`` gathered; mask: bool ``(R, C)``, True where row r may see column
            c; bias: additive, broadcastable to ``(B, H, R, C)``, or None. Columns every row sees go through plain
            matrix products; the others through ``where``-selected per-row copies ``(B, H, R, C', D)``, so a
            forbidden (row, key) pair is never part of any arithmetic, forward or backward.

    Returns:
        ``out (B, H, R, D)`` in q's dtype (rows that see nothing: 0, zero gradients) and ``lse (B, H, R)`` (-inf for
        those rows), computed in fp32 for half inputs as the fused kernels do.
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    every = mask.all(0)
    perm = torch.cat([every.nonzero().flatten(), (~every).nonzero().flatten()])  # columns every row sees first
    n_all = int(every.sum())
    mask = mask[:, perm].to(q.device)
    perm = perm.to(q.device)
    k, v = k.index_select(2, perm), v.index_select(2, perm)
    m_rest = mask[:, n_all:]
    sel = m_rest[..., None]
    s_rest = torch.einsum("bhrd,bhrcd->bhrc", q, torch.where(sel, k[:, :, None, n_all:], 0))
    s = torch.cat([q @ k[:, :, :n_all].transpose(-1, -2), s_rest], -1) * scale
    if bias is not None:
        s = s + (bias.index_select(-1, perm) if bias.shape[-1] > 1 else bias)
    live = mask.any(-1)[:, None]
    s = torch.where(live, torch.where(mask, s, float("-inf")), 0)  # a row that sees nothing: finite, then p = 0
    # rows whose every score is -inf (a -inf bias on all their keys) give 0, as the fused kernels do; their scores are
    # selected to 0 before the log-sum-exp, whose backward would otherwise be exp(-inf - -inf) = NaN even for a zero
    # upstream gradient (dq and the bias gradient of left padding's hidden rows)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(dead, 0, s), -1, keepdim=True)
    p = torch.where(mask & ~dead, torch.exp(s - lse), 0)
    out = p[..., :n_all] @ v[:, :, :n_all] + torch.einsum(
        "bhrc,bhrcd->bhrd", p[..., n_all:], torch.where(sel, v[:, :, None, n_all:], 0)
    )
    return out.to(dtype), torch.where(live & ~dead, lse, float("-inf"))[..., 0]


# ---------------------------------------------------------------------------------------------------------- CPU path
_fwd_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _zero_bad_rows(x: torch.Tensor):
    """``(x with its non-finite token rows zeroed, bad (..., N) bool)`` for ``x (..., N, D)``."""
    bad = ~torch.isfinite(x).all(-1)
    return x.masked_fill(bad[..., None], 0.0), bad


def _split_columns(mask: torch.Tensor, device):
    """``(every, rest, m_rest)`` of a straddling step's bool mask ``(R, C)``: the columns every row sees, the others
    (index tensors on ``device``), and the mask restricted to the others ``(R, C')``."""
    seen_by_all = mask.all(0)
    every, rest = seen_by_all.nonzero().flatten(), (~seen_by_all).nonzero().flatten()
    return every.to(device), rest.to(device), mask[:, rest].to(device)


def _rest_keys(k, v, rest, m_rest):
    """The columns only some rows see, with non-finite key rows zeroed: ``(k_r, v_r (B, H, C', D), bad (B, H, C'),
    hit (B, H, R))``; ``hit`` marks the rows that may attend a bad key (the only rows it may change)."""
    k_r, bad_k = _zero_bad_rows(k.index_select(2, rest))
    v_r, bad_v = _zero_bad_rows(v.index_select(2, rest))
    bad = bad_k | bad_v
    return k_r, v_r, bad, (m_rest & bad[:, :, None, :]).any(-1)


def _straddle_cpu_forward(q, k, v, mask, scale):
    """:func:`straddling_attention` without a bias, fast: ATen's CPU flash kernel on the columns every row of the step
    sees, plain masked products on the rest, merged by log-sum-exp. NaN-safe by zero-filling: the rest's non-finite key
    rows are zeroed (so a forbidden pair multiplies 0 by a finite number) and NaN is put back in the rows that may
    attend them. ``(out (B, H, R, D), lse (B, H, R))``."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    every, rest, m_rest = _split_columns(mask, q.device)
    k_r, v_r, _, hit = _rest_keys(k, v, rest, m_rest)
    s = torch.where(m_rest, torch.matmul(q, k_r.transpose(-1, -2)) * scale, float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf for rows that see none of these columns
    p = torch.where(m_rest, torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None]), 0)
    out = torch.matmul(p, v_r)
    if every.numel():
        o1, l1 = _fwd_cpu(q, k.index_select(2, every), v.index_select(2, every), 0.0, False, scale=scale)
        both = torch.logaddexp(l1.to(lse.dtype), lse)
        out = o1 * torch.exp(l1 - both)[..., None] + out * torch.exp(lse - both)[..., None]
        lse = both
    return out.masked_fill(hit[..., None], float("nan")).to(dtype), lse


def _straddle_cpu_backward(go, q, k, v, out, lse, mask, scale):
    """Backward of :func:`_straddle_cpu_forward` from the step's total ``out`` and ``lse``: the flash backward on the
    columns every row sees (any row's NaN may reach those), plain masked products on the rest with every bad token row
    (q, dO, out, keys) zeroed, and NaN put back only where the isolation rule lets it go."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v, go, out = q.float(), k.float(), v.float(), go.float(), out.float()
    every, rest, m_rest = _split_columns(mask, q.device)
    k_r, v_r, bad, hit = _rest_keys(k, v, rest, m_rest)
    q_z, bad_q = _zero_bad_rows(q)
    go_z, bad_go = _zero_bad_rows(go)
    rows = (bad_q | bad_go | hit) & mask.any(-1).to(q.device)
    delta = (go_z * out.masked_fill(rows[..., None] | ~torch.isfinite(out), 0)).sum(-1, keepdim=True)
    lse_r = lse.to(q.dtype).masked_fill(rows | torch.isneginf(lse), 0)[..., None]
    p = torch.where(m_rest, torch.exp(torch.matmul(q_z, k_r.transpose(-1, -2)) * scale - lse_r), 0)
    ds = torch.where(m_rest, p * (torch.matmul(go_z, v_r.transpose(-1, -2)) - delta), 0) * scale
    dq = torch.matmul(ds, k_r)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk.index_copy_(2, rest, torch.matmul(ds.transpose(-1, -2), q_z))
    dv.index_copy_(2, rest, torch.matmul(p.transpose(-1, -2), go_z))
    nan = float("nan")
    keys = (m_rest & rows[..., None]).any(-2) | (bad & m_rest.any(0))  # (B, H, C')
    dq = dq.masked_fill(rows[..., None], nan)
    dk.index_copy_(2, rest, dk.index_select(2, rest).masked_fill(keys[..., None], nan))
    dv.index_copy_(2, rest, dv.index_select(2, rest).masked_fill(keys[..., None], nan))
    if every.numel():
        g_q, g_k, g_v = _plain_cpu_backward(go, q, k.index_select(2, every), v.index_select(2, every), out, lse, scale)
        dq = dq + g_q
        dk.index_copy_(2, every, g_k)
        dv.index_copy_(2, every, g_v)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _all_finite(*ts) -> bool:
    # a finite sum has no NaN or Inf term (NaN and Inf propagate through any sum): one reduction pass, no bool
    # tensor; only a sum that overflows needs the element-wise check
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in ts)


def _plain_cpu_backward(go, q, k, v, out, lse, scale, bias=None):
    """Backward of a plain step: every row sees every key of the step but those ``bias`` sets to -inf. ATen's CPU
    flash backward does not keep a non-finite row to itself: with AMX (bf16 on Sapphire Rapids) a NaN query or
    upstream-gradient row reaches its neighbour row's dq. So when a gradient comes out non-finite (one sum each), the
    step is recomputed with the bad token rows zeroed and NaN put back where the isolation rule lets it go: the dq of
    the rows that are bad or attend a bad key, the dk/dv of the keys such a row attends and of bad keys some row
    attends."""
    go, out, lse = go.contiguous(), out.contiguous(), lse.contiguous()
    grads = _bwd_cpu(go, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    if _all_finite(*grads):
        return grads
    q_z, bad_q = _zero_bad_rows(q)
    go_z, bad_go = _zero_bad_rows(go)
    k_z, bad_k = _zero_bad_rows(k)
    v_z, bad_v = _zero_bad_rows(v)
    bad_kv = bad_k | bad_v  # (B, H, C)
    bad_rows = bad_q | bad_go | ~torch.isfinite(out).all(-1)  # (B, H, R)
    if bias is None:  # every row sees every key: no (R, C) table needed
        rows = bad_rows | bad_kv.any(-1, keepdim=True)
        keys = bad_kv | rows.any(-1, keepdim=True)
    else:
        sees = bias != float("-inf")  # broadcasts against (B, H, R, C)
        rows = (bad_rows | (sees & bad_kv[..., None, :]).any(-1)) & sees.any(-1)
        keys = (sees & rows[..., None]).any(-2) | (bad_kv & sees.any(-2))
    out_z = out.masked_fill(rows[..., None] | ~torch.isfinite(out), 0)
    lse_z = lse.masked_fill(rows, 0)
    dq, dk, dv = _bwd_cpu(go_z, q_z, k_z, v_z, out_z, lse_z, 0.0, False, attn_mask=bias, scale=scale)
    nan = float("nan")
    return (
        dq.masked_fill(rows[..., None], nan),
        dk.masked_fill(keys[..., None], nan),
        dv.masked_fill(keys[..., None], nan),
    )


def _causal_cpu_forward(q, k, v, scale):
    """A causal step's blocks (folded into the heads, square): one causal flash call. ATen's kernel fills the scores
    above the diagonal with -inf and then multiplies their zero weights by V, so non-finite key and value rows are
    zeroed first (clean rows come out bit for bit as from clean inputs) and NaN is put back in the rows at or below
    them (the rows that may attend them)."""
    if _all_finite(k, v):
        return _fwd_cpu(q, k, v, 0.0, True, scale=scale)
    k_z, bad_k = _zero_bad_rows(k)
    v_z, bad_v = _zero_bad_rows(v)
    out, lse = _fwd_cpu(q, k_z, v_z, 0.0, True, scale=scale)
    hit = torch.cumsum(bad_k | bad_v, -1) > 0  # row i attends keys 0 .. i
    return out.masked_fill(hit[..., None], float("nan")), lse


def _causal_cpu_backward(go, q, k, v, out, lse, scale):
    """Backward of :func:`_causal_cpu_forward`. With a non-finite input the bad token rows (keys, queries, upstream
    gradients, outputs) are zeroed so that the masked pairs multiply finite zeros, and NaN is put back where the
    isolation rule lets it go: the bad rows' dq and the dk/dv of every key such a row may attend."""
    if _all_finite(q, k, v, go, out):
        return _bwd_cpu(go.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, True, scale=scale)
    k_z, bad_k = _zero_bad_rows(k)
    v_z, bad_v = _zero_bad_rows(v)
    q_z, bad_q = _zero_bad_rows(q)
    go_z, bad_go = _zero_bad_rows(go)
    rows = bad_q | bad_go | (torch.cumsum(bad_k | bad_v, -1) > 0)
    out_z = out.masked_fill(rows[..., None] | ~torch.isfinite(out), 0)
    lse_z = lse.masked_fill(rows, 0)
    dq, dk, dv = _bwd_cpu(
        go_z.contiguous(), q_z, k_z, v_z, out_z.contiguous(), lse_z.contiguous(), 0.0, True, scale=scale
    )
    keys = torch.flip(torch.cumsum(torch.flip(rows, (-1,)), -1), (-1,)) > 0  # key j is attended by rows j ..
    nan = float("nan")
    return (
        dq.masked_fill(rows[..., None], nan),
        dk.masked_fill(keys[..., None], nan),
        dv.masked_fill(keys[..., None], nan),
    )


def _prefix_causal_cpu_forward(q, k, v, prefix: int, scale):
    """A causal step with a prefix (:attr:`Step.prefix`): the prefix keys every row sees in one plain flash call,
    the causal square (the last S keys, on the last S rows) in one causal call (NaN-safe,
    :func:`_causal_cpu_forward`), merged by log-sum-exp on those rows. Every square row sees at least its diagonal
    key, so both log-sum-exps are finite for finite inputs."""
    lead = q.shape[2] - (k.shape[2] - prefix)  # rows that see the prefix only
    o1, l1 = _fwd_cpu(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)
    o2, l2 = _causal_cpu_forward(q[:, :, lead:], k[:, :, prefix:], v[:, :, prefix:], scale)
    l1s = l1[:, :, lead:]
    lse = torch.logaddexp(l1s, l2)
    out = torch.mul(o1[:, :, lead:], torch.exp(l1s - lse)[..., None])  # in lse's precision: rounded to q's once
    out.addcmul_(o2, torch.exp(l2 - lse)[..., None])
    if lead == 0:
        return out.to(q.dtype), lse
    o1[:, :, lead:] = out  # o1 and l1 are the kernel's fresh outputs: written in place
    l1[:, :, lead:] = lse
    return o1, l1


def _prefix_causal_cpu_backward(go, q, k, v, out, lse, prefix: int, scale):
    """Backward of :func:`_prefix_causal_cpu_forward`: each part's flash backward from the step's total ``out`` and
    ``lse`` (the softmax of a row over both parts), dq summed; dK and dV as the two parts' pieces along the keys
    (written by :func:`_write_keys` without a concatenated copy)."""
    lead = q.shape[2] - (k.shape[2] - prefix)
    go, out, lse = go.contiguous(), out.contiguous(), lse.contiguous()
    g_q, g_k, g_v = _plain_cpu_backward(go, q, k[:, :, :prefix], v[:, :, :prefix], out, lse, scale)
    c_q, c_k, c_v = _causal_cpu_backward(
        go[:, :, lead:], q[:, :, lead:], k[:, :, prefix:], v[:, :, prefix:], out[:, :, lead:], lse[:, :, lead:], scale
    )
    g_q[:, :, lead:] += c_q
    return g_q, (g_k, c_k), (g_v, c_v)


def _take(ranges: Ranges, n: int) -> Ranges:
    """The ranges holding the first ``n`` rows gathered from ``ranges``."""
    out = []
    for s, e in ranges:
        if n <= 0:
            break
        out.append((s, min(e, s + n)))
        n -= e - s
    return tuple(out)


def _expand(st: Step) -> list[Step]:
    """A bucket or causal step as the single-block steps it stands for (causal blocks chunked along the diagonal,
    as the plan does for any band): for the paths that select per row (other devices, a bias)."""
    if st.index is None and not st.causal:
        return [st]
    if st.prefix:  # row q0 + lead + l sees the prefix and the square's keys 0 .. l; rows before, the prefix
        (q0, q1), out = st.q_ranges[0], []
        sq0 = q1 - (sum(e - s for s, e in st.k_ranges) - st.prefix)  # the square's first row
        for a, b in _chunks((q0, q1), BAND_ROWS):
            rows = torch.arange(a - sq0, b - sq0)[:, None]
            cols = torch.arange(st.prefix + max(b - sq0, 0))[None, :]
            m = (cols < st.prefix) | (cols - st.prefix <= rows)
            out.append(Step(((a, b),), _take(st.k_ranges, cols.shape[1]), 1, None if m.all() else m))
        return out
    if st.index is not None:
        members = list(zip(st.q_ranges, st.k_ranges))
    else:
        (q0, q1), (k0, k1) = st.q_ranges[0], st.k_ranges[0]
        lq, lk = (q1 - q0) // st.blocks, (k1 - k0) // st.blocks
        members = [((q0 + i * lq, q0 + (i + 1) * lq), (k0 + i * lk, k0 + (i + 1) * lk)) for i in range(st.blocks)]
    out = []
    for (q0, q1), (k0, k1) in members:
        if not st.causal:
            out.append(Step(((q0, q1),), ((k0, k1),)))
            continue
        for a, b in _chunks((q0, q1), BAND_ROWS):  # row q0 + l sees keys k0 .. k0 + l
            rows = torch.arange(a - q0, b - q0)[:, None]
            cols = torch.arange(b - q0)[None, :]
            m = cols <= rows
            out.append(Step(((a, b),), ((k0, k0 + b - q0),), 1, None if m.all() else m))
    return out


def _select(x: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
    return x if batch is None else x.index_select(0, batch)


def _batch_slice(batch: Optional[torch.Tensor]) -> Optional[slice]:
    """The samples ``batch`` (None: all) as a slice when they are consecutive, else None: a pattern of consecutive
    samples (one sample, per-sample layouts) reads its inputs and writes its outputs in place instead of gathering
    copies and scattering them back."""
    if batch is None:
        return slice(None)
    b = batch.tolist()
    return slice(b[0], b[-1] + 1) if b and b[-1] - b[0] == len(b) - 1 else None


def _write_keys(dst: torch.Tensor, writes: tuple, parts: tuple) -> None:
    """A step's dK or dV into ``dst (B, H, Nk, D)`` by its :attr:`Step.k_writes`, the gradient given as ``parts``:
    consecutive pieces along the gathered keys (dim 2; one piece for most steps)."""
    for s, e, o, acc in writes:
        pos = 0
        for g in parts:
            a, b = max(o, pos), min(o + e - s, pos + g.shape[2])
            if a < b:
                d, src = dst[:, :, s + a - o : s + b - o], g[:, :, a - pos : b - pos]
                if acc:
                    d.add_(src)
                else:
                    d.copy_(src)
            pos += g.shape[2]


def _steps(pat: Pattern, bias) -> tuple[Step, ...]:
    """The pattern's steps as the CPU path runs them: a bias is read per block, so causal steps are expanded."""
    if bias is None or not any(st.causal for st in pat.steps):
        return pat.steps
    # the chunks' dK/dV writes are scheduled afresh over the pattern (bucket steps copy by index whatever theirs say)
    return tuple(_schedule_key_writes([x for st in pat.steps for x in (_expand(st) if st.causal else [st])]))


def cpu_forward(q, k, v, plan: Plan, scale: float, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of a plan with ATen's CPU flash-attention kernels, one call per plan step (no autograd).
    ``bias``: as :func:`zorro_kernels.zorro_attention` (not differentiated here).

    Returns ``out (B, H, Nq, D)`` and ``lse (B, H, Nq)`` (fp32; fp64 for fp64 inputs). Buffers start uninitialised:
    every query row is written by exactly one step or explicitly zeroed (rows no step touches).
    """
    b, h, nq, d = q.shape
    out = q.new_empty(b, h, nq, d)
    lse = q.new_empty(b, h, nq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    for pat in plan.patterns:
        view = _batch_slice(pat.batch)
        if view is not None:
            qb, kb, vb, ob, lb = q[view], k[view], v[view], out[view], lse[view]
        else:
            qb, kb, vb = (_select(x, pat.batch) for x in (q, k, v))
            ob, lb = qb.new_empty(qb.shape), lse.new_empty(qb.shape[:3])
        kb, vb = expand_kv_heads(kb, h), expand_kv_heads(vb, h)
        for st in _steps(pat, bias):
            sb = _step_bias(st, bias, pat.batch, h, q.dtype)
            qi, ki = st.index or (None, None)
            args = (
                _gather(qb, st.q_ranges, st.blocks, qi),
                _gather(kb, st.k_ranges, st.blocks, ki),
                _gather(vb, st.k_ranges, st.blocks, ki),
            )
            if st.causal and st.prefix:
                o, l = _prefix_causal_cpu_forward(*args, st.prefix, scale)
            elif st.causal:
                o, l = _causal_cpu_forward(*args, scale)
            elif st.mask is None:
                o, l = _fwd_cpu(*args, 0.0, False, attn_mask=sb, scale=scale)
            elif sb is None:
                o, l = _straddle_cpu_forward(*args, st.mask, scale)
            else:
                o, l = straddling_attention(*args, st.mask, scale, sb)
            _scatter(ob, st.q_ranges, _unfold(o, h), qi)
            _scatter(lb, st.q_ranges, _unfold(l, h), qi)
        _zero(ob, pat.q_uncovered)
        _zero(lb, pat.q_uncovered)
        if view is None:
            out[pat.batch] = ob
            lse[pat.batch] = lb
    return out, lse


def cpu_backward(grad_out, q, k, v, out, lse, plan: Plan, scale: float, bias=None):
    """Backward of :func:`cpu_forward`: ``(dq, dk, dv)`` (none for ``bias``). dK/dV rows are first copied then
    accumulated (see
    :func:`_schedule_key_writes`); rows no step reads are zeroed."""
    grad_out = grad_out.contiguous()
    h, hkv = q.shape[1], k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for pat in plan.patterns:
        view = _batch_slice(pat.batch)
        if view is not None:
            qb, kb, vb, ob, lb, gb = (x[view] for x in (q, k, v, out, lse, grad_out))
            dqb, dkb, dvb = dq[view], dk[view], dv[view]
        else:
            qb, kb, vb, ob, lb, gb = (_select(x, pat.batch) for x in (q, k, v, out, lse, grad_out))
            dqb, dkb, dvb = torch.empty_like(qb), torch.empty_like(kb), torch.empty_like(vb)
        kb, vb = expand_kv_heads(kb, h), expand_kv_heads(vb, h)
        for st in _steps(pat, bias):
            sb = _step_bias(st, bias, pat.batch, h, q.dtype)
            qi, ki = st.index or (None, None)
            go = _gather(gb, st.q_ranges, st.blocks, qi)
            args = (
                _gather(qb, st.q_ranges, st.blocks, qi),
                _gather(kb, st.k_ranges, st.blocks, ki),
                _gather(vb, st.k_ranges, st.blocks, ki),
            )
            if st.causal and st.prefix:
                g_q, g_k, g_v = _prefix_causal_cpu_backward(
                    go, *args, _gather(ob, st.q_ranges), _gather(lb, st.q_ranges), st.prefix, scale
                )
            elif st.causal:
                g_q, g_k, g_v = _causal_cpu_backward(
                    go, *args, _gather(ob, st.q_ranges, st.blocks, qi), _gather(lb, st.q_ranges, st.blocks, qi), scale
                )
            elif st.mask is None:
                g_q, g_k, g_v = _plain_cpu_backward(
                    go,
                    *args,
                    _gather(ob, st.q_ranges, st.blocks, qi),
                    _gather(lb, st.q_ranges, st.blocks, qi),
                    scale,
                    sb,
                )
            elif sb is None:
                g_q, g_k, g_v = _straddle_cpu_backward(
                    go, *args, _gather(ob, st.q_ranges), _gather(lb, st.q_ranges), st.mask, scale
                )
            else:  # with a bias, a step across the band's edge is recomputed under autograd (a BAND_ROWS-row chunk)
                with torch.enable_grad():
                    leaves = tuple(t.detach().requires_grad_() for t in args)
                    g_q, g_k, g_v = torch.autograd.grad(
                        straddling_attention(*leaves, st.mask, scale, sb)[0], leaves, go
                    )
            _scatter(dqb, st.q_ranges, _unfold(g_q, h), qi)
            for g, dst in ((g_k, dkb), (g_v, dvb)):
                parts = [_unfold(x, h) for x in (g if isinstance(g, tuple) else (g,))]
                if hkv != h:  # GQA: the query heads of a group all read one kv head
                    parts = [x.unflatten(1, (hkv, h // hkv)).sum(2) for x in parts]
                if ki is not None:  # a bucket: keys no other step reads
                    dst.index_copy_(2, ki.to(dst.device), parts[0])
                    continue
                _write_keys(dst, st.k_writes, parts)
        for t, ranges in ((dqb, pat.q_uncovered), (dkb, pat.k_uncovered), (dvb, pat.k_uncovered)):
            _zero(t, ranges)
        if view is None:
            dq[pat.batch] = dqb
            dk[pat.batch] = dkb
            dv[pat.batch] = dvb
    return dq, dk, dv


class _SegmentAttentionCPU(torch.autograd.Function):
    """Autograd around :func:`cpu_forward` / :func:`cpu_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, bias):
        out, lse = cpu_forward(q, k, v, plan, scale, bias)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.bias = plan, scale, bias
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: ATen's CPU flash backward has no derivative of its own
            raise RuntimeError(
                "zorro_attention: the segments backend's CPU backward cannot be differentiated (double "
                "backward, create_graph=True); use backend='reference' for higher-order gradients"
            )
        return (*cpu_backward(grad_out, *ctx.saved_tensors, ctx.plan, ctx.scale, ctx.bias), None, None, None)


# ---------------------------------------------------------------------------------------------------------- any device
def _segment_attention_autograd(q, k, v, plan: Plan, scale: float, bias=None) -> torch.Tensor:
    """The same plan through ``F.scaled_dot_product_attention`` under autograd (GPU and other devices, and a bias
    that needs a gradient: SDPA differentiates its float ``attn_mask``)."""
    h = q.shape[1]
    out = q.new_zeros(q.shape)
    for pat in plan.patterns:
        qb, kb, vb = (_select(x, pat.batch) for x in (q, k, v))
        kb, vb = expand_kv_heads(kb, h), expand_kv_heads(vb, h)
        ob = out if pat.batch is None else qb.new_zeros(qb.shape)
        for st in (x for st_ in pat.steps for x in _expand(st_)):
            sb = _step_bias(st, bias, pat.batch, h, q.dtype)
            args = (
                _gather(qb, st.q_ranges, st.blocks),
                _gather(kb, st.k_ranges, st.blocks),
                _gather(vb, st.k_ranges, st.blocks),
            )
            if st.mask is None:
                o = F.scaled_dot_product_attention(*args, attn_mask=sb, scale=scale)
            else:
                o = straddling_attention(*args, st.mask, scale, sb)[0]
            _scatter(ob, st.q_ranges, _unfold(o, h))
        if pat.batch is not None:
            out = out.index_copy(0, pat.batch.to(q.device), ob)
    return out


def segment_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, bias=None
) -> torch.Tensor:
    """:func:`segment_attention` through ``F.scaled_dot_product_attention`` on every device: plain differentiable
    ops (no autograd.Function), so ``torch.func`` transforms can recompute it inside a custom op."""
    return _segment_attention_autograd(q, k, v, mask.derived(build_plan), scale, bias)


def _bias_needs_grad(bias) -> bool:
    t = getattr(bias, "table", bias)
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, bias=None) -> torch.Tensor:
    """Masked attention by exact segment decomposition. Shapes and ``bias`` as
    :func:`zorro_kernels.zorro_attention`; a bias is read one step's rows x columns at a time."""
    plan = mask.derived(build_plan)
    if q.device.type == "cpu" and not _bias_needs_grad(bias):
        return _SegmentAttentionCPU.apply(q, k, v, plan, scale, bias)
    return _segment_attention_autograd(q, k, v, plan, scale, bias)
