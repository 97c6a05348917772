"""Compile every Triton kernel configuration for a GPU architecture on a machine without a GPU.

Real Triton compilation rejects things its CPU interpreter accepts (dot shapes, dtype mixing, shared memory), so this
runs the backend's launch path with a stand-in driver that reports a CUDA target: each kernel is compiled to a cubin
with the same specialisation a real launch would get (``warmup``, no launch) for every (dtype, head dim, variant) the
block-size table serves, with every autotune candidate and the fallback table. It prints one line per compiled
variant with its shared memory and, from the cubin (Triton's bundled ``cuobjdump``), what the kernel became: registers
per thread, stack (spills), warpgroup MMAs (``HGMMA``) vs ``mma.sync`` (``HMMA``), 16-byte ``cp.async`` tile loads
(``LDGSTS...128``) and scalar 16-bit loads (``LDG.E.U16``, the sign of loads Triton could not vectorise), and from the
TTGIR the deepest multi-buffered shared-memory ring (``bufs``: the software pipeliner's stages in flight). It fails if
any variant does not compile or needs more shared memory than the card has.

    python benchmarks/triton_compile_check.py            # sm_90 (H100/H200), 228 KiB shared memory
    python benchmarks/triton_compile_check.py --arch 80  # sm_80 (A100), 164 KiB
    python benchmarks/triton_compile_check.py --quick    # fp16 + bf16 at D = 64, 128 only
    python benchmarks/triton_compile_check.py --sweep 50 # count real compilations over 50 random layouts
    python benchmarks/triton_compile_check.py --reference --dims 64 --dtypes float16 --no-fallback
                                                         # also a dense tutorial-style forward with the same tiles
    python benchmarks/triton_compile_check.py --dims 64 --dtypes float16 --no-fallback --variants plain \
        --kernels dkdv --dkdv 64x128:8:2,8:3             # one kernel, tiles other than the table's
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from zorro_kernels import RelativePositionBias, ZorroMask  # noqa: E402
from zorro_kernels.backends.triton import _bwd, _config, _fwd, _launch, backend  # noqa: E402
from zorro_kernels.testing import random_layout  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


class _StandInDriver:
    """Just enough of a Triton driver for ``JITFunction.warmup`` to compile for ``target`` without a device."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise AttributeError(f"the stand-in driver has no {name!r} (this script only compiles)")


