#!/usr/bin/env bash
# Benchmark run 6 (docs/benchmarks.md): GPU tests (kernels + training engine with the fast paths now on by default), then
# Llama-3-8B: reference, plain, and the train default (all fast paths) with a profile of one step.
set -uo pipefail
export TESTS="tests/gpu tests/kernels tests/train/test_train_gpu.py"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-430} benchmarks/gpu_run.sh "llama3-8b --paths reference --variants plain,+lora+norm+swiglu+rope,loratune --profile loratune"
