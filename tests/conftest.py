"""Test configuration shared by every tier.

Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present; the interpreter must be switched
on before the first ``@triton.jit`` is evaluated, i.e. before zorro_kernels' Triton module is imported.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

# MKL picks its code path per call by data alignment and CPU unless told to be reproducible, so two runs of the same
# product can differ in the last bit (measured on an AMD EPYC: a clean and a NaN-poisoned run of the segment path's
# fp64 backward gave dq 0.026958659466761875 vs ...82 in rows the poison never reaches). The isolation checks compare
# those entries bit for bit, so MKL runs in its strict reproducible mode here; set before torch's first BLAS call.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"torch {torch.__version__}, CUDA device: {cuda}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]


@pytest.fixture
def strict(zt):
    """``register(strict=True)`` for one test (a fallback to sdpa raises ``FallbackError``); ``zt`` is the requesting
    module's fixture for the transformers integration."""
    zt.register(strict=True)
    yield
    zt.register(strict=False)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """A copy of what a fresh clone holds (tracked and new, not ignored, files) with ``.venv`` pointing at the
    environment running the tests: the state after ``bash scripts/bootstrap.sh``."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "zorro").exists():
        pytest.skip(f"{venv} has no zorro command: run the walk from the bootstrapped .venv")
    dest = tmp_path_factory.mktemp("fresh_clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(venv)
    return dest
