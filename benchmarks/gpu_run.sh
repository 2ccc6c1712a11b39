#!/usr/bin/env bash
# One device call: install the carried wheels (.whl/, from ../shared/gpu/wheels.sh), run the GPU and
# kernel tests, then bench_train.py once per shape given. Logs go to $OUT; the tables print last.
# Usage (repo root, on the GPU machine):  benchmarks/gpu_run.sh "SHAPE [bench args]" ["SHAPE2 ..."]
# Environment: SKIP_TESTS=1 (no tests), TESTS_LAST=1 (tests after the benchmarks, all of them, no -x),
# TESTS (pytest paths), TEST_TIMEOUT, BENCH_TIMEOUT (seconds per shape).
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
run_tests() {
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest ${TESTS:-tests/gpu tests/kernels} -q "$@" -p no:cacheprovider -rf \
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
for f in "$OUT"/table_*.md; do echo "== $f"; cat "$f"; done
if [ -z "${SKIP_TESTS:-}" ] && [ -n "${TESTS_LAST:-}" ]; then
  run_tests
fi
