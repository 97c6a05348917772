"""How close to issue 20's CPU ideal the Gemma-3-like row can get: the bounds, measured (CPU, one thread).

    python -m benchmarks.gemma3_bounds                     # every section, fp32 (about 5 minutes)
    python -m benchmarks.gemma3_bounds kernels matmul --dtype bfloat16 --rounds 5

Layout as ``benchmarks.paired_gemma3`` (B=2, H=8, N=2048, D=64, 53.1% of the pairs attended); ideal = one unmasked
SDPA call at the same shape and dtype x the attended fraction. Every figure is the minimum CPU time
(``time.process_time``) over the rounds after a warm-up, its calls alternating round by round with the unmasked SDPA
call it is divided by, in an order that flips each round.

- ``kernels``: the segment plan's ATen flash calls alone, no zorro code around them (no gathers, no log-sum-exp merge,
  no finite checks): per step one plain call (the step's rows x its prefix keys) and one causal call (the text run's
  square), forward and backward. The ratio the segment path could reach with zero overhead of its own, and each call
  kind's efficiency (ideal time of its pairs / its time).
- ``matmul``: exact attention by row blocks of GEMMs, each row block's key range only (``q_blk @ k[:end]^T``, the mask
  written on the region it cuts, ``softmax``, ``P @ V``; backward recomputes P per block and takes dS from
  ``_softmax_backward_data``), checked against an fp64 dense reference first: the chunked-matmul strategy's ratio,
  and beside the forward its two GEMMs per block alone (no mask, no softmax): the floor of that strategy.
- ``squares``: the plan's causal squares (the text runs, 20-500 tokens) by ``matmul``'s row blocks of 32 and 64
  against one causal flash call each, forward and forward+backward: the diagonal alone by GEMMs.
- ``flex``: FlexAttention compiled for CPU (inductor's C++ template, the layout as a ``mask_mod`` and its block
  mask), forward only (torch has no FlexAttention backward on CPU).
- ``rows``: ATen's flash efficiency per pair against the query count of a plain call (its row block is 32 below 192
  rows, 64 below 768, 256 from 768), relative to the N=2048 unmasked call.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import zorro_kernels
from benchmarks.paired_gemma3 import TEXT, gemma3_mask
from zorro_kernels.backends.segments import build_plan

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
B, H, D = 2, 8, 64


def paired(fns: dict, rounds: int) -> dict:
    """Minimum CPU seconds per name, the calls alternating round by round (order flipped each round)."""
    for f in fns.values():
        f()  # warm-up
    times: dict = {n: [] for n in fns}
    for r in range(rounds):
        for n, f in list(fns.items())[:: 1 if r % 2 else -1]:
            t = time.process_time()
            f()
            times[n].append(time.process_time() - t)
    return {n: min(x) for n, x in times.items()}


def tensors(n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g).to(dtype) for _ in range(4))


def plan_calls(mask) -> list[tuple[int, int, int, int, int]]:
    """``(sample, first row, rows, keys, prefix)`` per causal step of the plan (every step of this layout is one)."""
    calls = []
    for pat in build_plan(mask).patterns:
        for st in pat.steps:
            assert st.causal and len(st.q_ranges) == len(st.k_ranges) == 1, "not the layout this bound is for"
            (r0, r1), (k0, k1) = st.q_ranges[0], st.k_ranges[0]
            assert k0 == 0
            calls += [(int(b), r0, r1 - r0, k1, st.prefix) for b in pat.batch.tolist()]
    return calls


def section_kernels(mask, dtype, rounds: int) -> None:
    q, k, v, g = tensors(mask.num_q, dtype)
    out, lse = _FWD(q, k, v)
    plain, causal = [], []  # (closure args, pairs)
    for b, r0, n, keys, pre in plan_calls(mask):
        sl = (slice(b, b + 1), slice(None))
        if pre:
            qq, kk, vv = q[sl + (slice(r0, r0 + n),)], k[sl + (slice(0, pre),)], v[sl + (slice(0, pre),)]
            plain.append(((qq, kk, vv, *_FWD(qq, kk, vv), g[sl + (slice(r0, r0 + n),)], False), n * pre))
        s = keys - pre
        qq, kk, vv = q[sl + (slice(r0 + n - s, r0 + n),)], k[sl + (slice(pre, keys),)], v[sl + (slice(pre, keys),)]
        causal.append(
            (
                (qq, kk, vv, *_FWD(qq, kk, vv, is_causal=True), g[sl + (slice(r0 + n - s, r0 + n),)], True),
                s * (s + 1) / 2,
            )
        )

    def run(calls, backward):
        def f():
            for (qq, kk, vv, o, l, gg, c), _ in calls:
                if backward:
                    _BWD(gg, qq, kk, vv, o, l, 0.0, c)
                else:
                    _FWD(qq, kk, vv, is_causal=c)

        return f

    for backward in (False, True):
        best = paired(
            {
                "plain": run(plain, backward),
                "causal": run(causal, backward),
                "unmasked": (lambda: _BWD(g, q, k, v, out, lse, 0.0, False)) if backward else (lambda: _FWD(q, k, v)),
            },
            rounds,
        )
        per_pair = best["unmasked"] / (B * mask.num_q * mask.num_kv)
        eff = {n: sum(p for _, p in c) * per_pair / best[n] for n, c in (("plain", plain), ("causal", causal))}
        total = best["plain"] + best["causal"]
        ideal = best["unmasked"] * mask.attended_fraction()
        print(
            f"kernels {'bwd' if backward else 'fwd'}: plain calls {best['plain'] * 1e3:.1f} ms (efficiency "
            f"{eff['plain']:.2f}) + causal squares {best['causal'] * 1e3:.1f} ms ({eff['causal']:.2f}) = "
            f"{total * 1e3:.1f} ms | ideal {ideal * 1e3:.1f} ms (unmasked {best['unmasked'] * 1e3:.1f} ms x "
            f"{mask.attended_fraction():.3f}) | flash calls alone: {ideal / total:.3f} of ideal",
            flush=True,
        )


class _Blocks(torch.autograd.Function):
    """Exact attention of ``(B, H, N, D)`` inputs by row blocks; ``blocks[b]`` lists ``(r0, r1, c0, c1, hide)``:
    rows ``r0:r1`` of sample ``b`` see keys ``0:c1`` but those ``hide`` (bool ``(r1 - r0, c1 - c0)``) marks among
    ``c0:c1``. Nothing is saved but the inputs: the backward recomputes each block's softmax."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, scale):
        out = torch.empty_like(q)
        qs = q * scale
        for b, rows in enumerate(blocks):
            for r0, r1, c0, c1, hide in rows:
                s = torch.matmul(qs[b, :, r0:r1], k[b, :, :c1].transpose(-1, -2))
                s[..., c0:c1].masked_fill_(hide, float("-inf"))
                torch.matmul(torch.softmax(s, -1), v[b, :, :c1], out=out[b, :, r0:r1])
        ctx.save_for_backward(q, k, v)
        ctx.blocks, ctx.scale = blocks, scale
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v = ctx.saved_tensors
        qs = q * ctx.scale
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, rows in enumerate(ctx.blocks):
            for r0, r1, c0, c1, hide in rows:
                kb, vb, gb = k[b, :, :c1], v[b, :, :c1], go[b, :, r0:r1]
                s = torch.matmul(qs[b, :, r0:r1], kb.transpose(-1, -2))
                s[..., c0:c1].masked_fill_(hide, float("-inf"))
                p = torch.softmax(s, -1)
                dv[b, :, :c1].baddbmm_(p.transpose(-1, -2), gb)
                ds = torch._softmax_backward_data(torch.matmul(gb, vb.transpose(-1, -2)), p, -1, p.dtype)
                torch.matmul(ds, kb, out=dq[b, :, r0:r1])
                dk[b, :, :c1].baddbmm_(ds.transpose(-1, -2), qs[b, :, r0:r1])
        return dq.mul_(ctx.scale), dk, dv, None, None


