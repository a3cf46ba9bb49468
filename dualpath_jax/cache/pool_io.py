"""Whole blocks in and out of the device KV pool, as host numpy arrays.

The cold tier stores a block as every layer of `block_size` tokens,
`[L, 2, Hkv, P, D]`; the pool holds it spread over its layer axis,
`pool[:, page]`. These two jitted functions move lists of blocks between the
two forms. List lengths are padded to powers of two (padding pages are
dropped on write and ignored on read), so a run compiles a handful of shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.buckets import next_pow2


@jax.jit
def _read(pool: jax.Array,  # [L, N, 2, Hkv, P, D]
          pages: jax.Array  # [n] int32
          ) -> jax.Array:  # [n, L, 2, Hkv, P, D]
  return jnp.moveaxis(pool[:, pages], 1, 0)


@functools.partial(jax.jit, donate_argnums=0)
def _write(pool: jax.Array,  # [L, N, 2, Hkv, P, D]
           pages: jax.Array,  # [n] int32; out of range = dropped
           blocks: jax.Array  # [n, L, 2, Hkv, P, D]
           ) -> jax.Array:  # [L, N, 2, Hkv, P, D]
  return pool.at[:, pages].set(jnp.moveaxis(blocks, 0, 1).astype(pool.dtype),
                               mode="drop")


def read_blocks(pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                pages: list[int]) -> np.ndarray:  # [n, L, 2, Hkv, P, D]
  """Copies pool pages `pages` to the host, one `[L, 2, Hkv, P, D]` each."""
  n = len(pages)
  padded = np.zeros(next_pow2(n), np.int32)
  padded[:n] = pages
  return np.asarray(_read(pool, padded))[:n]


def write_blocks(pool: jax.Array,  # [L, N, 2, Hkv, P, D] (donated)
                 pages: list[int],
                 blocks: np.ndarray  # [n, L, 2, Hkv, P, D]
                 ) -> jax.Array:  # [L, N, 2, Hkv, P, D]
  """Returns `pool` with `blocks[i]` written at page `pages[i]`."""
  n = len(pages)
  if blocks.shape[0] != n or blocks.shape[1:] != (pool.shape[0],) + pool.shape[2:]:
    raise ValueError(f"blocks {blocks.shape} do not match {n} pages of a pool "
                     f"{pool.shape}")
  size = next_pow2(n)
  padded = np.full(size, pool.shape[1], np.int32)  # out of range: dropped
  padded[:n] = pages
  data = np.zeros((size,) + blocks.shape[1:], blocks.dtype)
  data[:n] = blocks
  return _write(pool, padded, data)
