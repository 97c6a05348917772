"""The test kit: check a layout, a backend or a model against the dense fp64 oracle the way zorro's own tests do.

- :func:`attention_ref` — the oracle: attention through ``mask.to_dense()``, in fp64 (or at the input precision,
  which is what the tolerance rule compares against).
- :func:`generate_qkv` — random ``q, k, v`` shaped for a mask.
- The tolerance rule, in one place: a result's error against fp64 may be at most twice the error PyTorch itself makes
  at the same precision, plus a small floor per dtype (:data:`FLOOR`); :func:`assert_within_policy` checks one tensor,
  :func:`check_against_oracle` a whole attention function (output and every gradient, fully-masked rows exactly 0).
- Random and hand-picked layouts: :func:`random_mask`, :func:`named_masks`, :func:`random_layout`.

Example::

    import torch
    from zorro_kernels import ZorroMask, zorro_attention
    from zorro_kernels.testing import check_against_oracle, generate_qkv

    mask = ZorroMask.from_segments([("text", 7), ("image", 33)], {"text": "*", "image": ["image"]})
    check_against_oracle(zorro_attention, *generate_qkv(mask, dtype=torch.float16), mask)
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch

from .bias import RelativePositionBias, materialize_bias
from .mask import ZorroMask
from .reference import reference_attention

__all__ = [
    "attention_ref",
    "generate_qkv",
    "FLOOR",
    "max_err",
    "policy_violation",
    "assert_within_policy",
    "check_against_oracle",
    "ODD_SIZES",
    "cell_masks",
    "random_cell_mask",
    "per_sample_masks",
    "random_per_sample_mask",
    "random_mask",
    "named_masks",
    "random_layout",
]


# ------------------------------------------------------------------------------------------------ the oracle
def _cast_bias(bias, dtype: torch.dtype):
    if bias is None:
        return None
    if isinstance(bias, RelativePositionBias):
        return RelativePositionBias(bias.table.to(dtype), positions=bias.positions)
    return bias.to(dtype)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: ZorroMask,
    *,
    scale: Optional[float] = None,
    bias=None,
    upcast: bool = True,
) -> torch.Tensor:
    """The dense oracle (:func:`~zorro_kernels.reference_attention`, NaN-safe: a masked pair is never read).

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0``.
        mask: the layout, ``mask.num_q == Nq`` and ``mask.num_kv == Nk``.
        scale: softmax scale, default ``D ** -0.5``.
        bias: None, a float tensor broadcastable to ``(B, H, Nq, Nk)`` or a
            :class:`~zorro_kernels.RelativePositionBias`.
        upcast: True: the arithmetic and the result in fp64 (the oracle). False: the arithmetic and the result in q's
            dtype, no upcast of half types — the error PyTorch itself makes at that precision, which the tolerance
            rule allows twice of.

    Returns:
        ``(B, H, Nq, D)``, fp64 with ``upcast`` else q's dtype; differentiable (twice too) in q, k, v and the bias.
        A row that sees nothing is exactly 0 with zero gradients.
    """
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        bias = _cast_bias(bias, torch.float64)
    return reference_attention(q, k, v, mask, scale=scale, compute_dtype=q.dtype, bias=bias)


def generate_qkv(
    mask: Optional[ZorroMask] = None,
    *,
    batch: Optional[int] = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    num_q: Optional[int] = None,
    num_kv: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    noncontiguous: bool = False,
    requires_grad: bool = False,
    generator: Optional[torch.Generator] = None,
):
    """Standard-normal ``q (B, H, Nq, D)`` and ``k, v (B, Hkv, Nk, D)``, drawn in that order.

    Args:
        mask: gives ``Nq = mask.num_q``, ``Nk = mask.num_kv`` and, when it has per-sample lengths, the batch; None:
            ``num_q`` (and ``num_kv``, default ``num_q``) say the sizes.
        batch: B; default the mask's batch size, else 2.
        heads, kv_heads, head_dim: H, Hkv, D; the default is grouped-query (4 query heads on 2 kv heads) so a kernel's
            head mapping is exercised unless a test asks otherwise.
        dtype: of the tensors. fp32 and fp64 are drawn in that dtype; half types are drawn in fp32 and rounded.
        noncontiguous: stored ``(B, N, H, D)`` and seen through a transpose, as after a fused qkv projection.
        requires_grad: leaf tensors that require grad.
        generator: a CPU ``torch.Generator`` for reproducible draws independent of the global seed.
    """
    if mask is not None:
        num_q, num_kv = mask.num_q, mask.num_kv
        batch = batch or mask.batch_size or 2
    elif num_q is None:
        raise ValueError("generate_qkv: give a mask or num_q")
    batch, num_kv = batch or 2, num_q if num_kv is None else num_kv
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def draw(n, h):
        if noncontiguous:
            t = torch.randn(batch, n, h, head_dim, dtype=draw_dtype, generator=generator).transpose(1, 2)
        else:
            t = torch.randn(batch, h, n, head_dim, dtype=draw_dtype, generator=generator)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return draw(num_q, heads), draw(num_kv, kv_heads), draw(num_kv, kv_heads)


# ------------------------------------------------------------------------------------------------ the tolerance rule
#: absolute floor per dtype, scaled by the reference's magnitude; fp16/bf16 floors cover one rounding of the output
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in fp64 over tensors of one shape (0.0 when empty)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def policy_violation(
    name: str, got: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype
) -> Optional[str]:
    """None if ``got`` is within the rule, else the one-line reason with the numbers.

    The rule: ``max|got - ref64| <= 2 * max|torch_same - ref64| + FLOOR[dtype] * max(1, max|ref64|)``, after a shape
    check and a check that ``got`` is finite. ``got``, ``torch_same`` (the same computation done by PyTorch at
    ``dtype``) and ``ref64`` (done in fp64) have one shape, any shape.
    """
    if got.shape != ref64.shape:
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    if not torch.isfinite(got).all():
        return f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    kernel_err = max_err(got, ref64)
    torch_err = max_err(torch_same, ref64)
    bound = 2 * torch_err + FLOOR[dtype] * scale
    if kernel_err <= bound:
        return None
    return (
        f"{name} ({dtype}): error {kernel_err:.3e} > bound {bound:.3e} "
        f"(2 x torch error {torch_err:.3e} + floor {FLOOR[dtype] * scale:.3e})"
    )


def assert_within_policy(
    name: str, got: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype
) -> None:
    """Assert :func:`policy_violation` finds nothing; the AssertionError carries its numbers."""
    why = policy_violation(name, got, torch_same, ref64, dtype)
    assert why is None, why


def _leaf(bias, cast, grad: bool):
    """``(bias for the call, the leaf tensor whose gradient is checked or None)``, cast like q, k, v."""
    if bias is None:
        return None, None
    if isinstance(bias, RelativePositionBias):
        table = cast(bias.table).detach().requires_grad_(grad)
        return RelativePositionBias(table, positions=bias.positions), table
    leaf = cast(bias).detach().requires_grad_(grad)
    return leaf, leaf


def check_against_oracle(
    attn: Callable, q, k, v, mask: ZorroMask, *, scale=None, grad: bool = True, seed: int = 0, bias=None
) -> torch.Tensor:
    """Run ``attn(q, k, v, mask, scale=[, bias=])`` and compare its output and dq, dk, dv (and the gradient of a dense
    ``bias``, or of a :class:`~zorro_kernels.RelativePositionBias`'s table) with the oracle under the rule; rows that
    see nothing (the mask, or ``-inf`` biases on every key it allows) must be exactly 0 with a zero dq.

    Args:
        attn: e.g. :func:`~zorro_kernels.zorro_attention` or ``functools.partial(zorro_attention, backend=...)``.
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; in the dtype under test (the bias too).
        mask: the layout.
        grad: also check the gradients, for an upstream gradient drawn from ``seed``.

    Returns:
        ``attn``'s output ``(B, H, Nq, D)``, detached.
    """
    dtype = q.dtype
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)

    def run(fn, cast):
        qq, kk, vv = (cast(t).detach().requires_grad_(grad) for t in (q, k, v))
        bb, leaf = _leaf(bias, cast, grad)
        extra = {} if bb is None else {"bias": bb}
        out = fn(qq, kk, vv, **extra)
        inputs = (qq, kk, vv) + (() if leaf is None else (leaf,))
        if not grad:
            grads = ()
        elif out.requires_grad:
            grads = torch.autograd.grad(out, inputs, d_out.to(out.dtype), allow_unused=True, materialize_grads=True)
        else:  # a layout where every row sees nothing: the output is a constant 0
            grads = tuple(torch.zeros_like(t) for t in inputs)
        return out.detach(), [g.detach() for g in grads]

    got, got_g = run(lambda a, b, c, **kw: attn(a, b, c, mask, scale=scale, **kw), lambda t: t)
    ref, ref_g = run(lambda a, b, c, **kw: attention_ref(a, b, c, mask, scale=scale, **kw), lambda t: t.double())
    same, same_g = run(lambda a, b, c, **kw: attention_ref(a, b, c, mask, scale=scale, upcast=False, **kw), lambda t: t)
    assert got.dtype == dtype, f"output dtype {got.dtype} != input dtype {dtype}"
    assert_within_policy("out", got, same, ref, dtype)
    names = ("dq", "dk", "dv", "dtable" if isinstance(bias, RelativePositionBias) else "dbias")
    for name, g, s, r in zip(names, got_g, same_g, ref_g):
        assert_within_policy(name, g, s, r, dtype)
    dense = mask.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense)[:, None]  # (B|1, 1, Nq, Nk)
    full = materialize_bias(bias)
    if full is not None:
        dense = dense & ~torch.isneginf(torch.where(dense, full.detach().cpu(), 0))
    dead = ~dense.any(-1)  # (B|1, H|1, Nq)
    if dead.any():
        dead4 = dead[..., None].expand_as(got)
        assert (got[dead4] == 0).all(), "a fully masked row is not exactly 0"
        if grad:
            assert (got_g[0][dead4] == 0).all(), "a fully masked row has a non-zero dq"
    return got


# ------------------------------------------------------------------------------------------------ layouts
#: segment sizes that hit tile edges: empty, single tokens, primes, one below and above powers of two
ODD_SIZES = (0, 1, 2, 3, 5, 8, 13, 17, 31, 64, 97, 113)


def random_mask(
    rng: random.Random,
    *,
    max_segments: int = 6,
    sizes: Sequence[int] = ODD_SIZES,
    allow_cross: bool = True,
    allow_causal: bool = True,
    max_batch: int = 3,
) -> ZorroMask:
    """A random layout of 1..``max_segments`` segments whose sizes are drawn from ``sizes`` (at least one token in
    all): random rules (some segments see nothing), with probability 0.3 cross-attention to other kv segments,
    per-sample lengths ``(B, segments)`` with B in 1..``max_batch`` on either side (0 included), causal with
    probability 0.2. Reproducible from ``rng``."""
    n_seg = rng.randint(1, max_segments)
    names = [f"s{i}" for i in range(n_seg)]
    q_sizes = [rng.choice(sizes) for _ in range(n_seg)]
    if sum(q_sizes) == 0:
        q_sizes[rng.randrange(n_seg)] = rng.choice([1, 3, 7])
    cross = allow_cross and rng.random() < 0.3
    if cross:
        n_kv = rng.randint(1, max_segments)
        kv_names = [f"k{i}" for i in range(n_kv)]
        kv_sizes = [rng.choice(sizes) for _ in range(n_kv)]
        if sum(kv_sizes) == 0:
            kv_sizes[rng.randrange(n_kv)] = rng.choice([1, 2, 9])
    else:
        kv_names, kv_sizes = names, q_sizes
    rules = {}
    for n in names:
        r = rng.random()
        if r < 0.1:
            continue  # sees nothing
        rules[n] = "*" if r < 0.25 else [k for k in kv_names if rng.random() < 0.5]
    b = rng.randint(1, max_batch)
    lengths = kv_lengths = None
    if rng.random() < 0.5:
        lengths = torch.tensor([[rng.randint(0, s) for s in q_sizes] for _ in range(b)])
    if cross and rng.random() < 0.5:
        kv_lengths = torch.tensor([[rng.randint(0, s) for s in kv_sizes] for _ in range(b)])
    return ZorroMask.from_segments(
        list(zip(names, q_sizes)),
        rules,
        kv_segments=list(zip(kv_names, kv_sizes)) if cross else None,
        lengths=lengths,
        kv_lengths=kv_lengths,
        causal=allow_causal and rng.random() < 0.2,
    )


def named_masks() -> dict[str, ZorroMask]:
    """Hand-picked layouts every backend must get right: the paper's, odd and empty segments, ragged batches,
    packing (causal too), cross-attention read-outs, causal cross-attention aligned bottom-right, rows that see
    nothing."""
    return {
        "figure2_small": ZorroMask.zorro(audio=20, video=97, fusion=4),
        "odd_1_3_97_113": ZorroMask.zorro(audio=1, video=97, fusion=3, text=113),
        "empty_audio": ZorroMask.zorro(audio=0, video=33, fusion=2),
        "no_fusion": ZorroMask.zorro(audio=9, video=17, fusion=0),
        "ragged": ZorroMask.zorro(
            audio=16, video=40, fusion=3, lengths=torch.tensor([[16, 40, 3], [0, 40, 3], [5, 13, 3]])
        ),
        "bottleneck": ZorroMask.bottleneck(audio=11, video=29, bottleneck=4),
        "full": ZorroMask.full(audio=12, video=30, fusion=2),
        "packed": ZorroMask.packed([8, 8, 8, 5, 1, 13]),
        "packed_causal": ZorroMask.packed([7, 1, 20, 3], causal=True),
        "causal_self": ZorroMask.from_segments([("x", 45)], {"x": "*"}, causal=True),
        "cross_readout": ZorroMask.from_segments(
            [("audio_q", 1), ("video_q", 1), ("fusion_q", 1), ("global_q", 1)],
            {"audio_q": ["audio"], "video_q": ["video"], "fusion_q": ["fusion"], "global_q": "*"},
            kv_segments=[("audio", 21), ("video", 50), ("fusion", 4)],
            kv_lengths=torch.tensor([[21, 50, 4], [0, 50, 4]]),
        ),
        "cross_causal_bottom_right": ZorroMask.from_segments(
            [("q", 5)], {"q": "*"}, kv_segments=[("k", 23)], causal=True
        ),
        "nothing_visible_rows": ZorroMask.from_segments([("a", 7), ("b", 9)], {"a": ["a"]}),
    }


def random_layout(gen: torch.Generator, max_size: int, *, lengths: bool, batch: int = 2) -> ZorroMask:
    """Self-attention over 2-6 segments of 0..``max_size - 1`` tokens (the first non-empty), each pair allowed with
    probability 1/2; with ``lengths``, random per-sample valid lengths ``(batch, segments)``. Seeded by a torch
    Generator, so scripts without pytest reproduce the same sweep."""
    n_seg = int(torch.randint(2, 7, (1,), generator=gen))
    sizes = torch.randint(0, max_size, (n_seg,), generator=gen).tolist()
    sizes[0] += 1
    allow = torch.rand(n_seg, n_seg, generator=gen) < 0.5
    lens = (torch.rand(batch, n_seg, generator=gen) * (torch.tensor(sizes) + 1)).long() if lengths else None
    return ZorroMask.from_allow([(f"s{j}", s) for j, s in enumerate(sizes)], allow, lengths=lens)


# ------------------------------------------------------------------------------------------------ rule cells
def cell_masks() -> dict[str, ZorroMask]:
    """Layouts with causal rule cells (issue 20): Gemma-3-like causal text with bidirectional image blocks (odd sizes,
    an empty block, ragged lengths), a prefix-LM, packed causal cross-attention with unequal query/key counts per
    document (bottom-right per document), causal cells combined with the row-wide causal and a window."""
    return {
        "blocks_odd": ZorroMask.causal_with_blocks(
            [("t0", 3), ("img0", 97), ("t1", 1), ("img1", 0), ("img2", 113), ("t2", 17)], ["img*"]
        ),
        "blocks_ragged": ZorroMask.causal_with_blocks(
            [("t0", 13), ("img0", 8), ("t1", 17)],
            ["img0"],
            lengths=torch.tensor([[13, 8, 17], [5, 8, 1], [0, 3, 9]]),
        ),
        "prefix_lm": ZorroMask.prefix_lm(31, 17),
        "prefix_lm_ragged": ZorroMask.prefix_lm(20, 13, lengths=torch.tensor([[20, 13], [7, 2]])),
        "packed_unequal": ZorroMask.packed([5, 1, 3, 8], kv_seq_lens=[2, 7, 3, 13], causal=True),
        "packed_unequal_ragged": ZorroMask.from_segments(
            [("d0", 6), ("d1", 9)],
            {"d0": {"k0": "causal"}, "d1": {"k1": "causal"}},
            kv_segments=[("k0", 11), ("k1", 4)],
            lengths=torch.tensor([[6, 9], [2, 9]]),
            kv_lengths=torch.tensor([[11, 4], [1, 3]]),
        ),
        "cells_and_window": ZorroMask.causal_with_blocks([("t0", 9), ("img", 16), ("t1", 20)], ["img"], window=(6, -1)),
        "cells_and_causal": ZorroMask.from_segments(
            [("a", 12), ("b", 7)], {"a": {"a": "causal"}, "b": {"a": "full", "b": "causal"}}, causal=True
        ),
    }


def random_cell_mask(rng: random.Random, *, max_segments: int = 4, sizes: Sequence[int] = ODD_SIZES) -> ZorroMask:
    """A random layout whose rule cells are none, full or causal (causal twice as likely as full), with optional
    cross-attention, per-sample lengths on either side, the row-wide ``causal`` and a sliding window. Reproducible
    from ``rng``."""
    n = rng.randint(1, max_segments)
    q_sizes = [rng.choice(sizes) for _ in range(n)]
    if sum(q_sizes) == 0:
        q_sizes[0] = rng.choice([1, 5, 9])
    cross = rng.random() < 0.3
    kv_sizes = [rng.choice(sizes) for _ in range(rng.randint(1, max_segments))] if cross else q_sizes
    if sum(kv_sizes) == 0:
        kv_sizes[0] = rng.choice([1, 4, 7])
    kinds = torch.tensor([[rng.choice([0, 1, 2, 2]) for _ in kv_sizes] for _ in q_sizes])
    b = rng.randint(1, 3)
    lengths = torch.tensor([[rng.randint(0, s) for s in q_sizes] for _ in range(b)]) if rng.random() < 0.5 else None
    kv_lengths = None
    if cross and rng.random() < 0.5:
        kv_lengths = torch.tensor([[rng.randint(0, s) for s in kv_sizes] for _ in range(b)])
    return ZorroMask(
        [(f"s{i}", s) for i, s in enumerate(q_sizes)],
        kinds != 0,
        kv_segments=[(f"k{i}", s) for i, s in enumerate(kv_sizes)] if cross else None,
        lengths=lengths,
        kv_lengths=kv_lengths,
        causal=rng.random() < 0.2,
        window=rng.choice([None, None, None, (3, -1), (2, 4), (-1, 0)]),
        causal_cells=kinds == 2,
    )


# ------------------------------------------------------------------------------------------------ per-sample sizes
def per_sample_masks() -> dict[str, ZorroMask]:
    """Layouts whose segment boundaries differ per sample (issue 20): Gemma-3-like image blocks at different text
    positions (an image missing in one sample, left padding as a segment that sees nothing), a prefix-LM with
    per-sample prompt lengths, and cross-attention from new tokens to a cache with per-sample key boundaries."""
    segs = [("pad", 0), ("t0", 5), ("img0", 8), ("t1", 3), ("img1", 4), ("t2", 9)]
    sizes = torch.tensor([[0, 5, 8, 3, 4, 9], [4, 1, 8, 13, 0, 3], [2, 0, 8, 1, 4, 14]])
    blocks = ZorroMask.causal_with_blocks(segs, ["img*"], sample_sizes=sizes)
    allow = blocks.allow
    allow[0] = False  # the padding sees nothing and nobody sees it
    allow[:, 0] = False
    cells = blocks.causal_cells & allow
    return {
        "blocks": blocks,
        "blocks_left_padded": ZorroMask(segs, allow, causal_cells=cells, sample_sizes=sizes),
        "blocks_ragged": ZorroMask.causal_with_blocks(
            [("t0", 3), ("img", 4), ("t1", 2)],
            ["img"],
            sample_sizes=torch.tensor([[3, 4, 2], [1, 4, 4]]),
            lengths=torch.tensor([[3, 4, 1], [1, 2, 4]]),
        ),
        "prefix_lm": ZorroMask.prefix_lm([13, 7, 20], [10, 16, 3]),
        "decode_cross": ZorroMask.from_segments(
            [("new", 2)],
            {"new": {"t0": "full", "img": "full", "t1": "full", "new_k": "causal"}},
            kv_segments=[("t0", 4), ("img", 6), ("t1", 3), ("new_k", 2)],
            kv_sample_sizes=torch.tensor([[4, 6, 3, 2], [0, 6, 7, 2]]),
        ),
    }


def random_per_sample_mask(rng: random.Random, *, max_segments: int = 4, max_tokens: int = 40) -> ZorroMask:
    """A random self-attention layout whose segment sizes differ per sample (each sample's summing to one N, zeros
    included), with none/full/causal cells, optional lengths, the row-wide ``causal`` and a window."""
    n = rng.randint(1, max_segments)
    total = rng.randint(1, max_tokens)
    b = rng.randint(1, 3)

    def split():
        cuts = sorted(rng.randint(0, total) for _ in range(n - 1))
        return [y - x for x, y in zip([0] + cuts, cuts + [total])]

    sizes = torch.tensor([split() for _ in range(b)])
    kinds = torch.tensor([[rng.choice([0, 1, 2, 2]) for _ in range(n)] for _ in range(n)])
    lengths = None
    if rng.random() < 0.4:
        lengths = torch.tensor([[rng.randint(0, int(x)) for x in row] for row in sizes])
    return ZorroMask(
        [(f"s{i}", int(x)) for i, x in enumerate(sizes[0])],
        kinds != 0,
        causal_cells=kinds == 2,
        sample_sizes=sizes,
        lengths=lengths,
        causal=rng.random() < 0.2,
        window=rng.choice([None, None, (3, -1), (2, 2)]),
    )
