r"""Benchmark of the paged-attention kernels and the block copy.

    python -m launch.bench_kernels                      # GPU: the full table
    python -m launch.bench_kernels --preset=smoke       # CPU: tiny, interpret

For each shape (batch, heads, kv heads, head_dim, page size, context, dtype)
it times our kernels (decode: the Triton kernel, and the Mosaic GPU kernel
where it applies: bf16/f16 pools on Hopper) beside the XLA reference, JAX's
own Pallas GPU `paged_attention` (decode; q pre-scaled, since that op does
not scale) and
cuDNN dense attention through `jax.nn.dot_product_attention` (prefill), and
reports time, achieved GB/s (K/V bytes read once) and TFLOP/s. The same run
measures the ceilings: device-to-device copy bandwidth (bytes read plus
written) and a bf16 matmul's TFLOP/s, and the block copy host <-> device
against a plain pinned_host -> device transfer. Each time is the median of
`--reps` repetitions of `--inner` back-to-back calls, after a warm-up call
(compilation excluded). Prints a table and writes JSON (`--out`, with
the run's date, command, versions and git commit) and a PNG (`--plot`).
Each row records the wall seconds it took (`wall_s`: compilation, check
and timing) and each section its own (`section_s`, also printed as it
ends): what the next GPU lease's timeouts are planned from.

The smoke preset (the default off a GPU) times one call (`--reps=1
--inner=1 --warmup_s=0`) unless those flags are given. The JSON is rewritten
after every section (atomically: a run cut short keeps the last complete
report; `python -m launch.kernel_plot` plots it); the PNG is drawn once, at
the end (drawing it took ~3 s on a 2-core CPU). Ctrl-C writes the rows so
far (`complete: false`) and their PNG, prints the table and exits 130. Exits nonzero when every row failed or the plot could not be
written (after the JSON).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import sys
import traceback
from typing import Any, Callable

from absl import app, flags

from dualpath_jax import outputs
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from launch import float_flags
from launch import kernel_cases
from launch import kernel_plot
from launch.kernel_cases import (CopyShape, DecodeShape, PrefillShape,
                                 error_line, reraise_if_interrupted, rel_err,
                                 timeit)
from launch.kernel_table import fmt_row, host_to_device, print_table
from launch.kernel_targets import (GATHER_KERNEL, GATHER_TRANSFERS,
                                   MOSAIC_ONE_REDUCE, MOSAIC_PADDED_Q,
                                   MOSAIC_WS, TRITON_INT8_QUERY,
                                   TRITON_INT8_QUERY_V_TRANSPOSED,
                                   TRITON_V_TRANSPOSED,
                                   check_targets)

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", None, ["gpu", "smoke"],
                  "shape set; default: gpu on a GPU backend, else smoke")
flags.DEFINE_list("only", ["calib", "copy", "decode", "prefill", "overlap",
                          "gather_kernel"],
                  "sections to run, in this order whatever the flag's "
                  "(gather_kernel, an experiment, runs last: should it "
                  "crash the process, the JSON keeps the rest)")
flags.DEFINE_integer("reps", 10, "timed repetitions (median reported; "
                     "smoke preset: 1 unless given)", lower_bound=1)
flags.DEFINE_integer("inner", 5, "back-to-back calls per repetition, at least "
                     "(short calls get more, to fill kernel_cases.MIN_REP_S; "
                     "smoke preset: 1 unless given)", lower_bound=1)
float_flags.define_float("warmup_s", 0.2, "seconds of calls before timing each "
                         "row (the GPU's clock ramp; smoke preset: 0 unless given)",
                         lower_bound=0.0)
flags.DEFINE_string("out", None, "JSON output path (default: "
                    "docs/results/bench_kernels_<backend>.json)")
flags.DEFINE_alias("json", "out")  # every JSON-writing launcher takes --json
flags.DEFINE_string("plot", None, "PNG output path (default: the JSON's "
                    "path with .png; '' for none): each kernel as % of its "
                    "ceiling, with the targets (launch.kernel_plot)")


PRESETS = {
    "gpu": dict(
        calib=dict(copy_mib=2048, matmul=8192),
        decode=[
            # Llama-3-8B attention shapes, large KV (>= 256 MB).
            DecodeShape(64, 32, 8, 128, 16, 4096, "bfloat16"),
            DecodeShape(64, 32, 8, 128, 64, 4096, "bfloat16"),
            DecodeShape(64, 32, 8, 128, 16, 4096, "int8"),
            DecodeShape(16, 32, 8, 128, 16, 16384, "bfloat16"),
            # Small batch, long context.
            DecodeShape(1, 32, 8, 128, 16, 32768, "bfloat16"),
            DecodeShape(4, 32, 8, 128, 64, 32768, "bfloat16"),
            DecodeShape(4, 32, 8, 128, 64, 32768, "int8"),
            # SmolLM2-135M (9:3 GQA, head_dim 64), big pages, float32.
            DecodeShape(64, 9, 3, 64, 16, 4096, "bfloat16"),
            DecodeShape(32, 32, 8, 128, 256, 8192, "bfloat16"),
            DecodeShape(16, 9, 3, 64, 16, 4096, "float32"),
        ],
        prefill=[
            PrefillShape(1, 32, 8, 128, 16, 16384, 512, "bfloat16"),
            PrefillShape(1, 32, 8, 128, 64, 32256, 512, "bfloat16"),
            PrefillShape(4, 32, 8, 128, 64, 16384, 256, "bfloat16"),
        ],
        # Runs of 4 and 16 blocks: 2 and 8 MiB a transfer.
        copy=[CopyShape(8, 256, 4096, 2048, 8, 16, 128, "bfloat16",
                        run_lengths=(4, 16)),
              CopyShape(8, 64, 1024, 512, 8, 64, 128, "bfloat16",
                        run_lengths=(4,))],
        # A gather of ~64 MiB (~1.2 ms at PCIe speed) beside decode attention
        # over 4 GiB of another layer's K/V (~1.5 ms at HBM speed).
        overlap=(CopyShape(8, 256, 4096, 2048, 8, 16, 128, "bfloat16"),
                 DecodeShape(64, 32, 8, 128, 16, 16384, "bfloat16")),
    ),
    "smoke": dict(
        calib=dict(copy_mib=16, matmul=256),
        decode=[DecodeShape(2, 9, 3, 64, 16, 96, "float32"),
                DecodeShape(2, 4, 2, 64, 16, 64, "int8"),
                DecodeShape(2, 8, 2, 128, 32, 96, "bfloat16")],
        prefill=[PrefillShape(1, 4, 2, 64, 16, 48, 16, "float32"),
                 PrefillShape(1, 4, 2, 64, 16, 48, 16, "bfloat16")],
        copy=[CopyShape(2, 4, 32, 16, 2, 16, 64, "float32",
                        run_lengths=(2,))],
        overlap=(CopyShape(2, 4, 32, 16, 2, 16, 64, "float32"),
                 DecodeShape(2, 4, 2, 64, 16, 64, "float32")),
        # Interpret mode simulates the warp-specialized decode kernel's
        # threads slowly (~25 s a row): its plumbing once, on bf16; its
        # int8 cases are tests/test_kernels_mosaic_gpu.py's.
        warp_specialized_dtypes=("bfloat16",),
    ),
}


def _attempt(rows: list[dict], base: dict, impl: str,
             fn: Callable[[], Any], *, nbytes: float, flops: float,
             check: Callable[[Any], float] | None = None) -> None:
  """Times one implementation; records a row (or the error) in `rows`, with
  the wall seconds it took (compilation, check and timing: what a lease
  plan needs)."""
  row = dict(base, impl=impl)
  start = time.perf_counter()
  try:
    if check is not None:
      row["rel_err"] = check(fn())
    sec = timeit(fn, FLAGS.reps, FLAGS.inner, warmup_s=FLAGS.warmup_s,
                 compiled=check is not None)
    row.update(time_us=sec * 1e6, gbps=nbytes / sec / 1e9,
               tflops=flops / sec / 1e12)
  except Exception as e:  # pylint: disable=broad-except
    reraise_if_interrupted(e)
    row["error"] = error_line(e)
    traceback.print_exc()
  row["wall_s"] = round(time.perf_counter() - start, 3)
  rows.append(row)
  print(fmt_row(row), flush=True)  # as it comes, in case the run is cut short


def bench_calibration(cfg: dict, rows: list[dict]) -> dict:
  """Device copy bandwidth and bf16 matmul rate measured in this run."""
  import jax
  import jax.numpy as jnp
  n = cfg["copy_mib"] * 2**20 // 2
  x = jax.random.normal(kernel_cases.data_key(0), (n,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  base = dict(kind="calib", shape=f"copy {cfg['copy_mib']} MiB")
  _attempt(rows, base, "device_copy", lambda: copy(x), nbytes=2 * n * 2,
           flops=0)
  m = cfg["matmul"]
  a = jax.random.normal(kernel_cases.data_key(1), (m, m), jnp.bfloat16)
  b = jax.random.normal(kernel_cases.data_key(2), (m, m), jnp.bfloat16)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32
                                    ).astype(jnp.bfloat16))
  base = dict(kind="calib", shape=f"matmul {m}^3 bf16")
  _attempt(rows, base, "bf16_matmul", lambda: mm(a, b), nbytes=3 * m * m * 2,
           flops=2 * m**3)
  xla_copy = rows[-2].get("gbps")
  matmul = rows[-1].get("tflops")
  torch_copy = _torch_copy_gbps(cfg["copy_mib"], rows)
  # The ceiling is the best device-to-device copy measured here: XLA's
  # elementwise op reaches only ~75% of what a tuned copy (torch's) does.
  copies = [g for g in (xla_copy, torch_copy) if g]
  return dict(copy_gbps=max(copies) if copies else None,
              xla_copy_gbps=xla_copy, torch_copy_gbps=torch_copy,
              matmul_tflops=matmul)


def _torch_copy_gbps(copy_mib: int, rows: list[dict]) -> float | None:
  """`torch.Tensor.copy_` device-to-device GB/s (read + written), when torch
  with CUDA is installed beside jax; records a row either way."""
  base = dict(kind="calib", shape=f"copy {copy_mib} MiB", impl="torch copy_")
  start = time.perf_counter()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      raise RuntimeError("torch has no CUDA device here")
  except Exception as e:  # pylint: disable=broad-except
    reraise_if_interrupted(e)
    rows.append(dict(base, error=f"{type(e).__name__}: {e}"[:200],
                     wall_s=round(time.perf_counter() - start, 3)))
    print(fmt_row(rows[-1]), flush=True)
    return None
  n = copy_mib * 2**20 // 2

  def measure() -> float:  # its buffers are freed on return
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return timeit(lambda: dst.copy_(src), FLAGS.reps, FLAGS.inner,
                  warmup_s=FLAGS.warmup_s,
                  wait=lambda _: torch.cuda.synchronize())

  sec = measure()
  torch.cuda.empty_cache()
  rows.append(dict(base, time_us=sec * 1e6, gbps=2 * n * 2 / sec / 1e9,
                   tflops=0.0, wall_s=round(time.perf_counter() - start, 3)))
  print(fmt_row(rows[-1]), flush=True)
  return rows[-1]["gbps"]


def _mosaic_applies(s: DecodeShape | PrefillShape, interpret: bool) -> bool:
  """Whether the Mosaic GPU kernels run this shape here (their dtypes and
  shapes; a Hopper GPU, or interpret mode)."""
  from kernels import decode_mosaic_gpu
  hopper = interpret or decode_mosaic_gpu.is_hopper()
  return hopper and decode_mosaic_gpu.supports(
      q_len=1, head_dim=s.head_dim, block_size=s.page,
      quantized=s.dtype == "int8", dtype=s.dtype,
      group=s.heads // s.kv_heads)


def _padded_query(s: DecodeShape) -> bool:
  """Whether the Mosaic decode pads this shape's queries anyway (its GQA
  group cannot be copied unpadded)."""
  from kernels import decode_mosaic_gpu
  return decode_mosaic_gpu.query_blocks(s.heads, s.kv_heads).padded


def _checker(kind: str, args) -> Callable[[Any], float] | None:
  """rel_err against the full-precision reference, or None (logged) if the
  reference itself cannot run (e.g. out of memory): the kernels are still
  timed."""
  try:
    ref = kernel_cases.reference(kind, args)
  except Exception as e:  # pylint: disable=broad-except
    reraise_if_interrupted(e)
    traceback.print_exc()
    return None
  return lambda out: rel_err(out, ref)


def _bench_ours_and_reference(rows: list[dict], kind: str, s, args,
                              kv_bytes: int, flops: float, interpret: bool,
                              warp_specialized: bool = True):
  """Rows for our Triton kernel, our Mosaic GPU kernels where they run
  (with `warp_specialized`, their warp-specialized variants too), and the
  XLA reference on one "decode" or "prefill" problem; returns the shape's
  row base and its reference check (for other implementations)."""
  base = dict(kind=kind, shape=dataclasses.asdict(s), kv_mib=kv_bytes / 2**20)
  check = _checker(kind, args)
  impls = [("pallas_triton (ours)", f"triton_{kind}", None)]
  if kind == "decode" and s.dtype == "int8":
    default = kernel_cases.default_tiling("triton_decode", s)
    q8 = dataclasses.replace(default, int8_query=True)
    impls += [(TRITON_INT8_QUERY, "triton_decode", q8),  # V as stored,
              (TRITON_V_TRANSPOSED, "triton_decode_vt", default),  # not
              (TRITON_INT8_QUERY_V_TRANSPOSED, "triton_decode_vt", q8)]
  if _mosaic_applies(s, interpret):
    # The Mosaic GPU kernels in both variants on the default ring (the
    # default tiling is one of them, `kernels.tuning`): one computing
    # warpgroup, and warp-specialized: two computing warpgroups and a
    # copying one (prefill, bf16/f16), a copying warpgroup beside the
    # computing one (decode).
    kernel = f"mosaic_{kind}"
    default = kernel_cases.default_tiling(kernel, s, False)
    impls.append(("pallas_mosaic_gpu (ours)", kernel, default))
    if kind == "decode" and kv_bytes < 256 * 2**20:
      # Short calls: the launches around the kernel, one twin each.
      if not _padded_query(s):
        impls.append((MOSAIC_PADDED_Q, kernel,
                      dataclasses.replace(default, pad_query=True)))
      impls.append((MOSAIC_ONE_REDUCE, kernel,
                    dataclasses.replace(default, one_reduce_merge=True)))
    if warp_specialized and not (kind == "prefill" and s.dtype == "int8"):
      impls.append((MOSAIC_WS, kernel,
                    kernel_cases.default_tiling(kernel, s, True)))
  transposed_args = None
  for name, kernel, tiling in impls:
    call_args = args
    if kernel == "triton_decode_vt":
      if transposed_args is None:  # made once, outside the timed calls
        try:
          transposed_args = kernel_cases.with_v_transposed(args)
        except Exception as e:  # pylint: disable=broad-except
          reraise_if_interrupted(e)  # e.g. out of memory for the copy
          rows.append(dict(base, impl=name, error=error_line(e)))
          print(fmt_row(rows[-1]), flush=True)
          continue
      call_args = transposed_args
    fn = kernel_cases.kernel_fn(kernel, tiling, interpret)
    _attempt(rows, base, name, lambda: fn(*call_args), nbytes=kv_bytes,
             flops=flops, check=check)
  del transposed_args
  ref_fn = kernel_cases.reference_fn(kind)
  _attempt(rows, base, "xla reference", lambda: ref_fn(*args),
           nbytes=kv_bytes, flops=flops)
  return base, check


def bench_decode(shapes, rows: list[dict], interpret: bool,
                 warp_specialized_dtypes=None) -> None:
  """Our split-K decode kernels vs the XLA reference vs JAX's Pallas op;
  the warp-specialized variant on `warp_specialized_dtypes` (None: all)."""
  for i, s in enumerate(shapes):
    args, kv_bytes, flops = kernel_cases.decode_inputs(s, 10 + i)
    base, check = _bench_ours_and_reference(
        rows, "decode", s, args, kv_bytes, flops, interpret,
        warp_specialized=(warp_specialized_dtypes is None
                          or s.dtype in warp_specialized_dtypes))
    if s.dtype != "int8":
      q, pool, _, tables, lens = args
      _bench_jax_op(rows, base, q, pool, tables, lens, kv_bytes, flops,
                    check, interpret)


def _bench_jax_op(rows, base, q, pool, tables, lens, kv_bytes, flops, check,
                  interpret):
  """JAX's Pallas GPU paged_attention on the same data (its own layout)."""
  import jax
  import jax.numpy as jnp
  try:
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
  except ImportError as e:
    rows.append(dict(base, impl="jax pallas op", error=str(e)))
    return
  k_pages = jnp.swapaxes(pool[:, 0], 0, 1)  # [kv_heads, blocks, P, D]
  v_pages = jnp.swapaxes(pool[:, 1], 0, 1)
  q_scaled = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
  pages = tables.shape[1]
  k_splits = 16 if pages % 16 == 0 else 1
  # At most 128 tokens per compute block: its pipeline keeps several blocks
  # of K and V in shared memory (8 pages of 64 exceed the H100's 227 KiB).
  per_block = max(1, min(8, pages // k_splits, 128 // pool.shape[3]))
  fn = jax.jit(lambda q, k, v, t, l: jax_pa.paged_attention(
      q, k, v, t, l, k_splits=k_splits, pages_per_compute_block=per_block,
      interpret=interpret))
  _attempt(rows, base, "jax pallas op",
           lambda: fn(q_scaled, k_pages, v_pages, tables, lens),
           nbytes=kv_bytes, flops=flops, check=check)


def bench_prefill(shapes, rows: list[dict], interpret: bool) -> None:
  """Our prefill kernels vs the XLA reference vs cuDNN dense attention."""
  import jax
  import jax.numpy as jnp

  on_gpu = jax.default_backend() == "gpu"
  for i, s in enumerate(shapes):
    args, kv_bytes, flops = kernel_cases.prefill_inputs(s, 50 + i)
    base, _ = _bench_ours_and_reference(rows, "prefill", s, args, kv_bytes,
                                        flops, interpret)
    if on_gpu and s.dtype == "bfloat16":
      # cuDNN on the same K/V laid out densely, attending to all ctx keys
      # (no causal tail: its FLOPs are counted accordingly).
      q, pool, _, tables, _, _ = args
      ctx, pages = s.prefix + s.new, tables.shape[1]
      dense = pool[tables]  # [B, pages, 2, Hkv, P, D]
      dense = jnp.moveaxis(dense, 2, 0).swapaxes(3, 4)
      dense = dense.reshape(2, s.batch, pages * s.page, s.kv_heads,
                            s.head_dim)[:, :, :ctx]
      k, v = dense[0], dense[1]
      cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, implementation="cudnn"))
      _attempt(rows, base, "cudnn dense (full ctx)", lambda: cudnn(q, k, v),
               nbytes=kv_bytes,
               flops=4 * s.batch * s.heads * s.head_dim * s.new * ctx)


