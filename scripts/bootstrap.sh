#!/usr/bin/env bash
# Create ./.venv (if missing) and install zorro with everything its tests, demo and benchmarks use.
# Idempotent: a second run only checks that everything is installed.
#
# torch is pinned in the SAME pip command as everything else so that no dependency can swap it for another build.
# Override with TORCH_SPEC / TORCHVISION_SPEC (e.g. TORCH_SPEC="torch==2.11.0") to use another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" "$TORCHVISION_SPEC" -e ".[dev]"
# xformers is only used for its mask classes on CPU (its kernels need a GPU); --no-deps keeps it from pulling a torch.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps xformers
.venv/bin/python -c "import torch, zorro_kernels; print('zorro', zorro_kernels.__version__, '| torch', torch.__version__)"
