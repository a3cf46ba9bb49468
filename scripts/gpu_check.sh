#!/usr/bin/env bash
# The one script to run on a CUDA machine (H100/H200, jax 0.11.x), in order of
# what a short lease must not lose. Sections, each on by its variable:
#   BENCH=1    the kernel benchmark table and the gather/attention overlap
#              (JSON rewritten after every section, so a run cut short
#              keeps its rows; the one-kernel gather, an experiment, last)
#                                                             ~4 min
#   TESTS=1    the GPU kernel tests (Triton kernels, Mosaic GPU decode on
#              Hopper, block copy), the model's steps with each kernel
#              and the lowering tests                         ~4.5 min
#              then, in a pytest process of its own (a crash there loses
#              nothing else), the one-kernel gather's tests -> tests_gather.txt
#              (TEST_WORKERS pytest-xdist processes share the GPU where
#              xdist is installed: the cases are compile-bound)
#   PROFILE=0  Nsight Compute profiles (scripts/gpu_profile.sh; CASES
#              overrides its list), packed into profile.tgz   ~35 s a case
#   TILING=0   the tiling sweep (launch.bench_tiling), TILING_BUDGET seconds
#   STORAGE=0  the cold-tier benchmark on the machine's disk  ~1.5 min
# Everything it writes goes to $OUT (default /tmp/gpu_check): env.txt,
# bench.txt, bench_kernels_gpu.json with its plot (.png) and compiled gathers
# (_gather_hlo.txt, _gather_kernel_hlo.txt), tests.txt, tests_gather.txt,
# profile.txt, profile.tgz, tiling.txt, tiling.json, storage.txt, storage.json. Python packages
# missing there travel as wheels in .whl/ (installed into /tmp/site).
#
#   OUT=/tmp/x bash scripts/gpu_check.sh                       # bench + tests
#   BENCH=0 TESTS=0 TILING=1 TILING_BUDGET=300 bash scripts/gpu_check.sh
#   BENCH_ONLY=decode,copy bash scripts/gpu_check.sh           # some sections
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>&1
  "$PY" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib",
jaxlib.__version__, jax.devices())'
  nproc; free -g | head -2; df -h /tmp /var/tmp | tail -2
} 2>&1 | tee "$OUT/env.txt"

status=0
touch "$OUT/bench.txt" "$OUT/tests.txt"
if [[ "${BENCH:-1}" == 1 ]]; then
  timeout -s INT "${BENCH_TIMEOUT:-270}" "$PY" -m launch.bench_kernels \
    --only="${BENCH_ONLY:-calib,decode,prefill,copy,overlap,gather_kernel}" \
    --out="$OUT/bench_kernels_gpu.json" >"$OUT/bench.txt" 2>&1 || status=1
  grep -E '^(calib|decode|prefill|copy|overlap) ' "$OUT/bench.txt" | head -60
fi

if [[ "${TESTS:-1}" == 1 ]]; then
  # SIGINT, so that pytest still prints its summary when the time is up.
  workers=()
  if "$PY" -c 'import xdist' 2>/dev/null && [[ "${TEST_WORKERS:-4}" -gt 1 ]]; then
    # Several processes on one GPU: none may take most of its memory.
    workers=(-n "${TEST_WORKERS:-4}")
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
  fi
  timeout -s INT "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="-rA" --tb=short --maxfail=20 "${workers[@]}" \
    ${TEST_FILES:-tests/gpu/test_kernels_gpu.py tests/gpu/test_model_gpu.py \
    tests/test_kernels_lowering.py \
    tests/test_kernels_mosaic_gpu.py::test_decode_lowers_to_mosaic_gpu} \
    >"$OUT/tests.txt" 2>&1 || status=1
  unset XLA_PYTHON_CLIENT_PREALLOCATE
  timeout -s INT "${GATHER_TEST_TIMEOUT:-90}" "$PY" -m pytest -q \
    -p no:cacheprovider -o addopts="-rA" --tb=short \
    tests/gpu/test_host_gather_gpu.py >"$OUT/tests_gather.txt" 2>&1 || status=1
fi

if [[ "${PROFILE:-0}" == 1 ]]; then
  OUT="$OUT/profile" timeout "${PROFILE_TIMEOUT:-300}" bash scripts/gpu_profile.sh \
    >"$OUT/profile.txt" 2>&1 \
    || status=1
  # One file back instead of two per case.
  tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
  cat "$OUT/profile.txt"
fi

if [[ "${TILING:-0}" == 1 ]]; then
  timeout -s INT "${TILING_TIMEOUT:-$(( ${TILING_BUDGET:-240} + 90 ))}" \
    "$PY" -m launch.bench_tiling \
    --budget_s="${TILING_BUDGET:-240}" --json="$OUT/tiling.json" \
    >"$OUT/tiling.txt" 2>&1 || status=1
  sed -n '/^best tiling/,$p' "$OUT/tiling.txt"
fi

if [[ "${STORAGE:-0}" == 1 ]]; then
  mkdir -p /var/tmp/dpj_store
  timeout "${STORAGE_TIMEOUT:-120}" "$PY" -m launch.bench_storage \
    --recompute=none --dir=/var/tmp/dpj_store --global_drop \
    --configs=raw,file:raw@out=1,file:raw@out=1@chunk_writer=tensorstore \
    --store_bytes=1073741824 --queue_depth=32 --repeats=3 \
    --latency_samples=20 --json="$OUT/storage.json" \
    >"$OUT/storage.txt" 2>&1 || status=1
  tail -n 25 "$OUT/storage.txt"
fi

# The summaries last, so that the end of the output holds them.
sed -n '/^targets/,$p' "$OUT/bench.txt"
grep -E '^(FAILED|ERROR)' "$OUT/tests.txt" | head -20
tail -n 2 "$OUT/tests.txt"
[[ -s "$OUT/tests_gather.txt" ]] && tail -n 3 "$OUT/tests_gather.txt"
exit $status
