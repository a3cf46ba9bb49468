r"""Static report of the Triton decode kernel's Hopper machine code, made on
a machine with no GPU.

    pip install -e '.[sass]'      # the `triton` package: compiler, nvdisasm
    python -m launch.kernel_sass                     # bf16 and int8, a grid
    python -m launch.kernel_sass --dtypes=int8 --stages=1,2 --warps=4,8

Each configuration of `kernels.decode_triton.paged_decode` (the default
tiling, then every combination of `--step_tokens`, `--warps` and
`--stages`) is exported for an H100 with `jax.export`; the Triton IR that
JAX's Pallas lowering produces (`kernels.lowering.triton_modules`) is
compiled for sm_90 by the `triton` package's compiler, and its SASS and
resource usage are read (`launch.sass_analysis`). Per configuration the
table gives registers per thread, bytes spilled to local memory, shared
memory, the programs and warps one SM holds and what limits them, the
instructions of the inner loop over K/V steps, the warp-instructions issued
per KB of K/V read, the K/V rate at which issuing them would take every
scheduler's every clock, and the loop's most frequent opcodes.

Nothing runs: this explains a measurement (`launch.bench_kernels` on a GPU)
and picks the tilings worth a GPU's minutes; it times nothing. The compiler
here is the `triton` package's, not the Triton that jaxlib's XLA carries on
the GPU; the JSON records the `triton` package's version beside jax's. Writes the JSON (default
docs/results/kernel_sass_sm90.json) atomically; prints the table. Without
the `triton` package it exits 1 with one line saying so.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

from dualpath_jax import metrics
from launch import kernel_cases
from launch import sass_analysis
from launch.kernel_cases import DecodeShape

FLAGS = flags.FLAGS
flags.DEFINE_list("dtypes", ["bfloat16", "int8"], "pool dtypes (int8: with "
                  "per-page scales, bf16 queries)")
flags.DEFINE_list("shape", ["64", "32", "8", "128", "16", "4096"],
                  "batch,heads,kv_heads,head_dim,page,ctx of the decode call")
flags.DEFINE_list("step_tokens", ["64", "128", "256"],
                  "tokens per inner-loop step to try (powers of 2)")
flags.DEFINE_list("warps", ["4", "8"], "warps per program to try")
flags.DEFINE_list("stages", ["1", "2", "3"], "software-pipeline stages to try")
flags.DEFINE_integer("top_ops", 6, "opcodes listed per row", lower_bound=0)
flags.DEFINE_string("json", "docs/results/kernel_sass_sm90.json",
                    "JSON output")

KERNEL = "triton_decode"


class NoCompiler(RuntimeError):
  """The `triton` package, or its disassembler, is not installed."""


@dataclasses.dataclass(frozen=True)
class Compiled:
  sass: str
  resource_usage: str
  shared_bytes: int  # the program's dynamic shared memory


def _tools() -> tuple[Any, str]:
  """The `triton` module and its folder of NVIDIA binaries."""
  try:
    import triton  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise NoCompiler("launch.kernel_sass needs the `triton` package "
                     "(pip install -e '.[sass]'): " + str(e)) from e
  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends",
                         "nvidia", "bin")
  for tool in ("nvdisasm", "cuobjdump"):
    if not os.access(os.path.join(bin_dir, tool), os.X_OK):
      raise NoCompiler(f"the `triton` package at {bin_dir} has no {tool}")
  return triton, bin_dir


def compile_for_hopper(ttir: str, num_warps: int, num_stages: int,
                       workdir: str) -> Compiled:
  """Compiles Triton IR text for sm_90 and disassembles it."""
  triton, bin_dir = _tools()
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  # XLA's Triton fuses multiply-adds; say so and keep the compiler quiet.
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  path = os.path.join(workdir, "kernel.ttir")
  with open(path, "w", encoding="utf-8") as f:
    f.write(ttir)
  kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps,
                                       num_stages=num_stages))
  cubin = os.path.join(workdir, "kernel.cubin")
  with open(cubin, "wb") as f:
    f.write(kernel.asm["cubin"])

  def run(tool, *args):
    return subprocess.run([os.path.join(bin_dir, tool), *args, cubin],
                          capture_output=True, text=True, check=True).stdout
  return Compiled(run("nvdisasm", "-c"),
                  run("cuobjdump", "--dump-resource-usage"),
                  int(kernel.metadata.shared))


def step_kv_bytes(shape: DecodeShape, tiling) -> int:
  """K/V bytes one inner-loop step reads: its tokens' keys and values, and
  for int8 their pages' key and value scales."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  tokens = tiling.pages_per_chunk * shape.page // tiling.page_parts
  data = tokens * shape.head_dim * 2 * jnp.dtype(shape.dtype).itemsize
  scales = 2 * 4 * tiling.pages_per_chunk if shape.dtype == "int8" else 0
  return data + scales


