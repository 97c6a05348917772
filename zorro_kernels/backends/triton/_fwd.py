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
from ._mask import allowed_pairs, finite_rows, fixed_words, load_rows, poison, token_segments

LOG2E = 1.4426950408889634
# Integer arguments Triton must not specialise on (it would otherwise compile a variant per "divisible by 16" / "== 1"):
# lengths, tile and run counts and segment counts are runtime data. Strides stay specialised: Triton proves 16-byte
# alignment of every K/V/Q row from them, which is what makes the tile loads vector (and cp.async) loads at all —
# without it each element is a 2-byte load the pipeliner cannot make asynchronous (docs/triton.md, "Performance").
_RUNTIME_ARGS = ["H", "GROUP", "Nq", "Nk", "Tq", "Tk", "R", "WORDS", "MAP_B", "causal_offset"]


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, keep, v_bad, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One online-softmax update with the (already scaled, base-2) scores ``s`` of a tile and its values ``v``.
    ``MASKED`` (partial tiles): ``s`` is already -inf outside ``keep``; ``v`` has its non-finite rows zeroed and
    ``v_bad`` flags them (:func:`finite_rows`)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row with nothing visible yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    if MASKED:
        p = poison(p, keep, v_bad)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_full_runs(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                   RUN_NUM, RUNS, list_row, R, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """Full tiles, run by run: a contiguous stretch of kv tiles walked with pointer increments, no masks — the loop
    the pipeliner turns into cp.async loads issued ahead."""
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
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, 0, 0, False, INPUT_PRECISION)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _fwd_partial(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                 NUM, IDX, list_row, Tk, rows, q_seg, q_ok, q_word,
                 KCODE, k_code_row, BITS, WORDS, Nk, causal_offset, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                 ONE_WORD: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Partial tiles from the index list: valid keys only, element mask, guarded softmax."""
    num = tl.load(NUM + list_row)
    for t in range(0, num):
        cols = tl.load(IDX + list_row * Tk + t) * BLOCK_N + offs_n
        k_seg, k_ok = token_segments(KCODE, k_code_row, cols, Nk)
        k, v = load_rows(K_bh, V_bh, stride_kn, stride_vn, cols, offs_d, k_ok, HEAD_DIM, EVEN_D, True)
        v, v_bad = finite_rows(v)   # P·V sums over keys: a key some rows may not see must add 0, not 0 * NaN
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        keep = allowed_pairs(BITS, WORDS, q_seg, q_word, k_seg, ONE_WORD) & q_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
        s = tl.where(keep, s, float("-inf"))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, keep, v_bad, True, INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              RUN_NUM, RUNS, PART_NUM, PART_IDX,
              QCODE, KCODE, BITS,
              H, GROUP, Nq, Nk, Tq, Tk, R, WORDS, MAP_B, causal_offset, qk_scale,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ONE_WORD: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    len_row = b * MAP_B          # the tile plan and lengths broadcast over the batch when Bm == 1
    list_row = len_row * Tq + m
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM

    q_seg, q_ok = token_segments(QCODE, len_row.to(tl.int64) * Nq, rows, Nq)
    k_code_row = len_row.to(tl.int64) * Nk
    Q_bh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(Q_bh + rows[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None] & d_ok, other=0.0)
    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_full_runs(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                                   RUN_NUM, RUNS, list_row, R, qk_scale, HEAD_DIM, BLOCK_N, EVEN_D, INPUT_PRECISION)
    q_word = fixed_words(BITS, q_seg, WORDS, ONE_WORD)
    acc, l_i, m_i = _fwd_partial(acc, l_i, m_i, q, K_bh, V_bh, stride_kn, stride_vn, offs_n, offs_d,
                                 PART_NUM, PART_IDX, list_row, Tk, rows, q_seg, q_ok, q_word,
                                 KCODE, k_code_row, BITS, WORDS, Nk, causal_offset, qk_scale,
                                 HEAD_DIM, BLOCK_N, CAUSAL, EVEN_D, ONE_WORD, INPUT_PRECISION)

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


def common_constexprs(q: torch.Tensor, causal: bool, block_m: int, block_n: int, one_word: bool) -> dict:
    d = q.shape[-1]
    d_pad = padded_head_dim(d)
    return dict(HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
                EVEN_D=d == d_pad, ONE_WORD=bool(one_word), INPUT_PRECISION=input_precision(q.dtype))


def attention_forward(q, k, v, plan, km, scale: float, cfg: KernelConfig):
    """Run the forward kernel.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``, last dim contiguous (stride 1), any other strides.
        plan: the ``"kv"`` :class:`TilePlan` for ``(cfg.block_m, cfg.block_n)`` on q's device; km: the
            :class:`KernelMask`.
    Returns:
        ``out (B, H, Nq, D)`` contiguous in q's dtype and ``lse (B, H, Nq)`` fp32 (natural log; -inf for rows that see
        nothing).
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    grid = (plan.num_rows, b * h)
    args = (q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            plan.run_num, plan.runs, plan.part_num, plan.part_idx, km.q_code, km.k_code, km.q_bits,
            h, h // hkv, nq, nk, plan.num_rows, plan.num_cols, plan.max_runs, km.q_words, int(plan.per_sample),
            km.causal_offset, scale * LOG2E)
    launch(_attn_fwd, grid, args, common_constexprs(q, km.causal, cfg.block_m, cfg.block_n, km.q_words == 1), cfg)
    return out, lse
