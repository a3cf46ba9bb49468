#!/usr/bin/env bash
# Nsight Compute profiles of the kernels on the shapes where
# launch.bench_kernels missed a target (docs/benchmarks.md, "GPU"): memory
# and compute throughput, occupancy and its limits, warp stalls. One ncu run
# per case, profiling the launches of one call after the warm-up (an NVTX
# range, through torch's binding on the GPU hosts); the CSV of each goes
# to $OUT (default /tmp/gpu_profile; a relative path is taken from the
# directory the script is started in) and its key metrics to the output.
# About 30-40 s a case on an H100.
#
# Variables it reads:
#   CASES         whitespace-separated KERNEL:SHAPE cases (launch.profile_kernels'
#                 --kernel and --shape; default: the shapes below), all
#                 checked before anything runs under ncu
#   CASE_TIMEOUT  seconds for one ncu run of a case (default 150; SIGKILL
#                 20 s later); a case may take one run per replay mode
#   REPLAY        ncu replay modes to try in turn until one gives metrics
#                 (default "kernel application")
#   NCU           the ncu binary (default: ncu on PATH, else the first under
#                 /opt/nvidia/nsight-compute)
#   PYTHON        the interpreter (default python3)
# Worst case: cases x replay modes x (CASE_TIMEOUT + 20) seconds.
#
#   OUT=/tmp/p bash scripts/gpu_profile.sh
#   CASES="mosaic_decode:1,32,8,128,16,32768,bfloat16" bash scripts/gpu_profile.sh
set -uo pipefail
# Resolved before the cd below, so that a relative OUT means the caller's.
OUT="$(realpath -m "${OUT:-/tmp/gpu_profile}")"
cd "$(dirname "$0")/.."
mkdir -p "$OUT" || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Under ncu, JAX's default preallocation (75% of the GPU) and XLA's
# autotuning ran out of memory or crashed the profiled process on an H100
# (2026-11-26); the kernels profiled do not depend on either.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="--xla_gpu_autotune_level=0${XLA_FLAGS:+ $XLA_FLAGS}"
PY="${PYTHON:-python3}"
CASES="${CASES:-mosaic_decode:1,32,8,128,16,32768,bfloat16
mosaic_decode:64,32,8,128,16,4096,bfloat16
mosaic_decode:64,32,8,128,64,4096,bfloat16
mosaic_decode:64,32,8,128,16,4096,int8
triton_decode:64,32,8,128,16,4096,int8
triton_prefill:1,32,8,128,16,16384,512,bfloat16
mosaic_prefill:1,32,8,128,16,16384,512,bfloat16}"
read -r -d '' -a cases <<<"$CASES"
read -r -d '' -a replays <<<"${REPLAY:-kernel application}"
if [[ ${#cases[@]} -eq 0 ]]; then echo "CASES names no case"; exit 2; fi
if [[ ${#replays[@]} -eq 0 ]]; then echo "REPLAY names no replay mode"; exit 2; fi
# Every case checked first, with the parser launch.profile_kernels uses: a
# typo fails here in a second, not after the cases before it ran under ncu.
"$PY" -c 'import sys; from launch import profile_kernels as p
sys.exit(p.check_cases(sys.argv[1:]))' "${cases[@]}" || {
  echo "CASES: fix the cases above (KERNEL:SHAPE; see launch/profile_kernels.py)"
  exit 2; }
NCU="${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}"
if [[ -z "$NCU" ]]; then echo "no ncu found"; exit 1; fi
status=0
# A case's ncu runs in the background and the script waits for it, so that
# SIGINT or SIGTERM (Ctrl-C, gpu_check.sh's timeout) reaches the trap at
# once: it stops that ncu run (timeout passes the signal on to ncu and the
# profiled process) instead of leaving it on the GPU until CASE_TIMEOUT.
child=""
stop() {
  trap - INT TERM
  if [[ -n "$child" ]]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child" 2>/dev/null
  fi
  echo "interrupted: the case running was stopped; the CSVs in $OUT are the finished cases'"
  exit 130
}
trap stop INT TERM
i=0
for case in "${cases[@]}"; do
  i=$((i + 1))
  kernel="${case%%:*}"; shape="${case#*:}"
  csv="$OUT/ncu_${i}_${kernel}.csv"
  echo "== $i $kernel $shape"
  # Only the launches inside profile_kernels' NVTX range (after its checked
  # warm-up call): the kernel and its XLA epilogue, whatever they are named.
  # ncu's default kernel replay crashed the profiled process on two cases
  # (2026-11-26, H100); such a case is run again with application replay
  # (the whole process once per pass: slower, but no saved/restored state).
  # A usage error (a kernel that cannot run the shape here) is not retried.
  for replay in "${replays[@]}"; do
    timeout -k 20 "${CASE_TIMEOUT:-150}" "$NCU" --target-processes all \
      --replay-mode "$replay" \
      --nvtx --nvtx-include "dpj_profile/" --launch-count 4 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section LaunchStats --section Occupancy --section WarpStateStats \
      --section SchedulerStats --csv --page details \
      "$PY" -m launch.profile_kernels --kernel="$kernel" --shape="$shape" \
      --calls=1 >"$csv" 2>"$OUT/ncu_${i}.err" &
    child=$!
    wait "$child"
    rc=$?
    child=""
    [[ $rc -eq 0 ]] && grep -q '"Duration"' "$csv" && break
    echo "ncu (replay mode $replay) failed on case $i: $(tail -n 1 "$OUT/ncu_${i}.err")"
    # The launcher refused the case: another replay mode cannot help.
    grep -q "cannot run" "$OUT/ncu_${i}.err" && break
  done
  grep -h "rel_err" "$csv" "$OUT/ncu_${i}.err" | head -1
  "$PY" -m launch.profile_kernels --summarize="$csv" 2>/dev/null || {
    status=1; tail -n 5 "$OUT/ncu_${i}.err"; }
done
exit $status
