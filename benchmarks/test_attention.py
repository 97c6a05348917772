"""Masked attention, every layout x direction x peer: correctness first, then ``benchmark.pedantic``.

One test per (layout, direction, peer), in report order: the ideal baseline (SDPA without mask) and masked SDPA of a
layout run before the other peers, so each row can state its speedup and fraction of ideal in ``extra_info``.

zorro rows also time the ideal baseline *between their own rounds* (in ``pedantic``'s untimed setup), and report the
fraction of ideal from those paired rounds: on a shared machine load drifts between rows, and the pairing keeps the
ratio honest where two separate medians would not.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest

from benchmarks.conftest import RESULTS, bench_device
from benchmarks.layouts import Layout, suite
from benchmarks.measure import Reference, make_inputs, peak_memory, run_once, sync
from benchmarks.peers import IDEAL, MASKED, PEERS, Unavailable, flex_block_mask
from zorro_kernels.backends.segments import build_plan
from zorro_kernels.tilemap import build_tile_map

DIRECTIONS = ("fwd", "fwd+bwd")
# the cases the CPU speed goal is stated on (>= 0.95 of ideal): their zorro rows get more paired rounds
KEY_LAYOUTS = ("figure2", "scaling-4096")

# Per (tier, device type): seconds of timed calls a row aims at, and the bounds on its rounds.
TIMING = {
    ("full", "cpu"): dict(budget_s=3.0, min_rounds=5, max_rounds=15, paired_budget_s=8.0, paired_min_rounds=7),
    ("smoke", "cpu"): dict(budget_s=0.2, min_rounds=2, max_rounds=3, paired_budget_s=0.4, paired_min_rounds=3),
    ("full", "cuda"): dict(budget_s=1.0, min_rounds=10, max_rounds=200, paired_budget_s=2.0, paired_min_rounds=30),
    ("smoke", "cuda"): dict(budget_s=0.2, min_rounds=3, max_rounds=20, paired_budget_s=0.4, paired_min_rounds=5),
}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    layouts = suite(metafunc.config.getoption("--bench-tier"), bench_device().type)
    cases = [
        (layout, direction, peer)
        for layout in layouts
        for direction in DIRECTIONS
        if direction == "fwd" or layout.backward
        for peer in PEERS
    ]
    metafunc.parametrize("case", cases, ids=[f"{lay.name}-{d}-{p}" for lay, d, p in cases])


_STATE: dict = {"key": None}


def _layout_state(layout: Layout, device, dtype) -> dict:
    """Inputs (and, on first use, the oracle) of the layout under test; only one layout is kept at a time."""
    key = (layout.name, device, dtype)
    if _STATE["key"] != key:
        _STATE.clear()
        _STATE["key"] = key
        _STATE["inputs"] = make_inputs(layout, device, dtype)
        _STATE["ref"] = None
    return _STATE


def _reference(layout: Layout, state: dict) -> Reference:
    if state["ref"] is None:
        state["ref"] = Reference(layout, *state["inputs"], backward=layout.backward)
    return state["ref"]


def _timed(fn, inputs, backward, device):
    q, k, v, d_out = inputs

    def call():
        result = run_once(fn, q, k, v, d_out, backward)
        sync(device)
        return result

    return call


def _metadata_build_s(layout: Layout, peer_name: str, device) -> float | None:
    """Seconds for one build, from a fresh mask, of what the peer derives from the layout (None: nothing).

    zorro's segment path needs its plan, the Triton path a tile map (64 x 64 here), FlexAttention a block mask.
    """
    mask = layout.mask
    fresh = mask.with_lengths(mask.lengths, None if mask.is_self else mask.kv_lengths)
    builders = {
        "zorro-segments": lambda: build_plan(fresh),
        "zorro-triton": lambda: build_tile_map(fresh, 64, 64).to(device),
        "flex": lambda: flex_block_mask(dataclasses.replace(layout, mask=fresh), device),
    }
    if peer_name not in builders:
        return None
    t0 = time.perf_counter()
    builders[peer_name]()
    sync(device)
    return time.perf_counter() - t0


def test_attention(benchmark, case, tier, device, dtype):
    layout, direction, peer_name = case
    backward = direction == "fwd+bwd"
    peer = PEERS[peer_name]
    if tier == "smoke" and peer_name == "flex" and layout.family != "figure2":
        pytest.skip("smoke tier: FlexAttention compiles per shape (seconds to a minute each); figure2 keeps it alive")
    try:
        fn = peer.prepare(layout, device, dtype, backward)
    except Unavailable as e:
        pytest.skip(str(e))
    state = _layout_state(layout, device, dtype)
    call = _timed(fn, state["inputs"], backward, device)

    # correctness before any timing (the ideal baseline computes unmasked attention by design: nothing to check)
    t0 = time.perf_counter()
    out, grads = call()
    first_call_s = time.perf_counter() - t0
    checked = "not checked (unmasked by design)"
    wrong = []
    if peer_name != IDEAL:
        ref = _reference(layout, state)
        wrong = ref.violations(peer_name, out, grads)
        if wrong and peer_name.startswith("zorro-"):  # ours: a wrong result is a bug, the suite goes red
            pytest.fail("; ".join(wrong))
        checked = (
            ("out" + (", dq, dk, dv" if backward else ""))
            if ref.rows is None
            else (f"out{', dq' if backward else ''} on {len(ref.rows)} of {layout.num_q} rows")
        )
        if wrong:  # a peer that computes something else is a finding for the table (timed all the same)
            checked = "WRONG RESULT: " + "; ".join(wrong)
    del out, grads

    # one warm call sizes the rounds
    t0 = time.perf_counter()
    call()
    warm_s = time.perf_counter() - t0
    timing = TIMING[(tier, device.type)]
    paired = peer_name.startswith("zorro-")
    ideal_times: list[float] = []
    setup = None
    if paired:
        ideal_call = _timed(PEERS[IDEAL].prepare(layout, device, dtype, backward), state["inputs"], backward, device)
        t0 = time.perf_counter()
        ideal_call()
        per_round = warm_s + time.perf_counter() - t0
        min_rounds = timing["paired_min_rounds"] + (4 if layout.name in KEY_LAYOUTS and tier == "full" else 0)
        rounds = int(min(timing["max_rounds"], max(min_rounds, timing["paired_budget_s"] / per_round)))

        def setup():
            t = time.perf_counter()
            ideal_call()
            ideal_times.append(time.perf_counter() - t)
    else:
        rounds = int(min(timing["max_rounds"], max(timing["min_rounds"], timing["budget_s"] / max(warm_s, 1e-9))))

    benchmark.group = f"{layout.name} {direction}"
    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    times = benchmark.stats.stats.data
    median = statistics.median(times)

    frac = layout.mask.attended_fraction()
    flops = layout.flops("fwd" if not backward else "fwd+bwd")
    info = dict(
        layout=layout.name,
        family=layout.family,
        title=layout.title,
        shape=layout.shape_str(),
        direction=direction,
        peer=peer_name,
        description=peer.description,
        attended_fraction=frac,
        flops=flops,
        median_s=median,
        tflops=flops / median / 1e12,
        rounds=rounds,
        checked=checked,
        wrong_result=wrong,
        first_call_s=first_call_s,
    )
    ideal_row = RESULTS.get((layout.name, direction, IDEAL))
    masked_row = RESULTS.get((layout.name, direction, MASKED))
    if paired:
        info["ideal_median_s"] = statistics.median(ideal_times) * frac
        info["fraction_of_ideal"] = statistics.median(i * frac / t for i, t in zip(ideal_times, times))
        info["fraction_of_ideal_paired"] = True
        # best round against best round: what the rows cost when the machine was least disturbed
        info["fraction_of_ideal_best"] = min(ideal_times) * frac / min(times)
    elif ideal_row is not None:
        info["fraction_of_ideal"] = ideal_row["median_s"] * frac / median
        info["fraction_of_ideal_paired"] = False
    if masked_row is not None:
        info["speedup_vs_masked_sdpa"] = masked_row["median_s"] / median
    info["peak_memory_bytes"] = peak_memory(call, device)
    info["metadata_build_s"] = _metadata_build_s(layout, peer_name, device)
    benchmark.extra_info.update(info)
    RESULTS[(layout.name, direction, peer_name)] = info
