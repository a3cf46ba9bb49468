r"""Static report of the Triton kernels' Hopper machine code, made on a
machine with no GPU.

    pip install -e '.[sass]'      # the `triton` package: compiler, nvdisasm
    python -m launch.kernel_sass                      # decode, bf16 and int8
    python -m launch.kernel_sass --dtypes=int8 --stages=1,2 --warps=4,8
    python -m launch.kernel_sass --kernel=triton_prefill --dtypes=bfloat16

Each configuration of the kernel (its default tiling for the shape, then
every combination of the grid flags) is exported for an H100 with
`jax.export`; the Triton IR that JAX's Pallas lowering produces
(`kernels.lowering.triton_modules`) is compiled for sm_90 by the `triton`
package's compiler, and its SASS and resource usage are read
(`launch.sass_analysis`). Per configuration: registers per thread, bytes
spilled, shared memory, the programs and warps one SM holds and what limits
them, and for each loop that runs matmuls (decode: the one over K/V steps;
prefill: the unmasked prefix loop, then the causal one) its instructions,
its tensor-core instruction (`HGMMA` is Hopper's `wgmma`, `HMMA` the older
`mma.sync`), its most frequent opcodes, and how long issuing it takes
beside the work it does:

* decode (bound by reading K/V): warp-instructions per KB of K/V a step
  reads, and the K/V rate at which issuing them would take every scheduler
  of every SM every clock ("issue ceiling");
* prefill (bound by matmuls): a step's issue clocks (its warp-instructions
  over the SM's four schedulers) over its tensor clocks (its matmul FLOPs
  at the SM's dense bf16 rate). Above 1, issuing alone takes longer than
  the matmuls, and a program only reaches the tensor peak if another one
  on the SM issues while it multiplies.

An int8 pool's decode is also compiled with its queries in int8 (the
`int8_query` option: q @ K^T as an int8 matmul), each beside its twin;
the table marks those rows `int8+q8`. `--v_transposed` compiles the decode
for a pool whose V pages are stored transposed (`v_transposed`; rows
marked `+vt`):

    python -m launch.kernel_sass --dtypes=int8 --v_transposed

Nothing runs: this explains a measurement (`launch.bench_kernels` on a GPU)
and picks the tilings worth a GPU's minutes; it times nothing. The compiler
here is the `triton` package's, not the Triton that jaxlib's XLA carries on
the GPU; the JSON records the `triton` package's version beside jax's.
Writes the JSON (default docs/results/kernel_sass_sm90.json) atomically;
prints the table. Without the `triton` package it exits 1 with one line
saying so.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time

from absl import app, flags

from dualpath_jax import metrics
from dualpath_jax import outputs
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from launch import kernel_cases
from launch import list_flags
from launch import sass_analysis
from launch import sass_report
from launch.sass_report import KERNELS, NoCompiler

# Per kernel: the benchmark shape the report defaults to, and its grid.
DEFAULT_SHAPE = {"triton_decode": "64,32,8,128,16,4096",
                 "triton_prefill": "1,32,8,128,16,16384,512"}
DEFAULT_GRID = {
    "triton_decode": dict(step_tokens="64,128,256", warps="4,8",
                          stages="1,2,3", block_q=""),
    "triton_prefill": dict(step_tokens="32,64,128", warps="4,8",
                           stages="2,3", block_q="64,128"),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("kernel", "triton_decode", KERNELS, "the kernel to compile")
flags.DEFINE_list("dtypes", ["bfloat16", "int8"], "pool dtypes (int8: with "
                  "per-page scales, bf16 queries)")
flags.DEFINE_list("shape", None, "decode: batch,heads,kv_heads,head_dim,"
                  "page,ctx; prefill: batch,heads,kv_heads,head_dim,page,"
                  "prefix,new (default: " + "; ".join(
                      f"{k} {v}" for k, v in DEFAULT_SHAPE.items()) + ")")
flags.DEFINE_list("step_tokens", None, "tokens per inner-loop step to try "
                  "(powers of 2; default: decode 64,128,256, prefill "
                  "32,64,128)")
flags.DEFINE_list("warps", None, "warps per program to try (default 4,8)")
flags.DEFINE_list("stages", None, "software-pipeline stages to try "
                  "(default: decode 1,2,3, prefill 2,3)")
flags.DEFINE_list("block_q", None, "prefill: query rows per program to try "
                  "(powers of 2; default 64,128)")
flags.DEFINE_bool("v_transposed", False, "decode: compile for a pool whose "
                  "V pages are stored transposed (`v_transposed`)")
flags.DEFINE_integer("top_ops", 6, "opcodes listed per loop", lower_bound=0)
flags.DEFINE_string("json", "docs/results/kernel_sass_sm90.json",
                    "JSON output")


def header(kernel: str) -> str:
  """The table's column names."""
  tiling = ("step warps stg" if kernel == "triton_decode"
            else "  bq step warps stg")
  per_loop = ("loop  wi/KB issue TB/s" if kernel == "triton_decode"
              else "loops (instructions, issue/tensor clocks)")
  return (f"{'dtype':8} {tiling} {'regs':>4} {'spill':>5} {'smem KB':>7} "
          f"{'prog/SM':>7} {'warps/SM':>8} {'limit':>9}  {per_loop}  "
          "tensor op, loop mix")


