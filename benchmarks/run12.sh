#!/usr/bin/env bash
# Benchmark run 12 (next): the other named shapes of issue 6, reference against the default path:
# Llama-3.2-1B (three cases) and Qwen2.5-7B (2x2048, 1x8192). About 8 minutes on the H100.
set -uo pipefail
SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-230} benchmarks/gpu_run.sh \
  "llama3.2-1b --paths reference --variants loratune" \
  "qwen2.5-7b --paths reference --variants loratune --cases 2x2048,1x8192"
