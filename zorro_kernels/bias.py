"""Score biases for :func:`~zorro_kernels.zorro_attention`: what ``bias=`` takes, checked, and cut into the blocks a
backend reads.

``bias`` is added to the scaled scores ``q . k * scale`` before the softmax, only where the mask allows; a pair whose
bias is ``-inf`` counts as masked, and a key that a query-broadcast bias ``(..., 1, Nk)`` hides from every row (key
padding) is never read (:func:`hide_dead_keys`). Two forms:

- a float tensor broadcastable to ``(B, H, Nq, Nk)`` (SDPA's float ``attn_mask`` convention): each dim is either full
  or 1; fewer than 4 dims are aligned to the right. Backends read only the blocks the mask leaves visible, so entries at
  masked positions may hold anything (NaN included);
- a :class:`RelativePositionBias`: a learned table ``(H, T)`` indexed by the offset between a query's and a key's
  integer coordinates (any number of axes), computed per visible block and never materialised as ``Nq x Nk``::

      bias[h, i, j] = table[h, index(q_coords[i] - k_coords[j])]
      index(d) = sum_a (d_a + extent_a - 1) * prod_{b > a} (2 * extent_b - 1)        (row-major, as Swin's)

  Tokens may be *unplaced* (a coordinate row with a negative entry): every pair with an unplaced token gets bias 0
  (Swin's fusion tokens). :meth:`RelativePositions.concat` joins position sets with their own tables and extents
  (Swin's 2-D audio and 3-D video windows in one attention call); pairs across two sets get bias 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from .caching import Derived, tensor_key
from .mask import MAX_TOKENS, as_int_tensor

__all__ = [
    "RelativePositions",
    "RelativePositionBias",
    "check_bias",
    "materialize_bias",
    "step_bias",
    "bias_tensor",
    "with_tensor",
    "hide_dead_keys",
]

Ranges = tuple[tuple[int, int], ...]


def _int_coords(coords, arg: str) -> torch.Tensor:
    coords = as_int_tensor(coords, arg, "(N, axes)")
    if coords.ndim != 2:
        raise ValueError(f"{arg} must be 2-D (N, axes), got shape {tuple(coords.shape)}")
    return coords.detach().to("cpu", torch.int64).contiguous()


def _check_extents(extent, sets: bool) -> torch.Tensor:
    """``extent`` as int64 ``(G, A)``: ``A`` positive ints (one position set), or with ``sets`` ``G`` rows of them."""
    if isinstance(extent, torch.Tensor):
        extent = extent.tolist()
    want = "a (sets, axes) table of positive ints" if sets else "a non-empty sequence of positive ints"
    if isinstance(extent, (str, bytes)) or not isinstance(extent, Sequence) or not extent:
        raise TypeError(f"extent must be {want}, got {extent!r}")
    rows = list(extent) if sets else [extent]
    if sets and not all(isinstance(r, Sequence) and not isinstance(r, (str, bytes)) for r in rows):
        raise TypeError(f"extent must be {want} (with q_group and k_group), got {extent!r}")
    if any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise ValueError(f"extent rows must have one equal, non-zero number of axes, got {[list(r) for r in rows]}")
    if any(
        isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 1 <= e <= MAX_TOKENS for r in rows for e in r
    ):
        raise ValueError(
            f"extent must hold ints in [1, {MAX_TOKENS}], got {[list(r) for r in rows] if sets else list(extent)}"
        )
    for r in rows:  # the table's columns for one set; their index must fit the kernels' int32 too
        columns = math.prod(2 * int(e) - 1 for e in r)
        if columns > MAX_TOKENS:
            raise ValueError(f"extent {[int(e) for e in r]} needs a table of {columns} columns, more than {MAX_TOKENS}")
    return torch.tensor([[int(e) for e in r] for r in rows], dtype=torch.int64)


def _check_group(group, n: int, sets: int, arg: str) -> torch.Tensor:
    group = as_int_tensor(group, arg, "(N,)")
    if tuple(group.shape) != (n,):
        raise ValueError(f"{arg} must have shape ({n},), got {tuple(group.shape)}")
    group = group.detach().to("cpu", torch.int64).contiguous()
    if n and (int(group.min()) < -1 or int(group.max()) >= sets):
        raise ValueError(
            f"{arg} must hold position-set indices in [-1, {sets - 1}] (-1: unplaced), got values in "
            f"[{int(group.min())}, {int(group.max())}]"
        )
    return group


class RelativePositions(Derived):
    """Where queries and keys sit, for a relative position bias: the part of :class:`RelativePositionBias` that has no
    parameters. Immutable (its tensors are handed out as copies); the per-block table indices backends need are cached
    on it, so build it once per layout.

    Args:
        q_coords: int ``(Nq, A)`` coordinates of the queries (e.g. ``(t, f)`` for audio, ``(t, h, w)`` for video); a
            row with a negative entry is an unplaced token (bias 0).
        k_coords: int ``(Nk, A)`` for the keys (``q_coords`` for self-attention).
        extent: ``A`` positive ints: along axis ``a`` offsets lie in ``[-(extent[a] - 1), extent[a] - 1]``; the table
            has ``T = prod(2 * extent[a] - 1)`` columns. A pair the mask allows with an offset outside raises
            ValueError when a backend reads it.
        q_group, k_group: int ``(Nq,)``, ``(Nk,)``, for several position sets in one (see :meth:`concat`, which
            builds them): the set of each token, -1 when unplaced (its coordinates are then ignored). ``extent`` is
            then a ``(G, A)`` table, one row per set, whose tables are concatenated in set order.

    Attributes:
        q_coords, k_coords: int64 ``(Nq, A)``, ``(Nk, A)`` (``A`` the largest axis count over the sets joined).
        q_group, k_group: int64 ``(Nq,)``, ``(Nk,)``: the position set of each token, -1 when unplaced.
        extents: int64 ``(G, A)`` per set (1 on axes a set lacks); bases: int64 ``(G,)`` first table column per set.
        strides: int64 ``(G, A)``: row-major strides of each set's table.
        table_size: ``T``, the columns the table must have.
    """

    def __init__(self, q_coords, k_coords, extent, *, q_group=None, k_group=None):
        q = _int_coords(q_coords, "q_coords")
        k = _int_coords(k_coords, "k_coords")
        if (q_group is None) != (k_group is None):
            raise TypeError("q_group and k_group go together: give both (several position sets) or neither")
        extents = _check_extents(extent, sets=q_group is not None)
        shown = extents.tolist() if q_group is not None else extents[0].tolist()
        for name, c in (("q_coords", q), ("k_coords", k)):
            if c.shape[1] != extents.shape[1]:
                raise ValueError(f"{name} has {c.shape[1]} axes but extent has {extents.shape[1]} ({shown})")
        if q_group is None:
            q_group, k_group = torch.where((q >= 0).all(1), 0, -1), torch.where((k >= 0).all(1), 0, -1)
        else:
            q_group = _check_group(q_group, q.shape[0], extents.shape[0], "q_group")
            k_group = _check_group(k_group, k.shape[0], extents.shape[0], "k_group")
        sizes = (2 * extents - 1).prod(1)
        # row-major strides per set: index = base + sum_a (d_a + e_a - 1) * stride_a
        strides = torch.flip(torch.cumprod(torch.flip(2 * extents - 1, [1]), 1), [1]).roll(-1, 1)
        strides[:, -1] = 1
        self._q_coords, self._k_coords, self._q_group, self._k_group = q, k, q_group, k_group
        self._extents, self._strides, self._bases = extents, strides, torch.cumsum(sizes, 0) - sizes
        self.table_size = int(sizes.sum())
        self._cache: dict = {}  # Derived.derived's, and only its
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"RelativePositions is immutable (its cached table indices depend on it): cannot set {name!r}; "
                f"build new positions"
            )
        object.__setattr__(self, name, value)

    # tensors are handed out as copies: editing one in place must not change the positions under their caches
    q_coords = property(lambda self: self._q_coords.clone())
    k_coords = property(lambda self: self._k_coords.clone())
    q_group = property(lambda self: self._q_group.clone())
    k_group = property(lambda self: self._k_group.clone())
    extents = property(lambda self: self._extents.clone())
    strides = property(lambda self: self._strides.clone())
    bases = property(lambda self: self._bases.clone())

    @classmethod
    def concat(cls, parts: Sequence["RelativePositions"]) -> "RelativePositions":
        """Several position sets in one: each token placed by at most one part; their tables are concatenated in
        this order (``T = sum`` of the parts'). Pairs from different parts get bias 0."""
        parts = list(parts)
        if not parts or not all(isinstance(p, RelativePositions) for p in parts):
            raise TypeError("RelativePositions.concat takes a non-empty list of RelativePositions")
        nq, nk = parts[0].num_q, parts[0].num_kv
        for i, p in enumerate(parts):
            if (p.num_q, p.num_kv) != (nq, nk):
                raise ValueError(f"parts[{i}] covers {p.num_q} queries x {p.num_kv} keys, parts[0] {nq} x {nk}")
        axes = max(p._extents.shape[1] for p in parts)
        coords, groups = [], []
        for side in ("q", "k"):
            c = torch.zeros(nq if side == "q" else nk, axes, dtype=torch.int64)
            grp = torch.full((c.shape[0],), -1, dtype=torch.int64)
            g0 = 0
            for i, p in enumerate(parts):
                pc, pg = getattr(p, f"_{side}_coords"), getattr(p, f"_{side}_group")
                placed = pg >= 0
                if (placed & (grp >= 0)).any():
                    raise ValueError(
                        f"parts[{i}] places a {side} token another part places already "
                        f"(token {int((placed & (grp >= 0)).nonzero()[0])})"
                    )
                c[placed, : pc.shape[1]] = pc[placed]
                grp[placed] = pg[placed] + g0
                g0 += p._extents.shape[0]
            coords.append(c)
            groups.append(grp)
        extents = torch.ones(sum(p._extents.shape[0] for p in parts), axes, dtype=torch.int64)
        g0 = 0
        for p in parts:
            extents[g0 : g0 + p._extents.shape[0], : p._extents.shape[1]] = p._extents
            g0 += p._extents.shape[0]
        return cls(coords[0], coords[1], extents, q_group=groups[0], k_group=groups[1])

    @property
    def num_q(self) -> int:
        return self._q_coords.shape[0]

    @property
    def num_kv(self) -> int:
        return self._k_coords.shape[0]

    def index(
        self, rows: torch.Tensor, cols: torch.Tensor, *, check: bool = True
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Table columns for query ``rows (..., R)`` x key ``cols (..., C)`` (int64, broadcastable leading dims).

        Returns ``(idx (..., R, C) int64, placed (..., R, C) bool or None when every pair is placed)``; ``idx`` is 0
        where a pair is not placed. A placed pair whose offset exceeds the extent raises ValueError with ``check``,
        else its ``idx`` is -1.
        """
        gq, gk = self._q_group[rows][..., :, None], self._k_group[cols][..., None, :]
        placed = (gq >= 0) & (gq == gk)
        g = gq.clamp(min=0).expand(placed.shape)
        d = self._q_coords[rows][..., :, None, :] - self._k_coords[cols][..., None, :, :]  # (..., R, C, A)
        e = self._extents[g]
        bad = placed[..., None] & (d.abs() >= e)
        if check and bad.any():
            pos = tuple(bad.nonzero()[0].tolist())
            qi = rows[..., :, None].expand(d.shape[:-1])[pos[:-1]]
            kj = cols[..., None, :].expand(d.shape[:-1])[pos[:-1]]
            raise ValueError(
                f"relative position bias: query {int(qi)} and key {int(kj)} differ by {int(d[pos])} on "
                f"axis {pos[-1]}, beyond extent {int(e[pos])} (offsets must lie in "
                f"[-(extent - 1), extent - 1])"
            )
        idx = self._bases[g] + ((d + e - 1) * self._strides[g]).sum(-1)
        idx = torch.where(bad.any(-1), -1, torch.where(placed, idx, 0))
        return idx, None if bool(placed.all()) else placed

    def step_index(self, q_ranges: Ranges, k_ranges: Ranges, blocks: int = 1, allowed: Optional[torch.Tensor] = None):
        """:meth:`index` for a segment-plan step (gathered ``q_ranges`` x ``k_ranges``, ``blocks`` diagonal blocks):
        ``(idx (blocks or 1, R, C), placed or None)`` (1 when every block has the same offsets), or None when no
        pair of the step is placed. Cached.

        ``allowed``: bool ``(R, C)`` of a step across a causal diagonal or window edge (``blocks`` 1), the pairs its
        mask lets through: only those must lie inside the extent (the others are never read, their ``idx`` is -1)."""
        return self.derived(_step_index, q_ranges, k_ranges, blocks, tensor_key(allowed), allowed=allowed)


def _step_index(p: RelativePositions, q_ranges: Ranges, k_ranges: Ranges, blocks: int, _allowed_key, allowed=None):
    rows = torch.cat([torch.arange(s, e) for s, e in q_ranges]).reshape(blocks, -1)
    cols = torch.cat([torch.arange(s, e) for s, e in k_ranges]).reshape(blocks, -1)
    idx, placed = p.index(rows, cols, check=allowed is None)
    if allowed is not None and bool(((idx < 0) & allowed).any()):
        i, j = ((idx < 0) & allowed).nonzero()[0, 1:].tolist()
        p.index(rows[:, i : i + 1], cols[:, j : j + 1])  # raises the shared message for this pair
    if blocks > 1 and bool((idx == idx[:1]).all()) and (placed is None or bool((placed == placed[:1]).all())):
        # equal windows share their offsets: one block, broadcast (its gradient is then a sum, not a scatter)
        idx, placed = idx[:1], None if placed is None else placed[:1]
    return None if placed is not None and not placed.any() else (idx, placed)


class RelativePositionBias:
    """A learned relative position bias, computed per visible block (see the module docstring).

    Args:
        table: float ``(H, T)`` (or ``(1, T)``: shared by every head), ``T = positions.table_size``. Its gradient is
            accumulated like any parameter's.
        q_coords, k_coords, extent: as :class:`RelativePositions` (or pass ``positions=`` instead, to share one
            cached set across layers).

    Example (Swin: one 7x7 window, self-attention)::

        yx = torch.cartesian_prod(torch.arange(7), torch.arange(7))          # (49, 2)
        rpb = RelativePositionBias(table, yx, yx, (7, 7))                   # table (H, 13 * 13)
        out = zorro_attention(q, k, v, mask, bias=rpb)
    """

    def __init__(
        self,
        table: torch.Tensor,
        q_coords=None,
        k_coords=None,
        extent=None,
        *,
        positions: Optional[RelativePositions] = None,
    ):
        if positions is None:
            if q_coords is None or k_coords is None or extent is None:
                raise TypeError("RelativePositionBias needs q_coords, k_coords and extent, or positions=")
            positions = RelativePositions(q_coords, k_coords, extent)
        elif not isinstance(positions, RelativePositions):
            raise TypeError(f"positions must be RelativePositions, got {type(positions).__name__}")
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"table must be a torch.Tensor (H, T), got {type(table).__name__}")
        if not table.is_floating_point():
            raise TypeError(f"table must be a float tensor, got {table.dtype}")
        if table.ndim != 2 or table.shape[1] != positions.table_size:
            raise ValueError(
                f"table must have shape (H, {positions.table_size}) for extents "
                f"{positions.extents.tolist()}, got {tuple(table.shape)}"
            )
        self.table = table
        self.positions = positions

    @property
    def num_heads(self) -> int:
        return self.table.shape[0]

    def materialize(self) -> torch.Tensor:
        """The dense bias ``(1, H, Nq, Nk)``: 0 for unplaced pairs, NaN for pairs beyond the extent (which the mask
        must hide). Slow, for tests and the reference."""
        p = self.positions
        idx, placed = p.index(torch.arange(p.num_q), torch.arange(p.num_kv), check=False)
        idx = idx.to(self.table.device)
        out = self.table[:, idx.clamp(min=0)]
        if placed is not None:
            out = torch.where(placed.to(out.device), out, 0)
        return torch.where(idx >= 0, out, float("nan"))[None]


Bias = Union[torch.Tensor, RelativePositionBias]


def check_bias(bias, q: torch.Tensor, nk: int) -> None:
    """Raise TypeError/ValueError for a ``bias=`` that :func:`zorro_attention` cannot take (q: ``(B, H, Nq, D)``)."""
    if bias is None:
        return
    b, h, nq, _ = q.shape
    if isinstance(bias, RelativePositionBias):
        t = bias.table
        if t.device != q.device:
            raise ValueError(f"bias.table is on {t.device} but q is on {q.device}")
        if t.shape[0] not in (1, h):
            raise ValueError(f"bias.table has {t.shape[0]} heads, q has H={h} (give (H, T) or (1, T))")
        p = bias.positions
        if (p.num_q, p.num_kv) != (nq, nk):
            raise ValueError(
                f"bias positions cover Nq={p.num_q} x Nk={p.num_kv} tokens, attention has Nq={nq} x Nk={nk}"
            )
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(
            f"bias must be a float tensor broadcastable to (B, H, Nq, Nk), a RelativePositionBias or "
            f"None, got {type(bias).__name__}"
        )
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a float tensor (additive; use the mask for booleans), got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    full = (b, h, nq, nk)
    if bias.ndim > 4 or any(n not in (1, f) for n, f in zip(bias.shape[::-1], full[::-1])):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not broadcast to (B, H, Nq, Nk) = {full} "
            f"(each dim must be 1 or full)"
        )


def hide_dead_keys(
    k: torch.Tensor, v: torch.Tensor, bias: Optional[Bias], heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` with zeros on the keys a key-padding bias hides from every query.

    A dense bias broadcast over the queries (``(..., 1, Nk)``, e.g. the ``0 / -inf`` key bias of left padding) that is
    ``-inf`` on key ``j`` of a (sample, head) hides that key from every row; such keys are often uninitialised padding.
    A backend multiplying its zero probability by a NaN value would still give NaN, so they are selected to 0 here,
    once, before any backend reads them (masked means never read; their gradients are then 0). A kv head's key is
    zeroed only when every query head of its GQA group hides it. ``-inf`` on single pairs of a full ``(..., Nq, Nk)``
    bias hides those scores only: put keys that may hold garbage in the mask (lengths) instead.

    k, v: ``(B, Hkv, Nk, D)``; heads: H (query heads). Returns them unchanged without such a bias.
    """
    if not isinstance(bias, torch.Tensor) or (bias.ndim >= 2 and bias.shape[-2] != 1):
        return k, v
    x = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))  # (Bb, Hb, 1, Nk|1)
    if x.shape[-1] == 1:
        return k, v
    dead = torch.isneginf(x[:, :, 0])  # (Bb, Hb, Nk)
    if dead.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(dead.any()):
        return k, v  # (on CUDA this test would synchronise: the select runs regardless)
    hkv = k.shape[1]
    if dead.shape[1] > 1:
        dead = dead.reshape(dead.shape[0], hkv, heads // hkv, -1).all(2)  # (Bb, Hkv, Nk)
    dead = dead[..., None]
    return k.masked_fill(dead, 0.0), v.masked_fill(dead, 0.0)


def materialize_bias(bias: Optional[Bias]) -> Optional[torch.Tensor]:
    """``bias`` as a dense 4-D tensor broadcastable to ``(B, H, Nq, Nk)`` (None stays None). For the reference."""
    if bias is None:
        return None
    if isinstance(bias, RelativePositionBias):
        return bias.materialize()
    return bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))


