#!/usr/bin/env bash
# The one script to run on a CUDA machine (H100/H200, jax 0.11.x), in order of
# what a short lease must not lose: first the environment (env.txt), then
# each section that is on, in this order:
#   BENCH=1    the kernel benchmark table and the gather/attention overlap
#              (JSON rewritten after every section, so a run cut short
#              keeps its rows; the one-kernel gather, an experiment, last)
#              -> bench.txt, bench_kernels_gpu.json, its plot
#              bench_kernels_gpu.png and compiled gathers
#              bench_kernels_gpu_gather_hlo.txt and
#              bench_kernels_gpu_gather_kernel_hlo.txt        ~4 min
#   TESTS=1    in one pytest process, the GPU kernel tests (Triton kernels,
#              Mosaic GPU decode on Hopper, block copy), the model's steps
#              with each kernel and the lowering tests -> tests.txt
#                                                             ~4.5 min
#              then, in a pytest process of its own (a crash there loses
#              nothing else), the one-kernel gather's tests -> tests_gather.txt
#              (TEST_WORKERS pytest-xdist processes share the GPU where
#              xdist is installed: the cases are compile-bound)
#   PROFILE=0  Nsight Compute profiles (scripts/gpu_profile.sh; CASES
#              overrides its list, CASE_TIMEOUT/REPLAY/NCU pass through)
#              -> profile.txt, profile.tgz                    ~35 s a case
#   TILING=0   the tiling sweep (launch.bench_tiling), TILING_BUDGET seconds
#              -> tiling.txt, tiling.json
#   STORAGE=0  the cold-tier benchmark on the machine's disk  ~1.5 min
#              -> storage.txt, storage.json
#   HOT_TIER=0 the engine's hot tier in pinned_host memory: its tests in a
#              pytest process of its own (the GPU module, then the CPU
#              modules as they are) -> hot_tier_tests.txt, then its copies
#              to and from the pool per memory against plain copies
#              (launch.bench_hot_tier, Llama-3-8B blocks) -> hot_tier.txt,
#              hot_tier.json, hot_tier.png                    ~2 min
# Everything it writes goes to $OUT (default /tmp/gpu_check; a relative path
# is taken from the directory the script is started in). A section that runs
# first removes its own outputs of an earlier run; the summary at the end
# covers only the sections that ran (outputs of sections not run are left
# as they were). Python packages missing there travel as wheels in .whl/
# (installed into /tmp/site).
#
# Other variables it reads:
#   PYTHON               the interpreter (default python3)
#   BENCH_ONLY           launch.bench_kernels --only (default: every section)
#   BENCH_TIMEOUT=270    seconds for the benchmark
#   TEST_FILES           the first pytest process's files/tests (whitespace
#                        separated; default: the GPU kernel and model tests,
#                        the lowering tests, the Mosaic GPU lowering test)
#   TEST_WORKERS=4       pytest-xdist processes (1: none)
#   TEST_TIMEOUT=300     seconds for that pytest process
#   GATHER_TEST_TIMEOUT=90  seconds for the one-kernel gather's tests
#   PROFILE_TIMEOUT=300  seconds for all the profiles together
#   TILING_BUDGET=240    the sweep's --budget_s
#   TILING_KERNELS       the sweep's --kernels (default: all four)
#   TILING_TIMEOUT       seconds for the sweep (default TILING_BUDGET + 90)
#   STORAGE_TIMEOUT=120  seconds for the storage benchmark
#   HOT_TIER_TEST_TIMEOUT=90  seconds for the hot tier's tests
#   HOT_TIER_TIMEOUT=90  seconds for the hot-tier benchmark
#   DUALPATH_GIT_COMMIT  the commit every report records (the lease's copy
#                        of the tree carries stale git metadata): pass the
#                        output of `git rev-parse --short HEAD` run here
# Each step gets SIGINT at its timeout (pytest and the launchers then write
# what they have), and SIGKILL 20 s later if it is still running (a process
# stuck in native code): plan a lease as the sum of the timeouts that apply,
# plus 20 s each, plus ~20 s for the environment step.
#
#   OUT=/tmp/x bash scripts/gpu_check.sh                       # bench + tests
#   BENCH=0 TESTS=0 TILING=1 TILING_BUDGET=300 bash scripts/gpu_check.sh
#   BENCH_ONLY=decode,copy bash scripts/gpu_check.sh           # some sections
set -uo pipefail
# Resolved before the cd below, so that a relative OUT means the caller's.
OUT="$(realpath -m "${OUT:-/tmp/gpu_check}")"
cd "$(dirname "$0")/.."
mkdir -p "$OUT" || exit 1
PY="${PYTHON:-python3}"
# SIGKILL this many seconds after a step's timeout signal.
KILL_GRACE=20
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
ran=()  # the sections that ran, for the summary
if [[ "${BENCH:-1}" == 1 ]]; then
  ran+=(bench)
  rm -f "$OUT"/bench_kernels_gpu.json "$OUT"/bench_kernels_gpu.png \
    "$OUT"/bench_kernels_gpu_gather_hlo.txt \
    "$OUT"/bench_kernels_gpu_gather_kernel_hlo.txt
  timeout -s INT -k "$KILL_GRACE" "${BENCH_TIMEOUT:-270}" \
    "$PY" -m launch.bench_kernels \
    --only="${BENCH_ONLY:-calib,copy,decode,prefill,overlap,gather_kernel}" \
    --out="$OUT/bench_kernels_gpu.json" >"$OUT/bench.txt" 2>&1 || status=1
  grep -E '^(calib|decode|prefill|copy|overlap|section) ' "$OUT/bench.txt" | head -100
