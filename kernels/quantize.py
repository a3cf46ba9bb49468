"""int8 K/V pages with one float32 scale per page, per K/V, per head.

An int8 pool halves the bytes decode reads compared with bf16. Each page of
each head of K (and of V) carries one symmetric scale:

  value = int8_value * kv_scales[block, kv, head]

so `kv_scales` is `[num_blocks, 2, num_kv_heads]` float32, next to
`kv_pages [num_blocks, 2, num_kv_heads, block_size, head_dim]` int8. The
reference for int8 attention dequantizes and runs the float reference, so
every kernel is checked against the same semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.paged_attention_ref import ref_paged_attention


def quantize_rows(
    x: jax.Array,  # [..., n]
) -> tuple[jax.Array, jax.Array]:  # int8 [..., n], scales [...] f32
  """Quantizes each row (the last axis) symmetrically to int8: `x ~=
  int8 * scale[..., None]`, one float32 scale a row. `quantize_pages`
  quantizes each page so, and the Triton decode's `int8_query` option its
  queries."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scales = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(x / scales[..., None]), -127, 127)
  return q.astype(jnp.int8), scales


def quantize_pages(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
) -> tuple[jax.Array, jax.Array]:  # int8 pages, [num_blocks, 2, num_kv_heads] f32
  """Quantizes every page of every head symmetrically to int8."""
  if kv_pages.ndim != 5 or kv_pages.shape[1] != 2:
    raise ValueError(f"expected kv_pages [blocks, 2, kv_heads, block_size, "
                     f"head_dim]; got {kv_pages.shape}")
  # Each page of each head as one row.
  q, scales = quantize_rows(kv_pages.reshape(*kv_pages.shape[:3], -1))
  return q.reshape(kv_pages.shape), scales


def transpose_v_pages(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
) -> jax.Array:  # same shape; each V page's elements in [head_dim, block_size] order
  """The pool with each V page stored transposed, for the Triton decode's
  `v_transposed=True`: page `(b, 1, h)` holds `V^T` of that page, row-major,
  in the same `block_size * head_dim` elements (the array's shape does not
  change; K pages and an int8 pool's scales are untouched). For int8 pools
  the tokens p @ V sums over become the contiguous axis, which is the order
  an int8 page widens in without a shuffle. Its own inverse only when
  `block_size == head_dim`; `untranspose_v_pages` undoes it."""
  if kv_pages.ndim != 5 or kv_pages.shape[1] != 2:
    raise ValueError(f"expected kv_pages [blocks, 2, kv_heads, block_size, "
                     f"head_dim]; got {kv_pages.shape}")
  v_t = jnp.swapaxes(kv_pages[:, 1], -1, -2).reshape(kv_pages[:, 1].shape)
  return kv_pages.at[:, 1].set(v_t)


def untranspose_v_pages(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
) -> jax.Array:  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  """Inverse of `transpose_v_pages`: V pages back in `[block_size,
  head_dim]` order."""
  blocks, _, heads, block_size, head_dim = kv_pages.shape
  v_t = kv_pages[:, 1].reshape(blocks, heads, head_dim, block_size)
  return kv_pages.at[:, 1].set(jnp.swapaxes(v_t, -1, -2))


def dequantize_pages(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim] int8
    kv_scales: jax.Array,  # [num_blocks, 2, num_kv_heads] float32
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  """Inverse of `quantize_pages` (up to rounding)."""
  check_scales(kv_pages, kv_scales)
  x = kv_pages.astype(jnp.float32) * kv_scales[..., None, None]
  return x.astype(dtype)


def check_scales(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    kv_scales: jax.Array | None,  # [num_blocks, 2, num_kv_heads] f32
) -> None:
  """Raises ValueError unless `kv_scales` fits `kv_pages` (None: float pool)."""
  if kv_scales is None:
    if kv_pages.dtype == jnp.int8:
      raise ValueError("int8 kv_pages need kv_scales [blocks, 2, kv_heads]")
    return
  if kv_pages.dtype != jnp.int8:
    raise ValueError(f"kv_scales given but kv_pages are {kv_pages.dtype}, "
                     "not int8")
  if kv_scales.shape != kv_pages.shape[:3]:
    raise ValueError(f"kv_scales must be {kv_pages.shape[:3]} "
                     f"[blocks, 2, kv_heads]; got {kv_scales.shape}")


def ref_paged_attention_int8(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim] int8
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    kv_scales: jax.Array,  # [num_blocks, 2, num_kv_heads] float32
    sm_scale: float | None = None,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """The float reference on dequantized pages.

  Only the pages the block tables name are dequantized: they are gathered
  into a compact float pool with a matching identity table.
  """
  check_scales(kv_pages, kv_scales)
  batch, pages_per_seq = block_tables.shape
  ids = jnp.clip(block_tables, 0, kv_pages.shape[0] - 1).reshape(-1)
  pages = dequantize_pages(kv_pages[ids], kv_scales[ids], jnp.float32)
  tables = jnp.arange(batch * pages_per_seq, dtype=jnp.int32).reshape(
      batch, pages_per_seq)
  return ref_paged_attention(q, pages, tables, kv_lens, q_lens,
                             sm_scale=sm_scale)


def ref_paged_attention_any(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    sm_scale: float | None = None,
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """The `"xla"` implementation: float pools as they are, int8 dequantized."""
  check_scales(kv_pages, kv_scales)
  if kv_scales is None:
    return ref_paged_attention(q, kv_pages, block_tables, kv_lens, q_lens,
                               sm_scale=sm_scale)
  return ref_paged_attention_int8(q, kv_pages, block_tables, kv_lens, q_lens,
                                  kv_scales=kv_scales, sm_scale=sm_scale)
