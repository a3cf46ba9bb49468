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
  `slot_mapping` is zeroed first (see the module docstring); write each
  row's tokens at consecutive positions, as a sequence grows. A call whose
  rows start more than `ceil(q_len / P)` pages each has only its
  `batch * ceil(q_len / P)` lowest started page ids zeroed. Under
  `jit` with the pool donated this updates the pool in place. Numpy arrays
  and nested lists are taken as JAX arrays. Shapes and the slots' dtype are
  checked (ValueError): a mismatch would otherwise broadcast or fail deep in
  XLA; called eagerly, so is every slot against the pool's size
  (`checks.check_slot_values`), since the scatter drops one past it.
  """
  kv_pages, k, v, slot_mapping = (
      jnp.asarray(x) for x in (kv_pages, k, v, slot_mapping))
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
  if not jnp.issubdtype(kv_pages.dtype, jnp.floating):
    # An int8 pool holds quantized pages with their scales: a plain cast of
    # float K/V would truncate them (0.7 -> 0) and store no scale.
    raise ValueError(
        f"write_kv writes float pools; got a {kv_pages.dtype} pool (int8 "
        "pages are made by kernels.quantize from a float pool)")
  checks.check_slot_values(num_blocks * block_size, slot_mapping)
  slots = slot_mapping.reshape(-1)
  blk = jnp.where(slots < 0, num_blocks, slots // block_size)  # OOB -> dropped
  off = jnp.where(slots < 0, 0, slots % block_size)
  started = jnp.where(off == 0, blk, num_blocks)  # [batch * q_len]
  kv_pages = _zero_pages(kv_pages, started, k.shape[0] * math.ceil(
      k.shape[1] / block_size))
  kf = k.reshape(-1, num_kv_heads, head_dim).astype(kv_pages.dtype)
  vf = v.reshape(-1, num_kv_heads, head_dim).astype(kv_pages.dtype)
  kv_pages = kv_pages.at[blk, 0, :, off].set(kf, mode="drop")
  kv_pages = kv_pages.at[blk, 1, :, off].set(vf, mode="drop")
  return kv_pages


def _zero_pages(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    pages: jax.Array,  # [n] int32: page ids, num_blocks = none
    bound: int,  # zero at most this many: the lowest ids
) -> jax.Array:  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  """`kv_pages` with the `bound` lowest ids of `pages` zeroed.

  A row of `q_len` consecutive positions starts at most `ceil(q_len / P)`
  pages, so `bound = batch * ceil(q_len / P)` misses none of a call whose
  rows write in position order. The ids are compacted to that many because
  a scatter costs per entry, dropped ones included: on CPU, zeroing a
  512-token prefill chunk's pages by an entry per token took 0.54 ms a
  layer; compacted, the whole `write_kv` takes 0.19 ms (0.08 ms without the
  zeroing). A `lax.cond` to every entry when more are real would be exact
  for any order, but an XLA GPU conditional waits on the host for its
  predicate, once per layer.
  """
  if bound < pages.shape[0]:
    pages = jnp.sort(pages)[:bound]
  zeros = jnp.zeros((pages.shape[0],) + kv_pages.shape[1:], kv_pages.dtype)
  return kv_pages.at[pages].set(zeros, mode="drop")
