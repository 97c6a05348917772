#!/usr/bin/env bash
# Create ./.venv (if missing) and install zorro-attention (editable) with everything its tests, demo and benchmarks
# use. Idempotent: a second run only checks that everything is installed (seconds).
#
# torch is pinned in the SAME pip command as everything else so that no dependency can swap it for another build.
# Override with TORCH_SPEC / TORCHVISION_SPEC (e.g. TORCH_SPEC="torch==2.11.0") to use another torch. The default
# torch wheel on PyPI is the CUDA build: the venv takes ~6.2 GB (3.2 GB of NVIDIA libraries) even without a GPU; the
# README's set-up section says how to install a CPU-only torch instead. pip's own settings (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, ...) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}
start=$(date +%s)
say() { echo "[bootstrap $(( $(date +%s) - start ))s] $*"; }
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
# pip's lines without the hundreds of "Requirement already satisfied" ones: what it downloads and installs shows.
quiet_satisfied() { grep --line-buffered -v -e '^Requirement already satisfied' -e '^ *Preparing editable metadata' \
  -e '^ *Checking if build backend supports' -e '^ *Getting requirements to build' \
  -e "^WARNING: Location 'file:" || true; }  # the last: a local index of this CI machine's pip.conf

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# Until 2026-12 the distribution was named "zorro", which on PyPI is an unrelated package. An editable install under
# the old name would leave a second `zorro` command and import finder behind: remove it first.
# (grep without -q: reading all of pip's output keeps pipefail from seeing pip die of SIGPIPE)
if pip show zorro 2>/dev/null | grep '^Editable project location:' >/dev/null; then
  say "removing the old editable install named 'zorro' (now 'zorro-attention')"
  pip uninstall -y -q zorro
fi
say "installing $TORCH_SPEC, $TORCHVISION_SPEC and zorro-attention[dev] (the first run downloads several GB: the" \
    "CUDA build of torch and NVIDIA's libraries, 6.2 GB installed; minutes on a fast link)"
# pip says nothing while it unpacks the wheels (minutes for torch and the NVIDIA libraries): a line every 20 s
( while sleep 20 </dev/null >/dev/null 2>&1; do say "... pip is still at work"; done ) &  # sleep holds no pipe open
heartbeat=$!
trap 'kill "$heartbeat" 2>/dev/null || true' EXIT
pip install --progress-bar off "$TORCH_SPEC" "$TORCHVISION_SPEC" -e ".[dev]" 2>&1 | quiet_satisfied
kill "$heartbeat" 2>/dev/null || true
# xformers is only used for its mask classes on CPU (its kernels need a GPU); --no-deps keeps it from pulling a torch.
say "installing xformers (mask classes only, --no-deps)"
pip install --progress-bar off --no-deps xformers 2>&1 | quiet_satisfied
.venv/bin/python -c "import torch, zorro_kernels; print('zorro', zorro_kernels.__version__, '| torch', torch.__version__)"
# The compiled CPU kernel (backend "intervals") builds on first use; build it here once so no test or run pays it.
.venv/bin/python -c "
from zorro_kernels.backends import _cpp
ok = _cpp.load()
print('[bootstrap] CPU kernel:', f'built/loaded in {_cpp.build_seconds():.1f} s' if ok else _cpp.unavailable_reason())"
say "done: use .venv/bin/python and .venv/bin/zorro (or: source .venv/bin/activate)"
