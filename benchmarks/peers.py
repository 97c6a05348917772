"""The attention implementations measured side by side, each prepared once per layout.

A peer's ``prepare(layout, device, dtype, backward)`` does everything a user would do once per layout (build a dense
mask, a block mask, compile) and returns ``fn(q, k, v) -> out`` — the only thing timed — or raises
:class:`Unavailable` with the reason it cannot run here (the test then skips with that reason).

Peers (in report order):

- ``sdpa-nomask``: ``F.scaled_dot_product_attention`` without a mask on the same shapes. Not a masked attention: its
  time x the attended fraction is the *ideal* — a dense kernel's cost for just the attended entries.
- ``sdpa-masked``: SDPA with the dense boolean ``(B|1, 1, Nq, Nk)`` mask (what most codebases do).
- ``zorro-<backend>``: :func:`zorro_kernels.zorro_attention`, every registered backend the device runs well
  (``dense`` only where it is meant to run: tiny problems).
- ``zorro-auto``: ``backend="auto"``, what a user gets (on CUDA timed on first use, in the untimed first call).
- ``flex``: ``torch.compile``-d FlexAttention with a ``create_block_mask`` block mask built from the same layout.
- ``xformers``: ``memory_efficient_attention`` with the mask materialized as an additive bias (CUDA only).
- ``einsum``: einsum + ``masked_fill`` + softmax + einsum, as lucidrains/zorro-pytorch computes it.

The masked peers give a row that sees nothing (padding) every key and zero its output afterwards, as the dense
reference does, so they compute the same function as zorro (such rows are exactly 0) and pass the same check.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from zorro_kernels.backends import BACKENDS

from .layouts import Layout

__all__ = ["Peer", "PEERS", "Unavailable", "IDEAL", "MASKED", "peer_names"]

IDEAL = "sdpa-nomask"
MASKED = "sdpa-masked"
# A dense peer that would hold more than this many bytes of (B, H, Nq, Nk) intermediates is skipped.
DENSE_LIMIT_BYTES = int(float(os.environ.get("ZORRO_BENCH_DENSE_GIB", "4")) * (1 << 30))
# the dense backend is for problems of tens of tokens; beyond, it costs what masked SDPA costs (that row)
DENSE_MAX_N = 512
# FlexAttention on CPU runs ~7x slower than dense SDPA and compiles per shape: beyond this N it would dominate the
# suite's time budget, so larger CPU cases skip it (CUDA runs every size).
FLEX_CPU_MAX_N = 4096


class Unavailable(Exception):
    """A peer cannot run this case here; the message says why."""


class Peer(NamedTuple):
    name: str
    description: str
    prepare: Callable[[Layout, torch.device, torch.dtype, bool], Callable]


def _dense_mask(layout: Layout, device):
    """``(safe, dead)``: the bool mask ``(B|1, 1, Nq, Nk)`` with dead rows opened to every key, and the dead rows
    ``(B|1, 1, Nq, 1)`` to zero afterwards (None when every row sees something)."""
    dense = layout.mask.to_dense()
    dense = dense[None] if dense.ndim == 2 else dense
    live = dense.any(-1)
    safe = (dense | ~live[..., None])[:, None].to(device)
    dead = None if bool(live.all()) else (~live)[:, None, :, None].to(device)
    return safe, dead


def _zero_dead(out, dead):
    return out if dead is None else out.masked_fill(dead, 0.0)


# ------------------------------------------------------------------------------------------------------ peers
def _sdpa_nomask(layout, device, dtype, backward):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)


def _sdpa_masked(layout, device, dtype, backward):
    # SDPA turns a bool mask into an additive one of the query's dtype: 4 bytes per entry in fp32
    need = (layout.batch if layout.mask.batch_size else 1) * layout.num_q * layout.num_kv * 5
    if need > DENSE_LIMIT_BYTES:
        raise Unavailable(f"dense mask needs {need / 2**30:.1f} GiB > ZORRO_BENCH_DENSE_GIB")
    safe, dead = _dense_mask(layout, device)
    return lambda q, k, v: _zero_dead(F.scaled_dot_product_attention(q, k, v, attn_mask=safe), dead)


def _zorro(backend: str):
    def prepare(layout, device, dtype, backward):
        from zorro_kernels import zorro_attention

        if backend not in BACKENDS:
            raise Unavailable(f"backend {backend!r} is not registered in this install")
        if device.type == "cpu" and backend == "triton":
            raise Unavailable("Triton on CPU runs in the interpreter (a correctness tool), not a benchmark")
        if backend == "dense" and max(layout.num_q, layout.num_kv) > DENSE_MAX_N:
            raise Unavailable(
                f"the dense backend is for tiny problems (N <= {DENSE_MAX_N} here); beyond, it costs what "
                f"masked SDPA does"
            )
        probe = torch.empty(layout.batch, layout.heads, layout.num_q, layout.head_dim, device=device, dtype=dtype)
        kv = probe.new_empty(layout.batch, layout.heads, layout.num_kv, layout.head_dim)
        reasons = BACKENDS[backend].not_supported_reasons(probe, kv, kv, layout.mask)
        if reasons:
            raise Unavailable(f"backend {backend!r}: " + "; ".join(reasons))
        mask = layout.mask
        # derived data (tile maps, the segment plan) is cached on the mask: built here, outside the timed calls
        return lambda q, k, v: zorro_attention(q, k, v, mask, backend=backend)

    return prepare


def _zorro_auto(layout, device, dtype, backward):
    from zorro_kernels import explain, zorro_attention

    probe = torch.empty(layout.batch, layout.heads, layout.num_q, layout.head_dim, device=device, dtype=dtype)
    kv = probe.new_empty(layout.batch, layout.heads, layout.num_kv, layout.head_dim)
    if device.type != "cuda":  # not timed off CUDA: a rule picks one of the rows already measured
        choice = explain(probe, kv, kv, layout.mask, grad=backward).chosen
        raise Unavailable(f"auto runs {choice!r} here by its CPU rule: the zorro-{choice} row")
    mask = layout.mask
    return lambda q, k, v: zorro_attention(q, k, v, mask)


_FLEX = None


def _flex(layout, device, dtype, backward):
    global _FLEX
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({e})") from None
    if device.type == "cpu" and backward:
        raise Unavailable("FlexAttention has no backward on CPU")
    if device.type == "cpu" and max(layout.num_q, layout.num_kv) > FLEX_CPU_MAX_N:
        raise Unavailable(f"CPU FlexAttention beyond N={FLEX_CPU_MAX_N} exceeds the suite's time budget")
    if _FLEX is None:
        # every layout is a new static shape: allow a recompile per case instead of falling back to eager
        # (`import torch._dynamo` here made `torch` local to the function and broke the error line above)
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    block_mask = flex_block_mask(layout, device, create_block_mask)
    return lambda q, k, v: _FLEX(q, k, v, block_mask=block_mask)


def flex_mask_mod(layout: Layout, device):
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` for a layout: the element rule of
    :class:`~zorro_kernels.tilemap.TokenMeta` (segments, lengths, causal aligned bottom-right, the window)."""
    meta = layout.mask.token_meta(device)
    q_seg, k_seg = meta.q_seg.long(), meta.k_seg.long()
    allow = meta.allow.bool()
    ragged = layout.mask.batch_size is not None
    q_pos, k_pos, q_len, k_len = meta.q_pos, meta.k_pos, meta.q_len, meta.k_len
    offset, left, right = meta.causal_offset, meta.window_left, meta.window_right

    def mask_mod(b, h, qi, ki):
        a, c = q_seg[qi], k_seg[ki]
        ok = allow[a, c]
        if ragged:
            ok = ok & (q_pos[qi] < q_len[b, a]) & (k_pos[ki] < k_len[b, c])
        d = ki - qi - offset
        if meta.causal:
            ok = ok & (d <= 0)
        if left >= 0:
            ok = ok & (d >= -left)
        if right >= 0:
            ok = ok & (d <= right)
        return ok

    return mask_mod


