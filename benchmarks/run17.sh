#!/usr/bin/env bash
# Benchmark run 17: the graph's gradients as views of one buffer (zeroed by one kernel, kept attached between
# steps; run 14's trace: a foreach zero of 448 tensors held the host ~3 ms per step). Llama-3-8B, reference
# against the eager and default (graphed) paths, three cases, a profile of the graphed step; then every GPU test.
set -uo pipefail
TESTS_LAST=1 TESTS="tests/gpu tests/kernels tests/train/test_graphs_gpu.py tests/train/test_train_gpu.py" TEST_TIMEOUT=280 BENCH_TIMEOUT=330 benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune"
