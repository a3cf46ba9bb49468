"""Shapes, random inputs, timing and error measure shared by the kernel
benchmarks (`launch.bench_kernels`, `launch.bench_tiling`).

Kept free of flags so that each launcher defines only its own.
"""

from __future__ import annotations

import dataclasses
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


def timeit(fn: Callable[[], Any], reps: int, inner: int) -> float:
  """Median seconds per call of `fn` (compiled and warmed first)."""
  import jax
  jax.block_until_ready(fn())
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples)


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


def decode_problem(s: DecodeShape, key: int):
  """(args, reference output, K/V bytes, FLOPs) of one decode shape."""
  import jax
  import jax.numpy as jnp
  from kernels import quantize
  pages = -(-s.ctx // s.page)
  pool, scales, tables, k_q = random_case(s, pages, jax.random.key(key))
  q_dtype = jnp.bfloat16 if s.dtype == "int8" else jnp.dtype(s.dtype)
  q = jax.random.normal(k_q, (s.batch, s.heads, s.head_dim), q_dtype)
  lens = jnp.full((s.batch,), s.ctx, jnp.int32)
  ones = jnp.ones((s.batch,), jnp.int32)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(lambda q, p, sc, t, l: quantize.ref_paged_attention_any(
        q[:, None], p, t, l, ones, kv_scales=sc)[:, 0])(
            q, pool, scales, tables, lens)
  itemsize = 1 if s.dtype == "int8" else jnp.dtype(s.dtype).itemsize
  nbytes = s.batch * s.ctx * s.kv_heads * s.head_dim * 2 * itemsize
  flops = 4 * s.batch * s.heads * s.ctx * s.head_dim
  return (q, pool, scales, tables, lens), ref, nbytes, flops


def prefill_problem(s: PrefillShape, key: int):
  """(args, reference output, K/V bytes, FLOPs) of one prefill shape."""
  import jax
  import jax.numpy as jnp
  from kernels import quantize
  ctx = s.prefix + s.new
  pages = -(-ctx // s.page)
  pool, scales, tables, k_q = random_case(s, pages, jax.random.key(key))
  q_dtype = jnp.bfloat16 if s.dtype == "int8" else jnp.dtype(s.dtype)
  q = jax.random.normal(k_q, (s.batch, s.new, s.heads, s.head_dim), q_dtype)
  kv_lens = jnp.full((s.batch,), ctx, jnp.int32)
  q_lens = jnp.full((s.batch,), s.new, jnp.int32)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(quantize.ref_paged_attention_any)(
        q, pool, tables, kv_lens, q_lens, kv_scales=scales)
  itemsize = 1 if s.dtype == "int8" else jnp.dtype(s.dtype).itemsize
  nbytes = s.batch * ctx * s.kv_heads * s.head_dim * 2 * itemsize
  keys = s.new * s.prefix + s.new * (s.new + 1) / 2
  flops = 4 * s.batch * s.heads * s.head_dim * keys
  return (q, pool, scales, tables, kv_lens, q_lens), ref, nbytes, flops


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
