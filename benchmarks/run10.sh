#!/usr/bin/env bash
# Benchmark run 10 (next): every GPU test, the timeline of one eager and one graphed step (where the graphed
# step's ~70 ms of idle GPU time goes), then Llama-3-8B: reference, eager and default paths, three cases.
# Re-measures everything changed after run 9 (one autograd node per LoRA layer, the sync-free loop window,
# empty_cache after capture). About 9 minutes on the H100.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout 170 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu tests/train/test_graphs_gpu.py \
  tests/train/test_train_gpu.py tests/kernels > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED" "$OUT/tests.log" | tail -8
timeout 150 python3 benchmarks/trace_step.py --shape llama3-8b --case 2x2048 --out-dir "$OUT" 2>&1 | tee "$OUT/trace.log" \
  | grep -E "^==|gaps >=|ms idle|replays" | head -30
SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-240} benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune-eager"
