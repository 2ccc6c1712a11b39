#!/usr/bin/env bash
# Benchmark run 15: Llama-3-8B, reference against the eager and default (graphed) paths, three cases, after
# the Triton cross-entropy rows, batched adapter casts and fp32-out adapter gradients; then every GPU test.
set -uo pipefail
TESTS_LAST=1 TESTS="tests/gpu tests/kernels tests/train/test_graphs_gpu.py tests/train/test_train_gpu.py" TEST_TIMEOUT=230 BENCH_TIMEOUT=330 benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune"