def _copy_case(s: CopyShape, key: int):
  """(pool [layers, pool_blocks, ...] device, hot tier [host_slots, layers,
  ...] pinned host, src slots [blocks], dst pages [blocks], bytes moved)."""
  import jax
  import jax.numpy as jnp
  from kernels import block_copy
  tail = (2, s.kv_heads, s.page, s.head_dim)
  host = block_copy.allocate_host_tier((s.host_slots, s.layers) + tail,
                                       s.dtype, jax.devices()[0])
  pool, tier, src, dst = _copy_arrays_fn()(
      kernel_cases.data_key(key), pool_shape=(s.layers, s.pool_blocks) + tail,
      host_shape=host.shape, dtype=s.dtype, blocks=s.blocks)
  host = jax.device_put(tier, host.sharding)
  nbytes = s.layers * s.blocks * 2 * s.kv_heads * s.page * s.head_dim * (
      jnp.dtype(s.dtype).itemsize)
  return pool, host, src, dst, nbytes


@functools.cache
def _copy_arrays_fn():
  """`_copy_case`'s random arrays as one jitted program of a key
  (`kernel_cases.data_key`) and static shapes."""
  import jax
  import jax.numpy as jnp

  def make(key, *, pool_shape, host_shape, dtype, blocks):
    pool = jax.random.normal(key, pool_shape, dtype)
    tier = jax.random.normal(key, host_shape, dtype)
    src = jax.random.permutation(key, host_shape[0])[:blocks]
    dst = jax.random.permutation(key, pool_shape[1])[:blocks]
    return pool, tier, src.astype(jnp.int32), dst.astype(jnp.int32)

  return jax.jit(make, static_argnames=("pool_shape", "host_shape", "dtype",
                                        "blocks"))


