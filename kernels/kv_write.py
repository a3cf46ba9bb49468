"""Scatter new keys and values into the page pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import checks


def write_kv(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    k: jax.Array,  # [batch, q_len, num_kv_heads, head_dim]
    v: jax.Array,  # [batch, q_len, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [batch, q_len] int32: block*block_size+offset, -1 = skip
) -> jax.Array:  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  """Returns `kv_pages` with token `(b, t)` written at `slot_mapping[b, t]`.

  Slots `< 0` (padding) are dropped. Under `jit` with the pool donated this
  updates the pool in place. Shapes and the slots' dtype are checked
  (ValueError): a mismatch would otherwise broadcast or fail deep in XLA.
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
  kf = k.reshape(-1, num_kv_heads, head_dim).astype(kv_pages.dtype)
  vf = v.reshape(-1, num_kv_heads, head_dim).astype(kv_pages.dtype)
  kv_pages = kv_pages.at[blk, 0, :, off].set(kf, mode="drop")
  kv_pages = kv_pages.at[blk, 1, :, off].set(vf, mode="drop")
  return kv_pages
