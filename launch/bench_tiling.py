r"""Tiling sweep of the Pallas kernels: which tile sizes are fastest per shape.

    python -m launch.bench_tiling                       # GPU: the default grid
    python -m launch.bench_tiling --preset=smoke        # CPU: tiny, interpret
    python -m launch.bench_tiling --kernels=mosaic_decode --budget_s=120

The defaults in `kernels/tuning.py` are reasoned; this launcher measures
them against a grid of alternatives on the shapes where the kernel benchmark
(`launch.bench_kernels`) missed a target: the Mosaic GPU decode kernel (step
tokens, ring depth, split count), the Triton decode kernel on int8 pools,
and the Triton prefill kernel (query rows, keys per step, warps, stages).
`--kernels=triton_decode_vt` sweeps the Triton decode's grid on int8 pools
whose V pages are stored transposed (`v_transposed`; not in the default
list).
Every configuration is checked against the XLA reference (full float32
precision) before it is timed, so a tiling that computes the wrong thing is
reported as such, never as fast. The default tiling is timed first; each row
gives its speed relative to it. Stops starting new configurations after
`--budget_s` seconds, shared evenly by the shapes (time a shape leaves
unused goes to the ones after it); the default tiling of every shape is
always timed. The JSON (with the run's date, command, versions and git
commit) is rewritten atomically after every configuration, so a run cut
short keeps what it measured; Ctrl-C writes the rows so far (`complete:
false`), prints the best tilings and exits 130. Prints the best tiling per
shape. The smoke preset (the default off a GPU) times one call (`--reps=1
--inner=1 --warmup_s=0`) unless those flags are given.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator

from absl import app, flags

from dualpath_jax import outputs
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from launch import float_flags
from launch import kernel_cases
from launch.kernel_cases import (KERNELS, DecodeShape, PrefillShape,
                                 default_tiling,
                                 kernel_fn, problem, rel_err, timeit)

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", None, ["gpu", "smoke"],
                  "shape set; default: gpu on a GPU backend, else smoke")
flags.DEFINE_list("kernels", ["mosaic_decode", "triton_prefill",
                              "mosaic_prefill", "triton_decode"],
                  "kernels to sweep")
flags.DEFINE_integer("reps", 5, "timed repetitions (median reported; smoke "
                     "preset: 1 unless given)", lower_bound=1)
flags.DEFINE_integer("inner", 5, "back-to-back calls per repetition, at least "
                     "(short calls get more, to fill kernel_cases.MIN_REP_S; "
                     "smoke preset: 1 unless given)", lower_bound=1)
float_flags.define_float("warmup_s", 0.2, "seconds of calls before timing each "
                         "configuration (the GPU's clock ramp; smoke preset: 0 "
                         "unless given)", lower_bound=0.0)
float_flags.define_float("budget_s", 240.0, "no new configuration starts after "
                         "this many seconds", lower_bound=0.0)
flags.DEFINE_string("json", None, "JSON output (default: docs/results/"
                    "bench_tiling_<backend>.json)")


PRESETS = {
    "gpu": dict(
        mosaic_decode=[DecodeShape(1, 32, 8, 128, 16, 32768, "bfloat16"),
                       DecodeShape(4, 32, 8, 128, 64, 32768, "bfloat16"),
                       DecodeShape(16, 32, 8, 128, 16, 16384, "bfloat16"),
                       DecodeShape(64, 32, 8, 128, 16, 4096, "bfloat16"),
                       DecodeShape(64, 32, 8, 128, 16, 4096, "int8")],
        triton_decode=[DecodeShape(64, 32, 8, 128, 16, 4096, "int8"),
                       DecodeShape(4, 32, 8, 128, 64, 32768, "int8")],
        triton_decode_vt=[DecodeShape(64, 32, 8, 128, 16, 4096, "int8"),
                          DecodeShape(4, 32, 8, 128, 64, 32768, "int8")],
        triton_prefill=[PrefillShape(1, 32, 8, 128, 16, 16384, 512,
                                     "bfloat16"),
                        PrefillShape(1, 32, 8, 128, 64, 32256, 512,
                                     "bfloat16")],
        mosaic_prefill=[PrefillShape(1, 32, 8, 128, 16, 16384, 512,
                                     "bfloat16")],
        step_tokens=(64, 128, 256), split_factors=(0.5, 1, 2, 4),
        stages=(2, 3, 4), triton_stages=(1, 2, 3), warps=(4, 8),
        block_q=(64, 128),
        prefill_step_tokens=(32, 64, 128)),
    "smoke": dict(
        mosaic_decode=[DecodeShape(2, 8, 2, 64, 16, 200, "bfloat16")],
        triton_decode=[DecodeShape(2, 4, 2, 64, 16, 100, "int8")],
        triton_decode_vt=[DecodeShape(2, 4, 2, 64, 16, 100, "int8")],
        triton_prefill=[PrefillShape(1, 4, 2, 64, 16, 48, 16, "float32")],
        mosaic_prefill=[PrefillShape(1, 4, 2, 64, 16, 48, 16, "bfloat16")],
        step_tokens=(64,), split_factors=(1, 2), stages=(2,),
        triton_stages=(2,), warps=(4,),
        block_q=(16,), prefill_step_tokens=(16, 32)),
}


def _step(block_size: int, tokens: int) -> dict[str, int]:
  """The tiling fields for steps of `tokens` tokens: whole pages, or parts
  of one large page."""
  from kernels import tuning
  return dict(zip(("pages_per_chunk", "page_parts"),
                  tuning.step_split(block_size, tokens)))


def _splits(default: int, factors, pages: int) -> list[int]:
  out = sorted({max(1, min(pages, int(round(default * f)))) for f in factors})
  return out


def _default_first(default, candidates: Iterator[Any]) -> Iterator[Any]:
  """`default`, then each candidate tiling not seen before."""
  seen = {default}
  yield default
  for t in candidates:
    if t not in seen:
      seen.add(t)
      yield t


def _spread(tilings: Iterator[Any], key: Callable[[Any], Any]
            ) -> Iterator[Any]:
  """`tilings` reordered round-robin over the values of `key` (e.g. the
  step size): a sweep cut short by its budget has then tried each value,
  not every combination of the first one only (the H100 sweep of
  2026-11-26 spent its budget on 64-token steps)."""
  groups: dict[Any, list[Any]] = {}
  for t in tilings:
    groups.setdefault(key(t), []).append(t)
  for batch in itertools.zip_longest(*groups.values()):
    yield from (t for t in batch if t is not None)


def _step_of(tiling) -> tuple[int, int]:
  return tiling.pages_per_chunk, tiling.page_parts


def _ids_first_twin(tiling) -> list[Any]:
  """The default's twin that reads a step's page ids before its copies
  (`ids_first`), timed right after the default where a step has several
  pages: the A/B that decides that option's default."""
  if tiling.pages_per_chunk == 1 or tiling.ids_first:
    return []
  return [dataclasses.replace(tiling, ids_first=True)]


