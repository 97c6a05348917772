"""Suite-wide settings of the benchmarks: tier, device and dtype, machine description, the closing comparison table.

Tiers: ``--bench-tier=full`` (default; or env ``ZORRO_BENCH=full``) and ``--bench-tier=smoke`` (``ZORRO_BENCH=smoke``;
toy sizes, every layout family and peer path in about a minute, for CI). The device is CUDA when available (bf16),
else CPU (fp32); ``ZORRO_BENCH_DEVICE=cpu`` forces the CPU suite on a GPU machine.
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

from benchmarks.layouts import TIERS
from benchmarks.report import summary_lines

# rows recorded by the tests, in run order: the ``extra_info`` of each benchmark (read by later rows and the summary)
RESULTS: dict[tuple[str, str, str], dict] = {}
# skipped cases and why, for the report (pytest-benchmark's JSON only holds what ran)
SKIPPED: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("zorro benchmarks")
    group.addoption(
        "--bench-tier",
        choices=TIERS,
        default=os.environ.get("ZORRO_BENCH", "full"),
        help="benchmark sizes: full (default, env ZORRO_BENCH) or smoke (toy sizes, ~1 min)",
    )


def bench_device() -> torch.device:
    if os.environ.get("ZORRO_BENCH_DEVICE", "") == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(tier: str) -> dict:
    device = bench_device()
    return {
        "zorro_cpu": f"{cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "zorro_gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "zorro_torch": torch.__version__,
        "zorro_device": device.type,
        "zorro_dtype": str(bench_dtype(device)).replace("torch.", ""),
        "zorro_tier": tier,
        "zorro_date": _START.get("date") or _now(),
        "zorro_load_start": _START.get("load") or _loadavg(),
    }


_START: dict = {}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def pytest_sessionstart(session):
    # pytest-benchmark builds machine_info when it writes its results, at the end: note the start now
    _START.update(date=_now(), load=_loadavg())


def _loadavg() -> str:
    """The 1/5/15-minute load averages: on a shared machine, how much else was running."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


@pytest.fixture(scope="session")
def tier(pytestconfig) -> str:
    return pytestconfig.getoption("--bench-tier")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return bench_dtype(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(describe_machine(config.getoption("--bench-tier")))


#: printed with the smoke tier's timings: at toy sizes per-call overhead dominates (zorro's several fused calls per
#: layout against one SDPA call), so they say nothing about which library is faster
SMOKE_CAVEAT = (
    "smoke tier: toy sizes that run every code path; its timings are per-call overhead, NOT comparable "
    "between libraries (measure with the full tier)"
)


def pytest_report_header(config):
    m = describe_machine(config.getoption("--bench-tier"))
    lines = [
        f"zorro benchmarks: tier={m['zorro_tier']} device={m['zorro_device']} ({m['zorro_gpu'] or m['zorro_cpu']}) "
        f"dtype={m['zorro_dtype']} torch {m['zorro_torch']}"
    ]
    return lines + ([SMOKE_CAVEAT] if m["zorro_tier"] == "smoke" else [])


def pytest_terminal_summary(terminalreporter, config):
    if not RESULTS:
        return
    smoke = config.getoption("--bench-tier") == "smoke"
    terminalreporter.write_sep(
        "=",
        "zorro: comparison (median; ideal = SDPA without mask x attended fraction)"
        + (" -- SMOKE TIER, NOT COMPARABLE" if smoke else ""),
    )
    if smoke:
        terminalreporter.write_line(SMOKE_CAVEAT)
    for line in summary_lines(list(RESULTS.values())):
        terminalreporter.write_line(line)


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        SKIPPED.append({"case": report.nodeid.split("[", 1)[-1].rstrip("]"), "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["zorro_skipped"] = SKIPPED
    output_json.setdefault("machine_info", {}).update(zorro_load_end=_loadavg(), zorro_end=_now())
