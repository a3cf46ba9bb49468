"""What every paged-attention kernel shares, whatever its lowering.

The Triton, Mosaic GPU and Mosaic TPU kernels all keep an online softmax in
base 2 with a finite mask value, the split-K decode kernels merge their
partial results the same way, and every implementation returns zeros for a
padding row (`q_lens[b] == 0`). These definitions live here so that no
kernel module imports another backend's: the Triton lowering is deprecated
from jax 0.11, and the Mosaic kernels must not depend on it.
"""

from __future__ import annotations

import math

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

# A BlockSpec dimension that is indexed, not sliced.
SQUEEZED = pl.squeezed
# Finite stand-in for -inf: exp2(MASK_VALUE - real) == 0 and no NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# The kernels scale logits by sm_scale * LOG2E and use exp2.
LOG2E = math.log2(math.e)


def pad_tables(block_tables: jax.Array,  # [B, pages] int
               pages: int) -> jax.Array:  # [B, pages'] int32
  """`block_tables` widened to `pages` columns by repeating each row's last
  entry (int32).

  A kernel that walks whole chunks of pages reads the padding, masked. It
  must read a page of the row's own (the rule in `paged_attention_ref`):
  padding with page 0 read another sequence's page, and a masked
  probability of 0 times a NaN there is NaN in the output.
  """
  tables = block_tables.astype(jnp.int32)
  extra = pages - tables.shape[1]
  if extra <= 0:
    return tables
  return jnp.pad(tables, ((0, 0), (0, extra)), mode="edge")


def merge_splits(
    o: jax.Array,  # [..., splits, rows, head_dim] f32, unnormalised
    m: jax.Array,  # [..., splits, rows] f32, running max (base 2)
    l: jax.Array,  # [..., splits, rows] f32, running sum
) -> jax.Array:  # [..., rows, head_dim] f32
  """Merges split-K partial softmax results; rows with no keys give 0."""
  m_all = jnp.max(m, axis=-2, keepdims=True)
  w = jnp.exp2(m - m_all)
  l_all = jnp.sum(l * w, axis=-2)
  o_all = jnp.sum(o * w[..., None], axis=-3)
  safe = jnp.where(l_all > 0, l_all, 1.0)
  return jnp.where((l_all > 0)[..., None], o_all / safe[..., None], 0.0)


def merge_splits_one_reduce(
    o: jax.Array,  # [..., splits, rows, head_dim] f32, unnormalised
    m: jax.Array,  # [..., splits, rows] f32, running max (base 2)
    l: jax.Array,  # [..., splits, rows] f32, running sum
) -> jax.Array:  # [..., rows, head_dim] f32
  """`merge_splits` as one variadic reduction over the splits.

  `merge_splits` reduces three times (the max, then the weighted sums of l
  and of o, which need it), and XLA on a GPU launches each as its own
  kernel: a few microseconds apiece, a sizeable share of a short decode
  such as one 32k sequence. Here the splits are folded pairwise, each pair's
  (max, sum, output) rescaled to the larger max as it goes (the online
  softmax's own update), so one reduction does it all; m and l are
  broadcast along head_dim to o's shape, as a variadic reduction needs.
  Same result up to float rounding (the order of the sums differs).
  """
  axis = o.ndim - 3
  m_b = jnp.broadcast_to(m[..., None], o.shape)
  l_b = jnp.broadcast_to(l[..., None], o.shape)

  def fold(a, b):
    (m_a, l_a, o_a), (m_b2, l_b2, o_b) = a, b
    m_new = jnp.maximum(m_a, m_b2)
    w_a, w_b = jnp.exp2(m_a - m_new), jnp.exp2(m_b2 - m_new)
    return m_new, l_a * w_a + l_b2 * w_b, o_a * w_a + o_b * w_b

  # (MASK_VALUE, 0, 0) is the fold's identity: every kernel's m is at least
  # MASK_VALUE, and a split at it carries l == 0 and o == 0.
  init = (jnp.float32(MASK_VALUE), jnp.float32(0), jnp.float32(0))
  _, l_all, o_all = jax.lax.reduce((m_b, l_b, o), init, fold, (axis,))
  safe = jnp.where(l_all > 0, l_all, 1.0)
  return jnp.where(l_all > 0, o_all / safe, 0.0)


def decode_output(
    out: jax.Array,  # [batch, num_heads, head_dim]
    q_lens: jax.Array,  # [batch] int32
    dtype,
) -> jax.Array:  # [batch, 1, num_heads, head_dim]
  """A decode kernel's output in the API's layout: one query position, in
  the query's dtype, zeros for padding rows (`q_lens == 0`) as in the
  reference."""
  out = jnp.where((q_lens > 0)[:, None, None], out, 0).astype(dtype)
  return out[:, None]


def tile_steps(
    *,
    first_row: jax.Array,  # int32 scalar: the tile's first new token
    tile_tokens: int,  # new tokens per query tile
    kv_len: jax.Array,  # int32 scalar: the sequence's length, new tokens included
    q_len: jax.Array,  # int32 scalar: its new tokens (the last q_len of kv_len)
    capacity: int,  # tokens the block table can hold
    step_tokens: int,  # keys per step of the kernel's loop
) -> tuple[jax.Array, jax.Array, jax.Array]:  # int32 scalars
  """The key steps a prefill query tile walks: `(key_limit, num_steps,
  num_free)`.

  Keys exist below `key_limit`, the smaller of `kv_len` and the table's
  capacity (as in the reference). The tile's last real row sees keys up to
  its own position, so it needs `num_steps` steps; the first `num_free` of
  them lie wholly at or before the tile's first row's position, so every row
  sees them whole and they run unmasked (rows past `q_len` see them too,
  harmlessly: their output is zeroed). A tile with no real rows takes no
  step.
  """
  key_limit = jnp.minimum(kv_len, capacity)
  last_row = jnp.minimum(first_row + tile_tokens, q_len)  # exclusive
  num_keys = jnp.where(first_row < q_len,
                       jnp.clip(kv_len - q_len + last_row, 0, key_limit), 0)
  num_steps = (num_keys + step_tokens - 1) // step_tokens
  first_pos = kv_len - q_len + first_row
  num_free = jnp.clip(jnp.minimum(first_pos + 1, key_limit) // step_tokens,
                      0, num_steps)
  return key_limit, num_steps, num_free
