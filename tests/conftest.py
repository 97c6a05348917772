"""Test configuration shared by every tier.

Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present; the interpreter must be switched
on before the first ``@triton.jit`` is evaluated, i.e. before zorro_kernels' Triton module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"torch {torch.__version__}, CUDA device: {cuda}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
