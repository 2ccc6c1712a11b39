#!/usr/bin/env bash
# Benchmark run 10 (next): every GPU test, then the timeline of one eager and one graphed Llama-3-8B step
# at 2x2048 (where the graphed step's 420 ms go: kernels or idle GPU). About 8 minutes on the H100.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu tests/kernels tests/train/test_graphs_gpu.py \
  tests/train/test_train_gpu.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED" "$OUT/tests.log" | tail -8
timeout 170 python3 benchmarks/trace_step.py --shape llama3-8b --case 2x2048 --out-dir "$OUT" 2>&1 | tee "$OUT/trace.log" \
  | grep -E "^==|gaps >=|ms idle|replays" | head -40