def row_blocks(dense: torch.Tensor, size: int) -> list:
    """``_Blocks``'s blocks for a dense ``(B, N, N)`` mask whose rows each see a key prefix (this layout)."""
    lim = dense.sum(-1)  # (B, N): row r sees keys 0 .. lim - 1
    assert torch.equal(dense, torch.arange(dense.shape[-1]) < lim[..., None]), "rows must see key prefixes"
    out = []
    for b in range(dense.shape[0]):
        rows = []
        for r0 in range(0, dense.shape[1], size):
            r1 = min(r0 + size, dense.shape[1])
            c0, c1 = int(lim[b, r0:r1].min()), int(lim[b, r0:r1].max())
            rows.append((r0, r1, c0, c1, ~dense[b, r0:r1, c0:c1]))
        out.append(rows)
    return out


def section_matmul(mask, dtype, rounds: int) -> None:
    q, k, v, g = tensors(mask.num_q, dtype)
    dense = mask.to_dense()
    scale = D**-0.5
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, attn_mask=dense[:, None])
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    for size in (64, 128, 256):
        blocks = row_blocks(dense, size)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _Blocks.apply(*leaves, blocks, scale)
        grads = torch.autograd.grad(out, leaves, g)
        err = max((a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))
        assert err < (1e-4 if dtype == torch.float32 else 0.1), f"row blocks of {size}: max error {err}"
        for backward in (False, True):

            def call(fn):
                if not backward:
                    with torch.no_grad():
                        return fn(q, k, v)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                torch.autograd.grad(fn(*leaves), leaves, g)

            fns = {
                "matmul": lambda: call(lambda q, k, v: _Blocks.apply(q, k, v, blocks, scale)),
                "unmasked": lambda: call(F.scaled_dot_product_attention),
            }
            if not backward:  # the forward's two GEMMs per block alone: the floor of this strategy
                fns["gemms"] = lambda: [
                    torch.matmul(torch.matmul(q[b, :, r0:r1], k[b, :, :c1].transpose(-1, -2)), v[b, :, :c1])
                    for b, rows in enumerate(blocks)
                    for r0, r1, _, c1, _ in rows
                ]
            best = paired(fns, rounds)
            ideal = best["unmasked"] * mask.attended_fraction()
            gemms = (
                f", its GEMMs alone {best['gemms'] * 1e3:.1f} ms ({ideal / best['gemms']:.3f})" if not backward else ""
            )
            print(
                f"matmul {'fwd+bwd' if backward else 'fwd':7s} row blocks of {size:3d}: {best['matmul'] * 1e3:.1f} ms "
                f"| ideal {ideal * 1e3:.1f} ms | {ideal / best['matmul']:.3f} of ideal{gemms} (max error {err:.1e})",
                flush=True,
            )


