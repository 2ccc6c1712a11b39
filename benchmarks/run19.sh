#!/usr/bin/env bash
# Benchmark run 19: the SwiGLU backward writes its gradients over gate/up (reuse_inputs in the swapped MLPs;
# run 18's graphed peak was 7.16 GiB = 45.06% of the reference's). Llama-3-8B, reference against the eager
# and default paths, three cases; then the GPU kernel tests.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
SKIP_TESTS=1 BENCH_TIMEOUT=300 OUT=$OUT benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune" | tail -12
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 90 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8
