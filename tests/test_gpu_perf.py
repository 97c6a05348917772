"""The card script's planner (benchmarks/gpu_perf.py) on a simulated clock: stages in order of value, every finished row
written at once, the budget kept, the report and the headline FlexAttention row reserved. No GPU, no kernels."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
gpu_perf = pytest.importorskip("gpu_perf")

FULL = [
    "tests",
    "row fig2/float16/D64",
    "row 16k/float16/D64",
    "row fig2/bfloat16/D64",
    "row 16k/bfloat16/D64",
    "row fig2/float16/D128",
    "row 16k/float16/D128",
    "row fig2/bfloat16/D128",
    "row 16k/bfloat16/D128",
    "report",
    "swin",
    "variants fig2/float16/D64",
    "flex",
]


def test_plan_puts_the_tests_first_the_headline_rows_next_and_flex_last():
    assert [s.name for s in gpu_perf.plan()] == FULL
    quick = gpu_perf.plan(quick=True)
    assert [s.name for s in quick] == ["tests", "row fig2/float16/D64", "row 16k/float16/D64", "report", "flex"]
    assert quick[-1].rows == ("fig2/float16/D64", "16k/float16/D64")  # the headline flex row first
    assert not any("bfloat16" in r for s in gpu_perf.plan(bf16=False) for r in (s.name, *s.rows))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _simulate(tmp_path, stages, budget, duration):
    """Run the real planner with the real table writer; ``duration(stage, seconds)`` is what each stage takes (at most
    the seconds it is given: the caps and the rows' deadlines). Returns (statuses, rows on disk after each stage,
    elapsed)."""
    for lay, dt, d in gpu_perf.ROW_ORDER:
        gpu_perf.ROWS[gpu_perf.row_key(lay, dt, d)] = (*gpu_perf.SHAPES[lay], d)
    clock = Clock()
    info = {"card": "simulated", "date": "-", "torch": "-", "triton": "-", "autotune": "1"}
    results = {"info": info, "rows": [], "stages": []}
    on_disk = []

    def execute(st, seconds):
        took = duration(st, seconds)
        assert took <= seconds + 1e-9, (st.name, took, seconds)
        clock.t += took
        if st.name == "boom":
            raise RuntimeError("the stage broke")
        for name in st.rows:
            row = gpu_perf._empty_row(name)
            row["density"] = 0.5
            row["peers"] = {p: {"fwd_ms": 1.0, "fwd_bwd_ms": 3.0} for p in st.peers}
            gpu_perf.merge_row(results, row)

    def write(done):
        results["stages"] = done
        gpu_perf.write_outputs(results, tmp_path)
        disk = json.loads((tmp_path / "perf.json").read_text())
        md = (tmp_path / "perf.md").read_text()
        assert all(f"| {r['layout']} |" in md for r in disk["rows"])  # the markdown table has every row too
        on_disk.append((done[-1][0], [r["layout"] for r in disk["rows"]]))

    done = gpu_perf.run_stages(stages, budget, execute, write, clock=clock)
    return {name: status for name, status, _ in done}, on_disk, clock.t - 1000.0


def test_as_estimated_the_full_run_fits_and_writes_each_row_when_it_finishes(tmp_path):
    stages = gpu_perf.plan()
    status, on_disk, elapsed = _simulate(tmp_path, stages, 460, lambda st, s: st.est_s)
    assert elapsed <= 460
    ran = [n for n in FULL if status[n] == "done"]
    assert ran[:9] == FULL[:9] and ran[-2:] == ["report", "flex"]  # every row, in order; swin/variants if time left
    # each row stage's row is on disk right after that stage, before the next one starts
    for i, (name, rows) in enumerate(on_disk):
        if name.startswith("row "):
            assert rows[-1] == name[4:] or name[4:] in rows
            assert len(rows) == sum(n.startswith("row ") for n, _ in on_disk[: i + 1])
    flex = json.loads((tmp_path / "perf.json").read_text())["rows"][0]
    assert flex["peers"]["flex"] and flex["fwd_ms_speedup_vs_flex"] == 1.0


@pytest.mark.parametrize("quick", [False, True])
def test_on_a_slow_card_the_budget_holds_and_the_headline_stages_still_run(tmp_path, quick):
    """Every stage takes three times its estimate (cut at what it is given): later rows are skipped, the report and
    the headline flex row still run, the total stays within the budget."""
    budget = 225 if quick else 460
    status, on_disk, elapsed = _simulate(
        tmp_path, gpu_perf.plan(quick=quick), budget, lambda st, s: min(3 * st.est_s, s)
    )
    assert elapsed <= budget
    assert status["tests"] == status["row fig2/float16/D64"] == "done"
    assert status["report"] == status["flex"] == "done"
    assert any(v.startswith("skipped: time budget") for v in status.values())
    assert on_disk[1] == ("row fig2/float16/D64", ["fig2/float16/D64"])


def test_a_failing_stage_lets_the_next_run(tmp_path):
    stages = gpu_perf.plan(quick=True)
    stages.insert(1, gpu_perf.Stage("boom", "row", 5.0))
    status, _, _ = _simulate(tmp_path, stages, 225, lambda st, s: min(st.est_s, s))
    assert status["boom"].startswith("failed: RuntimeError: the stage broke")
    assert status["row fig2/float16/D64"] == status["flex"] == "done"
