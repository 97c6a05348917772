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

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..bias import step_bias
from ..reference import expand_kv_heads

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


class Step(NamedTuple):
    """One dense attention problem: gathered query rows x gathered key rows, as ``blocks`` independent diagonal
    blocks of equal size (``blocks > 1`` only for fused runs of windows / packed sequences, each a single range)."""

    q_ranges: Ranges
    k_ranges: Ranges
    blocks: int = 1
    # steps across a causal diagonal / window edge only: bool (rows, cols) mask of the gathered block
    mask: Optional[torch.Tensor] = None
    # filled by the plan: how this step's dK/dV land: (start, stop, offset in the gathered keys, accumulate?)
    k_writes: tuple = ()


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
        return x.mask is None and len(x.q_ranges) == 1 and len(x.k_ranges) == 1

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
    written: list[tuple[int, int]] = []
    out = []
    for st in steps:
        writes, off = [], 0
        for s, e in st.k_ranges:
            # split [s, e) into pieces already written (accumulate) and fresh (copy)
            cuts = sorted({s, e, *(x for w in written for x in w if s < x < e)})
            for a, b in zip(cuts[:-1], cuts[1:]):
                seen = any(ws <= a and b <= we for ws, we in written)
                writes.append((a, b, off + a - s, seen))
            off += e - s
        written = list(_merge(written + list(st.k_ranges)))
        out.append(st._replace(k_writes=tuple(writes)))
    return out


