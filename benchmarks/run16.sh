#!/usr/bin/env bash
# Benchmark run 16: q/k/v and gate/up as one LoRA node each (kernels/lora_group.py). Llama-3-8B, reference
# against the eager and default (graphed) paths, three cases, a profile of the graphed step; then every GPU test.
set -uo pipefail
TESTS_LAST=1 TESTS="tests/gpu tests/kernels tests/train/test_graphs_gpu.py tests/train/test_train_gpu.py" TEST_TIMEOUT=230 BENCH_TIMEOUT=330 benchmarks/gpu_run.sh \
  "llama3-8b --paths reference --variants loratune-eager,loratune --profile loratune"