def _cuobjdump() -> str:
    """Triton's bundled cuobjdump (it matches the ptxas that built the cubin), else one on PATH ('' if none)."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else (shutil.which("cuobjdump") or "")


_SASS_COUNTS = (
    ("hgmma", r"\bHGMMA"),
    ("hmma", r"\bHMMA"),
    ("cp.async16", r"LDGSTS[.A-Z]*\.128"),
    ("ld.u16", r"LDG\.E\.U16"),
)


# per SM: registers, shared memory, resident warps and blocks (sm_80 / sm_90; the driver reserves 1 KiB per block)
SM_LIMITS = {
    90: (65536, 233472, 64, 32),
    80: (65536, 167936, 64, 32),
    89: (65536, 102400, 48, 24),
    86: (65536, 102400, 48, 16),
}


def blocks_per_sm(regs: int, warps: int, shared: int, arch: int = 90) -> int:
    """Resident blocks per SM for a kernel's registers per thread, warps and shared memory per block (the occupancy
    calculator's arithmetic: registers are allocated per warp in units of 256)."""
    reg_file, smem, max_warps, max_blocks = SM_LIMITS.get(arch, SM_LIMITS[90])
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = reg_file // (per_warp * warps)
    by_smem = smem // (shared + 1024) if shared else max_blocks
    return int(min(by_regs, by_smem, max_warps // warps, max_blocks))


def asm_summary(kernel) -> str:
    """What a compiled kernel became: registers, stack, MMA kind, load kinds, pipeline depth (see the docstring)."""
    ttgir = kernel.asm.get("ttgir", "")
    bufs = max([int(n) for n in re.findall(r"memdesc<(\d+)x\d+x\d+x(?:bf|f)", ttgir)] or [1])
    parts = [f"bufs={bufs}"]
    tool = _cuobjdump()
    if tool and "cubin" in kernel.asm:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        usage = re.search(r"REG:(\d+) STACK:(\d+)", res)
        if usage:
            parts[:0] = [f"regs={usage.group(1)}", f"stack={usage.group(2)}"]
        counts = {name: len(re.findall(pattern, sass)) for name, pattern in _SASS_COUNTS}
        parts += [f"{name}={n}" for name, n in counts.items()]
    return " ".join(parts)


def _override_table(args) -> None:
    """``--fwd/--dkdv/--dq/--ranges BMxBN:W:S[,W:S...]``: compile those tiles and launch settings in place of the
    table's, for every dtype and head dim asked for (to see what a candidate table entry compiles to)."""
    specs = {f: getattr(args, f) for f in ("fwd", "dkdv", "dq", "ranges") if getattr(args, f)}
    if not specs:
        return
    configs = {}
    for field, spec in specs.items():
        tiles, *launches = spec.split(":", 1)[0], *spec.split(":", 1)[1:]
        bm, bn = (int(x) for x in tiles.split("x"))
        pairs = [tuple(int(x) for x in ws.split(":")) for ws in (launches[0] if launches else "4:2").split(",")]
        configs[field] = _config.KernelConfig(bm, bn, *pairs[0], tuple(pairs[1:]))
    choose = _config._choose

    _config._choose = lambda head_dim, dtype: choose(head_dim, dtype)._replace(**configs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dims", default=None, help="comma-separated head dims (default 16,64,80,128,256)")
    ap.add_argument("--dtypes", default=None, help="comma-separated: float16,bfloat16,float32")
    ap.add_argument("--no-fallback", action="store_true", help="skip the fallback table")
    ap.add_argument("--sweep", type=int, default=0, help="count compilations over this many random layouts instead")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also compile a dense tutorial-style forward with the table's forward tiles, for comparison",
    )
    ap.add_argument("--variants", default=None, help="comma-separated subset of plain,causal,window,dense-bias,...")
    ap.add_argument("--kernels", default=None, help="comma-separated substrings of the kernel names to compile")
    for field in ("fwd", "dkdv", "dq", "ranges"):
        ap.add_argument(
            f"--{field}",
            default=None,
            metavar="BMxBN:W:S[,W:S...]",
            help=f"the {field} kernel's tiles, warps and stages instead of the table's (first W:S, then candidates)",
        )
    args = ap.parse_args()
    _override_table(args)
    driver.set_active(_StandInDriver(GPUTarget("cuda", args.arch, 32)))
    if args.sweep:
        return sweep(args.sweep)
    limit = SHARED_LIMIT.get(args.arch, 101376)
    results = []
    tuning = []  # autotune candidates that break the rule (spill, or fewer than 2 blocks/SM)

    def warm(kernel, grid, kargs, constexprs, cfg, bucket=(), restore=()):
        cands = dict.fromkeys(((cfg.num_warps, cfg.num_stages),) + tuple(cfg.alternatives))
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        if args.kernels and not any(x in name for x in args.kernels.split(",")):
            return
        for i, (warps, stages) in enumerate(cands):
            mode = "one-pass" if constexprs.get("ONE_PASS") else ""
            tag = (
                f"{name:16s} {ctx['dtype']:9s} {mode:8s} D={constexprs.get('HEAD_DIM')!s:4s} "
                f"{ctx['variant']:13s} "
                f"{ctx['table']:8s} blocks={cfg.block_m}x{cfg.block_n} warps={warps} stages={stages}"
            )
            t0 = time.time()
            try:
                k = kernel.warmup(grid=grid, **kargs, **constexprs, num_warps=warps, num_stages=stages)
                shared = k.metadata.shared
                ok = shared <= limit
                summary = asm_summary(k)
                regs = re.search(r"regs=(\d+)", summary)
                occ = blocks_per_sm(int(regs.group(1)), warps, shared, args.arch) if regs else None
                occupancy = f"blocks/SM={occ} " if regs else ""
                stack = re.search(r"stack=(\d+)", summary)
                # the autotune rule: a candidate beyond the table's first config neither spills nor runs fewer than
                # 2 blocks per SM (a tuner that times such configs spends the card's minutes on losers)
                rule = i > 0 and occ is not None and (occ < 2 or (stack is not None and int(stack.group(1)) > 0))
                if rule:
                    tuning.append(tag)
                results.append(
                    (
                        ok,
                        f"{'ok ' if ok else 'BIG'} {tag} shared={shared} {summary} {occupancy}"
                        f"({time.time() - t0:.1f}s)" + (" TUNE-RULE" if rule else ""),
                    )
                )
            except Exception as err:  # noqa: BLE001 - report every failure, keep going
                results.append((False, f"ERR {tag}: {type(err).__name__}: {str(err)[:400]}"))
            print(results[-1][1], flush=True)

    _launch.launch = warm
    _fwd.launch = warm
    _bwd.launch = warm

    dtypes = [torch.float16, torch.bfloat16] + ([] if args.quick else [torch.float32])
    if args.dtypes:
        dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    dims = [64, 128] if args.quick else [16, 64, 80, 128, 256]
    if args.dims:
        dims = [int(x) for x in args.dims.split(",")]
    ctx = {}
    tables = [("table", None)] + ([] if args.quick or args.no_fallback else [("fallback", True)])
    # at D = 64 also the causal band, a sliding window and the two score-bias kinds (each a constexpr variant)
    extras = ["causal", "window", "dense-bias", "relative-bias"]
    cases = [
        (dtype, d, variant)
        for dtype in dtypes
        for d in dims
        for variant in (["plain"] + extras if d == 64 else ["plain"])
        if not args.variants or variant in args.variants.split(",")
    ]
    # the count up front: the full set runs for minutes, each case compiling its forward and backward kernels with
    # every autotune candidate
    print(
        f"{len(cases) * len(tables)} cases to compile for sm_{args.arch} ({len(dtypes)} dtype(s) x head dims "
        f"{','.join(map(str, dims))}, {', '.join(extras)} at D=64, tables: {', '.join(t for t, _ in tables)}); "
        f"each compiles "
        f"several kernel variants, a few seconds each" + ("" if args.quick else "; --quick for a short subset"),
        flush=True,
    )
    done = 0
    for dtype, d, variant in cases:
        mask = ZorroMask.from_segments(
            [("a", 40), ("b", 70)],
            {"a": ["a"], "b": "*"},
            causal=variant == "causal",
            window=(16, 16) if variant == "window" else None,
        )
        q = torch.randn(2, 4, 110, d).to(dtype)
        k = torch.randn(2, 2, 110, d).to(dtype)
        bias = None
        if variant == "dense-bias":
            bias = torch.randn(1, 4, 110, 110).to(dtype)
        elif variant == "relative-bias":
            pos = torch.arange(110)[:, None] % 40  # 1-D positions, offsets within 40
            bias = RelativePositionBias(torch.randn(4, 79).to(dtype), pos, pos, (40,))
        kw = {} if bias is None else {"bias": bias}
        for table, fallback in tables:
            done += 1
            print(
                f"-- case {done}/{len(cases) * len(tables)}: {str(dtype).replace('torch.', '')} D={d} "
                f"{variant} {table}",
                flush=True,
            )
            ctx.update(dtype=str(dtype).replace("torch.", ""), variant=variant, table=table)
            key = (_config.padded_head_dim(d), dtype)
            if fallback:
                _config._fallen_back.add(key)
                _config._chosen.clear()
            try:
                for kind in ("ranges", "tiles"):  # the forward over either plan
                    with _config.override_plan(kind):
                        out, lse = backend.forward(q, k, k, mask, d**-0.5, **kw)
                for det in (False, True):  # one-pass and deterministic backward
                    torch.use_deterministic_algorithms(det, warn_only=True)
                    backend.backward(out, q, k, k, out, lse, mask, d**-0.5, **kw)
                torch.use_deterministic_algorithms(False)
                if args.reference and table == "table" and variant == "plain":
                    warm(*_reference_launch(q, _config.choose_blocks(d, dtype).fwd))
            finally:
                _config._fallen_back.discard(key)
                _config._chosen.clear()
    bad = [line for ok, line in results if not ok]
    print(
        f"\n{len(results) - len(bad)} / {len(results)} kernel variants compiled for sm_{args.arch} within "
        f"{limit} bytes of shared memory"
    )
    for line in bad:
        print("FAILED:", line)
    for tag in tuning:
        print("TUNE-RULE (an autotune candidate that spills or runs < 2 blocks/SM):", tag)
    return 1 if bad or tuning else 0


@triton.jit
def _dense_reference_fwd(
    Q, K, V, O, stride_h, stride_n, N, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """What "good" looks like on this compiler: the fused-attention tutorial's forward loop (dense, no mask, every kv
    tile in order, pointer increments), for comparison with the block-sparse kernels' compiled form."""
    m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * stride_h
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * stride_n + offs_d[None, :])
    k_ptrs = K + base + offs_n[:, None] * stride_n + offs_d[None, :]
    v_ptrs = V + base + offs_n[:, None] * stride_n + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for _ in range(0, N, BLOCK_N):
        s = tl.dot(q, tl.trans(tl.load(k_ptrs))) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * stride_n
        v_ptrs += BLOCK_N * stride_n
    tl.store(O + base + offs_m[:, None] * stride_n + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def _reference_launch(q, cfg):
    """Arguments of ``warm`` for the dense reference at q's shape (head dim padded as the kernels pad it)."""
    d = _config.padded_head_dim(q.shape[-1])
    x = torch.empty(2, 4, 1024, d, dtype=q.dtype)
    return (
        _dense_reference_fwd,
        (1024 // cfg.block_m, 8),
        dict(Q=x, K=x, V=x, O=x, stride_h=x.stride(1), stride_n=x.stride(2), N=1024, qk_scale=0.1),
        dict(HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
        cfg,
    )


def sweep(n_layouts: int) -> int:
    """fwd + bwd launches (compiled, not run) over random layouts: 2-6 segments, sizes, rules, lengths, N all vary."""
    kernels = {
        "fwd_ranges": _fwd._attn_fwd_ranges,
        "fwd": _fwd._attn_fwd,
        "preprocess": _bwd._bwd_preprocess,
        "dkdv": _bwd._attn_bwd_dkdv,
        "dq": _bwd._attn_bwd_dq,
    }

    def warm(kernel, grid, kargs, constexprs, cfg, bucket=(), restore=()):
        kernel.warmup(grid=grid, **kargs, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _fwd.launch = warm
    _bwd.launch = warm

    def compiled():
        return {name: sum(len(c[0]) for c in k.device_caches.values()) for name, k in kernels.items()}

    gen = torch.Generator().manual_seed(0)
    first = None
    t0 = time.time()
    for i in range(n_layouts):
        mask = random_layout(gen, 400, lengths=i % 2 == 1)
        q, k, v = (torch.randn(2, 4, mask.num_q, 64).half() for _ in range(3))
        out, lse = backend.forward(q, k, v, mask, 0.125)
        backend.backward(out, q, k, v, out, lse, mask, 0.125)
        if i == 0:
            first = compiled()
    last = compiled()
    print(
        f"compilations over {n_layouts} layouts (fp16, D=64, sm target, autotune off): after the first layout "
        f"{first}, after all {last}; new after the first: {sum(last.values()) - sum(first.values())} "
        f"({time.time() - t0:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