def _padded_query_twin(tiling, s) -> list[Any]:
  """The Mosaic decode default's twin whose queries are padded to the
  64-row tile by an XLA op before the launch (the form before 2026-11-28),
  where the default copies them unpadded: the A/B of that launch."""
  from kernels import decode_mosaic_gpu
  if decode_mosaic_gpu.query_blocks(s.heads, s.kv_heads,
                                    pad=tiling.pad_query).padded:
    return []
  return [dataclasses.replace(tiling, pad_query=True)]


def _consumer_twins(tiling, quantized: bool) -> list[Any]:
  """The prefill default's twins with the other count of computing
  warpgroups (1, or 2 and a copying one: bf16/f16 pools only), with and
  without `ids_first`, timed right after the default."""
  if quantized:
    return []
  other = dataclasses.replace(tiling, consumers=3 - tiling.consumers)
  return [other, *_ids_first_twin(other)]


def mosaic_decode_grid(s: DecodeShape, cfg: dict) -> Iterator[Any]:
  """The Mosaic GPU decode kernel's default tiling, then its twins: with
  its queries padded before the launch; with a copying warpgroup (on its
  deep ring); one warpgroup on that deep ring (the default before the
  H200's second run); reading a step's page ids first. Then alternatives that fit its shared memory, each step size in
  turn (double steps with one program an SM among them)."""
  from kernels import decode_mosaic_gpu
  from kernels import tuning
  pages = -(-s.ctx // s.page)
  quantized = s.dtype == "int8"
  default = default_tiling("mosaic_decode", s)
  fits = lambda tokens, stages: tuning.mosaic_smem_bytes(
      tokens, s.head_dim, stages, quantized=quantized) <= (
          decode_mosaic_gpu.SMEM_BUDGET)
  copying = default_tiling("mosaic_decode", s, warp_specialized=True)
  return _default_first(default, itertools.chain(
      _padded_query_twin(default, s),
      [copying, dataclasses.replace(copying, copy_warpgroup=False)],
      _ids_first_twin(default),
      _spread((
      tuning.MosaicDecodeTiling(num_splits=splits, num_stages=stages,
                                **_step(s.page, tokens))
      for tokens, stages, splits in itertools.product(
          cfg["step_tokens"], cfg["stages"],
          _splits(default.num_splits, cfg["split_factors"], pages))
      if fits(tokens, stages)), _step_of)))


def _pipelining_twin(tiling) -> list[Any]:
  """The Triton decode default's twin with the other software pipelining
  (`num_stages` 1 or 2), timed right after the default. On int8 pools
  (unpipelined by default) the pipelined kernel needs 254 registers a
  thread (two programs an SM), unpipelined 160 (three) and a fifth fewer
  instructions a step, by the kernel's SASS compiled on CPU
  (`launch.kernel_sass`, docs/benchmarks.md)."""
  return [dataclasses.replace(tiling,
                              num_stages=2 if tiling.num_stages == 1 else 1)]


def _smaller_step_twins(tiling, block_size: int) -> list[Any]:
  """The Triton decode default's twins on steps of a half and a quarter of
  its tokens (at least 16, the smallest matmul Triton emits). On an H200
  the unpipelined int8 kernel ran 1.27x faster on 64-token steps than on
  its default 128 at 64 x 4k (docs/results/tiling_h200_2026-11-27.log):
  fewer registers a thread (125, four programs an SM, by `launch.
  kernel_sass`) for the widening of int8 to bf16."""
  tokens = tiling.pages_per_chunk * block_size // tiling.page_parts
  return [dataclasses.replace(tiling, **_step(block_size, tokens // d))
          for d in (2, 4) if tokens // d >= 16]


def _int8_query_twins(tilings: Iterator[Any], s: DecodeShape
                      ) -> Iterator[Any]:
  """Each Triton decode tiling of an int8 pool followed by its twin with
  int8 queries (`int8_query`): A/B pairs, however short the budget."""
  for t in tilings:
    yield t
    if s.dtype == "int8":
      yield dataclasses.replace(t, int8_query=True)


def triton_decode_grid(s: DecodeShape, cfg: dict) -> Iterator[Any]:
  """The Triton decode kernel's default tiling, its twin with the other
  pipelining and its twins on smaller steps, then alternatives; on an int8
  pool each followed by its twin with int8 queries."""
  from kernels import tuning
  pages = -(-s.ctx // s.page)
  default = default_tiling("triton_decode", s)
  return _int8_query_twins(_default_first(default, itertools.chain(
      _pipelining_twin(default), _smaller_step_twins(default, s.page),
      _spread((
          tuning.DecodeTiling(num_splits=splits, num_warps=warps,
                              num_stages=stages, **_step(s.page, tokens))
          for tokens, stages, warps, splits in itertools.product(
              cfg["step_tokens"], cfg["triton_stages"], cfg["warps"],
              _splits(default.num_splits, cfg["split_factors"], pages))),
          _step_of))), s)


def mosaic_prefill_grid(s: PrefillShape, cfg: dict) -> Iterator[Any]:
  """The Mosaic GPU prefill kernel's default page ring, then alternatives
  that fit its shared memory (one split)."""
  from kernels import decode_mosaic_gpu
  from kernels import tuning
  quantized = s.dtype == "int8"
  default = default_tiling("mosaic_prefill", s)
  return _default_first(default, itertools.chain(
      _consumer_twins(default, quantized), _ids_first_twin(default),
      _spread((
          tuning.MosaicDecodeTiling(num_splits=1, num_stages=stages,
                                    **_step(s.page, tokens))
          for tokens, stages in itertools.product(cfg["step_tokens"],
                                                  cfg["stages"])
          if tuning.mosaic_smem_bytes(tokens, s.head_dim, stages,
                                      quantized=quantized)
          <= decode_mosaic_gpu.SMEM_BUDGET), _step_of)))


def triton_prefill_grid(s: PrefillShape, cfg: dict) -> Iterator[Any]:
  """The Triton prefill kernel's default tiling, then alternatives."""
  from kernels import tuning
  default = default_tiling("triton_prefill", s)
  return _default_first(default, _spread((
      tuning.PrefillTiling(block_q=block_q, num_warps=warps,
                           num_stages=stages, **_step(s.page, tokens))
      for block_q, tokens, warps, stages in itertools.product(
          cfg["block_q"], cfg["prefill_step_tokens"], cfg["warps"],
          cfg["stages"])), lambda t: (t.block_q,) + _step_of(t)))


# Relative error above which a tiling counts as wrong (bf16 operands, float32
# accumulation: the defaults measure ~2e-3 on the GPU).
MAX_REL_ERR = 2e-2


def sweep_shape(kernel: str, shape, grid, problem, rows: list[dict],
                interpret: bool, deadline: float,
                on_row: Callable[[], None]) -> None:
  """Times every tiling of `grid` on one shape; appends one row each."""
  args, ref, nbytes, flops = problem
  default_us = None
  for i, tiling in enumerate(grid):
    if i > 0 and time.monotonic() > deadline:  # the default always runs
      rows.append(dict(kernel=kernel, shape=dataclasses.asdict(shape),
                       skipped="time budget spent"))
      on_row()
      print(f"{kernel:15s} {_shape_str(shape)}: budget spent, rest skipped",
            flush=True)
      return
    row = dict(kernel=kernel, shape=dataclasses.asdict(shape),
               tiling=dataclasses.asdict(tiling), default=i == 0)
    try:
      fn = kernel_fn(kernel, tiling, interpret)
      out = fn(*args)
      row["rel_err"] = rel_err(out, ref)
      if not row["rel_err"] <= MAX_REL_ERR:  # NaN fails too
        raise AssertionError(f"wrong result: rel_err {row['rel_err']:.2e}")
      sec = timeit(lambda: fn(*args), FLAGS.reps, FLAGS.inner,
                   warmup_s=FLAGS.warmup_s, compiled=True)
      row.update(time_us=sec * 1e6, gbps=nbytes / sec / 1e9,
                 tflops=flops / sec / 1e12)
      if i == 0:
        default_us = row["time_us"]
      if default_us:
        row["speedup_vs_default"] = default_us / row["time_us"]
    except Exception as e:  # pylint: disable=broad-except
      kernel_cases.reraise_if_interrupted(e)
      row["error"] = kernel_cases.error_line(e, 160)
      if not isinstance(e, (ValueError, AssertionError)):
        traceback.print_exc()
    rows.append(row)
    on_row()
    print(_fmt(row), flush=True)


def _fields(d: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in d.items())


def _shape_str(shape) -> str:
  return _fields(dataclasses.asdict(shape))


def _tiling_str(t: dict) -> str:
  short = dict(pages_per_chunk="chunk", num_splits="splits",
               num_warps="warps", num_stages="stages", page_parts="parts",
               block_q="bq")
  return " ".join(
      k if v is True else f"{short.get(k, k)}={v}" for k, v in t.items()
      if v is not False)  # flags: named when set


def _fmt(row: dict) -> str:
  if "skipped" in row:
    return f"{row['kernel']:15s} skipped: {row['skipped']}"
  head = (f"{row['kernel']:15s} {_tiling_str(row['tiling']):46s}"
          f"{'*' if row['default'] else ' '}")
  if "error" in row:
    return f"{head} ERROR {row['error'][:70]}"
  return (f"{head} {row['time_us']:9.1f} us {row['gbps']:8.1f} GB/s "
          f"{row['tflops']:7.2f} TF {row.get('speedup_vs_default', 1):5.2f}x "
          f"{row['rel_err']:.1e}")


def best_per_shape(rows: list[dict]) -> list[dict]:
  """The fastest correct tiling of each (kernel, shape), with the default's
  time beside it."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    if "time_us" in r:
      groups.setdefault(json.dumps([r["kernel"], r["shape"]]), []).append(r)
  out = []
  for group in groups.values():
    best = min(group, key=lambda r: r["time_us"])
    default = next((r for r in group if r["default"]), None)
    out.append(dict(kernel=best["kernel"], shape=best["shape"],
                    best_tiling=best["tiling"], best_us=best["time_us"],
                    best_gbps=best["gbps"], best_tflops=best["tflops"],
                    default_us=default["time_us"] if default else None,
                    speedup=(default["time_us"] / best["time_us"]
                             if default else None),
                    configs=len(group)))
  return out


def print_best(rows: list[dict]) -> None:
  print("\nbest tiling per shape (speedup over the default tiling)")
  for b in best_per_shape(rows):
    speedup = f"{b['speedup']:5.2f}x" if b["speedup"] else "    -"
    print(f"  {b['kernel']:15s} {_fields(b['shape']):70s} "
          f"{speedup}  {b['best_us']:9.1f} us  "
          f"{b['best_gbps']:8.1f} GB/s {b['best_tflops']:7.2f} TF  "
          f"{_tiling_str(b['best_tiling'])}  ({b['configs']} configs)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  backend, preset = kernel_cases.resolve_run(FLAGS, "kernels", KERNELS)
  cfg = PRESETS[preset]
  interpret = backend != "gpu"
  out = FLAGS.json or os.path.join("docs", "results",
                                   f"bench_tiling_{backend}.json")
  try:  # before any work: a bad path costs nothing
    outputs.check_output_path(out, "--json")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  meta = kernel_cases.run_metadata("launch.bench_tiling", interpret)
  rows: list[dict] = []
  started = time.monotonic()
  deadline = started + FLAGS.budget_s

  def write(final: bool = False, interrupted: bool = False) -> None:
    doc = dict(meta, preset=preset, reps=FLAGS.reps, inner=FLAGS.inner,
               warmup_s=FLAGS.warmup_s, budget_s=FLAGS.budget_s,
               complete=final, interrupted=interrupted,
               elapsed_s=time.monotonic() - started,
               max_rel_err=MAX_REL_ERR, rows=rows, best=best_per_shape(rows))
    try:
      outputs.write_json(doc, out)
    except OSError as e:
      sys.exit(f"error: cannot write {out}: {e}")

  grids = dict(mosaic_decode=mosaic_decode_grid,
               triton_decode=triton_decode_grid,
               triton_decode_vt=triton_decode_grid,
               triton_prefill=triton_prefill_grid,
               mosaic_prefill=mosaic_prefill_grid)
  jobs = []
  for kernel in KERNELS:
    if kernel not in FLAGS.kernels:
      continue
    if kernel.startswith("mosaic") and not interpret:
      from kernels import decode_mosaic_gpu
      if not decode_mosaic_gpu.is_hopper():
        print(f"{kernel}: not a Hopper GPU, skipped", flush=True)
        continue
    jobs += [(kernel, shape) for shape in cfg[kernel]]
  try:
    for key, (kernel, shape) in enumerate(jobs):
      # An equal share of the time left for each shape still to sweep, so
      # that a big grid early on does not starve the shapes after it.
      now = time.monotonic()
      shape_deadline = now + max(0.0, deadline - now) / (len(jobs) - key)
      print(f"\n{kernel} {_shape_str(shape)}  (* = default tiling)",
            flush=True)
      sweep_shape(kernel, shape, grids[kernel](shape, cfg),
                  problem(kernel, shape, key), rows, interpret,
                  shape_deadline, write)
  except KeyboardInterrupt:
    write(final=False, interrupted=True)
    print_best(rows)
    print(f"\ninterrupted: wrote the rows so far (complete: false) to {out}",
          file=sys.stderr)
    return 130
  write(final=True)
  print_best(rows)
  print(f"wrote {out}")
  if rows and not any("time_us" in r for r in rows):
    print("error: no configuration ran correctly; nothing was timed",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "bench_tiling"))
