"""Queries regrouped as kernel rows (token, head of the GQA group), and back.

Both prefill kernels (`prefill_triton.py`, `prefill_mosaic_gpu.py`) let one
program hold several new tokens times every query head of one KV head's
group, so that each K/V page they read serves the whole group. These two
functions are the layout change around them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_rows(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    num_kv_heads: int,
    group_pad: int,
    t_pad: int,
    dtype,
) -> jax.Array:  # [batch, num_kv_heads, t_pad * group_pad, head_dim]
  """Rows `t * group_pad + j` = token `t`, head `j` of the group; tokens
  padded to `t_pad`, the group to `group_pad` (padding rows are zeros)."""
  batch, q_len, num_heads, head_dim = q.shape
  group = num_heads // num_kv_heads
  qg = q.astype(dtype).reshape(batch, q_len, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, t_pad - q_len), (0, 0),
                    (0, group_pad - group), (0, 0)))
  return qg.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads,
                                             t_pad * group_pad, head_dim)


def ungroup_rows(
    out: jax.Array,  # [batch, num_kv_heads, t_pad * group_pad, head_dim]
    q_len: int,
    num_heads: int,
    group_pad: int,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """The inverse of `group_rows`, padding dropped."""
  batch, num_kv_heads, _, head_dim = out.shape
  group = num_heads // num_kv_heads
  out = out.reshape(batch, num_kv_heads, -1, group_pad, head_dim)
  out = out[:, :, :q_len, :group].transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, q_len, num_heads, head_dim)
