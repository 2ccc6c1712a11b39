#!/usr/bin/env bash
# One device call: install the carried wheels (.whl/, from ../shared/gpu/wheels.sh), run the GPU and
# kernel tests, then bench_train.py once per shape given, then (SFT=1) the realistic SFT epoch of
# bench_sft.py. Logs go to $OUT; the tables print last.
# Usage (repo root, on the GPU machine):  benchmarks/gpu_run.sh "SHAPE [bench args]" ["SHAPE2 ..."]
# Environment: SKIP_TESTS=1 (no tests), TESTS_LAST=1 (tests after the benchmarks, all of them, no -x),
# TESTS (pytest paths), TEST_TIMEOUT, BENCH_TIMEOUT (seconds per shape), SFT=1 with TOK (the Llama-3.1
# tokenizer folder, default .tok) and SFT_ARGS (more bench_sft.py arguments).
. "$(dirname "$0")/gpu_setup.sh"  # $OUT, the wheels, the environment, the GPU
run_tests() {
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest ${TESTS:-tests/gpu tests/kernels tests/train/test_decoder_train_gpu.py \
    tests/train/test_train_gpu.py tests/train/test_graphs_gpu.py tests/decoder/test_decoder_gpu.py} -q "$@" -p no:cacheprovider -rf \
    > "$OUT/tests.log" 2>&1
  echo "tests exit $?"; tail -15 "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error"
}
if [ -z "${SKIP_TESTS:-}" ] && [ -z "${TESTS_LAST:-}" ]; then
  run_tests ${PYTEST_X--x}
fi
for spec in "$@"; do
  set -- $spec
  shape=$1; shift
  timeout ${BENCH_TIMEOUT:-520} python3 benchmarks/bench_train.py --shape "$shape" --out-dir "$OUT" "$@" \
    > "$OUT/bench_$shape.log" 2>&1
  echo "bench $shape exit $?"; grep -E "^\[|Error|error" "$OUT/bench_$shape.log" | grep -v "profile of one" | tail -25
done
if [ -n "${SFT:-}" ]; then
  timeout ${SFT_TIMEOUT:-420} python3 benchmarks/bench_sft.py --tokenizer "${TOK:-.tok}" --out-dir "$OUT" ${SFT_ARGS:-} \
    > "$OUT/sft.log" 2>&1
  echo "bench_sft exit $?"
fi
for f in "$OUT"/table_*.md "$OUT"/sft_*.md; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
if [ -z "${SKIP_TESTS:-}" ] && [ -n "${TESTS_LAST:-}" ]; then
  run_tests
fi
