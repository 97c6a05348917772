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
from ._fwd import _RUNTIME_ARGS, LOG2E, common_constexprs, meta_args
from ._launch import launch
from ._mask import element_mask, element_mask_t, load_token_pair

_PRE = KernelConfig(64, 16, 4, 1)  # the delta preprocess: 64 rows a program, never autotuned


@triton.jit(do_not_specialize=["stride_dob", "stride_doh", "H", "Nq"])
def _bwd_preprocess(O, DO, DELTA, stride_dob, stride_doh, stride_don, stride_dod, H, Nq,
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
                 + offs_d[None, :] * stride_dod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, delta, mask=rows < Nq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_qd, stride_don, stride_dod,
                NUM, IDX, list_row, Tq,
                cols, k_seg, k_ok, offs_m, offs_d,
                QSEG, QPOS, QLEN, ALLOW, len_row, Nq, Sq, Sk, causal_offset, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PARTIAL: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        rows = tl.load(IDX + list_row * Tq + t) * BLOCK_M + offs_m
        q, do, q_seg, q_ok = load_token_pair(Q_bh, DO_bh, stride_qn, stride_qd, stride_don, stride_dod, rows, offs_d,
                                             QSEG, QPOS, QLEN, len_row, Nq, Sq, HEAD_DIM, PARTIAL, EVEN_D)
        lse = tl.load(LSE_bh + rows, mask=q_ok, other=0.0)
        delta = tl.load(DELTA_bh + rows, mask=q_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)
        if PARTIAL:
            # rows that see nothing have lse = -inf, so exp2 gives inf there; the mask selects 0 before any use
            keep = element_mask_t(ALLOW, q_seg, q_ok, rows, k_seg, k_ok, cols, Sk, causal_offset, CAUSAL)
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if PARTIAL:
            ds_t = tl.where(keep, ds_t, 0.0)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_ARGS + ["stride_dob", "stride_doh", "HKV"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
                   QSEG, QPOS, KSEG, KPOS, ALLOW, QLEN, KLEN,
                   H, HKV, GROUP, Nq, Nk, Tk, Tq, Sq, Sk, MAP_B, causal_offset, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
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
    k, v, k_seg, k_ok = load_token_pair(K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd, cols, offs_d,
                                        KSEG, KPOS, KLEN, len_row, Nk, Sk, HEAD_DIM, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for g in range(0, GROUP):  # GQA: the query heads reading this kv head, in order (no atomics)
        h = hk * GROUP + g
        bh = b * H + h
        Q_bh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DO_bh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSE_bh = LSE + bh.to(tl.int64) * Nq
        DELTA_bh = DELTA + bh.to(tl.int64) * Nq
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_qd, stride_don,
                             stride_dod, FULL_NUM, FULL_IDX, list_row, Tq, cols, k_seg, k_ok, offs_m, offs_d,
                             QSEG, QPOS, QLEN, ALLOW, len_row, Nq, Sq, Sk, causal_offset, qk_scale,
                             HEAD_DIM, BLOCK_M, False, CAUSAL, EVEN_D, INPUT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qn, stride_qd, stride_don,
                             stride_dod, PART_NUM, PART_IDX, list_row, Tq, cols, k_seg, k_ok, offs_m, offs_d,
                             QSEG, QPOS, QLEN, ALLOW, len_row, Nq, Sq, Sk, causal_offset, qk_scale,
                             HEAD_DIM, BLOCK_M, True, CAUSAL, EVEN_D, INPUT_PRECISION)
    # every kv tile has a program, so keys no query sees get exact zeros
    out_ok = (cols[:, None] < Nk) & d_ok
    off = bhk.to(tl.int64) * Nk * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
              NUM, IDX, list_row, Tk,
              rows, q_seg, q_ok, offs_n, offs_d,
              KSEG, KPOS, KLEN, ALLOW, len_row, Nk, Sk, causal_offset, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        cols = tl.load(IDX + list_row * Tk + t) * BLOCK_N + offs_n
        k, v, k_seg, k_ok = load_token_pair(K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd, cols, offs_d,
                                            KSEG, KPOS, KLEN, len_row, Nk, Sk, HEAD_DIM, PARTIAL, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if PARTIAL:
            keep = element_mask(ALLOW, q_seg, q_ok, rows, k_seg, k_ok, cols, Sk, causal_offset, CAUSAL)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        if PARTIAL:
            ds = tl.where(keep, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_ARGS + ["stride_dob", "stride_doh"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
                 QSEG, QPOS, KSEG, KPOS, ALLOW, QLEN, KLEN,
                 H, GROUP, Nq, Nk, Tq, Tk, Sq, Sk, MAP_B, causal_offset, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
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

    q, do, q_seg, q_ok = load_token_pair(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                         DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
                                         stride_qn, stride_qd, stride_don, stride_dod, rows, offs_d,
                                         QSEG, QPOS, QLEN, len_row, Nq, Sq, HEAD_DIM, True, EVEN_D)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=q_ok, other=0.0)
    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
                   FULL_NUM, FULL_IDX, list_row, Tk, rows, q_seg, q_ok, offs_n, offs_d,
                   KSEG, KPOS, KLEN, ALLOW, len_row, Nk, Sk, causal_offset, qk_scale,
                   HEAD_DIM, BLOCK_N, False, CAUSAL, EVEN_D, INPUT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
                   PART_NUM, PART_IDX, list_row, Tk, rows, q_seg, q_ok, offs_n, offs_d,
                   KSEG, KPOS, KLEN, ALLOW, len_row, Nk, Sk, causal_offset, qk_scale,
                   HEAD_DIM, BLOCK_N, True, CAUSAL, EVEN_D, INPUT_PRECISION)
    row_ok = rows < Nq
    tl.store(DQ + bh.to(tl.int64) * Nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def attention_backward(dout, q, k, v, out, lse, tm_dkdv, tm_dq, meta, scale: float,
                       cfg_dkdv: KernelConfig, cfg_dq: KernelConfig):
    """Gradients of :func:`attention_forward`.

    Args:
        dout: ``(B, H, Nq, D)`` (last dim contiguous); q, k, v, out, lse as saved by the forward.
        tm_dkdv: tile map for ``(cfg_dkdv.block_m, cfg_dkdv.block_n)``; tm_dq: for ``cfg_dq``'s blocks.
    Returns:
        ``dq (B, H, Nq, D)``, ``dk, dv (B, Hkv, Nk, D)``, contiguous, in the inputs' dtype.
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hkv, nk, d), dtype=v.dtype, device=v.device)
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    consts = common_constexprs(q, meta.causal, _PRE.block_m, _PRE.block_n)
    launch(_bwd_preprocess, (triton.cdiv(nq, _PRE.block_m), b * h), (out, dout, delta, *dout.stride(), h, nq),
           dict(HEAD_DIM=consts["HEAD_DIM"], D_PAD=consts["D_PAD"], BLOCK=_PRE.block_m), _PRE)
    sq, sk = meta.allow.shape
    meta_t = meta_args(meta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    qk_scale = scale * LOG2E

    tq, tk = tm_dkdv.full_q_idx.shape[2], tm_dkdv.full_q_idx.shape[1]
    args = (q, k, v, dout, lse, delta, dk, dv, *strides,
            tm_dkdv.full_q_num, tm_dkdv.full_q_idx, tm_dkdv.partial_q_num, tm_dkdv.partial_q_idx, *meta_t,
            h, hkv, h // hkv, nq, nk, tk, tq, sq, sk, int(tm_dkdv.full_q_num.shape[0] > 1), meta.causal_offset,
            qk_scale, scale)
    launch(_attn_bwd_dkdv, (tk, b * hkv), args,
           common_constexprs(q, meta.causal, cfg_dkdv.block_m, cfg_dkdv.block_n), cfg_dkdv)

    tq, tk = tm_dq.full_kv_idx.shape[1], tm_dq.full_kv_idx.shape[2]
    args = (q, k, v, dout, lse, delta, dq, *strides,
            tm_dq.full_kv_num, tm_dq.full_kv_idx, tm_dq.partial_kv_num, tm_dq.partial_kv_idx, *meta_t,
            h, h // hkv, nq, nk, tq, tk, sq, sk, int(tm_dq.full_kv_num.shape[0] > 1), meta.causal_offset,
            qk_scale, scale)
    launch(_attn_bwd_dq, (tq, b * h), args, common_constexprs(q, meta.causal, cfg_dq.block_m, cfg_dq.block_n),
           cfg_dq)
    return dq, dk, dv
