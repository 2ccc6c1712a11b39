#!/usr/bin/env bash
# Benchmark run 18: the LoRA scale folded into B's cast (no scaling pass per product). Llama-3-8B, reference
# against the eager and default (graphed) paths, three cases, a profile of the graphed step; then the kernel tests.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
SKIP_TESTS=1 BENCH_TIMEOUT=330 OUT=$OUT benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune" | tail -12
grep -E "GPU kernel time" "$OUT/bench_llama3-8b.log"
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu tests/kernels tests/train/test_graphs_gpu.py \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8
