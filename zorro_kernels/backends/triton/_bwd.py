"""Backward kernels: delta preprocess, dK/dV per kv tile (transposed tile lists), dQ per query tile (forward lists).

Two modes (:func:`one_pass`):

- **one pass** (the default, when ``torch.are_deterministic_algorithms_enabled()`` is False): the dK/dV kernel also
  computes each pair's ``dS^T K`` and adds it into an fp32 dQ buffer with atomics — 5 matrix products and one exp
  pass per pair, as FlashAttention-2/3, and no dQ kernel. The buffer is zeroed by the delta preprocess and scaled and
  cast once at the end. The summation order of dQ depends on scheduling, so reruns may differ in the last bits.
- **deterministic**: a separate dQ kernel over the forward plan recomputes S and dP (7 products, 2 exp passes per
  pair) and every output element is written by exactly one program in a fixed order, with no atomics: a rerun is
  bitwise equal.

For GQA a dK/dV program owns one kv head and loops over the query heads of its group, which keeps atomics out of dK/dV
in both modes. Every grid runs heaviest first (the plans' program order).

As in the forward, each kernel's tile body is one function compiled twice by its ``MASKED`` constexpr: full tiles
without mask arithmetic, partial tiles loading only valid tokens (so NaN in padding cannot leak), zeroing ``p`` and
``ds`` outside the element mask and zeroing the non-finite rows of what they sum over (``finite_rows``). Probabilities
are recomputed from the forward's base-2 log-sum-exp with one multiply-add: ``p = exp2(qk * qk_scale - lse2)``.

With a score bias (:mod:`._bias`) the probabilities add its tile before the exp, and the dK/dV kernel — which visits
every attended pair of a (sample, head) exactly once — also writes ``dS`` into the bias's gradient (stores for a
full-size dense bias, fp32 atomics for a broadcast one or a table; the deterministic mode stores into a full buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bias import bias_tile, full_tile_bias, write_bias_grad
from ._config import KernelConfig
from ._fwd import _RUNTIME_ARGS, LOG2E, common_constexprs, plan_args
from ._launch import launch, shape_bucket
from ._mask import finite_rows, fixed_words, load_rows, load_tile, pair_keep, poison, program_tile, token_segments

_PRE = KernelConfig(64, 16, 4, 1)  # the delta preprocess: 64 rows a program, never autotuned


@triton.jit(do_not_specialize=["H", "Nq"])
def _bwd_preprocess(
    O,
    DO,
    DELTA,
    DQ_ACC,
    stride_dob,
    stride_doh,
    stride_don,
    H,
    Nq,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """``delta[b, h, i] = sum_d out[b, h, i, d] * dout[b, h, i, d]`` in fp32; with ``ZERO_DQ`` also zeroes the
    one-pass backward's fp32 dQ buffer ``(B, H, Nq, HEAD_DIM)``."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + bh.to(tl.int64) * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(
        DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_don + offs_d[None, :],
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, delta, mask=rows < Nq)
    if ZERO_DQ:
        tl.store(
            DQ_ACC + bh.to(tl.int64) * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
            tl.zeros([BLOCK, D_PAD], dtype=tl.float32),
            mask=ok,
        )


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q,
    do,
    lse2,
    delta,
    qk_scale,
    keep,
    bias_t,
    MASKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dV += P^T dO, dK += dS^T Q for one query tile, computed transposed (key rows x query columns):
    ``k, v, dk, dv (BN, D)``, ``q, do (BM, D)``, ``lse2, delta (BM,)``, ``keep, bias_t (BN, BM)``. Returns ``dk, dv``
    and ``ds_t (BN, BM)`` (0 outside ``keep``): the one-pass dQ's and the bias gradient's input."""
    if MASKED:
        # both sums run over query rows: a row some keys may not see must add 0, not 0 * NaN
        q, q_bad = finite_rows(q)
        do, do_bad = finite_rows(do)
    qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
    if HAS_BIAS:
        p_t = tl.math.exp2(qk_t * qk_scale + bias_t - lse2[None, :])
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
        # rows that see nothing have lse = -inf, so exp2 gives inf there; the mask selects 0 before any use
        p_t = poison(p_t, keep, q_bad | do_bad)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if MASKED:
        ds_t = tl.where(keep, ds_t, 0.0)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv, ds_t


@triton.jit
def _add_dq(DQ_ptrs, ds_t, k_c, ok, INPUT_PRECISION: tl.constexpr):
    """One-pass dQ: ``DQ[rows] += dS K`` for one (query tile, kv tile) pair, fp32 atomics. ``k_c`` is K with its
    non-finite rows zeroed: a key a row may not see has ``ds = 0`` and must add 0, not ``0 * NaN``, while a kept pair
    with a non-finite key already has a NaN ``ds`` (its score is NaN)."""
    dq = tl.dot(tl.trans(ds_t).to(k_c.dtype), k_c, input_precision=INPUT_PRECISION)
    tl.atomic_add(DQ_ptrs, dq, mask=ok, sem="relaxed")


@triton.jit
def _dkdv_full_span(
    dk,
    dv,
    k,
    v,
    k_c,
    Q_bh,
    DO_bh,
    LSE_bh,
    DELTA_bh,
    DQ_bh,
    stride_qn,
    stride_don,
    offs_m,
    offs_d,
    lo,
    hi,
    qk_scale,
    cols,
    k_in,
    Nq,
    BIAS_bh,
    DB_bh,
    RQ,
    RK,
    stride_zm,
    stride_zn,
    stride_gm,
    stride_gn,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    DB_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Full query tiles ``lo..hi-1`` of this kv tile with pointer increments and no masks (see ``_fwd_full_runs``).
    Every row of a full tile sees every key of it, so its LSE is finite (a -inf bias aside: the caller then passes
    +inf for such rows) and needs no guard."""
    rows = lo * BLOCK_M + offs_m
    q_ptrs = Q_bh + rows[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO_bh + rows[:, None] * stride_don + offs_d[None, :]
    lse_ptrs = LSE_bh + rows
    delta_ptrs = DELTA_bh + rows
    dq_ptrs = DQ_bh + rows[:, None] * HEAD_DIM + offs_d[None, :]
    for t in range(lo, hi):
        q = load_tile(q_ptrs, offs_d, HEAD_DIM, EVEN_D)
        do = load_tile(do_ptrs, offs_d, HEAD_DIM, EVEN_D)
        bias_t = 0.0
        if BIAS_KIND != 0:
            qi = (t * BLOCK_M + offs_m)[None, :]
            q_in = qi < Nq
            ok = k_in[:, None] & q_in
            bias_t = bias_tile(
                BIAS_bh, RQ, RK, stride_zm, stride_zn, T, qi, cols[:, None], q_in, k_in[:, None], ok, BIAS_KIND
            )
        dk, dv, ds_t = _dkdv_tile(
            dk,
            dv,
            k,
            v,
            q,
            do,
            tl.load(lse_ptrs),
            tl.load(delta_ptrs),
            qk_scale,
            0,
            bias_t,
            False,
            BIAS_KIND != 0,
            INPUT_PRECISION,
        )
        if DB_MODE != 0:
            write_bias_grad(
                DB_bh,
                RQ,
                RK,
                stride_gm,
                stride_gn,
                T,
                qi,
                cols[:, None],
                q_in,
                k_in[:, None],
                ok,
                ds_t,
                BIAS_KIND,
                DB_MODE,
            )
        if ONE_PASS:
            _add_dq(dq_ptrs, ds_t, k_c, offs_d[None, :] < HEAD_DIM, INPUT_PRECISION)
            dq_ptrs += BLOCK_M * HEAD_DIM
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _dkdv_full_runs(
    dk,
    dv,
    k,
    v,
    k_c,
    Q_bh,
    DO_bh,
    LSE_bh,
    DELTA_bh,
    DQ_bh,
    stride_qn,
    stride_don,
    offs_m,
    offs_d,
    RUN_NUM,
    RUNS,
    list_row,
    R,
    SHIFT,
    qk_scale,
    cols,
    k_in,
    Nq,
    BIAS_bh,
    DB_bh,
    RQ,
    RK,
    stride_zm,
    stride_zn,
    stride_gm,
    stride_gn,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    DB_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Full query tiles of this kv tile, run by run. Each run starts ``SHIFT`` tiles in and wraps around: kv tiles that
    share a run (given different shifts) then add into different dQ tiles at once (the one-pass atomics spread out)
    instead of all walking it from its first tile."""
    num_runs = tl.load(RUN_NUM + list_row)
    for r in range(0, num_runs):
        run = RUNS + (list_row * R + r) * 2
        lo = tl.load(run)
        hi = tl.load(run + 1)
        if ONE_PASS:  # [mid, hi), then [lo, mid)
            mid = lo + SHIFT % tl.maximum(hi - lo, 1)
            dk, dv = _dkdv_full_span(
                dk,
                dv,
                k,
                v,
                k_c,
                Q_bh,
                DO_bh,
                LSE_bh,
                DELTA_bh,
                DQ_bh,
                stride_qn,
                stride_don,
                offs_m,
                offs_d,
                mid,
                hi,
                qk_scale,
                cols,
                k_in,
                Nq,
                BIAS_bh,
                DB_bh,
                RQ,
                RK,
                stride_zm,
                stride_zn,
                stride_gm,
                stride_gn,
                T,
                HEAD_DIM,
                BLOCK_M,
                EVEN_D,
                ONE_PASS,
                BIAS_KIND,
                DB_MODE,
                INPUT_PRECISION,
            )
            dk, dv = _dkdv_full_span(
                dk,
                dv,
                k,
                v,
                k_c,
                Q_bh,
                DO_bh,
                LSE_bh,
                DELTA_bh,
                DQ_bh,
                stride_qn,
                stride_don,
                offs_m,
                offs_d,
                lo,
                mid,
                qk_scale,
                cols,
                k_in,
                Nq,
                BIAS_bh,
                DB_bh,
                RQ,
                RK,
                stride_zm,
                stride_zn,
                stride_gm,
                stride_gn,
                T,
                HEAD_DIM,
                BLOCK_M,
                EVEN_D,
                ONE_PASS,
                BIAS_KIND,
                DB_MODE,
                INPUT_PRECISION,
            )
        else:  # no atomics to spread: one loop, half the code
            dk, dv = _dkdv_full_span(
                dk,
                dv,
                k,
                v,
                k_c,
                Q_bh,
                DO_bh,
                LSE_bh,
                DELTA_bh,
                DQ_bh,
                stride_qn,
                stride_don,
                offs_m,
                offs_d,
                lo,
                hi,
                qk_scale,
                cols,
                k_in,
                Nq,
                BIAS_bh,
                DB_bh,
                RQ,
                RK,
                stride_zm,
                stride_zn,
                stride_gm,
                stride_gn,
                T,
                HEAD_DIM,
                BLOCK_M,
                EVEN_D,
                ONE_PASS,
                BIAS_KIND,
                DB_MODE,
                INPUT_PRECISION,
            )
    return dk, dv


@triton.jit
def _dkdv_partial(
    dk,
    dv,
    k,
    v,
    k_c,
    Q_bh,
    DO_bh,
    LSE_bh,
    DELTA_bh,
    DQ_bh,
    stride_qn,
    stride_don,
    offs_m,
    offs_d,
    NUM,
    IDX,
    list_row,
    SHIFT,
    Tq,
    cols,
    k_seg,
    k_ok,
    k_word,
    QCODE,
    q_code_row,
    BITS,
    CBITS,
    k_cword,
    k_end,
    QEND,
    WORDS,
    Nq,
    Nk,
    lo_off,
    hi_off,
    qk_scale,
    BIAS_bh,
    DB_bh,
    RQ,
    RK,
    stride_zm,
    stride_zn,
    stride_gm,
    stride_gn,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BAND_LO: tl.constexpr,
    BAND_HI: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_WORD: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    DB_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CELLS: tl.constexpr,
):
    """Partial query tiles from the index list, starting ``SHIFT`` entries in (see ``_dkdv_full_runs``): valid rows
    only, element mask (transposed) on p and ds."""
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        rows = tl.load(IDX + list_row * Tq + (t + SHIFT) % num) * BLOCK_M + offs_m
        q_seg, q_ok = token_segments(QCODE, q_code_row, rows, Nq)
        q, do = load_rows(Q_bh, DO_bh, stride_qn, stride_don, rows, offs_d, q_ok, HEAD_DIM, EVEN_D, True)
        lse2 = tl.load(LSE_bh + rows, mask=q_ok, other=0.0)
        delta = tl.load(DELTA_bh + rows, mask=q_ok, other=0.0)
        q_end = rows * 0
        if CELLS:
            q_end = tl.load(QEND + q_code_row + rows, mask=rows < Nq, other=0)
        keep = pair_keep(
            BITS,
            WORDS,
            k_seg,
            k_word,
            k_ok,
            cols,
            q_seg,
            q_ok,
            rows,
            lo_off,
            hi_off,
            BAND_LO,
            BAND_HI,
            ONE_WORD,
            False,
            CBITS,
            k_cword,
            k_end,
            q_end,
            CELLS,
        )
        bias_t = 0.0
        if BIAS_KIND != 0:
            bias_t = bias_tile(
                BIAS_bh,
                RQ,
                RK,
                stride_zm,
                stride_zn,
                T,
                rows[None, :],
                cols[:, None],
                (rows < Nq)[None, :],
                (cols < Nk)[:, None],
                keep,
                BIAS_KIND,
            )
        dk, dv, ds_t = _dkdv_tile(
            dk, dv, k, v, q, do, lse2, delta, qk_scale, keep, bias_t, True, BIAS_KIND != 0, INPUT_PRECISION
        )
        if DB_MODE != 0:
            write_bias_grad(
                DB_bh,
                RQ,
                RK,
                stride_gm,
                stride_gn,
                T,
                rows[None, :],
                cols[:, None],
                (rows < Nq)[None, :],
                (cols < Nk)[:, None],
                keep,
                ds_t,
                BIAS_KIND,
                DB_MODE,
            )
        if ONE_PASS:
            _add_dq(
                DQ_bh + rows[:, None] * HEAD_DIM + offs_d[None, :],
                ds_t,
                k_c,
                q_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                INPUT_PRECISION,
            )
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_ARGS + ["HKV"])
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQ_ACC,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    ORDER,
    RUN_NUM,
    RUNS,
    PART_NUM,
    PART_IDX,
    QCODE,
    KCODE,
    BITS,
    CBITS,
    QEND,
    KEND,
    BIAS,
    RQ,
    RK,
    stride_zb,
    stride_zh,
    stride_zm,
    stride_zn,
    T,
    DBIAS,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gn,
    H,
    HKV,
    GROUP,
    Nq,
    Nk,
    Tk,
    Tq,
    R,
    WORDS,
    REP,
    lo_off,
    hi_off,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BAND_LO: tl.constexpr,
    BAND_HI: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_WORD: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    DB_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CELLS: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    n, b, hk, list_row = program_tile(ORDER, REP, HKV, Tk)
    bhk = b * HKV + hk
    len_row = list_row // Tk
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM

    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k_seg, k_ok = token_segments(KCODE, len_row.to(tl.int64) * Nk, cols, Nk)
    q_code_row = len_row.to(tl.int64) * Nq
    k, v = load_rows(K_bh, V_bh, stride_kn, stride_vn, cols, offs_d, k_ok, HEAD_DIM, EVEN_D, True)
    k_word = fixed_words(BITS, k_seg, WORDS, ONE_WORD)
    k_cword = fixed_words(CBITS, k_seg, WORDS, ONE_WORD)
    k_end = cols * 0
    if CELLS:
        k_end = tl.load(KEND + len_row.to(tl.int64) * Nk + cols, mask=cols < Nk, other=0)
    if ONE_PASS:
        k_c, _ = finite_rows(k)
    else:
        k_c = k
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    # one-pass: each kv tile starts its query tiles at its own offset, so the programs walking the same queries add
    # into different dQ tiles at once; deterministic: every program in list order (no atomics to spread)
    if ONE_PASS:
        shift = n
    else:
        shift = 0
    for g in range(0, GROUP):  # GQA: the query heads reading this kv head, in order (no atomics)
        h = hk * GROUP + g
        bh = b * H + h
        Q_bh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DO_bh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSE_bh = LSE + bh.to(tl.int64) * Nq
        DELTA_bh = DELTA + bh.to(tl.int64) * Nq
        DQ_bh = DQ_ACC + bh.to(tl.int64) * Nq * HEAD_DIM
        BIAS_bh = BIAS + b.to(tl.int64) * stride_zb + h.to(tl.int64) * stride_zh
        DB_bh = DBIAS + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        dk, dv = _dkdv_full_runs(
            dk,
            dv,
            k,
            v,
            k_c,
            Q_bh,
            DO_bh,
            LSE_bh,
            DELTA_bh,
            DQ_bh,
            stride_qn,
            stride_don,
            offs_m,
            offs_d,
            RUN_NUM,
            RUNS,
            list_row,
            R,
            shift,
            qk_scale,
            cols,
            cols < Nk,
            Nq,
            BIAS_bh,
            DB_bh,
            RQ,
            RK,
            stride_zm,
            stride_zn,
            stride_gm,
            stride_gn,
            T,
            HEAD_DIM,
            BLOCK_M,
            EVEN_D,
            ONE_PASS,
            BIAS_KIND,
            DB_MODE,
            INPUT_PRECISION,
        )
        dk, dv = _dkdv_partial(
            dk,
            dv,
            k,
            v,
            k_c,
            Q_bh,
            DO_bh,
            LSE_bh,
            DELTA_bh,
            DQ_bh,
            stride_qn,
            stride_don,
            offs_m,
            offs_d,
            PART_NUM,
            PART_IDX,
            list_row,
            shift,
            Tq,
            cols,
            k_seg,
            k_ok,
            k_word,
            QCODE,
            q_code_row,
            BITS,
            CBITS,
            k_cword,
            k_end,
            QEND,
            WORDS,
            Nq,
            Nk,
            lo_off,
            hi_off,
            qk_scale,
            BIAS_bh,
            DB_bh,
            RQ,
            RK,
            stride_zm,
            stride_zn,
            stride_gm,
            stride_gn,
            T,
            HEAD_DIM,
            BLOCK_M,
            BAND_LO,
            BAND_HI,
            EVEN_D,
            ONE_WORD,
            ONE_PASS,
            BIAS_KIND,
            DB_MODE,
            INPUT_PRECISION,
            CELLS,
        )
    # every kv tile has a program, so keys no query sees get exact zeros
    out_ok = (cols[:, None] < Nk) & d_ok
    off = bhk.to(tl.int64) * Nk * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    k,
    v,
    qk_scale,
    keep,
    bias,
    MASKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dQ += dS K for one kv tile: ``q, do, dq (BM, D)``, ``k, v (BN, D)``, ``lse2, delta (BM,)``,
    ``keep, bias (BM, BN)``."""
    if MASKED:
        k, k_bad = finite_rows(k)  # dS·K sums over keys
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        p = tl.math.exp2(qk * qk_scale + bias - lse2[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = poison(p, keep, k_bad)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:
        ds = tl.where(keep, ds, 0.0)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def _dq_full_runs(
    dq,
    q,
    do,
    lse2,
    delta,
    K_bh,
    V_bh,
    stride_kn,
    stride_vn,
    offs_n,
    offs_d,
    RUN_NUM,
    RUNS,
    list_row,
    R,
    qk_scale,
    rows,
    q_in,
    Nk,
    BIAS_bh,
    RQ,
    RK,
    stride_zm,
    stride_zn,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Full kv tiles of this query tile, run by run (see ``_fwd_full_runs``)."""
    num_runs = tl.load(RUN_NUM + list_row)
    for r in range(0, num_runs):
        run = RUNS + (list_row * R + r) * 2
        lo = tl.load(run)
        hi = tl.load(run + 1)
        k_ptrs = K_bh + (lo * BLOCK_N + offs_n)[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_bh + (lo * BLOCK_N + offs_n)[:, None] * stride_vn + offs_d[None, :]
        for t in range(lo, hi):
            k = load_tile(k_ptrs, offs_d, HEAD_DIM, EVEN_D)
            v = load_tile(v_ptrs, offs_d, HEAD_DIM, EVEN_D)
            bias = 0.0
            if BIAS_KIND != 0:
                bias = full_tile_bias(
                    BIAS_bh, RQ, RK, stride_zm, stride_zn, T, rows, q_in, t * BLOCK_N + offs_n, Nk, BIAS_KIND
                )
            dq = _dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, 0, bias, False, BIAS_KIND != 0, INPUT_PRECISION)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _dq_partial(
    dq,
    q,
    do,
    lse2,
    delta,
    K_bh,
    V_bh,
    stride_kn,
    stride_vn,
    offs_n,
    offs_d,
    NUM,
    IDX,
    list_row,
    Tk,
    rows,
    q_seg,
    q_ok,
    q_word,
    KCODE,
    k_code_row,
    BITS,
    CBITS,
    q_cword,
    q_end,
    KEND,
    WORDS,
    Nq,
    Nk,
    lo_off,
    hi_off,
    qk_scale,
    BIAS_bh,
    RQ,
    RK,
    stride_zm,
    stride_zn,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BAND_LO: tl.constexpr,
    BAND_HI: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_WORD: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CELLS: tl.constexpr,
):
    """Partial kv tiles from the index list: valid keys only, element mask on p and ds."""
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        cols = tl.load(IDX + list_row * Tk + t) * BLOCK_N + offs_n
        k_seg, k_ok = token_segments(KCODE, k_code_row, cols, Nk)
        k, v = load_rows(K_bh, V_bh, stride_kn, stride_vn, cols, offs_d, k_ok, HEAD_DIM, EVEN_D, True)
        k_end = cols * 0
        if CELLS:
            k_end = tl.load(KEND + k_code_row + cols, mask=cols < Nk, other=0)
        keep = pair_keep(
            BITS,
            WORDS,
            q_seg,
            q_word,
            q_ok,
            rows,
            k_seg,
            k_ok,
            cols,
            lo_off,
            hi_off,
            BAND_LO,
            BAND_HI,
            ONE_WORD,
            True,
            CBITS,
            q_cword,
            q_end,
            k_end,
            CELLS,
        )
        bias = 0.0
        if BIAS_KIND != 0:
            bias = bias_tile(
                BIAS_bh,
                RQ,
                RK,
                stride_zm,
                stride_zn,
                T,
                rows[:, None],
                cols[None, :],
                (rows < Nq)[:, None],
                (cols < Nk)[None, :],
                keep,
                BIAS_KIND,
            )
        dq = _dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, keep, bias, True, BIAS_KIND != 0, INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,
    ORDER,
    RUN_NUM,
    RUNS,
    PART_NUM,
    PART_IDX,
    QCODE,
    KCODE,
    BITS,
    CBITS,
    QEND,
    KEND,
    BIAS,
    RQ,
    RK,
    stride_zb,
    stride_zh,
    stride_zm,
    stride_zn,
    T,
    H,
    GROUP,
    Nq,
    Nk,
    Tq,
    Tk,
    R,
    WORDS,
    REP,
    lo_off,
    hi_off,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BAND_LO: tl.constexpr,
    BAND_HI: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_WORD: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CELLS: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    m, b, h, list_row = program_tile(ORDER, REP, H, Tq)
    bh = b * H + h
    hk = h // GROUP
    len_row = list_row // Tq
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM

    q_seg, q_ok = token_segments(QCODE, len_row.to(tl.int64) * Nq, rows, Nq)
    k_code_row = len_row.to(tl.int64) * Nk
    q, do = load_rows(
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
        DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
        stride_qn,
        stride_don,
        rows,
        offs_d,
        q_ok,
        HEAD_DIM,
        EVEN_D,
        True,
    )
    lse2 = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=q_ok, other=0.0)
    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    BIAS_bh = BIAS + b.to(tl.int64) * stride_zb + h.to(tl.int64) * stride_zh

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _dq_full_runs(
        dq,
        q,
        do,
        lse2,
        delta,
        K_bh,
        V_bh,
        stride_kn,
        stride_vn,
        offs_n,
        offs_d,
        RUN_NUM,
        RUNS,
        list_row,
        R,
        qk_scale,
        rows,
        rows < Nq,
        Nk,
        BIAS_bh,
        RQ,
        RK,
        stride_zm,
        stride_zn,
        T,
        HEAD_DIM,
        BLOCK_N,
        EVEN_D,
        BIAS_KIND,
        INPUT_PRECISION,
    )
    q_word = fixed_words(BITS, q_seg, WORDS, ONE_WORD)
    q_cword = fixed_words(CBITS, q_seg, WORDS, ONE_WORD)
    q_end = rows * 0
    if CELLS:
        q_end = tl.load(QEND + len_row.to(tl.int64) * Nq + rows, mask=rows < Nq, other=0)
    dq = _dq_partial(
        dq,
        q,
        do,
        lse2,
        delta,
        K_bh,
        V_bh,
        stride_kn,
        stride_vn,
        offs_n,
        offs_d,
        PART_NUM,
        PART_IDX,
        list_row,
        Tk,
        rows,
        q_seg,
        q_ok,
        q_word,
        KCODE,
        k_code_row,
        BITS,
        CBITS,
        q_cword,
        q_end,
        KEND,
        WORDS,
        Nq,
        Nk,
        lo_off,
        hi_off,
        qk_scale,
        BIAS_bh,
        RQ,
        RK,
        stride_zm,
        stride_zn,
        T,
        HEAD_DIM,
        BLOCK_N,
        BAND_LO,
        BAND_HI,
        EVEN_D,
        ONE_WORD,
        BIAS_KIND,
        INPUT_PRECISION,
        CELLS,
    )
    row_ok = rows < Nq
    tl.store(
        DQ + bh.to(tl.int64) * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok,
    )


def one_pass() -> bool:
    """The one-pass backward (atomic fp32 dQ) unless PyTorch's deterministic algorithms are on."""
    return not torch.are_deterministic_algorithms_enabled()


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    plan_dkdv,
    plan_dq,
    km,
    kb,
    dbias,
    scale: float,
    cfg_dkdv: KernelConfig,
    cfg_dq: KernelConfig,
    atomic: bool,
):
    """Gradients of :func:`attention_forward`, in the mode ``atomic`` (:func:`one_pass`) picks.

    Args:
        dout: ``(B, H, Nq, D)`` (last dim contiguous); q, k, v, out, lse (base 2) as saved by the forward.
        plan_dkdv: the ``"q"`` :class:`TilePlan` for ``(cfg_dkdv.block_m, cfg_dkdv.block_n)``; plan_dq: the ``"kv"``
            plan for ``cfg_dq``'s blocks (read in the deterministic mode only); km: the :class:`KernelMask`; kb: the
            :class:`~._bias.KernelBias`; dbias: the :class:`~._bias.BiasGrad` the dK/dV kernel writes (mode 0: none).
    Returns:
        ``dq (B, H, Nq, D)``, ``dk, dv (B, Hkv, Nk, D)``, contiguous, in the inputs' dtype (the bias's gradient is in
        ``dbias``).
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if kb.kind:
        # a row whose every allowed key had a -inf bias has LSE -inf and must get p = 0, not exp2(-inf + inf) = NaN
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hkv, nk, d), dtype=v.dtype, device=v.device)
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    dq_acc = torch.empty((b, h, nq, d), dtype=torch.float32, device=q.device) if atomic else delta
    consts = common_constexprs(q, km, _PRE.block_m, _PRE.block_n, True)
    launch(
        _bwd_preprocess,
        (triton.cdiv(nq, _PRE.block_m), b * h),
        dict(
            O=out,
            DO=dout,
            DELTA=delta,
            DQ_ACC=dq_acc,
            stride_dob=dout.stride(0),
            stride_doh=dout.stride(1),
            stride_don=dout.stride(2),
            H=h,
            Nq=nq,
        ),
        dict(HEAD_DIM=consts["HEAD_DIM"], D_PAD=consts["D_PAD"], BLOCK=_PRE.block_m, ZERO_DQ=atomic),
        _PRE,
    )
    common = dict(
        Q=q,
        K=k,
        V=v,
        DO=dout,
        LSE=lse,
        DELTA=delta,
        stride_qb=q.stride(0),
        stride_qh=q.stride(1),
        stride_qn=q.stride(2),
        stride_kb=k.stride(0),
        stride_kh=k.stride(1),
        stride_kn=k.stride(2),
        stride_vb=v.stride(0),
        stride_vh=v.stride(1),
        stride_vn=v.stride(2),
        stride_dob=dout.stride(0),
        stride_doh=dout.stride(1),
        stride_don=dout.stride(2),
        QCODE=km.q_code,
        KCODE=km.k_code,
        QEND=km.q_end,
        KEND=km.k_end,
        H=h,
        GROUP=h // hkv,
        Nq=nq,
        Nk=nk,
        lo_off=km.lo_off,
        hi_off=km.hi_off,
        qk_scale=scale * LOG2E,
        sm_scale=scale,
        **kb.args(),
    )

    p = plan_dkdv  # rows: kv tiles, columns: query tiles
    restore = (("DQ_ACC",) if atomic else ()) + (("DBIAS",) if dbias.mode else ())
    launch(
        _attn_bwd_dkdv,
        (p.num_rows * b * hkv,),
        dict(
            common,
            DK=dk,
            DV=dv,
            DQ_ACC=dq_acc,
            **plan_args(p, b * hkv),
            BITS=km.k_bits,
            CBITS=km.k_cbits,
            WORDS=km.k_words,
            HKV=hkv,
            Tk=p.num_rows,
            Tq=p.num_cols,
            **dbias.args(),
        ),
        dict(
            common_constexprs(q, km, cfg_dkdv.block_m, cfg_dkdv.block_n, km.k_words == 1, kb.kind),
            ONE_PASS=atomic,
            DB_MODE=dbias.mode,
        ),
        cfg_dkdv,
        shape_bucket(nq, nk, p.num_rows * b * hkv),
        restore=restore,
    )
    if atomic:
        return (dq_acc * scale).to(q.dtype), dk, dv

    dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    p = plan_dq
    launch(
        _attn_bwd_dq,
        (p.num_rows * b * h,),
        dict(
            common,
            DQ=dq,
            **plan_args(p, b * h),
            BITS=km.q_bits,
            CBITS=km.q_cbits,
            WORDS=km.q_words,
            Tq=p.num_rows,
            Tk=p.num_cols,
        ),
        common_constexprs(q, km, cfg_dq.block_m, cfg_dq.block_n, km.q_words == 1, kb.kind),
        cfg_dq,
        shape_bucket(nq, nk, p.num_rows * b * h),
    )
    return dq, dk, dv
