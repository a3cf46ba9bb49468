"""Scatter new keys and values into the page pool.

A page is zeroed when its first slot (offset 0) is written, before the new
tokens land. The slots past a sequence's last token then hold zeros, never
the keys and values of the page's previous owner. That matters because every
attention implementation multiplies the probabilities of masked keys (zero)
into their values, and `0 * NaN` is NaN: a page freed by a sequence whose
activations overflowed would otherwise poison the next sequence to get it.
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

from kernels import checks


def write_kv(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    k: jax.Array,  # [batch, q_len, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, q_len, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [batch, q_len] int32: block*block_size+offset, -1 = skip
) -> jax.Array:  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  """Returns `kv_pages` with token `(b, t)` written at `slot_mapping[b, t]`.

  Slots `< 0` (padding) are dropped. A page whose offset-0 slot is in
  `slot_mapping` is zeroed first (see the module docstring), so write a
  sequence's tokens in order: a page is started at its first slot. Under
  `jit` with the pool donated this updates the pool in place. Shapes and the
  slots' dtype are checked (ValueError): a mismatch would otherwise
  broadcast or fail deep in XLA.
  """
  checks.check_pool_shape(kv_pages)
  num_blocks, _, num_kv_heads, block_size, head_dim = kv_pages.shape
  if (k.shape != v.shape or k.ndim != 4
      or k.shape[2:] != (num_kv_heads, head_dim)
      or slot_mapping.shape != k.shape[:2]):
    raise ValueError(
        f"expected k and v [batch, q_len, {num_kv_heads}, {head_dim}] and "
        f"slot_mapping [batch, q_len]; got k {k.shape}, v {v.shape}, "
        f"slot_mapping {slot_mapping.shape}")
  if not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
    raise ValueError(
        f"slot_mapping must be integers (int32); got {slot_mapping.dtype}")
  slots = slot_mapping.reshape(-1)
  blk = jnp.where(slots < 0, num_blocks, slots // block_size)  # OOB -> dropped
  off = jnp.where(slots < 0, 0, slots % block_size)
  started = jnp.where(off == 0, blk, num_blocks)  # [batch * q_len]
  # A row of q_len consecutive positions starts at most ceil(q_len / P)
  # pages: zero that many (the started ids sorted first), unless the slots
  # start more (positions out of order), when every entry is scattered.
  bound = k.shape[0] * math.ceil(k.shape[1] / block_size)
  kv_pages = _zero_pages(kv_pages, started, bound)
  kf = k.reshape(-1, num_kv_heads, head_dim).astype(kv_pages.dtype)
  vf = v.reshape(-1, num_kv_heads, head_dim).astype(kv_pages.dtype)
  kv_pages = kv_pages.at[blk, 0, :, off].set(kf, mode="drop")
  kv_pages = kv_pages.at[blk, 1, :, off].set(vf, mode="drop")
  return kv_pages


def _zero_pages(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    pages: jax.Array,  # [n] int32: page ids, num_blocks = none
    bound: int,  # at most this many ids are usually < num_blocks
) -> jax.Array:  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  """`kv_pages` with `pages` zeroed. A scatter's cost follows its entries,
  dropped ones included (a 512-token prefill chunk scattering every token's
  page cost 1.8 ms a layer on CPU, its 32 started pages 0.05 ms), so the ids
  are compacted to `bound` entries when no more are real; `lax.cond` keeps
  the donated pool in place either way."""
  num_blocks = kv_pages.shape[0]

  def zero(pool, ids):  # ids [m]
    zeros = jnp.zeros((ids.shape[0],) + pool.shape[1:], pool.dtype)
    return pool.at[ids].set(zeros, mode="drop")

  if bound >= pages.shape[0]:
    return zero(kv_pages, pages)
  compact = lambda pool: zero(pool, jnp.sort(pages)[:bound])
  every = lambda pool: zero(pool, pages)
  return lax.cond(jnp.sum(pages < num_blocks) <= bound, compact, every,
                  kv_pages)
