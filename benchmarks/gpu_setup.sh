# Sourced by the one-call device scripts (gpu_run.sh, gpu_decode.sh, gpu_serve.sh), from the repo root on the GPU
# machine: $OUT made, the carried wheels (.whl/, from ../shared/gpu/wheels.sh) installed into /tmp/site, the
# environment every run there takes, and the GPU named in the log.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