def entry_op_counts(compiled_text: str) -> str:
  """`op x count, ...` of the entry computation of XLA's compiled program
  text (each a thunk: a kernel, a copy or a transfer), leaving out the ops
  that are no work (parameters, constants, bitcasts, tuples)."""
  import collections
  import re
  start = compiled_text.index("\nENTRY ")
  entry = compiled_text[start:].split("\n}", 1)[0]
  ops = collections.Counter(
      m.group(1) for line in entry.splitlines()[1:]
      for m in [re.search(r" = .*? ([a-z][a-z-]*)\(", line)] if m
      and m.group(1) not in ("parameter", "constant", "bitcast",
                             "get-tuple-element", "tuple"))
  return ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))


def dump_gather_hlo(s: CopyShape, path: str, blocks: int = 4) -> str:
  """Writes XLA's compiled program of a `blocks`-block gather of shape `s`
  (one transfer per block, then in one run) to `path`, and returns a
  one-line count of the entry computation's ops (each a thunk: a kernel, a
  copy or a transfer). The text (host memory is `S(5)` in its layouts)
  tells whether a slice of the pinned tier became a DMA (copy-start/done)
  or a kernel reading host memory, which decides what the gather can
  reach."""
  from kernels import block_copy
  small = dataclasses.replace(s, blocks=blocks, run_lengths=())
  pool, host, src, dst, _ = _copy_case(small, 7)
  texts, counts = [], []
  for run in (1, blocks):
    starts = src if run == 1 else src[:1] * 0
    text = block_copy.gather_to_device_unchecked.lower(
        pool, host, starts, dst, run_length=run,
        implementation="transfers").compile().as_text()
    texts.append(f"==== gather of {blocks} blocks, run_length={run}\n{text}")
    counts.append(f"run_length={run}: top-level ops {entry_op_counts(text)}")
  outputs.write_text("\n\n".join(texts), path)
  return "; ".join(counts)