def section_squares(dtype, rounds: int) -> None:
    sizes = [n for t in TEXT for n in t]
    scale = D**-0.5
    for backward in (False, True):

        def call(fn, q, k, v, g):
            if not backward:
                with torch.no_grad():
                    return fn(q, k, v)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            torch.autograd.grad(fn(*leaves), leaves, g)

        total: dict = {}
        for n in sizes:
            q, k, v, g = tensors(n, dtype)
            dense = torch.ones(n, n, dtype=torch.bool).tril().expand(B, n, n)
            fns = {
                f"rows of {size}": (lambda bl: lambda: call(lambda *x: _Blocks.apply(*x, bl, scale), q, k, v, g))(
                    row_blocks(dense, size)
                )
                for size in (32, 64)
            }
            fns["flash causal"] = lambda: call(
                lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), q, k, v, g
            )
            for name, t in paired(fns, rounds).items():
                total[name] = total.get(name, 0.0) + t
        print(
            f"squares {'fwd+bwd' if backward else 'fwd':7s} ({len(sizes)} squares of {min(sizes)}-{max(sizes)}): "
            + " | ".join(f"{name} {t * 1e3:.1f} ms" for name, t in total.items()),
            flush=True,
        )


def section_flex(mask, dtype, rounds: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, _ = tensors(mask.num_q, dtype)
    lim = mask.to_dense().sum(-1)  # (B, N): row r sees keys 0 .. lim - 1

    def mask_mod(b, h, row, col):
        return col < lim[b, row]

    block = create_block_mask(mask_mod, B, None, mask.num_q, mask.num_kv, device="cpu")
    flex = torch.compile(flex_attention)
    with torch.no_grad():
        err = flex(q, k, v, block_mask=block) - F.scaled_dot_product_attention(q, k, v, attn_mask=lim_mask(lim))
        best = paired(
            {
                "flex": lambda: flex(q, k, v, block_mask=block),
                "unmasked": lambda: F.scaled_dot_product_attention(q, k, v),
            },
            rounds,
        )
    ideal = best["unmasked"] * mask.attended_fraction()
    print(
        f"flex fwd: {best['flex'] * 1e3:.1f} ms | ideal {ideal * 1e3:.1f} ms | {ideal / best['flex']:.3f} of ideal "
        f"(max error {err.abs().max().item():.1e}, block mask sparsity {block.sparsity():.1f}%)",
        flush=True,
    )


def lim_mask(lim: torch.Tensor) -> torch.Tensor:
    """The ``(B, 1, N, N)`` bool mask of rows that see key prefixes ``0 .. lim - 1``."""
    return (torch.arange(lim.shape[-1]) < lim[..., None])[:, None]


def section_rows(dtype, rounds: int) -> None:
    q, k, v, _ = tensors(2048, dtype)
    for rows in (128, 191, 192, 296, 512, 756, 767, 768, 1024):
        effs = []
        for keys in (356, 912, 1368, 2048):
            qq, kk, vv = q[:, :, :rows], k[:, :, :keys], v[:, :, :keys]
            best = paired({"call": lambda: _FWD(qq, kk, vv), "unmasked": lambda: _FWD(q, k, v)}, rounds)
            effs.append(f"{keys} keys {best['unmasked'] * rows * keys / 2048**2 / best['call']:.2f}")
        print(f"rows {rows:4d}: " + " | ".join(effs), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sections", nargs="*", choices=["kernels", "matmul", "squares", "flex", "rows"], default=[])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    mask = gemma3_mask(zorro_kernels)
    for name in args.sections or ["kernels", "matmul", "squares", "flex", "rows"]:
        if name in ("rows", "squares"):
            {"rows": section_rows, "squares": section_squares}[name](dtype, args.rounds)
        else:
            {"kernels": section_kernels, "matmul": section_matmul, "flex": section_flex}[name](mask, dtype, args.rounds)


if __name__ == "__main__":
    main()
