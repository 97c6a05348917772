#!/usr/bin/env bash
# The short GPU check: the card, the CUDA test tier of the Triton backend (correctness of the kernels on real
# hardware), then benchmarks/gpu_perf.py (headline timings, registers/spills, the table last). Under 5 minutes:
#
#   timeout 300 bash benchmarks/gpu_perf.sh        # writes to $OUT if set, else ./gpu_out
#
# Every stage is capped and guarded: a failing or slow stage still lets the next one run and print.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

echo "== card"
nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | tee "$OUT/card.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda',
torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1 \
  | tee -a "$OUT/card.txt"

echo "== 1/2 Triton CUDA tests (autotune off), capped at 120 s"
COLUMNS=200 ZORRO_TRITON_AUTOTUNE=0 timeout 120 $PY -m pytest -m gpu tests/test_triton.py -x -v -rfEs \
  -p no:cacheprovider > "$OUT/pytest_triton.txt" 2>&1
echo "pytest exit $? at $(elapsed)s (124 = cut by the cap)"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)" "$OUT/pytest_triton.txt" | grep "::" | sed "s/ *$//" | cut -c1-150 | head -n 30
grep -E "^E " "$OUT/pytest_triton.txt" | head -n 15 | cut -c1-250
tail -n 2 "$OUT/pytest_triton.txt" | cut -c1-200

echo "== 2/2 gpu_perf.py, capped at 150 s"
timeout 150 $PY benchmarks/gpu_perf.py --budget 120 --out "$OUT" > "$OUT/perf_log.txt" 2>&1
echo "perf exit $? at $(elapsed)s (124 = cut by the cap)"
grep -E "Error|error|Traceback" "$OUT/perf_log.txt" | grep -v "^errors / skips" | head -n 8 | cut -c1-250
if [ -s "$OUT/perf_table.txt" ]; then
  cat "$OUT/perf_table.txt"
else
  echo "no perf_table.txt; last lines of the log:"
  tail -n 25 "$OUT/perf_log.txt" | cut -c1-250
fi