def bench_copy(shapes, rows: list[dict], hlo_path: str | None = None) -> None:
  """Block gather/scatter vs a plain pinned_host -> device transfer; with
  `hlo_path`, the first shape's compiled gather goes there first."""
  import jax
  from kernels import block_copy

  if hlo_path and shapes:
    try:
      print(f"gather HLO ({hlo_path}): {dump_gather_hlo(shapes[0], hlo_path)}",
            flush=True)
    except Exception as e:  # pylint: disable=broad-except
      reraise_if_interrupted(e)
      traceback.print_exc()
  for i, s in enumerate(shapes):
    pool, host, src, dst, nbytes = _copy_case(s, 90 + i)
    base = dict(kind="copy", shape=dataclasses.asdict(s),
                mib=nbytes / 2**20)
    state = {"pool": pool, "host": host}

    def gather(implementation="auto"):
      state["pool"] = block_copy.gather_to_device(
          state["pool"], state["host"], src, dst,
          implementation=implementation)
      return state["pool"]

    def scatter():
      state["host"] = block_copy.scatter_to_host(state["host"],
                                                 state["pool"], dst, src)
      return state["host"]

    try:  # The first call's output types differ from the inputs' (committed
      # arrays): warm every variant so that timing sees no compilation.
      jax.block_until_ready(gather())
      jax.block_until_ready(gather("transfers"))
      jax.block_until_ready(scatter())
    except Exception as e:  # pylint: disable=broad-except
      reraise_if_interrupted(e)
      traceback.print_exc()
    # What `gather_to_device` does by itself (on a GPU: one kernel), then
    # its per-block transfers (elsewhere the same thing).
    _attempt(rows, base, "gather host->device (ours)", gather,
             nbytes=nbytes, flops=0)
    _attempt(rows, base, GATHER_TRANSFERS,
             lambda: gather("transfers"), nbytes=nbytes, flops=0)
    _attempt(rows, base, "scatter device->host (ours)", scatter,
             nbytes=nbytes, flops=0)
    for run in s.run_lengths:  # the same bytes, one transfer per run
      starts = run * jax.random.permutation(
          kernel_cases.data_key(100 + i), s.host_slots // run)[:s.blocks // run]

      def gather_runs(starts=starts.astype(src.dtype), run=run):
        state["pool"] = block_copy.gather_to_device(
            state["pool"], state["host"], starts, dst, run_length=run,
            implementation="transfers")
        return state["pool"]
      _attempt(rows, base, f"gather runs of {run} (ours)", gather_runs,
               nbytes=nbytes, flops=0)
    # Where a gather's time goes: its two halves, timed apart.
    fetch = jax.jit(block_copy.fetch_blocks_core)
    _attempt(rows, base, "gather: block transfers only", lambda: fetch(
        state["host"], src), nbytes=nbytes, flops=0)
    moved = fetch(state["host"], src)
    place = jax.jit(block_copy.place_blocks_core, donate_argnums=(0,))

    def place_only():
      state["pool"] = place(state["pool"], moved, dst)
      return state["pool"]
    _attempt(rows, base, "gather: pool scatter only", place_only,
             nbytes=nbytes, flops=0)
    _plain_copy(s, rows, base, nbytes)


def _plain_copy(s: CopyShape, rows: list[dict], base: dict,
                nbytes: int) -> None:
  """The gathers' ceiling: one contiguous pinned buffer of the same bytes
  moved to the device."""
  import jax
  from kernels import block_copy
  dev = jax.devices()[0]
  staged = block_copy.allocate_host_tier(
      (s.blocks, s.layers, 2, s.kv_heads, s.page, s.head_dim), s.dtype, dev)
  to_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  _attempt(rows, base, "plain pinned->device", lambda: jax.device_put(
      staged, to_dev), nbytes=nbytes, flops=0)


def bench_gather_kernel(shapes, rows: list[dict], interpret: bool,
                        hlo_path: str | None = None) -> None:
  """The block gather as one Pallas kernel reading the pinned tier
  (kernels/host_gather_triton.py, what `gather_to_device` runs on a GPU),
  on the copy section's shapes and data.

  Its row checks the moved pages against the tier (`rel_err`: the largest
  difference, 0 when right) and names the compiled program's top-level ops
  (`hlo_ops`: one custom call if XLA handed the kernel the pinned tier as
  it is; a copy of the whole tier would show there and in the time); the
  first shape's program goes to `hlo_path`. Times a plain pinned -> device
  copy too where the copy section did not run.
  """
  import jax
  import jax.numpy as jnp
  from kernels import host_gather_triton

  to_dev = jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                             memory_kind="device")
  for i, s in enumerate(shapes):
    pool, host, src, dst, nbytes = _copy_case(s, 90 + i)
    base = dict(kind="copy", shape=dataclasses.asdict(s),
                mib=nbytes / 2**20)
    row_extra = {}
    try:  # compiled once: the program written out is the one timed
      gather = host_gather_triton.gather_to_device.lower(
          pool, host, src, dst, interpret=interpret).compile()
      text = gather.as_text()
      row_extra["hlo_ops"] = entry_op_counts(text)
      if hlo_path and i == 0:
        outputs.write_text(text, hlo_path)
        print(f"gather kernel HLO ({hlo_path}): {row_extra['hlo_ops']}",
              flush=True)
    except Exception as e:  # pylint: disable=broad-except
      reraise_if_interrupted(e)
      traceback.print_exc()
      # Compiled on first use instead, so that the row records the error.
      gather = functools.partial(host_gather_triton.gather_to_device,
                                 interpret=interpret)
    state = {"pool": pool}

    def run():
      state["pool"] = gather(state["pool"], host, src, dst)
      return state["pool"]

    def check(out):  # the moved pages against the tier's slots, on device
      want = jax.device_put(host, to_dev)[src]
      got = jnp.swapaxes(out[:, dst], 0, 1)
      return float(jnp.max(jnp.abs(got.astype(jnp.float32)
                                   - want.astype(jnp.float32))))
    _attempt(rows, dict(base, **row_extra), GATHER_KERNEL, run,
             nbytes=nbytes, flops=0, check=check)
    if not kernel_plot.find_row(rows, "copy", "plain pinned->device",
                                base["shape"]):
      _plain_copy(s, rows, base, nbytes)


