"""What `launch.kernel_sass` reports of one kernel configuration: the
Triton IR compiled for sm_90 by the `triton` package, its disassembly and
resource usage read by `launch.sass_analysis`, and the per-step figures
that relate a loop's instructions to the bytes it reads and the matmuls it
runs. No absl flags here, so that tests and other tools can import it
beside other launchers.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
from typing import Any

from launch import kernel_cases
from launch import sass_analysis

KERNELS = ("triton_decode", "triton_prefill")


class NoCompiler(RuntimeError):
  """The `triton` package, or its disassembler, is not installed."""


@dataclasses.dataclass(frozen=True)
class Compiled:
  sass: str
  resource_usage: str
  shared_bytes: int  # the program's dynamic shared memory


def tools() -> tuple[Any, str]:
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
  triton, bin_dir = tools()
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  # Multiply-adds fused, Triton's default and XLA's; set, as triton 3.9
  # warns when it is not.
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


def step_tokens(shape, tiling) -> int:
  """Keys one inner-loop step reads."""
  return tiling.pages_per_chunk * shape.page // tiling.page_parts


def step_kv_bytes(shape, tiling) -> int:
  """K/V bytes one inner-loop step reads: its tokens' keys and values, and
  for int8 their pages' key and value scales."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  data = (step_tokens(shape, tiling) * shape.head_dim * 2
          * jnp.dtype(shape.dtype).itemsize)
  scales = 2 * 4 * tiling.pages_per_chunk if shape.dtype == "int8" else 0
  return data + scales


def step_flops(kernel: str, shape, tiling) -> int:
  """Matmul FLOPs of one step of one program, padding rows included (the
  tensor cores multiply them too): q.K^T and p.V over the step's keys."""
  from kernels import decode_triton  # pylint: disable=import-outside-toplevel
  if kernel == "triton_prefill":
    rows = tiling.block_q
  else:
    rows = decode_triton.dot_rows(shape.heads // shape.kv_heads)
  return 4 * rows * step_tokens(shape, tiling) * shape.head_dim


def tilings(kernel: str, shape, grid: dict[str, list[int]]) -> list:
  """The kernel's default tiling for `shape`, then each combination of
  `grid` (step_tokens, warps, stages and, for prefill, block_q) that
  differs from it; fields the grid leaves out (decode's splits) stay the
  default's: they do not change the loop. The decode of an int8 pool takes
  each also with its queries in int8 (`int8_query`), right after it."""
  from kernels import tuning  # pylint: disable=import-outside-toplevel
  default = kernel_cases.default_tiling(kernel, shape)
  out = [default]
  block_qs = grid.get("block_q") or [None]
  for tokens, w, s, bq in itertools.product(
      grid["step_tokens"], grid["warps"], grid["stages"], block_qs):
    chunk, parts = tuning.step_split(shape.page, tokens)
    fields = dict(pages_per_chunk=chunk, page_parts=parts, num_warps=w,
                  num_stages=s)
    if bq is not None:
      fields["block_q"] = bq
    t = dataclasses.replace(default, **fields)
    if t not in out:
      out.append(t)
  if kernel == "triton_decode" and shape.dtype == "int8":
    out = [v for t in out for v in (t, dataclasses.replace(t,
                                                         int8_query=True))]
  return out


def _inputs(kernel: str, shape):
  """The kernel's arguments as shapes and dtypes only (nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  make = (kernel_cases.prefill_inputs if kernel == "triton_prefill"
          else kernel_cases.decode_inputs)
  return jax.eval_shape(lambda: make(shape, 0)[0])


def loop_row(loop: sass_analysis.Loop, kernel: str, shape, tiling,
             top_ops: int) -> dict:
  """One matmul loop's figures."""
  sm = sass_analysis.HOPPER
  n = len(loop.instructions)
  issue = n * tiling.num_warps / sm.schedulers
  tensor = step_flops(kernel, shape, tiling) / sm.tensor_flops_per_clock
  per_kb = n * tiling.num_warps / (step_kv_bytes(shape, tiling) / 1024)
  mix = loop.mix()
  return {
      "label": loop.label, "instructions": n,
      "tensor_ops": {op: mix[op] for op in sass_analysis.TENSOR_OPS
                     if mix[op]},
      "issue_clocks_per_step": round(issue, 1),
      "tensor_clocks_per_step": round(tensor, 1),
      "issue_per_tensor": round(issue / tensor, 2),
      "warp_instructions_per_kb": round(per_kb, 1),
      "issue_ceiling_tbps": round(sass_analysis.issue_ceiling_tbps(per_kb),
                                  2),
      "mix": dict(mix.most_common(top_ops or None)),
  }


def analyse(kernel: str, shape, tiling, workdir: str, top_ops: int,
            v_transposed: bool = False) -> dict:
  """One configuration's row (`v_transposed`: the decode of a pool whose V
  pages are stored transposed)."""
  from kernels import lowering  # pylint: disable=import-outside-toplevel
  fn = kernel_cases.kernel_fn(
      "triton_decode_vt" if v_transposed else kernel, tiling, interpret=False)
  (ttir,) = lowering.triton_modules(fn, _inputs(kernel, shape))
  compiled = compile_for_hopper(ttir, tiling.num_warps, tiling.num_stages,
                                workdir)
  used = sass_analysis.resources(compiled.resource_usage)
  shared = compiled.shared_bytes + used.static_shared
  occ = sass_analysis.occupancy(used.registers, shared, tiling.num_warps)
  loops = sass_analysis.matmul_loops(compiled.sass)
  if not loops:
    raise ValueError("no loop of the kernel runs a matmul")
  return {
      "kernel": kernel, "shape": dataclasses.asdict(shape),
      "tiling": dataclasses.asdict(tiling), "v_transposed": v_transposed,
      "step_tokens": step_tokens(shape, tiling),
      "registers": used.registers, "spill_bytes": used.spilled,
      "shared_bytes": shared,
      "programs_per_sm": occ.programs, "warps_per_sm": occ.warps,
      "limited_by": occ.limited_by,
      "loops": [loop_row(lp, kernel, shape, tiling, top_ops)
                for lp in loops],
  }
