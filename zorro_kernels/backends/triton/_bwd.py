"""Backward kernels: delta preprocess, dK/dV per kv tile (transposed tile lists), dQ per query tile (forward lists).

Every output element is written by exactly one program and accumulated in a fixed order, with no atomics, so the
backward is deterministic: a rerun is bitwise equal. For GQA a dK/dV program owns one kv head and loops over the query
heads of its group, which is what keeps atomics out.

As in the forward, the ``PARTIAL`` constexpr compiles the loop twice: full tiles without mask arithmetic, partial tiles
loading only valid tokens (so NaN in padding cannot leak) and zeroing ``p`` and ``ds`` outside the element mask.
Probabilities are recomputed from the saved log-sum-exp: ``p = exp2(s * scale * log2(e) - lse * log2(e))``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import KernelConfig
from ._fwd import _RUNTIME_ARGS, LOG2E, common_constexprs
from ._launch import launch
from ._mask import allowed_pairs, finite_rows, fixed_words, load_rows, poison, token_segments

_PRE = KernelConfig(64, 16, 4, 1)  # the delta preprocess: 64 rows a program, never autotuned


@triton.jit(do_not_specialize=["H", "Nq"])
def _bwd_preprocess(O, DO, DELTA, stride_dob, stride_doh, stride_don, H, Nq,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """``delta[b, h, i] = sum_d out[b, h, i, d] * dout[b, h, i, d]`` in fp32."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + bh.to(tl.int64) * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_don
                 + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, delta, mask=rows < Nq)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale, keep, q_bad, MASKED: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """dV += P^T dO, dK += dS^T Q for one query tile, computed transposed (key rows x query columns). ``MASKED``:
    ``q``/``do`` have their non-finite rows zeroed, flagged in ``q_bad`` (both sums run over query rows)."""
    s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)
    if MASKED:
        # rows that see nothing have lse = -inf, so exp2 gives inf there; the mask selects 0 before any use
        p_t = poison(p_t, keep, q_bad)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if MASKED:
        ds_t = tl.where(keep, ds_t, 0.0)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_full_runs(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_don, offs_m, offs_d,
                    RUN_NUM, RUNS, list_row, R, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Full query tiles of this kv tile, run by run, with pointer increments and no masks (see ``_fwd_full_runs``).
    Every row of a full tile sees every key of it, so its LSE is finite and needs no guard."""
    num_runs = tl.load(RUN_NUM + list_row)
    for r in range(0, num_runs):
        run = RUNS + (list_row * R + r) * 2
        lo = tl.load(run)
        hi = tl.load(run + 1)
        rows = lo * BLOCK_M + offs_m
        q_ptrs = Q_bh + rows[:, None] * stride_qn + offs_d[None, :]
        do_ptrs = DO_bh + rows[:, None] * stride_don + offs_d[None, :]
        lse_ptrs = LSE_bh + rows
        delta_ptrs = DELTA_bh + rows
        for _ in range(lo, hi):
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale, 0, 0, False, INPUT_PRECISION)
            q_ptrs += BLOCK_M * stride_qn
            do_ptrs += BLOCK_M * stride_don
            lse_ptrs += BLOCK_M
            delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _dkdv_partial(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_don, offs_m, offs_d,
                  NUM, IDX, list_row, Tq, cols, k_seg, k_ok, k_word,
                  QCODE, q_code_row, BITS, WORDS, Nq, causal_offset, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                  ONE_WORD: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Partial query tiles from the index list: valid rows only, element mask (transposed) on p and ds."""
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        rows = tl.load(IDX + list_row * Tq + t) * BLOCK_M + offs_m
        q_seg, q_ok = token_segments(QCODE, q_code_row, rows, Nq)
        q, do = load_rows(Q_bh, DO_bh, stride_qn, stride_don, rows, offs_d, q_ok, HEAD_DIM, EVEN_D, True)
        q, q_bad = finite_rows(q)
        do, do_bad = finite_rows(do)
        lse = tl.load(LSE_bh + rows, mask=q_ok, other=0.0)
        delta = tl.load(DELTA_bh + rows, mask=q_ok, other=0.0)
        keep = allowed_pairs(BITS, WORDS, k_seg, k_word, q_seg, ONE_WORD) & k_ok[:, None] & q_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[:, None] <= rows[None, :] + causal_offset)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale, keep, q_bad | do_bad, True, INPUT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_ARGS + ["HKV"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don,
                   RUN_NUM, RUNS, PART_NUM, PART_IDX,
                   QCODE, KCODE, BITS,
                   H, HKV, GROUP, Nq, Nk, Tk, Tq, R, WORDS, MAP_B, causal_offset, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ONE_WORD: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    len_row = b * MAP_B
    list_row = len_row * Tk + n
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
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for g in range(0, GROUP):  # GQA: the query heads reading this kv head, in order (no atomics)
        h = hk * GROUP + g
        bh = b * H + h
        Q_bh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DO_bh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSE_bh = LSE + bh.to(tl.int64) * Nq
        DELTA_bh = DELTA + bh.to(tl.int64) * Nq
        dk, dv = _dkdv_full_runs(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_don, offs_m, offs_d,
                                 RUN_NUM, RUNS, list_row, R, qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, INPUT_PRECISION)
        dk, dv = _dkdv_partial(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_don, offs_m, offs_d,
                               PART_NUM, PART_IDX, list_row, Tq, cols, k_seg, k_ok, k_word,
                               QCODE, q_code_row, BITS, WORDS, Nq, causal_offset, qk_scale,
                               HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, ONE_WORD, INPUT_PRECISION)
    # every kv tile has a program, so keys no query sees get exact zeros
    out_ok = (cols[:, None] < Nk) & d_ok
    off = bhk.to(tl.int64) * Nk * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, qk_scale, keep, k_bad, MASKED: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """dQ += dS K for one kv tile. ``MASKED``: ``k`` has its non-finite rows zeroed, flagged in ``k_bad``."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = poison(p, keep, k_bad)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:
        ds = tl.where(keep, ds, 0.0)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def _dq_full_runs(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                  RUN_NUM, RUNS, list_row, R, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """Full kv tiles of this query tile, run by run (see ``_fwd_full_runs``)."""
    num_runs = tl.load(RUN_NUM + list_row)
    for r in range(0, num_runs):
        run = RUNS + (list_row * R + r) * 2
        lo = tl.load(run)
        hi = tl.load(run + 1)
        k_ptrs = K_bh + (lo * BLOCK_N + offs_n)[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_bh + (lo * BLOCK_N + offs_n)[:, None] * stride_vn + offs_d[None, :]
        for _ in range(lo, hi):
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            dq = _dq_step(dq, q, do, lse2, delta, k, v, qk_scale, 0, 0, False, INPUT_PRECISION)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _dq_partial(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                NUM, IDX, list_row, Tk, rows, q_seg, q_ok, q_word,
                KCODE, k_code_row, BITS, WORDS, Nk, causal_offset, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                ONE_WORD: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        cols = tl.load(IDX + list_row * Tk + t) * BLOCK_N + offs_n
        k_seg, k_ok = token_segments(KCODE, k_code_row, cols, Nk)
        k, v = load_rows(K_bh, V_bh, stride_kn, stride_vn, cols, offs_d, k_ok, HEAD_DIM, EVEN_D, True)
        k, k_bad = finite_rows(k)   # dS·K sums over keys
        keep = allowed_pairs(BITS, WORDS, q_seg, q_word, k_seg, ONE_WORD) & q_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, qk_scale, keep, k_bad, True, INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qn,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_don,
                 RUN_NUM, RUNS, PART_NUM, PART_IDX,
                 QCODE, KCODE, BITS,
                 H, GROUP, Nq, Nk, Tq, Tk, R, WORDS, MAP_B, causal_offset, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ONE_WORD: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    len_row = b * MAP_B
    list_row = len_row * Tq + m
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM

    q_seg, q_ok = token_segments(QCODE, len_row.to(tl.int64) * Nq, rows, Nq)
    k_code_row = len_row.to(tl.int64) * Nk
    q, do = load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                      DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
                      stride_qn, stride_don, rows, offs_d, q_ok, HEAD_DIM, EVEN_D, True)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=q_ok, other=0.0)
    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _dq_full_runs(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                       RUN_NUM, RUNS, list_row, R, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, INPUT_PRECISION)
    q_word = fixed_words(BITS, q_seg, WORDS, ONE_WORD)
    dq = _dq_partial(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                     PART_NUM, PART_IDX, list_row, Tk, rows, q_seg, q_ok, q_word,
                     KCODE, k_code_row, BITS, WORDS, Nk, causal_offset, qk_scale,
                     HEAD_DIM, BLOCK_N, CAUSAL, EVEN_D, ONE_WORD, INPUT_PRECISION)
    row_ok = rows < Nq
    tl.store(DQ + bh.to(tl.int64) * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def attention_backward(dout, q, k, v, out, lse, plan_dkdv, plan_dq, km, scale: float,
                       cfg_dkdv: KernelConfig, cfg_dq: KernelConfig):
    """Gradients of :func:`attention_forward`.

    Args:
        dout: ``(B, H, Nq, D)`` (last dim contiguous); q, k, v, out, lse as saved by the forward.
        plan_dkdv: the ``"q"`` :class:`TilePlan` for ``(cfg_dkdv.block_m, cfg_dkdv.block_n)``; plan_dq: the ``"kv"``
            plan for ``cfg_dq``'s blocks; km: the :class:`KernelMask`.
    Returns:
        ``dq (B, H, Nq, D)``, ``dk, dv (B, Hkv, Nk, D)``, contiguous, in the inputs' dtype.
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hkv, nk, d), dtype=v.dtype, device=v.device)
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    consts = common_constexprs(q, km.causal, _PRE.block_m, _PRE.block_n, True)
    launch(_bwd_preprocess, (triton.cdiv(nq, _PRE.block_m), b * h), (out, dout, delta, *dout.stride()[:3], h, nq),
           dict(HEAD_DIM=consts["HEAD_DIM"], D_PAD=consts["D_PAD"], BLOCK=_PRE.block_m), _PRE)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    qk_scale = scale * LOG2E

    p = plan_dkdv  # rows: kv tiles, columns: query tiles
    args = (q, k, v, dout, lse, delta, dk, dv, *strides,
            p.run_num, p.runs, p.part_num, p.part_idx, km.q_code, km.k_code, km.k_bits,
            h, hkv, h // hkv, nq, nk, p.num_rows, p.num_cols, p.max_runs, km.k_words, int(p.per_sample),
            km.causal_offset, qk_scale, scale)
    launch(_attn_bwd_dkdv, (p.num_rows, b * hkv), args,
           common_constexprs(q, km.causal, cfg_dkdv.block_m, cfg_dkdv.block_n, km.k_words == 1), cfg_dkdv)

    p = plan_dq
    args = (q, k, v, dout, lse, delta, dq, *strides,
            p.run_num, p.runs, p.part_num, p.part_idx, km.q_code, km.k_code, km.q_bits,
            h, h // hkv, nq, nk, p.num_rows, p.num_cols, p.max_runs, km.q_words, int(p.per_sample),
            km.causal_offset, qk_scale, scale)
    launch(_attn_bwd_dq, (p.num_rows, b * h), args,
           common_constexprs(q, km.causal, cfg_dq.block_m, cfg_dq.block_n, km.q_words == 1), cfg_dq)
    return dq, dk, dv