def fmt_row(row: dict, default: bool) -> str:
  """One table line; `*` marks the kernel's default tiling."""
  t = row["tiling"]
  tiling = f"{row['step_tokens']:>4} {t['num_warps']:>5} {t['num_stages']:>3}"
  if row["kernel"] == "triton_prefill":
    tiling = f"{t['block_q']:>4} " + tiling
  limit = {"shared memory": "smem"}.get(row["limited_by"], row["limited_by"])
  loops = row["loops"]
  if row["kernel"] == "triton_decode":
    lp = loops[-1]
    figures = (f"{lp['instructions']:>4} {lp['warp_instructions_per_kb']:>6.1f}"
               f" {lp['issue_ceiling_tbps']:>10.2f}")
  else:
    figures = " ".join(f"{lp['instructions']:>4} {lp['issue_per_tensor']:>4.2f}"
                       for lp in loops)
  main = max(loops, key=lambda lp: lp["instructions"])
  ops = " ".join(f"{k}:{v}" for k, v in main["tensor_ops"].items())
  mix = " ".join(f"{k}:{v}" for k, v in main["mix"].items())
  dtype = (row["shape"]["dtype"] + ("+q8" if t.get("int8_query") else "")
           + ("+vt" if row.get("v_transposed") else ""))
  return (f"{dtype:8} {tiling} {row['registers']:>4} "
          f"{row['spill_bytes']:>5} {row['shared_bytes'] / 1024:>7.0f} "
          f"{row['programs_per_sm']:>7} {row['warps_per_sm']:>8} "
          f"{limit:>9}{'*' if default else ' '} {figures}  {ops}, {mix}")


def _flag(name: str) -> list[str]:
  """A list flag's values, or the kernel's default."""
  value = getattr(FLAGS, name)
  if value is None:
    value = (DEFAULT_SHAPE[FLAGS.kernel] if name == "shape"
             else DEFAULT_GRID[FLAGS.kernel][name]).split(",")
  return [v for v in value if v]


