"""In-kernel pieces shared by the forward and backward kernels: which tile a program owns (:func:`program_tile`), and
the partial-tile path's per-token validity, element mask, token-row loads and NaN isolation.

The mask is evaluated in-kernel from per-token codes (segment id or -1 for padding) and the rule table packed into bit
words (see :mod:`._plan`).

Query ``i`` of sample ``b`` may see key ``j`` iff the rule allows ``(q_seg[i], k_seg[j])``, both tokens are valid
(inside the matrix and not padding of sample ``b``) and ``j`` lies in the band of causality and the sliding window,
``i + lo_off <= j <= i + hi_off`` (:class:`._plan.KernelMask`), and, in a causal rule cell, the key's end offset
``pos - valid_len`` is at most the query's. Only partial tiles pay for this; full tiles never call
these functions.

Each kernel has a *fixed* side (the token tile its program owns: the query tile of the forward and dQ kernels, the kv
tile of the dK/dV kernel) and a *moving* side (the tiles its loop visits). Everything about the fixed side — segment
ids, validity, its rule words — is computed once per program, outside the tile loop.
"""

import triton
import triton.language as tl


@triton.jit
def program_tile(ORDER, REP, HEADS, T):
    """``(tile, b, head, list_row)`` of this program in the plan's longest-first order. The 1-D grid covers
    ``Bm * T * REP`` programs, ``REP = B * HEADS / Bm``: program ``pid`` takes plan entry ``e = ORDER[pid // REP]``
    (``e = row * T + tile``, row 0 when the plan broadcasts over the batch) and the ``pid % REP``-th (sample, head)
    that entry serves."""
    pid = tl.program_id(0)
    e = tl.load(ORDER + pid // REP)
    r = pid % REP
    return e % T, e // T + r // HEADS, r % HEADS, e


@triton.jit
def token_segments(CODE, code_row, idx, N):
    """Segment ids and validity of token indices ``idx`` (any shape) from row ``code_row`` of the token codes
    ``CODE (Bm, N)`` (segment id, or -1 for padding); out-of-range tokens are invalid. Invalid tokens get segment 0."""
    code = tl.load(CODE + code_row + idx, mask=idx < N, other=-1)
    return tl.maximum(code, 0), code >= 0


@triton.jit
def fixed_words(BITS, seg, WORDS, ONE_WORD: tl.constexpr):
    """The fixed side's rule words, loaded once per program: ``BITS[seg, 0]`` when the moving side has at most 32
    segments (``ONE_WORD``), else a placeholder :func:`allowed_pairs` does not read."""
    if ONE_WORD:
        return tl.load(BITS + seg * WORDS)
    else:
        return seg


@triton.jit
def allowed_pairs(BITS, WORDS, fixed_seg, fixed_word, moving_seg, ONE_WORD: tl.constexpr):
    """Bool ``(len(fixed), len(moving))``: the segment pairs the rule allows. ``BITS (S_fixed, WORDS)`` holds, per
    fixed-side segment, one bit per moving-side segment."""
    if ONE_WORD:
        word = fixed_word[:, None]
    else:
        word = tl.load(BITS + fixed_seg[:, None] * WORDS + (moving_seg[None, :] >> 5))
    return ((word >> (moving_seg[None, :] & 31)) & 1) != 0


@triton.jit
def pair_keep(
    BITS,
    WORDS,
    fixed_seg,
    fixed_word,
    fixed_ok,
    fixed_idx,
    moving_seg,
    moving_ok,
    moving_idx,
    lo_off,
    hi_off,
    BAND_LO: tl.constexpr,
    BAND_HI: tl.constexpr,
    ONE_WORD: tl.constexpr,
    FIXED_IS_QUERY: tl.constexpr,
    CBITS,
    fixed_cword,
    fixed_e,
    moving_e,
    CELLS: tl.constexpr,
):
    """The element mask of a partial tile, bool ``(fixed, moving)``: the rule allows the segment pair, both tokens are
    valid and key ``j`` lies in query ``i``'s band, ``i + lo_off <= j <= i + hi_off`` (``BAND_LO`` / ``BAND_HI``:
    that side is bounded; see :class:`._plan.KernelMask`). ``FIXED_IS_QUERY``: the
    fixed side holds the queries (forward, dQ) rather than the keys (dK/dV). ``CELLS``: the mask has causal rule
    cells, ``CBITS`` their bits (as ``BITS``), ``fixed_e``/``moving_e`` each token's end offset ``pos - valid_len``:
    a causal-cell pair is kept iff the key's offset is at most the query's (bottom-right inside the pair)."""
    keep = allowed_pairs(BITS, WORDS, fixed_seg, fixed_word, moving_seg, ONE_WORD)
    keep = keep & fixed_ok[:, None] & moving_ok[None, :]
    if FIXED_IS_QUERY:
        qi = fixed_idx[:, None]
        kj = moving_idx[None, :]
    else:
        qi = moving_idx[None, :]
        kj = fixed_idx[:, None]
    if BAND_HI:
        keep = keep & (kj <= qi + hi_off)
    if BAND_LO:
        keep = keep & (kj >= qi + lo_off)
    if CELLS:
        cz = allowed_pairs(CBITS, WORDS, fixed_seg, fixed_cword, moving_seg, ONE_WORD)
        if FIXED_IS_QUERY:
            seen = moving_e[None, :] <= fixed_e[:, None]
        else:
            seen = fixed_e[:, None] <= moving_e[None, :]
        keep = tl.where(cz, keep & seen, keep)
    return keep


@triton.jit
def finite_rows(x):
    """``(x with its non-finite entries replaced by 0, bool per row: the row held one)`` for an operand that a partial
    tile contracts over its rows (V in P·V, K in dS·K, Q and dO in dK/dV's sums over queries). A row a pair may not
    see then adds an exact 0, never ``0 * NaN``; the pairs that do see a bad row get NaN through ``p`` instead
    (:func:`poison`), so a row attending a non-finite value is never silently finite."""
    fin = tl.abs(x) < float("inf")  # False for NaN too
    return tl.where(fin, x, 0.0), tl.max(tl.where(fin, 0, 1), 1) > 0


@triton.jit
def poison(p, keep, bad_moving):
    """``p (fixed, moving)`` with 0 where the pair is masked and NaN where a kept pair meets a bad row of the moving
    side (``bad_moving`` from :func:`finite_rows`)."""
    return tl.where(keep, tl.where(bad_moving[None, :], float("nan"), p), 0.0)


@triton.jit
def load_tile(ptrs, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """A full tile's rows at ``ptrs`` (``(rows, D_PAD)`` pointers): no row mask, a head-dim mask only when D is not a
    power of two."""
    if EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def load_rows(
    A, B, stride_a, stride_b, idx, offs_d, ok, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_ROWS: tl.constexpr
):
    """Rows ``idx`` of two operands over the same tokens (K and V, or Q and dO), ``(len(idx), D_PAD)`` each, last dim
    contiguous. ``MASK_ROWS`` loads only rows where ``ok`` (zeros elsewhere), so NaN or garbage in padding never
    enters a dot; otherwise only a head-dim mask when D is not a power of two."""
    a_ptrs = A + idx[:, None] * stride_a + offs_d[None, :]
    b_ptrs = B + idx[:, None] * stride_b + offs_d[None, :]
    if MASK_ROWS:
        m = ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        a = tl.load(a_ptrs, mask=m, other=0.0)
        b = tl.load(b_ptrs, mask=m, other=0.0)
    elif EVEN_D:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        a = tl.load(a_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        b = tl.load(b_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return a, b
