#!/usr/bin/env bash
# One device call: install the carried wheels (.whl/, from ../shared/gpu/wheels.sh), run the GPU and
# kernel tests, then bench_train.py once per shape given. Logs go to $OUT; the tables print last.
# Usage (repo root, on the GPU machine):  benchmarks/gpu_run.sh "SHAPE [bench args]" ["SHAPE2 ..."]
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest ${TESTS:-tests/gpu tests/kernels} -q ${PYTEST_X--x} -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
fi
for spec in "$@"; do
  set -- $spec
  shape=$1; shift
  timeout ${BENCH_TIMEOUT:-520} python3 benchmarks/bench_train.py --shape "$shape" --out-dir "$OUT" "$@" \
    > "$OUT/bench_$shape.log" 2>&1
  echo "bench $shape exit $?"; grep -E "^\[|Error|error" "$OUT/bench_$shape.log" | grep -v "^\[.*profile" | tail -25
done
for f in "$OUT"/table_*.md; do echo "== $f"; cat "$f"; done