def tilings(shape: DecodeShape, step_tokens, warps, stages) -> list:
  """The kernel's default tiling for `shape`, then each combination of the
  grid that differs from it (splits as the default's: they do not change
  the loop)."""
  from kernels import tuning  # pylint: disable=import-outside-toplevel
  default = kernel_cases.default_tiling(KERNEL, shape)
  out = [default]
  for tokens, w, s in itertools.product(step_tokens, warps, stages):
    chunk, parts = tuning.step_split(shape.page, tokens)
    t = dataclasses.replace(default, pages_per_chunk=chunk, page_parts=parts,
                            num_warps=w, num_stages=s)
    if t not in out:
      out.append(t)
  return out


def analyse(shape: DecodeShape, tiling, workdir: str, top_ops: int) -> dict:
  """One configuration's row."""
  import jax  # pylint: disable=import-outside-toplevel
  from kernels import lowering  # pylint: disable=import-outside-toplevel
  args = jax.eval_shape(lambda: kernel_cases.decode_inputs(shape, 0)[0])
  fn = kernel_cases.kernel_fn(KERNEL, tiling, interpret=False)
  (ttir,) = lowering.triton_modules(fn, args)
  compiled = compile_for_hopper(ttir, tiling.num_warps, tiling.num_stages,
                                workdir)
  used = sass_analysis.resources(compiled.resource_usage)
  shared = compiled.shared_bytes + used.static_shared
  occ = sass_analysis.occupancy(used.registers, shared, tiling.num_warps)
  loop = sass_analysis.main_loop(compiled.sass)
  step_bytes = step_kv_bytes(shape, tiling)
  per_kb = len(loop.instructions) * tiling.num_warps / (step_bytes / 1024)
  return {
      "kernel": KERNEL, "shape": dataclasses.asdict(shape),
      "tiling": dataclasses.asdict(tiling),
      "step_tokens": tiling.pages_per_chunk * shape.page // tiling.page_parts,
      "registers": used.registers, "spill_bytes": used.spilled,
      "shared_bytes": shared,
      "programs_per_sm": occ.programs, "warps_per_sm": occ.warps,
      "limited_by": occ.limited_by,
      "loop_instructions": len(loop.instructions),
      "step_kv_bytes": step_bytes,
      "warp_instructions_per_kb": round(per_kb, 1),
      "issue_ceiling_tbps": round(sass_analysis.issue_ceiling_tbps(per_kb), 2),
      "loop_mix": dict(loop.mix().most_common(top_ops or None)),
  }


HEADER = (f"{'dtype':8} {'step':>4} {'warps':>5} {'stg':>3} {'regs':>4} "
          f"{'spill':>5} {'smem KB':>7} {'prog/SM':>7} {'warps/SM':>8} {'limit':>9} "
          f"{'loop':>5} {'wi/KB':>6} {'issue TB/s':>10}  loop mix")


def fmt_row(row: dict, default: bool) -> str:
  """One table line; `*` marks the kernel's default tiling."""
  t = row["tiling"]
  mix = " ".join(f"{k}:{v}" for k, v in row["loop_mix"].items())
  limit = {"shared memory": "smem"}.get(row["limited_by"], row["limited_by"])
  return (f"{row['shape']['dtype']:8} {row['step_tokens']:>4} "
          f"{t['num_warps']:>5} {t['num_stages']:>3} {row['registers']:>4} "
          f"{row['spill_bytes']:>5} "
          f"{row['shared_bytes'] / 1024:>7.0f} {row['programs_per_sm']:>7} "
          f"{row['warps_per_sm']:>8} {limit:>9} "
          f"{row['loop_instructions']:>5} "
          f"{row['warp_instructions_per_kb']:>6.1f} "
          f"{row['issue_ceiling_tbps']:>10.2f}{'*' if default else ' '} {mix}")


