#!/usr/bin/env bash
# Benchmark run 9 (docs/benchmarks.md): the new GPU tests (own norm/SwiGLU kernels, host-embedding gather, CUDA graphs, graphs
# in training), then Llama-3-8B: reference, the eager fast path (profiled) and the train default (fast path +
# CUDA graphs, autotuned per shape against eager) on all three cases.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 timeout 130 python3 -m pytest -q -p no:cacheprovider -rf \
  tests/gpu/test_kernels_gpu.py tests/train/test_graphs_gpu.py \
  -k "graphed or host_embedding or rmsnorm or norm_swiglu or apply or graphs" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8
SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune-eager"
