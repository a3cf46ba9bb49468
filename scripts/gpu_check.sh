#!/usr/bin/env bash
# The one script to run on a CUDA machine (H100/H200, jax 0.11.x): the GPU
# kernel tests (Triton kernels, the Mosaic GPU decode kernel on Hopper, block
# copy), then the kernel benchmark (decode rows for both GPU kernels).
# Everything it writes goes to $OUT (default /tmp/gpu_check): env.txt,
# tests.txt, bench.txt and bench_kernels_gpu.json. Budget: about 2.5 min of
# tests + 4.5 min of benchmark.
#
#   OUT=/tmp/x bash scripts/gpu_check.sh              # all
#   BENCH_ONLY=decode bash scripts/gpu_check.sh       # one bench section
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>&1
  "$PY" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib",
jaxlib.__version__, jax.devices())'
} 2>&1 | tee "$OUT/env.txt"

status=0
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider \
  -o addopts="-ra" tests/gpu/test_kernels_gpu.py tests/test_kernels_lowering.py \
  tests/test_kernels_mosaic_gpu.py::test_decode_lowers_to_mosaic_gpu \
  2>&1 | tee "$OUT/tests.txt" || status=1

timeout "${BENCH_TIMEOUT:-300}" "$PY" -m launch.bench_kernels \
  --only="${BENCH_ONLY:-calib,decode,prefill,copy}" \
  --out="$OUT/bench_kernels_gpu.json" 2>&1 | tee "$OUT/bench.txt" || status=1

# The table last, so that the end of the output holds it.
tac "$OUT/bench.txt" | sed '/^kind /q' | tac
tail -n 3 "$OUT/tests.txt"
exit $status
