"""A narrower ``zorro ablate --grid`` into the --out of a wider one is refused: it would replace the wider table."""

import json

import pytest

from zorro_models.commands.ablate import AXES, PLAN, _check_narrower, grid_cells, parse_grid, run_ablate


def _tabulated(out, grid, seeds):
    out.mkdir()
    (out / PLAN).write_text(json.dumps({"grid": grid, "seeds": seeds, "config": None, "overrides": []}))


def test_a_narrower_grid_into_the_same_out_is_refused_before_training(tmp_path):
    _tabulated(tmp_path / "out", dict(AXES), 2)
    with pytest.raises(ValueError, match=r"holds the table of a wider grid \(12 cells x 2 seeds\).*another --out"):
        run_ablate(str(tmp_path / "out"), grid=["mask=zorro"], seeds=2, verbose=False)
    with pytest.raises(ValueError, match=r"seeds 1..1"):
        _check_narrower(tmp_path / "out", grid_cells(parse_grid([])), 1)


def test_the_same_or_a_wider_grid_is_accepted(tmp_path):
    _tabulated(tmp_path / "out", parse_grid(["mask=zorro"]), 1)
    _check_narrower(tmp_path / "out", grid_cells(parse_grid(["mask=zorro"])), 1)
    _check_narrower(tmp_path / "out", grid_cells(parse_grid([])), 2)
    _check_narrower(tmp_path / "fresh", grid_cells(parse_grid(["mask=zorro"])), 1)
