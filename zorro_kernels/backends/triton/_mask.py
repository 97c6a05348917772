"""Per-token pieces shared by the kernels: validity, the element mask of a partial tile, loading token rows.

The mask is evaluated in-kernel from per-token metadata (see :class:`TokenMeta`).

Query ``i`` of sample ``b`` may see key ``j`` iff ``allow[q_seg[i], k_seg[j]]``, both tokens are valid
(``pos < len[b, seg]`` and inside the matrix) and, for causal masks, ``j <= i + causal_offset``. Only partial tiles
pay for this; full tiles never call these functions.
"""
import triton
import triton.language as tl


@triton.jit
def token_valid(SEG, POS, LEN, len_row, idx, N, num_segments):
    """Segment id and validity of token indices ``idx`` (any shape): valid iff ``idx < N`` and its position is below
    its segment's length in row ``len_row`` of ``LEN (Bm, num_segments)``. Out-of-range tokens get segment 0."""
    inside = idx < N
    seg = tl.load(SEG + idx, mask=inside, other=0)
    pos = tl.load(POS + idx, mask=inside, other=0)
    length = tl.load(LEN + len_row * num_segments + seg)
    return seg, inside & (pos < length)


@triton.jit
def element_mask(ALLOW, q_seg, q_ok, rows, k_seg, k_ok, cols, num_k_segments, causal_offset, CAUSAL: tl.constexpr):
    """Bool ``(BLOCK_M, BLOCK_N)``: query rows x key columns."""
    allowed = tl.load(ALLOW + q_seg[:, None] * num_k_segments + k_seg[None, :]) != 0
    keep = allowed & q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
    return keep


@triton.jit
def element_mask_t(ALLOW, q_seg, q_ok, rows, k_seg, k_ok, cols, num_k_segments, causal_offset, CAUSAL: tl.constexpr):
    """The transpose of :func:`element_mask`, built directly: bool ``(BLOCK_N, BLOCK_M)``, key rows x query columns."""
    allowed = tl.load(ALLOW + k_seg[:, None] + q_seg[None, :] * num_k_segments) != 0
    keep = allowed & k_ok[:, None] & q_ok[None, :]
    if CAUSAL:
        keep = keep & (cols[:, None] <= rows[None, :] + causal_offset)
    return keep


@triton.jit
def load_token_pair(A, B, stride_an, stride_ad, stride_bn, stride_bd, idx, offs_d,
                    SEG, POS, LEN, len_row, N, num_segments,
                    HEAD_DIM: tl.constexpr, PARTIAL: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows ``idx`` of two operands over the same tokens (K and V, or Q and dO): ``(len(idx), D_PAD)`` each, with the
    tokens' segment ids and validity.

    ``PARTIAL`` loads only valid tokens (zeros elsewhere), so NaN or garbage in padding never enters a dot. Otherwise
    every token is known to be valid and inside the matrix (full tiles): no row mask at all, only a head-dim mask when
    D is not a power of two; the returned segment ids and validity are then placeholders the caller does not read.
    """
    a_ptrs = A + idx[:, None] * stride_an + offs_d[None, :] * stride_ad
    b_ptrs = B + idx[:, None] * stride_bn + offs_d[None, :] * stride_bd
    d_ok = offs_d[None, :] < HEAD_DIM
    if PARTIAL:
        seg, ok = token_valid(SEG, POS, LEN, len_row, idx, N, num_segments)
        a = tl.load(a_ptrs, mask=ok[:, None] & d_ok, other=0.0)
        b = tl.load(b_ptrs, mask=ok[:, None] & d_ok, other=0.0)
    else:
        seg = tl.zeros_like(idx)
        ok = idx >= 0
        if EVEN_D:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=d_ok, other=0.0)
            b = tl.load(b_ptrs, mask=d_ok, other=0.0)
    return a, b, seg, ok
