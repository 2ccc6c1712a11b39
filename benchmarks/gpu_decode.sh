#!/usr/bin/env bash
# One device call for issue 15's decode path: install the carried wheels (.whl/, from ../shared/gpu/wheels.sh:
# bitsandbytes is needed), run its GPU tests (NF4 matvec and decode attention kernels against their references,
# graphed = eager decode, timing lines), then benchmarks/bench_decode.py on the Llama-3-8B shape.
# Usage (repo root, on the GPU machine):  benchmarks/gpu_decode.sh [bench_decode.py args]
# Environment: SKIP_TESTS=1, TEST_TIMEOUT (default 240 s), BENCH_TIMEOUT (default 300 s). Logs go to $OUT.
. "$(dirname "$0")/gpu_setup.sh"  # $OUT, the wheels, the environment, the GPU
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rf -s -p no:cacheprovider tests/gpu/test_nf4_matvec_gpu.py \
    tests/gpu/test_decode_attention_gpu.py tests/infer/test_decode_graphs_gpu.py > "$OUT/decode_tests.log" 2>&1
  echo "tests exit $?"
  grep -E "passed|failed|FAILED|Error|nf4 matvec|decode step" "$OUT/decode_tests.log" | tail -30
fi
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_decode.py --out-dir "$OUT" "$@" > "$OUT/bench_decode.log" 2>&1
echo "bench_decode exit $?"
grep -v -i "warn" "$OUT/bench_decode.log" | tail -14
