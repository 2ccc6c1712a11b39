#!/usr/bin/env bash
# Benchmark run 18: the LoRA scale folded into B's cast (no scaling pass per product). Llama-3-8B, reference
# against the eager and default (graphed) paths, three cases, a profile of the graphed step; then the kernel tests.
set -uo pipefail
TESTS_LAST=1 TESTS="tests/gpu tests/kernels tests/train/test_graphs_gpu.py" TEST_TIMEOUT=150 BENCH_TIMEOUT=330 \
  benchmarks/gpu_run.sh "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune"
