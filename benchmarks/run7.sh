#!/usr/bin/env bash
# Benchmark run 7 (docs/benchmarks.md): GPU tests, then Llama-3-8B reference vs the train default after the host-cost work
# (adapter casts once per step, own RMSNorm/SwiGLU kernels, GPU-side host-embedding gather), profiled.
set -uo pipefail
export TESTS="tests/gpu tests/kernels tests/train/test_train_gpu.py" TEST_TIMEOUT=200
BENCH_TIMEOUT=${BENCH_TIMEOUT:-360} benchmarks/gpu_run.sh "llama3-8b --paths reference --variants +lora+norm+swiglu+rope,loratune --profile loratune"
