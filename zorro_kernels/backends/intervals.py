"""The intervals backend: a compiled CPU flash kernel over each row's key intervals (``zorro_kernels/csrc``).

Every ZorroMask row attends a few runs of consecutive keys: the allowed key segments' valid tokens, cut by a causal
cell's diagonal and the row-wide causal/window band. :func:`mask_intervals` writes them as ``lo, hi`` int32
``(B, Nq, R)`` (row i of sample b attends key j iff ``lo[b, i, r] <= j < hi[b, i, r]`` for some r), and the kernels
(``torch.ops.zorro_cpu.interval_fwd`` / ``interval_bwd``, built on first use by :mod:`._cpp`) run flash attention
over rows in blocks, skipping key chunks no row attends and masking only the chunks some row attends in part.

Masked means never read: the kernels select ``-inf`` (P = 0, dS = 0) outside a row's intervals, so a finite value
there never contributes. A non-finite q, k, v or upstream gradient shows in the output or dq (one sum each decides);
that call is then redone with the bad token rows zeroed and NaN put back exactly where the isolation rule lets it go,
so clean rows come out bit for bit as from clean inputs. Rows that attend nothing are exactly 0 with zero gradients.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _cpp

__all__ = [
    "interval_attention_reference",
    "mask_intervals",
    "mean_attended",
    "forward",
    "backward",
    "extra_reasons",
    "DESCRIPTION",
    "MAX_INTERVALS",
]

DESCRIPTION = "compiled CPU flash kernel over each row's key intervals, built on first use (ZORRO_CPU_KERNEL=0: off)"
MAX_INTERVALS = 64  # intervals per row the kernels take; more (a row seeing many scattered segments) is refused
_MAX_CELLS = 1 << 26  # (rows x cells) the builder fills before merging; past it the layout is refused unbuilt


def interval_attention_reference(q, k, v, lo, hi, scale: float):
    """The kernels' semantics in plain PyTorch: ``(out, lse)`` with a dense ``(B, Nq, Nk)`` mask built from ``lo``,
    ``hi`` (slow; the oracle of the kernel tests). Differentiable, any float dtype (run it in fp64 for a reference).

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv; lo, hi: int (B, Nq, R). A row with no keys
    gives out 0 and lse ``-inf``, and zero gradients."""
    nk = k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    j = torch.arange(nk, device=q.device)
    allowed = ((lo[..., None] <= j) & (j < hi[..., None])).any(2)[:, None]  # (B, 1, Nq, Nk)
    scores = torch.where(allowed, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    live = allowed.any(-1, keepdim=True)
    # a dead row's scores are all -inf: softmax would give NaN, so it is selected to 0 (its gradient then is too)
    p = torch.where(live, torch.softmax(torch.where(live, scores, 0.0), -1), 0.0)
    return p @ v, lse


# ---------------------------------------------------------------------------------------------------- builder
def _cell_table(mask) -> tuple[np.ndarray, np.ndarray]:
    """``(cell_c, cell_causal)`` of shape ``(Sq, R0)``: the key segments each query segment may see, in key order
    (-1 pads), and whether each cell is causal. Linear in the rule table's allowed cells. numpy: these tables are a
    few cells, where each torch call would cost more than its work."""
    runs = mask._runs
    a, c = runs.pairs()
    causal = runs.lookup(a, c, causal=True)
    sq = len(mask.q_sizes)
    counts = np.bincount(a, minlength=sq)
    width = max(int(counts.max()) if counts.size else 0, 1)
    slot = np.arange(a.size) - (np.cumsum(counts) - counts)[a]
    cell_c = np.full((sq, width), -1, dtype=np.int64)
    cell_causal = np.zeros((sq, width), dtype=bool)
    cell_c[a, slot] = c
    cell_causal[a, slot] = causal
    return cell_c, cell_causal


def _merge_np(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_merge` in numpy, for the per-segment tables: a few cells, where torch's per-call cost is the cost (the
    Gemma-3 row's intervals 0.80 ms against 0.93 with :func:`_merge` here). The per-row tables keep :func:`_merge`,
    whose scatters beat numpy's fancy indexing there (ragged demo 4.2 against 6.6 ms)."""
    empty = lo >= hi
    ends = np.where(empty, 0, hi)
    prev = np.maximum.accumulate(np.concatenate((np.zeros_like(ends[..., :1]), ends[..., :-1]), -1), -1)
    lo, hi = np.where(empty, prev, lo), np.where(empty, prev, hi)
    starts = lo > prev
    starts[..., 0] = True
    group = np.cumsum(starts, -1) - 1
    width = int(group.max()) + 1 if group.size else 1
    # sorted and disjoint, empty ones turned into the point before them: a group's start holds its lo and its last
    # member its hi (hi never decreases along a row), one of each per group, so plain assignment places them
    last = np.ones_like(starts)
    last[..., :-1] = starts[..., 1:]
    new_lo = np.zeros((*lo.shape[:-1], width), dtype=lo.dtype)
    new_hi = np.zeros_like(new_lo)
    lead = np.nonzero(starts)
    new_lo[(*lead[:-1], group[lead])] = lo[lead]
    tail = np.nonzero(last)
    new_hi[(*tail[:-1], group[tail])] = hi[tail]
    return new_lo, new_hi


