"""Forward kernel: one program per (query tile, batch x head), visiting only the kv tiles the tile map lists for it.

Full tiles run with no mask arithmetic and no bounds checks on keys (a full tile lies wholly inside the matrix and has
no padding); partial tiles load keys under their validity mask and evaluate the element mask. The two loops are the
same code compiled twice (``PARTIAL`` is a constexpr). Softmax is online in base 2: scores are multiplied by
``scale * log2(e)`` once so that ``exp2`` (one instruction) replaces ``exp``; the saved log-sum-exp is natural-log.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import KernelConfig, padded_head_dim
from ._launch import launch
from ._mask import element_mask, load_token_pair, token_valid

LOG2E = 1.4426950408889634
# Integer arguments Triton must not specialise on (it would otherwise compile a variant per "divisible by 16" / "== 1"):
# lengths, tile counts and segment counts are runtime data, and batch/head strides scale with N while only feeding
# 64-bit base offsets. Row strides and the head-dim stride stay specialised: they enable vectorised loads.
_RUNTIME_ARGS = ["stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vb", "stride_vh",
                 "H", "GROUP", "Nq", "Nk", "Tq", "Tk", "Sq", "Sk", "MAP_B", "causal_offset"]


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
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
        if PARTIAL:
            keep = element_mask(ALLOW, q_seg, q_ok, rows, k_seg, k_ok, cols, Sk, causal_offset, CAUSAL)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
              QSEG, QPOS, KSEG, KPOS, ALLOW, QLEN, KLEN,
              H, GROUP, Nq, Nk, Tq, Tk, Sq, Sk, MAP_B, causal_offset, qk_scale,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    len_row = b * MAP_B          # the tile map and lengths broadcast over the batch when Bm == 1
    list_row = len_row * Tq + m
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM

    q_seg, q_ok = token_valid(QSEG, QPOS, QLEN, len_row, rows, Nq, Sq)
    Q_bh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(Q_bh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=q_ok[:, None] & d_ok, other=0.0)
    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
                               FULL_NUM, FULL_IDX, list_row, Tk, rows, q_seg, q_ok, offs_n, offs_d,
                               KSEG, KPOS, KLEN, ALLOW, len_row, Nk, Sk, causal_offset, qk_scale,
                               HEAD_DIM, BLOCK_N, False, CAUSAL, EVEN_D, INPUT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
                               PART_NUM, PART_IDX, list_row, Tk, rows, q_seg, q_ok, offs_n, offs_d,
                               KSEG, KPOS, KLEN, ALLOW, len_row, Nk, Sk, causal_offset, qk_scale,
                               HEAD_DIM, BLOCK_N, True, CAUSAL, EVEN_D, INPUT_PRECISION)

    # rows that saw nothing: l == 0, acc == 0 -> output exactly 0, LSE -inf
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(live, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row_ok = rows < Nq
    O_bh = O + bh.to(tl.int64) * Nq * HEAD_DIM
    tl.store(O_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: the fp32 path is the accurate one
    return "ieee" if dtype == torch.float32 else "tf32"


def common_constexprs(q: torch.Tensor, causal: bool, block_m: int, block_n: int) -> dict:
    d = q.shape[-1]
    d_pad = padded_head_dim(d)
    return dict(HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
                EVEN_D=d == d_pad, INPUT_PRECISION=input_precision(q.dtype))


def meta_args(meta) -> tuple:
    return (meta.q_seg, meta.q_pos, meta.k_seg, meta.k_pos, meta.allow, meta.q_len, meta.k_len)


def attention_forward(q, k, v, tm, meta, scale: float, cfg: KernelConfig):
    """Run the forward kernel.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``, last dim contiguous, any other strides.
        tm: the :class:`TileMap` for ``(cfg.block_m, cfg.block_n)`` on q's device; meta: the :class:`TokenMeta`.
    Returns:
        ``out (B, H, Nq, D)`` contiguous in q's dtype and ``lse (B, H, Nq)`` fp32 (natural log; -inf for rows that see
        nothing).
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    tq, tk = tm.full_kv_idx.shape[1], tm.full_kv_idx.shape[2]
    grid = (tq, b * h)
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(),
            tm.full_kv_num, tm.full_kv_idx, tm.partial_kv_num, tm.partial_kv_idx, *meta_args(meta),
            h, h // hkv, nq, nk, tq, tk, meta.allow.shape[0], meta.allow.shape[1],
            int(tm.full_kv_num.shape[0] > 1), meta.causal_offset, scale * LOG2E)
    launch(_attn_fwd, grid, args, common_constexprs(q, meta.causal, cfg.block_m, cfg.block_n), cfg)
    return out, lse
