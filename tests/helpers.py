"""Shared test helpers (not a test module; the library's own test kit is zorro_kernels.testing): a tiny model
configuration, a writer of real mp4 clips, switches for the Triton backend's tests (whether it runs here, small tiles,
its deterministic backward), the Triton kernel cases, bias and window layouts shared by the bias, window and Triton
files, and the exact tile-map check."""

import contextlib
import importlib.util
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.testing import random_mask
from zorro_kernels.tilemap import EMPTY, FULL, PARTIAL, build_tile_map

ROOT = Path(__file__).resolve().parents[1]

# A model small enough for CPU tests: 2 frames of 16x16 (8 video tokens), 16x16 spectrogram (4 audio tokens).
TINY = [
    "model.kwargs={img_size: 16, num_frames: 2, video_patch: 8, n_mels: 16, audio_frames: 16, audio_patch: 8, "
    "embed_dim: 32, depth: 1, num_heads: 2, num_fusion: 2}",
    "data.audio.hop_length=500",
    "data.train_size=48",
    "train.batch_size=8",
    "train.progress=false",
    "train.plot=false",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "train.proj_dim=16",
    "probe.train_size=32",
    "probe.test_size=32",
    "data.num_workers=0",
]

# The same inputs for every family, with each family's own settings in model.kwargs (TINY's last entries, which
# follow its model.kwargs, still apply). Swin: a 4x4 audio grid and a 2x4x4 video grid in 2x2 (1x2x2) windows, two
# stages; HiP: two levels of 2 -> 1 groups per modality.
_INPUTS = "img_size: 16, num_frames: 2, n_mels: 16, audio_frames: 16"
TINY_FAMILY = {
    "vit": TINY,
    "swin": [
        "model.name=zorro_swin_tiny",
        f"model.kwargs={{{_INPUTS}, video_patch: [1, 4, 4], audio_patch: 4, base_dim: 16, depths: [2, 2], "
        "num_heads: [2, 4], audio_window: 2, video_window: [1, 2, 2], num_fusion: 2}",
        *TINY[1:],
    ],
    "hip": [
        "model.name=zorro_hip_tiny",
        f"model.kwargs={{{_INPUTS}, video_patch: 8, audio_patch: 8, audio_groups: [2, 1], video_groups: [2, 1], "
        "latents: [4, 4], dims: [32, 64], depths: [1, 1], num_heads: [2, 4], num_fusion: 2}",
        *TINY[1:],
    ],
}


def write_clip(path, *, frames=10, fps=10, size=(48, 40), tone_hz=440.0, sample_rate=16000, seconds=1.0, audio=True):
    """A real mp4: H.264 video whose frame i is a flat grey of level 20 * i, and (optionally) an AAC sine tone."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        streams = [vs]
        if audio:
            a = c.add_stream("aac", rate=sample_rate)
            a.layout = "mono"
            streams.append(a)
        for i in range(frames):
            img = np.full((size[1], size[0], 3), 20 * i, np.uint8)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        if audio:
            t = np.arange(int(sample_rate * seconds)) / sample_rate
            x = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            for s in range(0, len(x), 1024):
                frame = av.AudioFrame.from_ndarray(x[None, s : s + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, s
                for pkt in a.encode(frame):
                    c.mux(pkt)
        for s in streams:
            for pkt in s.encode(None):
                c.mux(pkt)
    return Path(path)


# ------------------------------------------------------------------------------------------------ Triton
def triton_unavailable(device: str = "cpu") -> list:
    """Why the Triton backend cannot run on ``device`` tensors here (empty if it can: a GPU, or CPU tensors under
    ``TRITON_INTERPRET=1``, which conftest sets when there is no GPU)."""
    from zorro_kernels.backends import BACKENDS

    probe = torch.zeros(1, 1, 1, 16, device=device)
    return BACKENDS["triton"].not_supported_reasons(probe, probe, probe, ZorroMask.packed([1]))


_OFF = triton_unavailable()
# "triton" as a backend parameter for tests on CPU tensors: skipped where the backend cannot take them
TRITON = pytest.param("triton", marks=pytest.mark.skipif(bool(_OFF), reason="; ".join(_OFF)))


@pytest.fixture
def small_triton_tiles():
    """16 x 16 Triton tiles for a test's whole run (forward and backward), so that small shapes still mix full,
    partial and empty tiles. Other backends ignore it."""
    from zorro_kernels.backends.triton._config import override_blocks

    with override_blocks((16, 16)):
        yield


@pytest.fixture(autouse=True)
def no_stale_fallbacks():
    """Autouse where imported: each test starts with zero integration fallbacks counted, so its own count is exact."""
    from zorro_kernels.integrations import reset_fallback_counts

    reset_fallback_counts()
    yield


@contextlib.contextmanager
def deterministic(on: bool = True):
    """``torch.use_deterministic_algorithms(on)`` for a block: on, the Triton backward runs its atomic-free kernels;
    off, the one-pass backward (atomic fp32 dQ)."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# ------------------------------------------------------------------------------------------------ Triton cases