def build_plan(mask) -> Plan:
    """The execution plan of ``mask`` (see the module docstring). Pure Python over segment counts: microseconds."""
    ql = mask._q_lengths_or_sizes()
    kl = mask._kv_lengths_or_sizes()
    bm = max(ql.shape[0], kl.shape[0])
    rows = torch.cat([ql.expand(bm, -1), kl.expand(bm, -1)], 1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    allow = mask.allow.tolist()
    off = mask.num_kv - mask.num_q
    lo, hi = mask.band()
    patterns = []
    for u in range(uniq.shape[0]):
        lens = uniq[u].tolist()
        qv = _valid_ranges(mask.q_sizes, lens[: len(mask.q_sizes)])
        kv = _valid_ranges(mask.kv_sizes, lens[len(mask.q_sizes) :])
        by_keys: dict[Ranges, list] = {}
        for a, qr in enumerate(qv):
            if qr is None:
                continue
            keys = _merge(kv[c] for c in range(len(kv)) if allow[a][c] and kv[c] is not None)
            if keys:
                by_keys.setdefault(keys, []).append(qr)
        steps = []
        for keys, q_ranges in by_keys.items():
            q_ranges = _merge(q_ranges)
            if lo is None and hi is None:
                steps.append(Step(q_ranges, keys))
                continue

            # banded: one step per query range, keys trimmed to the band; a range that straddles the band's edge is
            # cut into chunks of BAND_ROWS rows, each with its own element mask
            def trim(qr):
                return _merge(
                    (s if lo is None else max(s, qr[0] + off + lo), e if hi is None else min(e, qr[1] + off + hi))
                    for s, e in keys
                )

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
        steps.sort(key=lambda st: st.q_ranges[0][0])
        steps = _schedule_key_writes(_fuse_runs(steps))
        batch = None if uniq.shape[0] == 1 else (inverse == u).nonzero().flatten()
        q_cov = [r for st in steps for r in st.q_ranges]
        k_cov = [r for st in steps for r in st.k_ranges]
        patterns.append(Pattern(batch, tuple(steps), _complement(q_cov, mask.num_q), _complement(k_cov, mask.num_kv)))
    return Plan(tuple(patterns), mask.num_q, mask.num_kv)


# ---------------------------------------------------------------------------------------------------------- gathers
def _gather(x: torch.Tensor, ranges: Ranges, blocks: int = 1) -> torch.Tensor:
    """Rows ``ranges`` of ``x (B, H, N, D)`` along dim 2 (a view for one range); with ``blocks > 1`` the rows are
    split into equal diagonal blocks folded into the head dim: ``(B, H * blocks, rows / blocks, D)``."""
    if len(ranges) == 1:
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


def _scatter(dst: torch.Tensor, ranges: Ranges, src: torch.Tensor) -> None:
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
        g_q, g_k, g_v = _bwd_cpu(
            go.contiguous(),
            q,
            k.index_select(2, every),
            v.index_select(2, every),
            out.contiguous(),
            lse.contiguous(),
            0.0,
            False,
            scale=scale,
        )
        dq = dq + g_q
        dk.index_copy_(2, every, g_k)
        dv.index_copy_(2, every, g_v)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _select(x: torch.Tensor, batch: Optional[torch.Tensor]) -> torch.Tensor:
    return x if batch is None else x.index_select(0, batch)


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
        qb, kb, vb = (_select(x, pat.batch) for x in (q, k, v))
        kb, vb = expand_kv_heads(kb, h), expand_kv_heads(vb, h)
        ob = out if pat.batch is None else qb.new_empty(qb.shape)
        lb = lse if pat.batch is None else lse.new_empty(qb.shape[:3])
        for st in pat.steps:
            sb = _step_bias(st, bias, pat.batch, h, q.dtype)
            args = (
                _gather(qb, st.q_ranges, st.blocks),
                _gather(kb, st.k_ranges, st.blocks),
                _gather(vb, st.k_ranges, st.blocks),
            )
            if st.mask is None:
                o, l = _fwd_cpu(*args, 0.0, False, attn_mask=sb, scale=scale)
            elif sb is None:
                o, l = _straddle_cpu_forward(*args, st.mask, scale)
            else:
                o, l = straddling_attention(*args, st.mask, scale, sb)
            _scatter(ob, st.q_ranges, _unfold(o, h))
            _scatter(lb, st.q_ranges, _unfold(l, h))
        _zero(ob, pat.q_uncovered)
        _zero(lb, pat.q_uncovered)
        if pat.batch is not None:
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
        qb, kb, vb, ob, lb, gb = (_select(x, pat.batch) for x in (q, k, v, out, lse, grad_out))
        kb, vb = expand_kv_heads(kb, h), expand_kv_heads(vb, h)
        dqb = dq if pat.batch is None else torch.empty_like(qb)
        dkb = dk if pat.batch is None else qb.new_empty(qb.shape[0], hkv, *kb.shape[2:])
        dvb = dv if pat.batch is None else torch.empty_like(dkb)
        for st in pat.steps:
            sb = _step_bias(st, bias, pat.batch, h, q.dtype)
            go = _gather(gb, st.q_ranges, st.blocks)
            args = (
                _gather(qb, st.q_ranges, st.blocks),
                _gather(kb, st.k_ranges, st.blocks),
                _gather(vb, st.k_ranges, st.blocks),
            )
            if st.mask is None:
                g_q, g_k, g_v = _bwd_cpu(
                    go.contiguous(),
                    *args,
                    _gather(ob, st.q_ranges, st.blocks),
                    _gather(lb, st.q_ranges, st.blocks).contiguous(),
                    0.0,
                    False,
                    attn_mask=sb,
                    scale=scale,
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
            _scatter(dqb, st.q_ranges, _unfold(g_q, h))
            for g, dst in ((g_k, dkb), (g_v, dvb)):
                g = _unfold(g, h)
                if hkv != h:  # GQA: the query heads of a group all read one kv head
                    g = g.unflatten(1, (hkv, h // hkv)).sum(2)
                for s, e, o, acc in st.k_writes:
                    if acc:
                        dst[:, :, s:e] += g[:, :, o : o + e - s]
                    else:
                        dst[:, :, s:e] = g[:, :, o : o + e - s]
        for t, ranges in ((dqb, pat.q_uncovered), (dkb, pat.k_uncovered), (dvb, pat.k_uncovered)):
            _zero(t, ranges)
        if pat.batch is not None:
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
        for st in pat.steps:
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
