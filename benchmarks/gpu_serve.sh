#!/usr/bin/env bash
# One device call for issue 15's serving: install the carried wheels (.whl/, from ../shared/gpu/wheels.sh:
# bitsandbytes, and for the server and its client fastapi, uvicorn, httpx, openai), run the mixed-adapter GPU
# tests (a batch of several adapters = each alone; mixed steps graphed), then benchmarks/bench_serve.py on the
# Llama-3-8B shape (loratune serve with 1 and 4 adapters at concurrency 1/8/32 beside transformers generate).
# Usage (repo root, on the GPU machine):  benchmarks/gpu_serve.sh [bench_serve.py args]
#   e.g. benchmarks/gpu_serve.sh --gen-tokens 128 --requests-per-client 1     (a first run within one call)
# Environment: SKIP_TESTS=1, TEST_TIMEOUT (default 180 s), BENCH_TIMEOUT (default 540 s). Logs go to $OUT.
. "$(dirname "$0")/gpu_setup.sh"  # $OUT, the wheels, the environment, the GPU
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-180} python3 -m pytest -q -rf -s -p no:cacheprovider tests/infer/test_multi_lora_gpu.py \
    > "$OUT/serve_tests.log" 2>&1
  echo "tests exit $?"
  grep -E "passed|failed|FAILED|Error|NF4 bf16" "$OUT/serve_tests.log" | tail -20
fi
timeout ${BENCH_TIMEOUT:-540} python3 benchmarks/bench_serve.py --work-dir /tmp/bench-serve --out-dir "$OUT" "$@" \
  > "$OUT/bench_serve.log" 2>&1
echo "bench_serve exit $?"
grep -v -i "warn" "$OUT/bench_serve.log" | tail -20
cp /tmp/bench-serve/serve-*.log "$OUT/" 2>/dev/null