def zorro_ragged(b=2):
    lengths = torch.tensor([[20, 30, 4], [7, 0, 3]])[:b]
    return ZorroMask.zorro(audio=20, video=30, fusion=4, lengths=lengths)


# (id, mask builder, (B, H, Hkv, D), blocks): odd lengths, cross-attention, GQA, causal, ragged lengths, empty
# segments, dead rows
TRITON_CASES = [
    ("zorro", lambda: ZorroMask.zorro(audio=20, video=30, fusion=5), (2, 2, 2, 16), (16, 16)),
    (
        "odd_1_3_97",
        lambda: ZorroMask.from_segments([("a", 1), ("b", 3), ("c", 93)], {"a": "*", "b": ["a", "b"], "c": ["c", "a"]}),
        (1, 1, 1, 16),
        (32, 32),
    ),
    (
        "cross_97x113",
        lambda: ZorroMask.from_segments(
            [("a", 40), ("b", 57)], {"a": ["x"], "b": "*"}, kv_segments=[("x", 13), ("y", 100)]
        ),
        (1, 1, 1, 16),
        (32, 32),
    ),
    (
        "one_query_x_113",
        lambda: ZorroMask.from_segments([("q", 1)], {"q": ["y"]}, kv_segments=[("x", 13), ("y", 100)]),
        (2, 2, 1, 16),
        (16, 32),
    ),
    ("ragged_empty", zorro_ragged, (2, 2, 1, 24), (16, 32)),
    ("gqa_causal", lambda: ZorroMask.packed([19, 26], causal=True), (1, 4, 2, 32), (16, 16)),
    (
        "dead_rows",
        lambda: ZorroMask.from_segments(
            [("a", 10), ("ghost", 12), ("b", 20), ("empty", 0)], {"a": ["a", "b"], "b": ["b"]}
        ),
        (1, 2, 2, 16),
        (16, 16),
    ),
]


