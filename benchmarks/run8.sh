#!/usr/bin/env bash
# Benchmark run 8 (docs/benchmarks.md): GPU tests (kernels, graphs, training engine), then Llama-3-8B: reference, the
# eager fast path, and the train default (fast path + CUDA graphs) on all three cases, profiled.
set -uo pipefail
export TESTS="tests/gpu tests/train/test_graphs_gpu.py tests/train/test_train_gpu.py tests/kernels" TEST_TIMEOUT=200 PYTEST_X=" "
BENCH_TIMEOUT=${BENCH_TIMEOUT:-340} benchmarks/gpu_run.sh "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune"