def bench_overlap(copy_shape: CopyShape, attn_shape: DecodeShape,
                  rows: list[dict], interpret: bool) -> None:
  """Block gather of one layer group beside decode attention over another
  layer's pool, in one jitted step, vs each alone: can they overlap?

  Records the three times and `overlap` = (gather + attention - both) /
  the shorter of the two: 1 when the shorter hides entirely under the
  longer, 0 when they run one after the other.
  """
  import jax
  import jax.numpy as jnp
  from kernels import block_copy
  from kernels.paged_attention import paged_attention

  s, a = copy_shape, attn_shape
  pool, host, src, dst, _ = _copy_case(s, 120)
  (q, kv, _, tables, lens), _, _ = kernel_cases.decode_inputs(a, 121)
  q = q[:, None]  # [batch, 1, heads, head_dim]
  impl = "xla" if interpret else "auto"

  def attend(q, kv, tables, lens):
    return paged_attention(q, kv, tables, lens, jnp.ones_like(lens),
                           implementation=impl)

  both = jax.jit(lambda pool, host, src, dst, q, kv, t, l: (
      block_copy.gather_to_device_core(pool, host, src, dst),
      attend(q, kv, t, l)), donate_argnums=(0,))
  attn = jax.jit(attend)
  state = {"pool": pool}

  def run_both():
    state["pool"], out = both(state["pool"], host, src, dst, q, kv, tables,
                              lens)
    return out

  def run_gather():
    state["pool"] = block_copy.gather_to_device(state["pool"], host, src, dst)
    return state["pool"]

  base = dict(kind="overlap", shape=dict(
      copy=dataclasses.asdict(s), attention=dataclasses.asdict(a)))
  row = dict(base, impl=f"gather + attention ({impl})")
  start = time.perf_counter()
  try:
    for fn in (run_gather, run_both):  # warm: committed outputs differ
      jax.block_until_ready(fn())
    t_gather = timeit(run_gather, FLAGS.reps, FLAGS.inner,
                      warmup_s=FLAGS.warmup_s)
    t_attn = timeit(lambda: attn(q, kv, tables, lens), FLAGS.reps,
                    FLAGS.inner, warmup_s=FLAGS.warmup_s)
    t_both = timeit(run_both, FLAGS.reps, FLAGS.inner,
                    warmup_s=FLAGS.warmup_s)
    row.update(gather_us=t_gather * 1e6, attention_us=t_attn * 1e6,
               time_us=t_both * 1e6,
               overlap=(t_gather + t_attn - t_both) / min(t_gather, t_attn))
  except Exception as e:  # pylint: disable=broad-except
    reraise_if_interrupted(e)
    row["error"] = error_line(e)
    traceback.print_exc()
  row["wall_s"] = round(time.perf_counter() - start, 3)
  rows.append(row)
  print(fmt_row(row), flush=True)