def bias_tensor(bias: Optional[Bias]) -> Optional[torch.Tensor]:
    """The tensor a bias's gradient belongs to: the dense bias itself, or the relative bias's table."""
    return bias.table if isinstance(bias, RelativePositionBias) else bias


def with_tensor(bias: Bias, t: torch.Tensor) -> Bias:
    """``bias`` with its tensor (see :func:`bias_tensor`) replaced by ``t``."""
    return RelativePositionBias(t, positions=bias.positions) if isinstance(bias, RelativePositionBias) else t


def _rows_of(ranges: Ranges, blocks: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(s, e) for s, e in ranges]).reshape(blocks, -1).to(device)


def _pick(x: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    """Rows ``ranges`` of ``x`` along ``dim`` (a view for one range; a size-1 dim broadcasts and is kept)."""
    if x.shape[dim] == 1:
        return x
    if len(ranges) == 1:
        return x.narrow(dim, ranges[0][0], ranges[0][1] - ranges[0][0])
    return torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim)


def step_bias(
    bias: Optional[Bias],
    batch: Optional[torch.Tensor],
    q_ranges: Ranges,
    k_ranges: Ranges,
    blocks: int,
    heads: int,
    allowed: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """The bias of one segment-plan step, shaped for its gathered, block-folded problem: broadcastable to
    ``(Bsel, heads * blocks, R / blocks, C / blocks)`` (see ``segments._gather``), or None when it adds nothing.

    Only the step's rows and columns are read (the diagonal blocks when ``blocks > 1``), never the rest of a dense
    bias. ``batch``: the sample indices of the step's pattern (None = all). ``allowed``: the bool ``(R, C)`` mask of
    a step across the band's edge; a relative bias's extent is checked on those pairs only.
    """
    if bias is None:
        return None
    if isinstance(bias, RelativePositionBias):
        hit = bias.positions.step_index(q_ranges, k_ranges, blocks, allowed)
        if hit is None:
            return None
        idx, placed = hit
        t = bias.table
        out = t[:, idx.to(t.device)]  # (Ht, blocks or 1, R, C)
        if placed is not None:
            out = torch.where(placed.to(t.device), out, 0)
        out = out.expand(out.shape[0], blocks, *out.shape[2:])
        hb = out.shape[0]
        out = out[None]
    else:
        x = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
        if batch is not None and x.shape[0] > 1:
            x = x.index_select(0, batch.to(x.device))
        hb = x.shape[1]
        if blocks == 1:
            return _pick(_pick(x, 2, q_ranges), 3, k_ranges)
        # a fused run: only the diagonal blocks
        r = (
            _rows_of(q_ranges, blocks, x.device)[:, :, None]
            if x.shape[2] > 1
            else torch.zeros(blocks, 1, 1, dtype=torch.long)
        )
        c = (
            _rows_of(k_ranges, blocks, x.device)[:, None, :]
            if x.shape[3] > 1
            else torch.zeros(blocks, 1, 1, dtype=torch.long)
        )
        out = x[:, :, r.to(x.device), c.to(x.device)]  # (Bb, Hb, blocks, R|1, C|1)
    if blocks == 1:
        return out[:, :, 0]
    if hb == 1 and heads > 1:
        out = out.expand(out.shape[0], heads, *out.shape[2:])
    return out.reshape(out.shape[0], -1, *out.shape[3:])
