#!/usr/bin/env bash
# The GPU check: the CUDA test tier, then a compact benchmark table — one command, under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; writes to $OUT if set, else ./gpu_out
#
# Needs: a CUDA card, torch (2.11 tested for) with Triton, pytest, einops; no internet. Every stage is guarded: a
# failing stage still lets the next ones run and print. The last thing printed is the benchmark table; full results
# (results.json, table.txt, test logs) land in the output folder. Copy the table into BENCHMARKS.md with the card and
# the date.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

echo "== card"
nvidia-smi --query-gpu=name --format=csv 2>&1 | tee "$OUT/card.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda',
torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1 \
  | tee -a "$OUT/card.txt"

echo "== 1/3 Triton CUDA tests (autotune off: one compile per kernel variant)"
COLUMNS=200 ZORRO_TRITON_AUTOTUNE=0 timeout 200 $PY -m pytest -m gpu tests/test_triton.py -v -rfEs \
  -p no:cacheprovider > "$OUT/pytest_triton.txt" 2>&1
echo "pytest exit $? at $(elapsed)s"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)" "$OUT/pytest_triton.txt" | grep "::" | sed "s/ *$//" | cut -c1-160 | head -n 40
grep -E "^E " "$OUT/pytest_triton.txt" | head -n 20 | cut -c1-250
tail -n 3 "$OUT/pytest_triton.txt"

echo "== 2/3 the other CUDA tests in tests/"
timeout 60 $PY -m pytest -m gpu tests/ -x -q -p no:cacheprovider --ignore=tests/test_triton.py \
  --continue-on-collection-errors > "$OUT/pytest_rest.txt" 2>&1
echo "pytest exit $? at $(elapsed)s"
tail -n 8 "$OUT/pytest_rest.txt"

echo "== 3/3 benchmarks (compile-count sweep over 50 layouts, then the table)"
left=$(( 440 - $(elapsed) ))
[ "$left" -lt 60 ] && left=60
timeout $(( left + 30 )) $PY benchmarks/gpu_bench.py --budget "$left" --out "$OUT" > "$OUT/bench_log.txt" 2>&1
echo "bench exit $? at $(elapsed)s"
grep -E "^(row|compile sweep|skipping)" "$OUT/bench_log.txt" | cut -c1-400
grep -E "Error|error" "$OUT/bench_log.txt" | head -n 10 | cut -c1-300

echo "== summary ($(elapsed)s in all)"
grep -E "[0-9]+ (passed|failed)|error" "$OUT/pytest_triton.txt" | tail -n 2
grep -E "[0-9]+ (passed|failed)|no tests ran|error" "$OUT/pytest_rest.txt" | tail -n 1
$PY benchmarks/gpu_bench.py --render --out "$OUT" 2>&1 | tail -n 40