fi

if [[ "${TESTS:-1}" == 1 ]]; then
  ran+=(tests)
  # SIGINT, so that pytest still prints its summary when the time is up.
  workers=()
  if "$PY" -c 'import xdist' 2>/dev/null && [[ "${TEST_WORKERS:-4}" -gt 1 ]]; then
    # Several processes on one GPU: none may take most of its memory.
    workers=(-n "${TEST_WORKERS:-4}")
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
  fi
  read -r -d '' -a test_files <<<"${TEST_FILES:-tests/gpu/test_kernels_gpu.py
    tests/gpu/test_model_gpu.py tests/test_kernels_lowering.py
    tests/test_kernels_mosaic_gpu.py::test_decode_lowers_to_mosaic_gpu}"
  timeout -s INT -k "$KILL_GRACE" "${TEST_TIMEOUT:-300}" \
    "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="-rA" --tb=short --maxfail=20 "${workers[@]}" \
    "${test_files[@]}" >"$OUT/tests.txt" 2>&1 || status=1
  unset XLA_PYTHON_CLIENT_PREALLOCATE
  timeout -s INT -k "$KILL_GRACE" "${GATHER_TEST_TIMEOUT:-90}" \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="-rA" --tb=short \
    tests/gpu/test_host_gather_gpu.py >"$OUT/tests_gather.txt" 2>&1 || status=1
fi

if [[ "${PROFILE:-0}" == 1 ]]; then
  ran+=(profile)
  rm -rf "$OUT/profile" "$OUT/profile.tgz"
  OUT="$OUT/profile" timeout -k "$KILL_GRACE" "${PROFILE_TIMEOUT:-300}" \
    bash scripts/gpu_profile.sh >"$OUT/profile.txt" 2>&1 || status=1
  # One file back instead of two per case.
  if [[ -d "$OUT/profile" ]]; then
    tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
  fi
  cat "$OUT/profile.txt"
fi

if [[ "${TILING:-0}" == 1 ]]; then
  ran+=(tiling)
  rm -f "$OUT/tiling.json"
  timeout -s INT -k "$KILL_GRACE" \
    "${TILING_TIMEOUT:-$(( ${TILING_BUDGET:-240} + 90 ))}" \
    "$PY" -m launch.bench_tiling \
    --budget_s="${TILING_BUDGET:-240}" --json="$OUT/tiling.json" \
    ${TILING_KERNELS:+--kernels="$TILING_KERNELS"} \
    >"$OUT/tiling.txt" 2>&1 || status=1
  sed -n '/^best tiling/,$p' "$OUT/tiling.txt"
fi

if [[ "${STORAGE:-0}" == 1 ]]; then
  ran+=(storage)
  rm -f "$OUT/storage.json"
  mkdir -p /var/tmp/dpj_store
  timeout -k "$KILL_GRACE" "${STORAGE_TIMEOUT:-120}" \
    "$PY" -m launch.bench_storage \
    --recompute=none --dir=/var/tmp/dpj_store --global_drop \
    --configs=raw,file:raw@out=1,file:raw@out=1@chunk_writer=tensorstore \
    --store_bytes=1073741824 --queue_depth=32 --repeats=3 \
    --latency_samples=20 --json="$OUT/storage.json" \
    >"$OUT/storage.txt" 2>&1 || status=1
  tail -n 25 "$OUT/storage.txt"
fi

if [[ "${HOT_TIER:-0}" == 1 ]]; then
  ran+=(hot_tier)
  rm -f "$OUT/hot_tier.json" "$OUT/hot_tier.png"
  timeout -s INT -k "$KILL_GRACE" "${HOT_TIER_TEST_TIMEOUT:-90}" \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="-rA" --tb=short \
    tests/gpu/test_hot_tier_gpu.py tests/test_hot_tier_memory.py \
    tests/test_hot_tier.py >"$OUT/hot_tier_tests.txt" 2>&1 || status=1
  grep -E '^(FAILED|ERROR) tests/' "$OUT/hot_tier_tests.txt" | head -10
  tail -n 1 "$OUT/hot_tier_tests.txt"
  timeout -s INT -k "$KILL_GRACE" "${HOT_TIER_TIMEOUT:-90}" \
    "$PY" -m launch.bench_hot_tier --shape=llama3_8b --blocks=256 \
    --repeats=10 --json="$OUT/hot_tier.json" --plot="$OUT/hot_tier.png" \
    >"$OUT/hot_tier.txt" 2>&1 || status=1
  tail -n 12 "$OUT/hot_tier.txt"
fi

# The summaries last, so that the end of the output holds them: this run's
# sections only.
if [[ " ${ran[*]} " == *" bench "* ]]; then
  sed -n '/^targets/,$p' "$OUT/bench.txt"
fi
if [[ " ${ran[*]} " == *" tests "* ]]; then
  grep -E '^(FAILED|ERROR)' "$OUT/tests.txt" | head -20
  tail -n 2 "$OUT/tests.txt"
  [[ -s "$OUT/tests_gather.txt" ]] && tail -n 3 "$OUT/tests_gather.txt"
fi
echo "gpu_check: ran ${ran[*]:-no section}; outputs in $OUT (exit $status)"
exit $status