def _starts(sizes: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(sizes, 1) - sizes


def _merge(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joins each row's touching intervals (sorted, disjoint, empty ones anywhere) so a row attending consecutive
    segments has one interval, and drops the padding: ``(lo, hi)`` with the fewest columns that hold them."""
    if lo.shape[-1] == 1:
        return lo, hi
    if lo.shape[-1] == 2:  # the common row shape (a prefix and a causal part): a few element-wise ops, no scatter
        e0, e1 = lo[..., 0] >= hi[..., 0], lo[..., 1] >= hi[..., 1]
        if bool((e0 | e1 | (lo[..., 1] <= hi[..., 0])).all()):  # every row one interval (or none)
            one_lo = torch.where(e0, lo[..., 1], lo[..., 0])
            one_hi = torch.where(e1, torch.where(e0, lo[..., 1], hi[..., 0]), hi[..., 1])
            return one_lo[..., None], one_hi[..., None]
    empty = lo >= hi
    # end of the row's non-empty intervals before each one; an empty interval becomes that point, which joins the
    # group before it and widens nothing
    ends = torch.where(empty, 0, hi)
    prev = torch.cummax(torch.cat((torch.zeros_like(ends[..., :1]), ends[..., :-1]), -1), -1).values
    lo = torch.where(empty, prev, lo)
    hi = torch.where(empty, prev, hi)
    starts = lo > prev  # a gap before it: a new interval
    starts[..., 0] = True
    group = torch.cumsum(starts.to(torch.int64), -1) - 1
    width = int(group.max()) + 1 if group.numel() else 1
    shape = (*lo.shape[:-1], width)
    new_lo = torch.zeros(shape, dtype=lo.dtype).scatter_reduce(-1, group, lo, "amin", include_self=False)
    new_hi = torch.zeros(shape, dtype=hi.dtype).scatter_reduce(-1, group, hi, "amax", include_self=False)
    return new_lo, new_hi


def _segment_slots(mask, kl: np.ndarray, k_sizes: np.ndarray):
    """Per sample and query segment, the key intervals its rows share, as slots ``(lo, hi, causal, kv)`` each
    ``(Bm, Sq, R)`` in key order: the full cells' keys (touching ones joined here, once per segment, so the row-level
    work has a few columns, not one per cell) and each causal cell's keys, whose end each row sets from its position
    (``hi`` there is the cell's last key + 1; ``kv`` its valid keys). ``kl``, ``k_sizes``: ``(Bm, Sk)``."""
    cell_c, cell_causal = _cell_table(mask)  # (Sq, R0)
    bm = kl.shape[0]
    present = cell_c >= 0
    flat = np.maximum(cell_c, 0)
    k0 = (np.cumsum(k_sizes, 1) - k_sizes)[:, flat]  # (Bm, Sq, R0)
    kv = kl[:, flat]
    full = present & ~cell_causal
    flo, fhi = _merge_np(k0, np.where(full, k0 + kv, k0))
    causal = present & cell_causal
    rc = int(causal.sum(1).max()) if causal.any() else 0
    if rc == 0:
        return flo, fhi, None, None
    # the causal cells first, in key order (a stable sort on "not causal"), cut to the most any segment has
    order = np.argsort(~causal, axis=1, kind="stable")[:, :rc]
    c_ok = np.broadcast_to(np.take_along_axis(causal, order, 1), (bm, *order.shape))
    index = np.broadcast_to(order, (bm, *order.shape))
    c_lo = np.take_along_axis(k0, index, 2)
    c_kv = np.where(c_ok, np.take_along_axis(kv, index, 2), 0)
    lo = np.concatenate((flo, c_lo), -1)
    hi = np.concatenate((fhi, c_lo + c_kv), -1)
    is_causal = np.concatenate((np.zeros(flo.shape, dtype=bool), c_ok), -1)
    kv_all = np.concatenate((fhi - flo, c_kv), -1)
    # key order for the row-level merge: empty slots last (they may sit anywhere, but the non-empty ones must be
    # sorted); cells are disjoint key segments, so sorting by start is sorting by position
    perm = np.argsort(np.where(lo < hi, lo, np.iinfo(np.int64).max), axis=-1, kind="stable")
    return tuple(np.take_along_axis(x, perm, -1) for x in (lo, hi, is_causal, kv_all))


def _build_intervals(mask) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(lo, hi)`` int32 ``(Bm, Nq, R)`` for ``mask`` (Bm = 1 when every sample has the same layout), or None when
    the layout needs more than :data:`MAX_INTERVALS` per row. Tensor ops over ``(Bm, Sq, cells)`` per segment, then
    over ``(Bm, Nq, slots)`` per row with the slots a segment's rows share, no loop over rows."""
    ql = mask._q_lengths_or_sizes()  # (Bm, Sq) valid tokens
    kl = mask._kv_lengths_or_sizes()
    bm = max(ql.shape[0], kl.shape[0])
    ql, kl = ql.expand(bm, -1), kl.expand(bm, -1)
    q_sizes = mask._sample_sizes if mask._sample_sizes is not None else torch.tensor(mask.q_sizes)[None]
    k_sizes = mask._kv_sample_sizes if mask._kv_sample_sizes is not None else torch.tensor(mask.kv_sizes)[None]
    q_sizes, k_sizes = q_sizes.expand(bm, -1), k_sizes.expand(bm, -1)
    nq, nk = mask.num_q, mask.num_kv
    slots = _segment_slots(mask, kl.numpy(), k_sizes.numpy())
    s_lo, s_hi, s_causal, s_kv = (None if x is None else torch.from_numpy(np.ascontiguousarray(x)) for x in slots)
    width = s_lo.shape[-1]
    if bm * nq * width > _MAX_CELLS:
        return None
    i = torch.arange(nq)[None].expand(bm, -1)
    # each row's segment: the segment ids repeated by each sample's sizes (searchsorted and int64 clamp cost 10x more)
    seg = torch.repeat_interleave(torch.arange(q_sizes.shape[1]).repeat(bm), q_sizes.reshape(-1)).view(bm, nq)
    il = i - _starts(q_sizes).gather(1, seg)
    q_valid = ql.gather(1, seg)  # (Bm, Nq): the row's segment's valid tokens
    index = seg[..., None].expand(-1, -1, width)
    lo, hi = s_lo.gather(1, index), s_hi.gather(1, index)  # (Bm, Nq, R)
    zero = torch.zeros((), dtype=torch.int64)
    if s_causal is not None:
        # a causal cell's keys up to its bottom-right diagonal: row il of q_valid sees kv - q_valid + il + 1 of them
        kv = s_kv.gather(1, index)
        seen = torch.clamp((il - q_valid)[..., None] + kv + 1, min=0)
        hi = torch.where(s_causal.gather(1, index), lo + torch.minimum(seen, kv), hi)
    band_lo, band_hi = mask.band()  # on d = j - i - (Nk - Nq)
    row = (i + (nk - nq))[..., None]
    if band_lo is not None:
        lo = torch.maximum(lo, row + band_lo)
    if band_hi is not None:
        hi = torch.minimum(hi, row + band_hi + 1)
    if band_lo is not None or band_hi is not None:  # segment bounds lie in [0, Nk] already; a band may leave it
        top = torch.tensor(nk, dtype=torch.int64)
        lo, hi = torch.minimum(torch.maximum(lo, zero), top), torch.minimum(torch.maximum(hi, zero), top)
    hi = torch.where((il < q_valid)[..., None] & (lo < hi), hi, lo)
    lo, hi = _merge(lo, hi)
    if lo.shape[-1] > MAX_INTERVALS:
        return None
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def mean_attended(mask) -> Optional[float]:
    """Attended (query, key) pairs per sample, averaged over the samples, counted from the mask's cached intervals
    (``mask.attended()``'s mean, without its segment arithmetic); None when the layout has too many intervals."""
    built = mask.derived(_build_intervals)
    if built is None:
        return None
    lo, hi = built
    return float((hi - lo).sum(dtype=torch.int64)) / lo.shape[0]


def _batched_intervals(mask, batch: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    built = mask.derived(_build_intervals)
    if built is None:
        return None
    lo, hi = built
    return lo.expand(batch, -1, -1).contiguous(), hi.expand(batch, -1, -1).contiguous()


def mask_intervals(mask, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` int32 ``(batch, Nq, R)``: the keys each row of ``mask`` attends as sorted disjoint intervals
    (see the module docstring). Cached on the mask. Raises ValueError for a layout of more than
    :data:`MAX_INTERVALS` intervals per row."""
    built = mask.derived(_batched_intervals, int(batch))
    if built is None:
        raise ValueError(f"the mask needs more than {MAX_INTERVALS} key intervals per row")
    return built


# ---------------------------------------------------------------------------------------------------- backend
def extra_reasons(q, k, v, mask) -> list:
    if torch.compiler.is_compiling():
        # nothing is built or planned while tracing (the op plans inside, on the real mask): the kernels must have
        # loaded in an eager call before, e.g. the first call or ``zorro_kernels.backends._cpp.load()``
        if _cpp.loaded():
            return []
        return [
            _cpp.unavailable_reason()
            if _cpp.loaded() is False
            else "the CPU kernel is not loaded yet in this "
            "process (it builds on the first eager call, or zorro_kernels.backends._cpp.load())"
        ]
    reason = _cpp.unavailable_reason() if q.device.type == "cpu" else None
    if reason is not None:
        return [reason]
    if not (_cpp.has_op("interval_fwd") and _cpp.has_op("interval_bwd")):
        return ["the CPU kernel library lacks zorro_cpu.interval_fwd or interval_bwd"]
    if mask.derived(_build_intervals) is None:
        return [f"the layout needs more than {MAX_INTERVALS} key intervals per row"]
    return []


def _finite(t: torch.Tensor) -> bool:
    # one sum: NaN and Inf survive it (an overflow to Inf only sends a finite call down the careful path, still exact)
    return bool(t.sum(dtype=t.dtype).isfinite())


def _dead_rows(mask, batch: int) -> Optional[torch.Tensor]:
    """bool ``(B, 1, Nq, 1)``: the rows that attend nothing, or None when every row attends some key."""
    lo, hi = mask_intervals(mask, batch)
    dead = (lo >= hi).all(-1)
    return dead[:, None, :, None] if bool(dead.any()) else None


def _zero_bad_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x with its non-finite token rows zeroed, bad (B, H, N) bool)``."""
    bad = ~torch.isfinite(x).all(-1)
    return x.masked_fill(bad[..., None], 0.0), bad


def _rows_hitting(lo, hi, bad_keys: torch.Tensor) -> torch.Tensor:
    """bool ``(B, H, Nq)``: the rows whose intervals hold a key marked in ``bad_keys (B, H, Nk)``."""
    b, h = bad_keys.shape[:2]
    count = torch.nn.functional.pad(torch.cumsum(bad_keys.to(torch.int32), -1), (1, 0))  # (B, H, Nk + 1)
    nq, r = lo.shape[1:]

    def at(x):
        return count.gather(-1, x.reshape(b, 1, nq * r).expand(b, h, -1).long()).view(b, h, nq, r)

    return ((at(hi) - at(lo)) * (lo < hi)[:, None].to(torch.int32)).sum(-1) > 0


def _keys_hit_by(lo, hi, rows: torch.Tensor, nk: int) -> torch.Tensor:
    """bool ``(B, H, Nk)``: the keys some row marked in ``rows (B, H, Nq)`` attends."""
    b, h = rows.shape[:2]
    w = (rows[..., None] & (lo < hi)[:, None]).to(torch.int32).reshape(b, h, -1)  # (B, H, Nq * R)
    diff = torch.zeros(b, h, nk + 1, dtype=torch.int32)
    diff.scatter_add_(-1, lo.reshape(b, 1, -1).expand(b, h, -1).long(), w)
    diff.scatter_add_(-1, hi.reshape(b, 1, -1).expand(b, h, -1).long(), -w)
    return torch.cumsum(diff, -1)[..., :nk] > 0


def _clean_keys(k, v, lo, hi, group: int):
    """Non-finite key tokens zeroed, so the kernels' GEMMs multiply finite numbers by the masked pairs' 0: ``(k, v,
    bad_keys (B, Hkv, Nk), hit (B, Hq, Nq))``, ``hit`` the rows that may attend a bad key (the caller poisons them)."""
    k, bad_k = _zero_bad_rows(k)
    v, bad_v = _zero_bad_rows(v)
    bad = bad_k | bad_v
    return k, v, bad, _rows_hitting(lo, hi, bad).repeat_interleave(group, 1)


def forward(q, k, v, mask, scale: float):
    """``(out (B, H, Nq, D), lse (B, H, Nq) fp32)`` on validated CPU inputs.

    The kernel runs on the inputs as they are. A masked score is selected away whatever it is, but a masked value
    row meets its P = 0 in a GEMM, so a non-finite value (or a bad query row, in its own output) shows in the output:
    then the bad key tokens are zeroed, the kernel runs again, and NaN goes to exactly the rows that may attend them.
    A bad query row spoils only its own output (the GEMMs keep rows apart); rows that attend nothing stay 0."""
    lo, hi = mask_intervals(mask, q.shape[0])
    out, lse = torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, hi, float(scale))
    if not _finite(out):
        k, v, _, hit = _clean_keys(k, v, lo, hi, q.shape[1] // k.shape[1])
        out, lse = torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, hi, float(scale))
        out = out.masked_fill(hit[..., None], float("nan"))
    return out, lse.float()


def backward(dout, q, k, v, out, lse, mask, scale: float):
    """``(dq, dk, dv)`` from :func:`forward`'s ``out`` and ``lse``.

    Checked as the dense backend's: every way a non-finite number reaches a gradient it may not passes through a
    non-finite ``dS`` of some pair or a masked pair's 0 times a bad key, both summed into dq; so a finite dq means dk
    and dv read nothing they may not (the upstream gradient of rows that attend nothing is zeroed first: their P = 0
    would carry it into dV). Else :func:`_careful_backward`."""
    lo, hi = mask_intervals(mask, q.shape[0])
    if q.dtype == torch.float64 and lse.dtype != torch.float64:
        # the probabilities are recomputed as exp(s - lse): an fp32 LSE would cost fp64 gradients 7 digits
        lse = torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, hi, float(scale))[1]
    dead = mask.derived(_dead_rows, q.shape[0])
    if dead is not None:
        dout = dout.masked_fill(dead, 0.0)
    grads = _kernel_backward(dout, q, k, v, out, lse, lo, hi, scale)
    return grads if _finite(grads[0]) else _careful_backward(dout, q, k, v, lo, hi, scale)


def _kernel_backward(dout, q, k, v, out, lse, lo, hi, scale: float):
    lse = lse.to(q.dtype).contiguous()
    return tuple(torch.ops.zorro_cpu.interval_bwd(dout, q, k, v, out, lse, lo, hi, float(scale)))


def _careful_backward(dout, q, k, v, lo, hi, scale: float):
    """The backward with every bad token row zeroed (and the forward redone on them), NaN put back exactly where the
    rule lets it go: the dq of rows that are bad or may attend a bad key, the dk/dv of the keys such rows may attend
    and of bad keys some row may attend."""
    group = q.shape[1] // k.shape[1]
    k, v, bad_keys, hit = _clean_keys(k, v, lo, hi, group)
    q, bad_q = _zero_bad_rows(q)
    dout, bad_do = _zero_bad_rows(dout)
    live = (lo < hi).any(-1)[:, None]  # (B, 1, Nq)
    rows = (bad_q | bad_do | hit) & live
    dout = dout.masked_fill(rows[..., None], 0.0)
    out, lse = torch.ops.zorro_cpu.interval_fwd(q, k, v, lo, hi, float(scale))
    dq, dk, dv = _kernel_backward(dout, q, k, v, out, lse, lo, hi, scale)
    kv_rows = rows.unflatten(1, (k.shape[1], group)).any(2)
    nk = k.shape[2]
    keys = _keys_hit_by(lo, hi, kv_rows, nk) | (bad_keys & _keys_hit_by(lo, hi, live.expand_as(kv_rows), nk))
    nan = float("nan")
    dq = dq.masked_fill(rows[..., None], nan)
    return dq, dk.masked_fill(keys[..., None], nan), dv.masked_fill(keys[..., None], nan)
