#!/usr/bin/env bash
# The card session's one script (issue 10), under 8 minutes on one H100/H200:
#   1. the card and versions;
#   2. `pytest -m gpu` over tests/ (autotune off), capped at 200 s — the Triton kernels against the fp64/fp32 oracles
#      on real hardware (fp16/bf16, D = 16..256, NaN isolation, bitwise reruns, compile);
#   3. benchmarks/gpu_perf.py: forward and forward+backward of triton / unmasked SDPA (ideal) / compiled FlexAttention /
#      the segment path for Figure-2 (B=8, H=12) and 16k (B=1, H=12), fp16 and bf16, D = 64 and 128, each checked
#      first; then the kernel-resource report (registers, spills, blocks per SM, cubin summary, autotune choices);
#   between them, benchmarks/test_swin_bias.py (capped at 75 s): the Swin relative-bias layout on triton with and
#      without the bias (bias_cost), the segment path and the hand-written Swin computation.
# Results: $OUT (or --out DIR; default ./gpu_out) gets card.txt, pytest_gpu.txt, perf.json, perf.md (markdown for
# BENCHMARKS.md), perf_table.txt, perf_log.txt, swin_bias.txt. Every stage is capped and guarded: a failing stage lets the next run.
#
#   timeout 480 bash benchmarks/gpu_perf.sh --out /tmp/card_run      # on the card
#   bash benchmarks/gpu_perf.sh --cpu-smoke --out /tmp/smoke          # here, without a GPU: the script's own paths
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
SMOKE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --cpu-smoke) SMOKE="--cpu-smoke"; shift ;;
    *) echo "usage: gpu_perf.sh [--out DIR] [--cpu-smoke]"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

echo "== card"
if [ -z "$SMOKE" ]; then nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
  | tee "$OUT/card.txt"; fi
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda',
torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1 \
  | tee -a "$OUT/card.txt"

echo "== 1/2 pytest -m gpu (autotune off), capped at 200 s"
if [ -n "$SMOKE" ]; then tests="tests/test_triton.py"; cap=60; else tests="tests/"; cap=200; fi
COLUMNS=200 ZORRO_TRITON_AUTOTUNE=0 timeout $cap $PY -m pytest -m gpu $tests -v -rfEs -p no:cacheprovider \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $? at $(elapsed)s (124 = cut by the cap; 5 = no CUDA tests collected)"
grep -E "(FAILED|ERROR)( |$)" "$OUT/pytest_gpu.txt" | grep "::" | sed "s/ *$//" | cut -c1-160 | head -n 30
grep -E "^E " "$OUT/pytest_gpu.txt" | head -n 15 | cut -c1-250
tail -n 1 "$OUT/pytest_gpu.txt" | cut -c1-200

echo "== Swin windows with the relative position bias (issue 13): triton with/without the bias, capped at 75 s"
if [ -n "$SMOKE" ]; then tier="--bench-tier smoke"; else tier=""; fi
COLUMNS=200 timeout 75 $PY -m pytest benchmarks/test_swin_bias.py --benchmark-only -s -q -p no:cacheprovider $tier \
  > "$OUT/swin_bias.txt" 2>&1
echo "swin-bias exit $? at $(elapsed)s"
grep -E "median|passed|failed|Error" "$OUT/swin_bias.txt" | cut -c1-200

left=$(( 400 - $(elapsed) ))
[ "$left" -lt 120 ] && left=120
echo "== 2/2 gpu_perf.py: rows, then the kernel-resource report (budget ${left}s)"
timeout $(( left + 30 )) $PY benchmarks/gpu_perf.py $SMOKE --budget "$left" --out "$OUT" > "$OUT/perf_log.txt" 2>&1
echo "perf exit $? at $(elapsed)s (124 = cut by the cap)"
grep -E "^row " "$OUT/perf_log.txt" | cut -c1-300
grep -E "Error|error|Traceback" "$OUT/perf_log.txt" | grep -v "^failed checks" | head -n 8 | cut -c1-250
if [ -s "$OUT/perf_table.txt" ]; then
  cat "$OUT/perf_table.txt"
else
  echo "no perf_table.txt; last lines of the log:"
  tail -n 25 "$OUT/perf_log.txt" | cut -c1-250
fi
echo "== done in $(elapsed)s; results in $OUT (perf.md for BENCHMARKS.md)"