# The order they run in: the ceilings first, then the block copy (a few
# rows, and a target of its own that a run cut short by a lease's timeout
# would otherwise lose), then attention, and the one-kernel gather (an
# experiment that may crash the process) last.
SECTIONS = ("calib", "copy", "decode", "prefill", "overlap", "gather_kernel")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  backend, preset = kernel_cases.resolve_run(FLAGS, "only", SECTIONS)
  cfg = PRESETS[preset]
  interpret = backend != "gpu"
  out = FLAGS.out or os.path.join("docs", "results",
                                  f"bench_kernels_{backend}.json")
  plot = (os.path.splitext(out)[0] + ".png" if FLAGS.plot is None
          else FLAGS.plot)
  hlo = os.path.splitext(out)[0] + "_gather_hlo.txt"
  kernel_hlo = os.path.splitext(out)[0] + "_gather_kernel_hlo.txt"
  paths = [("--out", out)] + ([("--plot", plot)] if plot else [])
  if "copy" in FLAGS.only:
    paths.append(("the gather HLO beside --out", hlo))
  if "gather_kernel" in FLAGS.only:
    paths.append(("the gather kernel HLO beside --out", kernel_hlo))
  try:  # before any work: a bad path costs nothing
    outputs.check_output_paths(paths)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  meta = kernel_cases.run_metadata("launch.bench_kernels", interpret)
  rows: list[dict] = []
  ceilings: dict = {}
  state: dict = dict(written=[], plot_error=None)
  section_s: dict[str, float] = {}  # wall seconds of each section run

  def report(final: bool, interrupted: bool = False) -> list[dict]:
    """Writes the JSON so far (after every section, so that a run cut short
    still leaves its rows; atomically) and, at the end or on Ctrl-C, its
    plot; returns the target checks."""
    copy_gbps = ceilings.get("copy_gbps")
    for row in rows:
      if copy_gbps and "gbps" in row and row["kind"] == "decode":
        row["pct_copy"] = 100 * row["gbps"] / copy_gbps
      if row["kind"] == "copy" and "gbps" in row and host_to_device(
          row["impl"]):
        plain = kernel_plot.find_row(rows, "copy", "plain pinned->device",
                                     row["shape"])
        if plain:
          row["pct_pinned"] = 100 * row["gbps"] / plain["gbps"]
    checks = check_targets(rows, copy_gbps)
    if interpret:  # ratios of interpret-mode times judge nothing
      checks = [dict(c, ok=None) for c in checks]
    doc = dict(meta, preset=preset, reps=FLAGS.reps, inner=FLAGS.inner, warmup_s=FLAGS.warmup_s,
               complete=final, interrupted=interrupted, ceilings=ceilings,
               section_s=section_s, rows=rows, targets=checks)
    try:
      outputs.write_json(doc, out)
    except OSError as e:
      sys.exit(f"error: cannot write {out}: {e}")
    state["written"] = [out]
    if plot and (final or interrupted):
      try:
        kernel_plot.plot_kernels(doc, plot)
        state["written"].append(plot)
        state["plot_error"] = None
      except Exception as e:  # pylint: disable=broad-except
        reraise_if_interrupted(e)
        traceback.print_exc()  # the JSON holds the rows; replot from it
        state["plot_error"] = error_line(e)
    return checks

  sections = dict(
      calib=lambda: ceilings.update(bench_calibration(cfg["calib"], rows)),
      copy=lambda: bench_copy(cfg["copy"], rows, hlo),
      decode=lambda: bench_decode(cfg["decode"], rows, interpret,
                                  cfg.get("warp_specialized_dtypes")),
      prefill=lambda: bench_prefill(cfg["prefill"], rows, interpret),
      overlap=lambda: bench_overlap(*cfg["overlap"], rows, interpret),
      gather_kernel=lambda: bench_gather_kernel(cfg["copy"], rows, interpret,
                                                kernel_hlo))
  assert tuple(sections) == SECTIONS
  try:
    for name, run in sections.items():
      if name in FLAGS.only:
        start, first_row = time.perf_counter(), len(rows)
        run()
        section_s[name] = round(time.perf_counter() - start, 1)
        print(f"section {name}: {section_s[name]:.1f} s, "
              f"{len(rows) - first_row} rows", flush=True)
        report(final=False)
  except KeyboardInterrupt:
    checks = report(final=False, interrupted=True)
    print_table(rows, checks, interpret)
    print(f"\ninterrupted: wrote the rows so far (complete: false) to "
          f"{' and '.join(state['written'])}", file=sys.stderr)
    return 130
  checks = report(final=True)
  print_table(rows, checks, interpret)
  print(f"wrote {' and '.join(state['written'])}")
  status = 0
  if state["plot_error"]:
    print(f"error: the plot {plot} was not written: {state['plot_error']}",
          file=sys.stderr)
    status = 1
  if not any("error" not in r for r in rows):
    print("error: every row failed; nothing was measured (see the errors "
          "above)", file=sys.stderr)
    status = 1
  return status


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "bench_kernels"))