def _ints(name: str, values, power_of_2: bool = False) -> list[int]:
  """A list flag's values as positive ints (powers of 2 if asked)."""
  try:
    out = [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--{name}: not an integer list: {values}") from e
  if not out or any(v < 1 or (power_of_2 and v & (v - 1)) for v in out):
    raise ValueError(f"--{name}: need positive integers"
                     f"{' (powers of 2)' if power_of_2 else ''}; got {out}")
  return out


def parse_flags() -> tuple[list[DecodeShape], list[int], list[int],
                           list[int]]:
  """The shapes (one per dtype) and the grid, checked; ValueError says
  which flag is wrong."""
  dims = _ints("shape", FLAGS.shape)
  if len(dims) != 6:
    raise ValueError("--shape: need batch,heads,kv_heads,head_dim,page,ctx; "
                     f"got {FLAGS.shape}")
  for d in FLAGS.dtypes:
    if d not in kernel_cases.DTYPES:
      raise ValueError(f"--dtypes: {d!r} is none of {kernel_cases.DTYPES}")
  try:
    shapes = [DecodeShape(*dims, d) for d in FLAGS.dtypes]
  except ValueError as e:  # heads not a multiple of kv_heads, ...
    raise ValueError(f"--shape: {e}") from e
  from kernels import decode_triton  # pylint: disable=import-outside-toplevel
  for name, n in (("head_dim", dims[3]), ("page", dims[4])):
    if not decode_triton.tileable(n):
      raise ValueError(f"--shape: the Triton kernel needs {name} a power of "
                       f"2 >= {decode_triton.MIN_DOT_ROWS}; got {n}")
  steps = _ints("step_tokens", FLAGS.step_tokens, power_of_2=True)
  if min(steps) < decode_triton.MIN_DOT_ROWS:
    raise ValueError(f"--step_tokens: at least "
                     f"{decode_triton.MIN_DOT_ROWS}; got {steps}")
  return (shapes, steps, _ints("warps", FLAGS.warps, power_of_2=True),
          _ints("stages", FLAGS.stages))


def main(argv):
  del argv
  try:
    shapes, steps, warps, stages = parse_flags()
    metrics.check_output_path(FLAGS.json, "--json")
    triton, _ = _tools()
  except (ValueError, NoCompiler) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  import jax  # pylint: disable=import-outside-toplevel
  report = {"kind": "kernel_sass", "target": sass_analysis.HOPPER.name,
            "triton_version": triton.__version__,
            "command": " ".join(["python -m launch.kernel_sass"]
                                + sys.argv[1:]),
            "environment": metrics.run_environment(),
            "limits": dataclasses.asdict(sass_analysis.HOPPER), "rows": []}
  configs = [(s, t) for s in shapes
             for t in tilings(s, steps, warps, stages)]
  print(f"jax {jax.__version__} -> Triton IR -> triton {triton.__version__} "
        f"-> {sass_analysis.HOPPER.name}; {len(configs)} configurations; "
        "* = the kernel's default tiling", flush=True)
  print(HEADER, flush=True)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="kernel_sass_") as workdir:
    for shape, tiling in configs:
      default = tiling == kernel_cases.default_tiling(KERNEL, shape)
      try:
        row = analyse(shape, tiling, workdir, FLAGS.top_ops)
      except Exception as e:  # pylint: disable=broad-except
        kernel_cases.reraise_if_interrupted(e)
        row = {"kernel": KERNEL, "shape": dataclasses.asdict(shape),
               "tiling": dataclasses.asdict(tiling),
               "error": kernel_cases.error_line(e)}
        print(f"{shape.dtype:8} {tiling}: {row['error']}", flush=True)
      else:
        print(fmt_row(row, default), flush=True)
      row["default"] = default
      report["rows"].append(row)
      metrics.write_json(report, FLAGS.json)
  failed = sum("error" in r for r in report["rows"])
  print(f"{len(configs) - failed} of {len(configs)} configurations analysed "
        f"in {time.perf_counter() - start:.0f} s; JSON: {FLAGS.json}")
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
