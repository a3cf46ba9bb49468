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
