#!/usr/bin/env bash
# Benchmark run 20: the other shapes on the final code of this session (run 19's), reference against the
# default path at 2x2048 and 1x8192: Llama-3.2-1B and Qwen2.5-7B; peaks for the memory planner.
set -uo pipefail
SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} benchmarks/gpu_run.sh \
  "llama3.2-1b --paths reference --variants loratune --cases 2x2048,1x8192" \
  "qwen2.5-7b --paths reference --variants loratune --cases 2x2048,1x8192"