def gpu(fn):
    """The CUDA tier: marked ``gpu`` and skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


# ------------------------------------------------------------------------------------------------ biases, windows
_INTERPRETED_BF16 = "bfloat16 arithmetic is wrong in Triton's CPU interpreter"


def skip_interpreted_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip(_INTERPRETED_BF16)


def attn_fn(backend):
    return lambda q, k, v, mask, scale=None, bias=None: zorro_attention(
        q, k, v, mask, bias=bias, scale=scale, backend=backend
    )


def qkv_for(mask, hkv=2, g=2, d=8, dtype=torch.float64, seed=0):
    """Seeded ``q (B, hkv * g, Nq, d)``, ``k, v (B, hkv, Nk, d)`` for ``mask`` (B = its batch size, else 2)."""
    gen = torch.Generator().manual_seed(seed)
    b = mask.batch_size or 2
    q = torch.randn(b, hkv * g, mask.num_q, d, generator=gen, dtype=dtype)
    k, v = (torch.randn(b, hkv, mask.num_kv, d, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


def dense_bias(mask, shape, *, b=2, h=4, dtype=torch.float32):
    """A random bias of ``shape`` ("BHQK" letters kept, others 1), aligned right as SDPA broadcasts."""
    full = {"B": mask.batch_size or b, "H": h, "Q": mask.num_q, "K": mask.num_kv}
    return torch.randn([full[c] if c in full else 1 for c in shape], dtype=dtype)


def windows_mask(grid=(4, 6), win=(2, 3), fusion=3, shift=(0, 0)):
    """Swin-like: a 2-D grid in windows (window order), each window a segment seeing itself; fusion sees all.
    Returns ``(mask, coords (N, 2) with -1 rows for fusion)``."""
    from zorro_models.models.swin import window_order, window_partition

    wins = window_partition(grid, win, shift)
    perm, sizes = window_order(grid, wins)
    yx = torch.cartesian_prod(torch.arange(grid[0]), torch.arange(grid[1]))[perm]
    coords = torch.cat([yx, torch.full((fusion, 2), -1)])
    segs = [(f"w/{i}", n) for i, n in enumerate(sizes)] + [("fusion", fusion)]
    return ZorroMask.from_segments(segs, {"w/*": "self", "fusion": "*"}), coords


def random_window_mask(rng: random.Random) -> ZorroMask:
    base = random_mask(rng, sizes=(0, 1, 2, 3, 5, 13, 17, 31))
    window = (rng.choice([-1, 0, 1, 3, 8]), rng.choice([-1, 0, 2, 5]))
    return ZorroMask(
        list(zip(base.q_names, base.q_sizes)),
        base.allow,
        kv_segments=None if base.is_self else list(zip(base.kv_names, base.kv_sizes)),
        lengths=base.lengths,
        kv_lengths=None if base.is_self else base.kv_lengths,
        causal=base.causal,
        window=window,
    )


# ------------------------------------------------------------------------------------------------ tile maps
def expected_kinds(mask: ZorroMask, bm: int, bn: int) -> torch.Tensor:
    """Classification straight from to_dense(): empty = no True, full = all True and wholly inside the matrix."""
    d = mask.to_dense()
    d = d[None] if d.ndim == 2 else d
    b, nq, nk = d.shape
    tq, tk = -(-nq // bm), -(-nk // bn)
    padded = torch.zeros(b, tq * bm, tk * bn, dtype=torch.bool)
    padded[:, :nq, :nk] = d
    inside = torch.zeros(tq * bm, tk * bn, dtype=torch.bool)
    inside[:nq, :nk] = True
    blocks = padded.view(b, tq, bm, tk, bn)
    any_ = blocks.any(4).any(2)
    all_ = blocks.all(4).all(2) & inside.view(tq, bm, tk, bn).all(3).all(1)
    kinds = torch.full((b, tq, tk), PARTIAL, dtype=torch.int8)
    kinds[all_] = FULL
    kinds[~any_] = EMPTY
    return kinds


def check_tile_map(mask: ZorroMask, bm: int, bn: int) -> None:
    tm = build_tile_map(mask, bm, bn)
    want = expected_kinds(mask, bm, bn)
    got = tm.kinds.expand_as(want)
    assert torch.equal(got, want), f"{mask!r}\ntiles {bm}x{bn}: got\n{got}\nwant\n{want}"
    # the work lists enumerate exactly the tiles of each kind, ascending; the transposed lists too
    for kind, num, idx, axis in (
        (FULL, tm.full_kv_num, tm.full_kv_idx, 2),
        (PARTIAL, tm.partial_kv_num, tm.partial_kv_idx, 2),
        (FULL, tm.full_q_num, tm.full_q_idx, 1),
        (PARTIAL, tm.partial_q_num, tm.partial_q_idx, 1),
    ):
        k = tm.kinds if axis == 2 else tm.kinds.transpose(1, 2)
        for b in range(k.shape[0]):
            for r in range(k.shape[1]):
                cols = (k[b, r] == kind).nonzero().flatten().tolist()
                assert num[b, r] == len(cols) and idx[b, r, : len(cols)].tolist() == cols
    # the expansion of the tile map (partial tiles by the element rule) is the dense mask
    meta = mask.token_meta()
    rows, cols = torch.arange(mask.num_q), torch.arange(mask.num_kv)
    elem = meta.element_mask(rows[None], cols[None])[:, 0]
    dense = mask.to_dense()
    assert torch.equal(elem.expand_as(dense[None] if dense.ndim == 2 else dense), dense.expand_as(elem))


def check_shell_command(cmd: str, monkeypatch) -> None:
    """A README/docs shell command parses as bash; every program, script, module and config it names exists; zorro
    commands parse as the CLI parses them, and their configs load with their settings."""
    import zorro_models.cli as cli
    from zorro_models.training.config import load_config

    assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0
    words_all = shlex.split(cmd, comments=True)
    parts = [[]]
    for w in words_all:
        if w == "&&":
            parts.append([])
        else:
            parts[-1].append(w)
    for words in parts:
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes
            words.pop(0)
        prog, args = words[0], words[1:]
        if prog == "bash":
            assert (ROOT / args[0]).is_file(), args[0]
        elif prog == ".venv/bin/python":
            if args[0] == "-m":
                assert importlib.util.find_spec(args[1]) is not None, args[1]
            else:
                assert (ROOT / args[0]).is_file(), args[0]
                if args[0].startswith("examples/") or args[0].startswith("benchmarks/"):
                    compile((ROOT / args[0]).read_text(), args[0], "exec")
        elif prog == ".venv/bin/zorro":
            seen = {}
            for name in cli.COMMANDS:
                monkeypatch.setitem(cli.COMMANDS, name, lambda a: seen.update(vars(a)) or 0)
            assert cli.main(args) == 0
            if seen.get("config"):
                load_config(ROOT / seen["config"], seen["overrides"])
        elif prog == ".venv/bin/torchrun":
            module = args[args.index("-m") + 1]
            assert importlib.util.find_spec(module) is not None
            rest = args[args.index("-m") + 2 :]
            config = ROOT / rest[rest.index("--config") + 1] if "--config" in rest else None
            load_config(config, [a for a in rest if "=" in a])
        else:
            pytest.fail(f"unknown program {prog!r} in {cmd!r}: add a check here")


def torchrun_train(overrides, timeout: float) -> subprocess.CompletedProcess:
    """Two ranks of ``python -m zorro_models.train`` under torchrun (``python -m torch.distributed.run``), from the
    repository root, with ``overrides`` as the command line's settings."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "zorro_models.train", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
