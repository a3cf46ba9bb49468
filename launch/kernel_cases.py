"""Shapes, random inputs, timing and error measure shared by the kernel
benchmarks (`launch.bench_kernels`, `launch.bench_tiling`).

Kept free of flags so that each launcher defines only its own.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  page: int
  ctx: int
  dtype: str  # float32 | bfloat16 | int8 (q in bf16)


@dataclasses.dataclass(frozen=True)
class PrefillShape:
  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  page: int
  prefix: int  # cached tokens before the chunk
  new: int  # tokens in the chunk
  dtype: str


@dataclasses.dataclass(frozen=True)
class CopyShape:
  layers: int  # layers in the group moved by one call
  blocks: int  # blocks moved
  pool_blocks: int
  host_slots: int
  kv_heads: int
  page: int
  head_dim: int
  dtype: str
  # Gathers also timed with the blocks in runs of this many consecutive
  # hot-tier slots, one transfer each (`block_copy`'s `run_length`).
  run_lengths: tuple[int, ...] = ()

  def __post_init__(self):
    for r in self.run_lengths:
      if r < 1 or self.blocks % r or self.host_slots < self.blocks:
        raise ValueError(f"{self}: each run length must divide the blocks "
                         "moved, and the tier hold them")


# A timed repetition lasts at least this long (seconds): the host's wait
# for the device and the next repetition's first launch then cost the
# timed calls a few percent at most.
MIN_REP_S = 0.005
# No more back-to-back calls per repetition than this.
MAX_INNER = 1000


def timeit(fn: Callable[[], Any], reps: int, inner: int, *,
           wait: Callable[[Any], Any] | None = None,
           warmup_s: float = 0.2, min_rep_s: float = MIN_REP_S) -> float:
  """Median seconds per call of `fn` over `reps` repetitions of back-to-back
  calls, after one warm-up call (compilation) and then calls for `warmup_s`
  seconds.

  Warm-up: a GPU left idle while the host compiles drops to a low clock
  (the H100 reported 345 MHz idle) and needs some milliseconds of work to
  return to its boost clock, which can be longer than all the timed calls
  of a short kernel; the H100 run of 2026-11-26 timed one kernel and tiling
  at 84 us in the sweep and 107 us in the benchmark with a single warm-up
  call.

  Calls per repetition: at least `inner`, and as many as the warm-up's
  per-call time says fill `min_rep_s` (at most `MAX_INNER`). Each
  repetition ends in a wait for the device, and the next one's first call
  starts on an idle device: tens of microseconds that five calls of an
  80 us kernel would each carry a tenth of. `wait(out)` blocks until `out`
  is computed (default: JAX's `block_until_ready`).
  """
  if wait is None:
    import jax
    wait = jax.block_until_ready
  wait(fn())
  calls, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < warmup_s:
    wait(fn())
    calls += 1
  inner = calls_per_rep(inner, elapsed / calls if calls else None, min_rep_s)
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    wait(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples)


def calls_per_rep(inner: int, per_call_s: float | None,
                  min_rep_s: float = MIN_REP_S) -> int:
  """Back-to-back calls in one timed repetition: `inner`, or enough calls
  of `per_call_s` (an over-estimate: measured with a wait after each call)
  to fill `min_rep_s`, at most `MAX_INNER`; `inner` when unknown."""
  if not per_call_s or per_call_s <= 0:
    return inner
  return max(inner, min(MAX_INNER, math.ceil(min_rep_s / per_call_s)))


def random_case(shape, batch_pages: int, key):
  """Random pool (bf16/f32 normal, or int8 with scales) and block tables."""
  import jax
  import jax.numpy as jnp
  k_pool, k_perm, k_q, k_s = jax.random.split(key, 4)
  num_blocks = shape.batch * batch_pages + 8
  pool_shape = (num_blocks, 2, shape.kv_heads, shape.page, shape.head_dim)
  scales = None
  if shape.dtype == "int8":
    pool = jax.random.randint(k_pool, pool_shape, -127, 128, jnp.int8)
    scales = jax.random.uniform(k_s, pool_shape[:3], jnp.float32, 0.5, 2.0)
    scales = scales / 127.0
  else:
    pool = jax.random.normal(k_pool, pool_shape, shape.dtype)
  perm = jax.random.permutation(k_perm, num_blocks)[:shape.batch * batch_pages]
  tables = perm.reshape(shape.batch, batch_pages).astype(jnp.int32)
  return pool, scales, tables, k_q


def rel_err(out, ref) -> float:
  import numpy as np
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("nan")
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _kv_bytes(s, ctx: int, pages: int) -> int:
  """K/V bytes a call reads once (int8: with its per-page scales)."""
  if s.dtype == "int8":
    return s.batch * (ctx * s.kv_heads * s.head_dim * 2
                      + pages * s.kv_heads * 2 * 4)
  import jax.numpy as jnp
  itemsize = jnp.dtype(s.dtype).itemsize
  return s.batch * ctx * s.kv_heads * s.head_dim * 2 * itemsize


def decode_inputs(s: DecodeShape, key: int):
  """(args (q, pool, scales, tables, lens), K/V bytes, FLOPs) of one decode
  shape: random pool and queries, shuffled tables, full contexts."""
  import jax
  import jax.numpy as jnp
  pages = -(-s.ctx // s.page)
  pool, scales, tables, k_q = random_case(s, pages, jax.random.key(key))
  q_dtype = jnp.bfloat16 if s.dtype == "int8" else jnp.dtype(s.dtype)
  q = jax.random.normal(k_q, (s.batch, s.heads, s.head_dim), q_dtype)
  lens = jnp.full((s.batch,), s.ctx, jnp.int32)
  flops = 4 * s.batch * s.heads * s.ctx * s.head_dim
  return (q, pool, scales, tables, lens), _kv_bytes(s, s.ctx, pages), flops


def prefill_inputs(s: PrefillShape, key: int):
  """(args (q, pool, scales, tables, kv_lens, q_lens), K/V bytes, FLOPs) of
  one prefill shape; FLOPs count the keys each new token sees (causal over
  the chunk, full over the prefix)."""
  import jax
  import jax.numpy as jnp
  ctx = s.prefix + s.new
  pages = -(-ctx // s.page)
  pool, scales, tables, k_q = random_case(s, pages, jax.random.key(key))
  q_dtype = jnp.bfloat16 if s.dtype == "int8" else jnp.dtype(s.dtype)
  q = jax.random.normal(k_q, (s.batch, s.new, s.heads, s.head_dim), q_dtype)
  kv_lens = jnp.full((s.batch,), ctx, jnp.int32)
  q_lens = jnp.full((s.batch,), s.new, jnp.int32)
  keys = s.new * s.prefix + s.new * (s.new + 1) / 2
  flops = 4 * s.batch * s.heads * s.head_dim * keys
  return ((q, pool, scales, tables, kv_lens, q_lens),
          _kv_bytes(s, ctx, pages), flops)


def reference_fn(kind: str) -> Callable[..., Any]:
  """The jitted XLA reference taking a "decode" or "prefill" problem's
  args (at whatever matmul precision the caller sets)."""
  import jax
  import jax.numpy as jnp
  from kernels import quantize
  if kind == "decode":
    return jax.jit(lambda q, p, sc, t, l: quantize.ref_paged_attention_any(
        q[:, None], p, t, l, jnp.ones_like(l), kv_scales=sc)[:, 0])
  return jax.jit(lambda q, p, sc, t, kl, ql: quantize.ref_paged_attention_any(
      q, p, t, kl, ql, kv_scales=sc))


def reference(kind: str, args) -> Any:
  """The reference output at full float32 precision (a GPU's default for
  float32 matmuls is TF32, looser than the kernels it checks)."""
  import jax
  with jax.default_matmul_precision("highest"):
    return reference_fn(kind)(*args)


def decode_problem(s: DecodeShape, key: int):
  """(args, reference output, K/V bytes, FLOPs) of one decode shape."""
  args, nbytes, flops = decode_inputs(s, key)
  return args, reference("decode", args), nbytes, flops


def prefill_problem(s: PrefillShape, key: int):
  """(args, reference output, K/V bytes, FLOPs) of one prefill shape."""
  args, nbytes, flops = prefill_inputs(s, key)
  return args, reference("prefill", args), nbytes, flops


# The kernels `kernel_fn` calls by name; the prefill ones take prefill shapes.
KERNELS = ("mosaic_decode", "triton_decode", "triton_prefill",
           "mosaic_prefill")
PREFILL_KERNELS = ("triton_prefill", "mosaic_prefill")


def default_tiling(kernel: str, s):
  """The tiling `kernel` picks by itself for shape `s` (what its wrapper
  passes to `kernels.tuning`): the Triton kernels size their tiles by the
  dtype they compute in (the queries', bf16 here, for int8 pools), the
  Mosaic ones by the pool's."""
  import jax.numpy as jnp
  from kernels import tuning
  quantized = s.dtype == "int8"
  pool_itemsize = jnp.dtype(s.dtype).itemsize
  compute_itemsize = 2 if quantized else pool_itemsize
  if kernel == "mosaic_prefill":
    return tuning.mosaic_prefill_tiling(
        block_size=s.page, head_dim=s.head_dim, itemsize=pool_itemsize,
        quantized=quantized)
  if kernel == "triton_prefill":
    return tuning.prefill_tiling(block_size=s.page, head_dim=s.head_dim,
                                 itemsize=compute_itemsize)
  shape = dict(batch=s.batch, num_kv_heads=s.kv_heads,
               pages_per_seq=-(-s.ctx // s.page), block_size=s.page,
               head_dim=s.head_dim)
  if kernel == "mosaic_decode":
    return tuning.mosaic_decode_tiling(**shape, itemsize=pool_itemsize,
                                       quantized=quantized)
  return tuning.decode_tiling(**shape, itemsize=compute_itemsize)


def problem(kernel: str, shape, key: int):
  """`prefill_problem` or `decode_problem` of `shape`, as `kernel` takes."""
  if kernel in PREFILL_KERNELS:
    return prefill_problem(shape, key)
  return decode_problem(shape, key)


def kernel_fn(kernel: str, tiling, interpret: bool) -> Callable[..., Any]:
  """One jitted kernel call taking a problem's args: "mosaic_decode",
  "triton_decode", "triton_prefill" or "mosaic_prefill" (tiling None: the
  default)."""
  import jax
  from kernels import decode_mosaic_gpu
  from kernels import decode_triton
  from kernels import prefill_mosaic_gpu
  from kernels import prefill_triton
  if kernel == "mosaic_decode":
    return jax.jit(lambda q, p, sc, t, l: decode_mosaic_gpu.paged_decode(
        q, p, t, l, sc, tiling=tiling, interpret=interpret))
  if kernel == "triton_decode":
    return jax.jit(lambda q, p, sc, t, l: decode_triton.paged_decode(
        q, p, t, l, sc, tiling=tiling, interpret=interpret))
  if kernel == "mosaic_prefill":
    return jax.jit(lambda q, p, sc, t, kl, ql: prefill_mosaic_gpu.paged_prefill(
        q, p, t, kl, ql, sc, tiling=tiling, interpret=interpret))
  return jax.jit(lambda q, p, sc, t, kl, ql: prefill_triton.paged_prefill(
      q, p, t, kl, ql, sc, tiling=tiling, interpret=interpret))
