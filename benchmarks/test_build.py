"""Mask metadata build time: zorro's tile map and segment plan vs FlexAttention's ``create_block_mask``.

Every call starts from a fresh layout (no cached metadata), as a new batch of lengths would. Tiles are 128 x 128,
FlexAttention's default block size, and the two maps are checked to mark the same tiles as visited before timing.
"""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from benchmarks.conftest import RESULTS
from benchmarks.layouts import ragged, scaling
from benchmarks.peers import flex_block_mask
from zorro_kernels.backends.segments import build_plan
from zorro_kernels.tilemap import EMPTY, build_tile_map

BLOCK = 128
BUILDERS = ("zorro-tile_map", "zorro-segment_plan", "flex-create_block_mask")


def _layouts(tier: str):
    if tier == "smoke":
        return [ragged(32, 196, 4, batch=2, heads=2, head_dim=32), scaling(512)]
    return [ragged(), scaling(4096), scaling(16384)]


def pytest_generate_tests(metafunc):
    if "build_case" in metafunc.fixturenames:
        cases = [(lay, b) for lay in _layouts(metafunc.config.getoption("--bench-tier")) for b in BUILDERS]
        metafunc.parametrize("build_case", cases, ids=[f"{lay.name}-{b}" for lay, b in cases])


def _fresh(mask):
    return mask.with_lengths(mask.lengths, None if mask.is_self else mask.kv_lengths)


def test_build(benchmark, build_case, tier, device):
    layout, builder = build_case
    mask = layout.mask
    if builder == "flex-create_block_mask":
        try:
            from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
        except ImportError as e:
            pytest.skip(f"torch {torch.__version__} has no FlexAttention ({e})")
        # the block mask must visit exactly the tiles the tile map does not mark empty
        visited = flex_block_mask(layout, device).to_dense().bool().cpu()[:, 0]  # (B|1, Tq, Tk)
        ours = build_tile_map(mask, BLOCK, BLOCK).kinds != EMPTY  # (B|1, Tq, Tk)
        assert torch.equal(visited.expand_as(ours) if visited.shape[0] == 1 else visited, ours), (
            f"{layout.name}: create_block_mask and the tile map disagree on {int((visited != ours).sum())} tiles"
        )

        def build():
            return flex_block_mask(dataclasses.replace(layout, mask=_fresh(mask)), device)
    elif builder == "zorro-tile_map":

        def build():
            tm = build_tile_map(_fresh(mask), BLOCK, BLOCK)
            return tm if device.type == "cpu" else tm.to(device)
    else:

        def build():
            return build_plan(_fresh(mask))

    build()
    rounds = {"smoke": 3}.get(tier, 5 if layout.num_q <= 4096 else 3)
    benchmark.group = f"build {layout.name}"
    benchmark.pedantic(build, rounds=rounds, warmup_rounds=1, iterations=1)
    info = dict(
        kind="build",
        layout=layout.name,
        shape=f"B={layout.mask.batch_size or 1} N={layout.num_q}, {BLOCK}x{BLOCK} tiles",
        peer=builder,
        direction="build",
        family=layout.family,
        median_s=statistics.median(benchmark.stats.stats.data),
        rounds=rounds,
    )
    benchmark.extra_info.update(info)
    RESULTS[(layout.name, "build", builder)] = info
