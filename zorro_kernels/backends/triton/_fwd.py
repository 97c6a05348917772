"""Forward kernels: one program per (query tile, batch x head), launched heaviest first, visiting only the keys its plan
lists — ``_attn_fwd_ranges`` over the segment-aligned :class:`RangePlan` (query tiles start at group boundaries, key
intervals walked from their unaligned start, only interval ends and causal diagonals masked), ``_attn_fwd`` over the
uniform :class:`TilePlan` (layouts of many tiny query groups).

In the tile-plan kernel, full tiles run with no mask arithmetic and no bounds checks on keys (a full tile lies wholly
inside the matrix and has no padding); partial tiles load keys under their validity mask and evaluate the element mask.
Both loops call one tile body, :func:`_fwd_tile`, compiled twice by its ``MASKED`` constexpr. Softmax is online in base
2 with the scale folded into one multiply-add, as in Triton's fused-attention tutorial: ``p = exp2(qk * qk_scale - m)``
with ``qk_scale = scale * log2(e)`` (``scale > 0``, which ``check_inputs`` guarantees, so ``max(qk) * qk_scale`` is the
scaled max) and the running max ``m`` in base-2 units. The saved log-sum-exp is base 2 as well (``m + log2(l)``): the
backward subtracts it as is.

A score bias (``BIAS_KIND``, :mod:`._bias`) is one more term on the scaled scores, in base-2 units, before the max —
loaded per tile (dense) or gathered from the table (relative), under the element mask on partial tiles. A sliding
window's band (``BAND_LO``/``BAND_HI``) is part of the element mask; tiles outside it are empty in the tile map and
never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bias import bias_tile, full_tile_bias
from ._config import KernelConfig, padded_head_dim
from ._launch import launch, shape_bucket
from ._mask import finite_rows, fixed_words, load_rows, load_tile, pair_keep, poison, program_tile, token_segments
from ._plan import RangePlan

LOG2E = 1.4426950408889634
# Integer arguments Triton must not specialise on (it would otherwise compile a variant per "divisible by 16" / "== 1"):
# lengths, tile and run counts, segment counts, band offsets, the table size and the program-order stride are runtime
# data. Strides stay specialised: Triton proves 16-byte alignment of every K/V/Q row from them, which is what makes the
# tile loads vector (and cp.async) loads at all — without it each element is a 2-byte load the pipeliner cannot make
# asynchronous (docs/triton.md, "Performance").
_RUNTIME_ARGS = ["H", "GROUP", "Nq", "Nk", "Tq", "Tk", "R", "WORDS", "REP", "lo_off", "hi_off", "T"]


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k,
    v,
    qk_scale,
    keep,
    bias,
    MASKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One kv tile of the online softmax: ``q (BM, D)``, ``k, v (BN, D)``; returns the updated ``acc, l, m``.

    ``MASKED`` (partial tiles): ``keep (BM, BN)`` is the element mask; scores outside it are selected to -inf, ``v``'s
    non-finite rows are zeroed and only kept pairs that meet one are poisoned (``finite_rows``/``poison``).
    ``HAS_BIAS``: ``bias (BM, BN)`` (fp32, base-2 units) is added to the scaled scores before the max. Whenever a
    score can be -inf (masked, or a -inf bias) the running max is guarded, so a row with nothing visible yet stays
    exactly 0.
    """
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MASKED or HAS_BIAS:
        s = qk * qk_scale
        if HAS_BIAS:
            s = s + bias
        if MASKED:
            v, v_bad = finite_rows(v)  # P·V sums over keys: a key some rows may not see must add 0, not 0 * NaN
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        if MASKED:
            p = poison(p, keep, v_bad)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # one multiply-add per score
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_full_runs(
    acc,
    l_i,
    m_i,
    q,
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
    """Full tiles, run by run: a contiguous stretch of kv tiles walked with pointer increments, no masks — the loop
    the pipeliner turns into cp.async loads issued ahead."""
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
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, qk_scale, 0, bias, False, BIAS_KIND != 0, INPUT_PRECISION)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _fwd_partial(
    acc,
    l_i,
    m_i,
    q,
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
    """Partial tiles from the index list: valid keys only, element mask (the bias read only where it holds)."""
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
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, qk_scale, keep, bias, True, BIAS_KIND != 0, INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
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
    len_row = list_row // Tq  # the plan and token codes broadcast over the batch when they have one row
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
    BIAS_bh = BIAS + b.to(tl.int64) * stride_zb + h.to(tl.int64) * stride_zh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_full_runs(
        acc,
        l_i,
        m_i,
        q,
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
    acc, l_i, m_i = _fwd_partial(
        acc,
        l_i,
        m_i,
        q,
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

    # rows that saw nothing: l == 0, acc == 0 -> output exactly 0, LSE -inf
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(live, m_i + tl.math.log2(l_safe), float("-inf"))
    row_ok = rows < Nq
    O_bh = O + bh.to(tl.int64) * Nq * HEAD_DIM
    tl.store(O_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse2, mask=row_ok)


@triton.jit
def _fwd_interval(
    acc,
    l_i,
    m_i,
    q,
    K_bh,
    V_bh,
    stride_kn,
    stride_vn,
    offs_n,
    offs_d,
    ks,
    ke,
    rows,
    q_ok,
    r0,
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
    BAND_HI: tl.constexpr,
    EVEN_D: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Keys ``[ks, ke)`` of one visible interval (range plan), walked from its unaligned start: steps every row of
    the tile sees in full run with no mask (pointer increments, as ``_fwd_full_runs``); the rest — the interval's
    last step and, with an upper band edge (causal), the steps past the first row's edge — load only keys ``< ke``,
    element mask on. (A band with a lower edge never takes this plan.)"""
    if BAND_HI:
        ke = tl.minimum(ke, tl.max(tl.where(q_ok, rows, -1)) + hi_off + 1)  # past the last row's edge
        full_end = tl.minimum(ke, r0 + hi_off + 1)  # keys the first row sees
    else:
        full_end = ke
    n_full = tl.maximum(full_end - ks, 0) // BLOCK_N
    k_ptrs = K_bh + (ks + offs_n)[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V_bh + (ks + offs_n)[:, None] * stride_vn + offs_d[None, :]
    for t in range(0, n_full):
        k = load_tile(k_ptrs, offs_d, HEAD_DIM, EVEN_D)
        v = load_tile(v_ptrs, offs_d, HEAD_DIM, EVEN_D)
        bias = 0.0
        if BIAS_KIND != 0:
            cols = ks + t * BLOCK_N + offs_n
            bias = bias_tile(
                BIAS_bh,
                RQ,
                RK,
                stride_zm,
                stride_zn,
                T,
                rows[:, None],
                cols[None, :],
                q_ok[:, None],
                cols[None, :] < ke,
                q_ok[:, None] & (cols[None, :] < ke),
                BIAS_KIND,
            )
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, qk_scale, 0, bias, False, BIAS_KIND != 0, INPUT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    for start in range(ks + n_full * BLOCK_N, ke, BLOCK_N):
        cols = start + offs_n
        k_ok = cols < ke
        k, v = load_rows(K_bh, V_bh, stride_kn, stride_vn, cols, offs_d, k_ok, HEAD_DIM, EVEN_D, True)
        keep = q_ok[:, None] & k_ok[None, :]
        if BAND_HI:
            keep = keep & (cols[None, :] <= rows[:, None] + hi_off)
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
                q_ok[:, None],
                k_ok[None, :],
                keep,
                BIAS_KIND,
            )
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, qk_scale, keep, bias, True, BIAS_KIND != 0, INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_ARGS + ["G"])
def _attn_fwd_ranges(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    ORDER,
    TILE_LO,
    TILE_HI,
    TILE_GROUP,
    ROW_PATTERN,
    IV_PTR,
    IV,
    QCODE,
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
    G,
    REP,
    hi_off,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BAND_HI: tl.constexpr,
    EVEN_D: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The forward over a :class:`RangePlan`: one program per (segment-aligned query tile, sample, head)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and D_PAD >= 16)
    t, b, h, e = program_tile(ORDER, REP, H, Tq)
    row = e // Tq
    bh = b * H + h
    hk = h // GROUP
    r0 = tl.load(TILE_LO + t)
    r1 = tl.load(TILE_HI + t)
    grp = tl.load(TILE_GROUP + t)
    pat = tl.load(ROW_PATTERN + row)
    rows = r0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM
    in_tile = rows < r1
    _, q_ok = token_segments(QCODE, row.to(tl.int64) * Nq, rows, Nq)
    q_ok = q_ok & in_tile
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
        mask=q_ok[:, None] & d_ok,
        other=0.0,
    )
    K_bh = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    BIAS_bh = BIAS + b.to(tl.int64) * stride_zb + h.to(tl.int64) * stride_zh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    ptr = IV_PTR + pat * (G + 1) + grp
    for i in range(tl.load(ptr), tl.load(ptr + 1)):
        acc, l_i, m_i = _fwd_interval(
            acc,
            l_i,
            m_i,
            q,
            K_bh,
            V_bh,
            stride_kn,
            stride_vn,
            offs_n,
            offs_d,
            tl.load(IV + 2 * i),
            tl.load(IV + 2 * i + 1),
            rows,
            q_ok,
            r0,
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
            BAND_HI,
            EVEN_D,
            BIAS_KIND,
            INPUT_PRECISION,
        )
    # padding rows and rows that saw nothing: output exactly 0, LSE -inf (full steps computed padding rows too);
    # a row whose sum is NaN (it attends a non-finite value) stays NaN
    live = (l_i != 0.0) & q_ok
    l_safe = tl.where(live, l_i, 1.0)
    out = tl.where(live[:, None], acc / l_safe[:, None], 0.0)
    lse2 = tl.where(live, m_i + tl.math.log2(l_safe), float("-inf"))
    O_bh = O + bh.to(tl.int64) * Nq * HEAD_DIM
    tl.store(
        O_bh + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=in_tile[:, None] & d_ok
    )
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse2, mask=in_tile)


def input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: the fp32 path is the accurate one
    return "ieee" if dtype == torch.float32 else "tf32"


def common_constexprs(q: torch.Tensor, km, block_m: int, block_n: int, one_word: bool, bias_kind: int = 0) -> dict:
    d = q.shape[-1]
    d_pad = padded_head_dim(d)
    return dict(
        HEAD_DIM=d,
        D_PAD=d_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BAND_LO=km.band_lo,
        BAND_HI=km.band_hi,
        CELLS=km.cells,
        EVEN_D=d == d_pad,
        ONE_WORD=bool(one_word),
        BIAS_KIND=bias_kind,
        INPUT_PRECISION=input_precision(q.dtype),
    )


def plan_args(plan, batch_heads: int) -> dict:
    """The plan's kernel arguments and the 1-D grid over ``(plan rows x batch x heads)`` in the plan's longest-first
    order: program ``pid`` runs plan entry ``order[pid // REP]`` for head-and-sample ``pid % REP``."""
    rep = batch_heads // plan.run_num.shape[0]
    return dict(
        ORDER=plan.order,
        RUN_NUM=plan.run_num,
        RUNS=plan.runs,
        PART_NUM=plan.part_num,
        PART_IDX=plan.part_idx,
        R=plan.max_runs,
        REP=rep,
    )


def attention_forward(q, k, v, plan, km, kb, scale: float, cfg: KernelConfig):
    """Run the forward kernel.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``, last dim contiguous (stride 1), any other strides.
        plan: a :class:`RangePlan` (segment-aligned tiles) or the ``"kv"`` :class:`TilePlan` for
            ``(cfg.block_m, cfg.block_n)`` on q's device; km: the :class:`KernelMask`; kb: the
            :class:`~._bias.KernelBias` (kind 0 without a bias).
    Returns:
        ``out (B, H, Nq, D)`` contiguous in q's dtype and ``lse (B, H, Nq)`` fp32, **base 2** (``log2`` of the row's
        sum of ``exp2`` of its scaled, biased scores; -inf for rows that see nothing) — what the backward reads.
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    common = dict(
        Q=q,
        K=k,
        V=v,
        O=out,
        LSE=lse,
        stride_qb=q.stride(0),
        stride_qh=q.stride(1),
        stride_qn=q.stride(2),
        stride_kb=k.stride(0),
        stride_kh=k.stride(1),
        stride_kn=k.stride(2),
        stride_vb=v.stride(0),
        stride_vh=v.stride(1),
        stride_vn=v.stride(2),
        QCODE=km.q_code,
        H=h,
        GROUP=h // hkv,
        Nq=nq,
        Nk=nk,
        hi_off=km.hi_off,
        qk_scale=scale * LOG2E,
        **kb.args(),
    )
    consts = common_constexprs(q, km, cfg.block_m, cfg.block_n, km.q_words == 1, kb.kind)
    if isinstance(plan, RangePlan):
        programs = plan.num_tiles * b * h
        rep = b * h // plan.row_pattern.shape[0]
        del consts["ONE_WORD"], consts["BAND_LO"], consts["CELLS"]
        launch(
            _attn_fwd_ranges,
            (programs,),
            dict(
                common,
                ORDER=plan.order,
                TILE_LO=plan.tile_lo,
                TILE_HI=plan.tile_hi,
                TILE_GROUP=plan.tile_group,
                ROW_PATTERN=plan.row_pattern,
                IV_PTR=plan.iv_ptr,
                IV=plan.iv,
                Tq=plan.num_tiles,
                G=plan.num_groups,
                REP=rep,
            ),
            consts,
            cfg,
            shape_bucket(nq, nk, programs),
        )
        return out, lse
    programs = plan.num_rows * b * h
    launch(
        _attn_fwd,
        (programs,),
        dict(
            common,
            **plan_args(plan, b * h),
            KCODE=km.k_code,
            BITS=km.q_bits,
            CBITS=km.q_cbits,
            QEND=km.q_end,
            KEND=km.k_end,
            Tq=plan.num_rows,
            Tk=plan.num_cols,
            WORDS=km.q_words,
            lo_off=km.lo_off,
        ),
        consts,
        cfg,
        shape_bucket(nq, nk, programs),
    )
    return out, lse
