"""A narrower ``zorro ablate --grid`` (or fewer --seeds) into the --out of a wider one keeps the wider table: its own
table goes to a folder under ``<out>/subsets/``."""

import json

from zorro_models.commands.ablate import AXES, PLAN, _narrower_than_before, grid_cells, parse_grid


def _tabulated(out, grid, seeds):
    out.mkdir()
    (out / PLAN).write_text(json.dumps({"grid": grid, "seeds": seeds, "config": None, "overrides": []}))


def test_a_narrower_grid_or_fewer_seeds_gets_a_table_of_its_own(tmp_path):
    _tabulated(tmp_path / "out", dict(AXES), 2)
    one_mask = _narrower_than_before(tmp_path / "out", grid_cells(parse_grid(["mask=zorro"])), 2)
    one_seed = _narrower_than_before(tmp_path / "out", grid_cells(parse_grid([])), 1)
    assert one_mask is not None and one_mask.parent == tmp_path / "out" / "subsets"
    assert one_seed is not None and one_seed != one_mask and one_seed.name.startswith("12-cells-1-seeds-")


def test_the_same_or_a_wider_grid_replaces_the_table(tmp_path):
    _tabulated(tmp_path / "out", parse_grid(["mask=zorro"]), 1)
    assert _narrower_than_before(tmp_path / "out", grid_cells(parse_grid(["mask=zorro"])), 1) is None
    assert _narrower_than_before(tmp_path / "out", grid_cells(parse_grid([])), 2) is None
    assert _narrower_than_before(tmp_path / "fresh", grid_cells(parse_grid(["mask=zorro"])), 1) is None
