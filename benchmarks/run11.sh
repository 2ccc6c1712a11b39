#!/usr/bin/env bash
# Benchmark run 11 (next): Llama-3-8B, reference against the eager and default (graphed) paths, three cases,
# re-measuring what changed after run 9 (docs/benchmarks.md). About 7 minutes on the H100.
set -uo pipefail
SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-420} benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune"
