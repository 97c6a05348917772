#!/usr/bin/env bash
# The card session's one script: at most 8 minutes on one H100/H200 (--quick: at most 4). It prints the card, then
# runs benchmarks/gpu_perf.py, which runs the stages in order of value and writes every finished one at once (see its
# docstring): the kernel tests (pytest -m gpu tests/test_triton*.py, autotune off, capped), the Figure-2 and 16k rows
# at fp16 D=64, then bf16 and D=128, the kernel-resource report, the Swin relative-bias row, the tile/deterministic
# variants, and compiled FlexAttention last in its own capped process. The outer timeout is the hard guard: a kill
# loses nothing finished.
# Results in $OUT (or --out DIR; default ./gpu_out): card.txt, pytest_gpu.txt, perf.json, perf.md (markdown for
# BENCHMARKS.md), perf_table.txt, perf_log.txt, swin_bias.txt, flex_log.txt.
#
#   bash benchmarks/gpu_perf.sh --out /tmp/card_run            # on the card, 8 minutes
#   bash benchmarks/gpu_perf.sh --quick --out /tmp/card_run    # on the card, 4 minutes
#   bash benchmarks/gpu_perf.sh --cpu-smoke --out /tmp/smoke    # here, without a GPU: the script's own paths
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
SMOKE=""
QUICK=""
total=480
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --cpu-smoke) SMOKE="--cpu-smoke"; shift ;;  # no timing value: a budget the interpreter can finish in
    --quick) QUICK="--quick"; total=240; shift ;;
    *) echo "usage: gpu_perf.sh [--out DIR] [--quick] [--cpu-smoke]"; exit 2 ;;
  esac
done
[ -n "$SMOKE" ] && total=$(( total * 5 ))
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

echo "== card"
if [ -z "$SMOKE" ]; then timeout 10 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
  | tee "$OUT/card.txt"; fi
timeout 30 $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda',
torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1 \
  | tee -a "$OUT/card.txt"

# the stages get what is left of the total but 15 s (interpreter start-up, the last write); the timeout is the guard
budget=$(( total - 15 - $(elapsed) ))
echo "== gpu_perf.py $QUICK: the stages in order of value (budget ${budget}s; log in perf_log.txt)"
timeout $(( total - 5 - $(elapsed) )) $PY benchmarks/gpu_perf.py $SMOKE $QUICK --budget "$budget" --out "$OUT" \
  > "$OUT/perf_log.txt" 2>&1
echo "gpu_perf exit $? at $(elapsed)s (124 = cut by the guard: every finished stage is already written)"
grep -E "^stage " "$OUT/perf_log.txt" | cut -c1-200
if [ -s "$OUT/perf_table.txt" ]; then
  cat "$OUT/perf_table.txt"
else
  echo "no perf_table.txt; last lines of the log:"
  tail -n 25 "$OUT/perf_log.txt" | cut -c1-250
fi
echo "== done in $(elapsed)s; results in $OUT (perf.md for BENCHMARKS.md)"
