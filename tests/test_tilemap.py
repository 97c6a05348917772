"""Tile maps: exact against the dense oracle on many random layouts; work lists consistent with the classification."""

import random

import pytest
import torch

from zorro_kernels import ZorroMask
from zorro_kernels.testing import named_masks, random_mask
from zorro_kernels.tilemap import EMPTY, FULL

from .helpers import check_tile_map

TILES = [(1, 1), (2, 3), (4, 4), (16, 16), (8, 32), (64, 16), (128, 64)]


@pytest.mark.parametrize("name", sorted(named_masks()))
def test_named_layouts_exact(name):
    for bm, bn in TILES:
        check_tile_map(named_masks()[name], bm, bn)


def test_random_layouts_exact():
    rng = random.Random(1234)
    for _ in range(120):
        mask = random_mask(rng)
        for bm, bn in rng.sample(TILES, 3):
            check_tile_map(mask, bm, bn)


@pytest.mark.full
def test_random_layouts_exact_many():
    rng = random.Random(99)
    for _ in range(1500):
        mask = random_mask(rng, max_segments=8)
        for bm, bn in TILES:
            check_tile_map(mask, bm, bn)


def test_figure2_tile_counts():
    tm = ZorroMask.zorro(audio=320, video=1568, fusion=8).tile_map(64, 64)
    assert tm.kinds.shape == (1, 30, 30)
    # audio: 5x5 full tiles; video rows 5..28 x cols 5..29: tile 29 holds video 1856..1887 + fusion 1888..1895 +
    # is ragged (1896 = 29*64 + 40), so it is partial; the last row tile mixes video and fusion rows: partial
    assert tm.counts() == {"empty": 30 * 30 - 25 - 24 * 25 - 30, "partial": 24 + 30, "full": 25 + 24 * 24}


def test_tile_map_is_cached_per_block_and_device():
    m = ZorroMask.zorro(audio=10, video=20, fusion=2)
    assert m.tile_map(16, 16) is m.tile_map(16, 16)
    assert m.tile_map(16, 16) is not m.tile_map(16, 32)
    assert m.token_meta() is m.token_meta("cpu")


def test_ragged_tile_maps_are_per_sample():
    m = ZorroMask.zorro(audio=32, video=32, fusion=0, lengths=torch.tensor([[32, 32, 0], [0, 32, 0]]))
    tm = m.tile_map(16, 16)
    assert tm.kinds.shape == (2, 4, 4)
    assert (tm.kinds[1, :2] == EMPTY).all() and (tm.kinds[1, :, :2] == EMPTY).all()
    assert (tm.kinds[0, :2, :2] == FULL).all()


def test_build_is_linear_in_tiles_not_quadratic_in_tokens():
    # 64k tokens would be a 16 GB dense bool matrix; the tile map must not care
    m = ZorroMask.zorro(audio=16384, video=45875, fusion=5277)
    tm = m.tile_map(128, 128)
    assert tm.kinds.shape == (1, 528, 528)
    assert tm.counts()["full"] > 0