def parse_flags() -> tuple[list, dict[str, list[int]]]:
  """The shapes (one per dtype) and the grid, checked; ValueError says
  which flag is wrong."""
  from kernels import decode_triton  # pylint: disable=import-outside-toplevel
  if not FLAGS.dtypes:
    raise ValueError(f"--dtypes: give at least one of {kernel_cases.DTYPES}")
  for d in FLAGS.dtypes:
    if d not in kernel_cases.DTYPES:
      raise ValueError(f"--dtypes: {d!r} is none of {kernel_cases.DTYPES}")
  try:
    shapes = [kernel_cases.parse_shape(FLAGS.kernel, _flag("shape"), d)
              for d in FLAGS.dtypes]
  except ValueError as e:  # a count, a non-integer, heads over kv_heads...
    raise ValueError(f"--shape: {e}") from e
  for name in ("head_dim", "page"):
    n = getattr(shapes[0], name)
    if not decode_triton.tileable(n):
      raise ValueError(f"--shape: the Triton kernels need {name} a power "
                       f"of 2 >= {decode_triton.MIN_DOT_ROWS}; got {n}")
  ints = list_flags.positive_ints
  grid = {"step_tokens": ints("step_tokens", _flag("step_tokens"),
                              power_of_2=True),
          "warps": ints("warps", _flag("warps"), power_of_2=True),
          "stages": ints("stages", _flag("stages"))}
  if min(grid["step_tokens"]) < decode_triton.MIN_DOT_ROWS:
    raise ValueError(f"--step_tokens: at least "
                     f"{decode_triton.MIN_DOT_ROWS}; got {grid['step_tokens']}")
  if FLAGS.kernel == "triton_prefill":
    grid["block_q"] = ints("block_q", _flag("block_q"), power_of_2=True)
  elif FLAGS.block_q is not None:
    raise ValueError("--block_q: only the prefill kernel has query blocks")
  if FLAGS.v_transposed and FLAGS.kernel != "triton_decode":
    raise ValueError("--v_transposed: only the decode kernel reads V "
                     "transposed")
  return shapes, grid


def main(argv):
  del argv
  try:
    shapes, grid = parse_flags()
    outputs.check_output_path(FLAGS.json, "--json")
    triton, _ = sass_report.tools()
  except (ValueError, NoCompiler) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  import jax  # pylint: disable=import-outside-toplevel
  kernel = FLAGS.kernel
  report = {"kind": "kernel_sass", "kernel": kernel,
            "target": sass_analysis.HOPPER.name,
            "triton_version": triton.__version__,
            "command": " ".join(["python -m launch.kernel_sass"]
                                + sys.argv[1:]),
            "environment": metrics.run_environment(),
            "limits": dataclasses.asdict(sass_analysis.HOPPER), "rows": []}
  configs = [(s, t) for s in shapes
             for t in sass_report.tilings(kernel, s, grid)]
  print(f"{kernel}: jax {jax.__version__} -> Triton IR -> triton "
        f"{triton.__version__} -> {sass_analysis.HOPPER.name}; "
        f"{len(configs)} configurations; * = the kernel's default tiling",
        flush=True)
  print(header(kernel), flush=True)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="kernel_sass_") as workdir:
    for shape, tiling in configs:
      default = tiling == kernel_cases.default_tiling(kernel, shape)
      try:
        row = sass_report.analyse(kernel, shape, tiling, workdir,
                                  FLAGS.top_ops, FLAGS.v_transposed)
      except Exception as e:  # pylint: disable=broad-except
        kernel_cases.reraise_if_interrupted(e)
        row = {"kernel": kernel, "shape": dataclasses.asdict(shape),
               "tiling": dataclasses.asdict(tiling),
               "v_transposed": FLAGS.v_transposed,
               "error": kernel_cases.error_line(e)}
        print(f"{shape.dtype:8} {tiling}: {row['error']}", flush=True)
      else:
        print(fmt_row(row, default), flush=True)
      row["default"] = default
      report["rows"].append(row)
      outputs.write_json(report, FLAGS.json)
  failed = sum("error" in r for r in report["rows"])
  print(f"{len(configs) - failed} of {len(configs)} configurations analysed "
        f"in {time.perf_counter() - start:.0f} s; JSON: {FLAGS.json}")
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "kernel_sass"))