def flex_block_mask(layout: Layout, device, create_block_mask=None):
    if create_block_mask is None:
        from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(
        flex_mask_mod(layout, device), layout.mask.batch_size, None, layout.num_q, layout.num_kv, device=device
    )


_XFORMERS_REASON = None


def _xformers_reason(device) -> str:
    """Empty if xformers' memory-efficient kernels run here, else why not (probed once)."""
    global _XFORMERS_REASON
    if _XFORMERS_REASON is None:
        if device.type != "cuda":
            _XFORMERS_REASON = "xformers' memory_efficient_attention kernels are CUDA-only"
        else:
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import xformers.ops as xops
                x = torch.randn(1, 16, 1, 64, device=device, dtype=torch.float16)
                xops.memory_efficient_attention(x, x, x)
                _XFORMERS_REASON = ""
            except Exception as e:  # noqa: BLE001 - an import, build-mismatch or kernel-dispatch failure: all mean "cannot run"
                _XFORMERS_REASON = f"xformers does not run here: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return _XFORMERS_REASON


def _xformers(layout, device, dtype, backward):
    reason = _xformers_reason(device)
    if reason:
        raise Unavailable(reason)
    import xformers.ops as xops

    need = layout.batch * layout.heads * layout.num_q * layout.num_kv * torch.finfo(dtype).bits // 8
    if need > DENSE_LIMIT_BYTES:
        raise Unavailable(f"the materialized bias needs {need / 2**30:.1f} GiB > ZORRO_BENCH_DENSE_GIB")
    safe, dead = _dense_mask(layout, device)
    # xformers wants the bias's last dim padded to a multiple of 8 in memory, the view sliced back
    nk_pad = -(-layout.num_kv // 8) * 8
    bias = torch.full((layout.batch, layout.heads, layout.num_q, nk_pad), float("-inf"), device=device, dtype=dtype)
    bias = bias[..., : layout.num_kv]
    bias.masked_fill_(safe.expand_as(bias), 0.0)

    def fn(q, k, v):
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return _zero_dead(out.transpose(1, 2), dead)

    return fn


def _einsum(layout, device, dtype, backward):
    # sim, the masked copy and the softmax are each (B, H, Nq, Nk); autograd keeps them for backward
    need = 3 * layout.batch * layout.heads * layout.num_q * layout.num_kv * torch.finfo(dtype).bits // 8
    if need > DENSE_LIMIT_BYTES:
        raise Unavailable(f"(B, H, Nq, Nk) intermediates need {need / 2**30:.1f} GiB > ZORRO_BENCH_DENSE_GIB")
    safe, dead = _dense_mask(layout, device)
    scale = layout.head_dim**-0.5

    def fn(q, k, v):
        sim = torch.einsum("bhid,bhjd->bhij", q * scale, k)
        sim = sim.masked_fill(~safe, -torch.finfo(sim.dtype).max)
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
        return _zero_dead(out, dead)

    return fn


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer(IDEAL, "SDPA without a mask; x attended fraction = the ideal", _sdpa_nomask),
        Peer(MASKED, "SDPA with the dense bool mask", _sdpa_masked),
        *[
            Peer(f"zorro-{name}", f"zorro_attention, backend={name!r}", _zorro(name))
            for name in [
                *sorted(n for n in BACKENDS if n != "reference"),
                *(["triton"] if "triton" not in BACKENDS else []),
            ]
        ],
        Peer("zorro-auto", "zorro_attention, backend='auto'", _zorro_auto),
        Peer("flex", "torch.compile(flex_attention) + create_block_mask", _flex),
        Peer("xformers", "xformers memory_efficient_attention + materialized bias", _xformers),
        Peer("einsum", "einsum + masked_fill + softmax (lucidrains/zorro-pytorch)", _einsum),
    ]
}


def peer_names() -> list[str]:
    return list(PEERS)
