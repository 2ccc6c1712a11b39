#!/usr/bin/env bash
# Benchmark run 19: the SwiGLU backward writes its gradients over gate/up (reuse_inputs in the swapped MLPs;
# run 18's graphed peak was 7.16 GiB = 45.06% of the reference's). Llama-3-8B, reference against the eager
# and default paths, three cases; then the GPU kernel tests.
set -uo pipefail
TESTS_LAST=1 TESTS=tests/gpu TEST_TIMEOUT=90 BENCH_TIMEOUT=300 benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune"
