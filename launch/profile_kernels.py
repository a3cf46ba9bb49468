r"""Runs one kernel on one shape a few times, for a profiler to capture.

    ncu --nvtx --nvtx-include dpj_profile/ --launch-count 4 \
        python -m launch.profile_kernels --kernel=mosaic_decode \
        --shape=1,32,8,128,16,32768,bfloat16
    bash scripts/gpu_profile.sh        # the shapes that missed a target
    python -m launch.profile_kernels --summarize=ncu.csv   # key metrics

Where the benchmark (`launch.bench_kernels`) misses a target, the issue asks
for the profile that shows the limit: this launcher gives a profiler (Nsight
Compute's `ncu`) a process that compiles the kernel once, checks it against
the reference, then calls it `--calls` times inside an NVTX range
(`dpj_profile`), so that `ncu --nvtx --nvtx-include dpj_profile/` captures
only those calls, not the warm-up's. Decode shapes are `batch,heads,
kv_heads,head_dim,page,ctx,dtype`; prefill shapes add the new tokens after
the context: `batch,heads,kv_heads,head_dim,page,prefix,new,dtype` (sizes
>= 1, prefix >= 0, heads a multiple of kv_heads, page a power of two, dtype
bfloat16/float16/float32/int8). A shape the kernel cannot run is a usage
error (exit 1, no traceback).
"""

from __future__ import annotations

import contextlib
import sys

from absl import app, flags

from dualpath_jax.interrupts import ctrl_c_ends_quietly
from launch.kernel_cases import (KERNELS, kernel_fn, parse_shape, problem,
                                 rel_err)

FLAGS = flags.FLAGS
flags.DEFINE_enum("kernel", "mosaic_decode", list(KERNELS),
                  "kernel to run (default tiling)")
flags.DEFINE_list("shape", ["1", "32", "8", "128", "16", "32768", "bfloat16"],
                  "decode: batch,heads,kv_heads,head_dim,page,ctx,dtype; "
                  "prefill: batch,heads,kv_heads,head_dim,page,prefix,new,"
                  "dtype")
flags.DEFINE_integer("calls", 5, "calls after the checked warm-up call",
                     lower_bound=1)
flags.DEFINE_string("summarize", None, "instead of running a kernel: print "
                    "the key metrics of an `ncu --csv --page details` file")

# What tells a memory-bound kernel's limit, as Nsight Compute names it.
KEY_METRICS = (
    "Duration", "DRAM Throughput", "Memory Throughput", "L2 Hit Rate",
    "Compute (SM) Throughput", "Registers Per Thread",
    "Dynamic Shared Memory Per Block", "Static Shared Memory Per Block",
    "Block Limit Shared Mem", "Block Limit Registers", "Grid Size",
    "Theoretical Occupancy", "Achieved Occupancy", "Waves Per SM",
    "Warp Cycles Per Issued Instruction", "Issued Warp Per Scheduler",
    "No Eligible")


# The NVTX range around the profiled calls (after the checked warm-up), so
# that `ncu --nvtx --nvtx-include "dpj_profile/"` captures only their
# kernels, whatever the compilers named them.
PROFILE_RANGE = "dpj_profile"


@contextlib.contextmanager
def nvtx_range(name: str):
  """An NVTX range through torch's binding where torch with CUDA is
  installed (the GPU hosts), else nothing (and the profiler selects by
  kernel name instead)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    nvtx = torch.cuda.nvtx if torch.cuda.is_available() else None
  except ImportError:
    nvtx = None
  if nvtx is None:
    yield
    return
  nvtx.range_push(name)
  try:
    yield
  finally:
    nvtx.range_pop()


def check_cases(cases: list[str]) -> int:
  """Checks `kernel:shape` cases (scripts/gpu_profile.sh's CASES) before
  any runs: prints each bad one and returns 2 if any, else 0."""
  bad = 0
  for case in cases:
    kernel, sep, shape = case.partition(":")
    if not sep:
      print(f"bad case {case!r}: not KERNEL:SHAPE", file=sys.stderr)
      bad += 1
      continue
    try:
      parse_shape(kernel, shape.split(","))
    except ValueError as e:
      print(f"bad case {case!r}: {kernel} cannot run {shape}: {e}",
            file=sys.stderr)
      bad += 1
  return 2 if bad else 0


def summarize(path: str) -> list[tuple[str, str, str, str]]:
  """(kernel, metric, unit, value) rows of `KEY_METRICS` in an ncu CSV."""
  import csv
  rows = []
  with open(path, newline="") as f:
    for rec in csv.DictReader(line for line in f if line.startswith('"')):
      name = rec.get("Metric Name", "")
      if name in KEY_METRICS:
        rows.append((rec.get("Kernel Name", "")[:40], name,
                     rec.get("Metric Unit", ""), rec.get("Metric Value", "")))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.summarize:
    try:
      rows = summarize(FLAGS.summarize)
    except (OSError, UnicodeDecodeError) as e:
      raise app.UsageError(f"--summarize: cannot read {FLAGS.summarize}: "
                           f"{getattr(e, 'strerror', None) or e}") from e
    if not rows:
      raise app.UsageError(f"no Nsight Compute metrics in {FLAGS.summarize}")
    for kernel, name, unit, value in rows:
      print(f"{kernel:40s} {name:36s} {value:>14s} {unit}")
    return
  try:
    shape = parse_shape(FLAGS.kernel, FLAGS.shape)
  except ValueError as e:
    raise app.UsageError(f"{FLAGS.kernel} cannot run --shape="
                         f"{','.join(FLAGS.shape)}: {e}") from e
  import jax
  interpret = jax.default_backend() != "gpu"
  try:  # the kernels refuse what they cannot run with a ValueError
    args, ref, _, _ = problem(FLAGS.kernel, shape, 0)
    fn = kernel_fn(FLAGS.kernel, None, interpret)
    err = rel_err(fn(*args), ref)
  except ValueError as e:
    first = (str(e).splitlines() or [""])[0]
    raise app.UsageError(f"{FLAGS.kernel} cannot run {shape}: {first}"
                         ) from e
  print(f"{FLAGS.kernel} {shape}: rel_err {err:.1e} vs the reference",
        flush=True)
  out = None
  with nvtx_range(PROFILE_RANGE):  # what `ncu --nvtx-include` selects
    for _ in range(FLAGS.calls):
      out = fn(*args)
    jax.block_until_ready(out)
  print(f"ran {FLAGS.calls} more calls", flush=True)


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "profile_kernels"))
