"""Queries regrouped as kernel rows (token, head of the GQA group), and back.

Both prefill kernels (`prefill_triton.py`, `prefill_mosaic_gpu.py`) let one
program hold several new tokens times every query head of one KV head's
group, so that each K/V page they read serves the whole group. These two
functions are the layout change around them. `DecodeQueryBlocks` is the
Mosaic GPU decode kernel's: which rows of the unpadded queries a program
copies, and which of its output rows are its own.
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class DecodeQueryBlocks:
  """Where a decode program finds its query rows in `q [batch, num_heads,
  head_dim]`, copied as they are (no padding op before the launch).

  The query tile of a Mosaic GPU program is `tile_rows` (64) rows, and a
  copy into it must cover whole 8-row tiles. Program `(b, h)` copies block
  `h // heads_per_block` of `operand(q)`, `[batch, blocks, rows, head_dim]`,
  into the tile's first `rows` rows:

  * a group that is a multiple of 8 (8, 16, ... 64): its own `group` rows;
  * a group that divides 8 (1, 2, 4) with `num_heads % 8 == 0`: the 8 rows
    of `8 // group` neighbouring KV heads' groups, its own at row
    `(h % heads_per_block) * group` (the others are attended too, against
    this head's K/V, and dropped by `own_rows`; a query row only meets
    itself in both matmuls and the softmax, and the tile's uncopied rows
    likewise stay in their own rows);
  * otherwise (`padded`; e.g. SmolLM2's 9 / 3 heads): the group padded with
    zero rows to the whole tile by an XLA op before the launch.
  """

  rows: int  # rows of q a program copies (the whole tile when padded)
  heads_per_block: int  # KV heads whose groups make one copied block
  padded: bool

  @staticmethod
  def choose(num_heads: int, num_kv_heads: int, *, tile_rows: int,
             align: int, pad: bool = False) -> "DecodeQueryBlocks":
    """The copy for a head layout; `pad` forces the padded form."""
    group = num_heads // num_kv_heads
    if not pad and group % align == 0 and group <= tile_rows:
      return DecodeQueryBlocks(rows=group, heads_per_block=1, padded=False)
    if not pad and align % group == 0 and num_heads % align == 0:
      return DecodeQueryBlocks(rows=align, heads_per_block=align // group,
                               padded=False)
    return DecodeQueryBlocks(rows=tile_rows, heads_per_block=1, padded=True)

  def operand(
      self,
      q: jax.Array,  # [batch, num_heads, head_dim]
      num_kv_heads: int,
      dtype,
  ) -> jax.Array:  # [batch, blocks, rows, head_dim]
    """The kernel's query operand: a reshape of `q` (and a cast if `dtype`
    differs), or the padded groups."""
    batch, num_heads, head_dim = q.shape
    q = q.astype(dtype)
    if not self.padded:
      return q.reshape(batch, num_heads // self.rows, self.rows, head_dim)
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    return jnp.pad(qg, ((0, 0), (0, 0), (0, self.rows - group), (0, 0)))

  def own_rows(
      self,
      out: jax.Array,  # [batch, num_kv_heads, rows_out, head_dim]
      num_heads: int,
  ) -> jax.Array:  # [batch, num_heads, head_dim]
    """Each KV head's own group of output rows, in head order."""
    batch, num_kv_heads, _, head_dim = out.shape
    group = num_heads // num_kv_heads
    k = self.heads_per_block
    if k == 1:
      return out[:, :, :group].reshape(batch, num_heads, head_dim)
    # Head h = k * j + i keeps sub-block i of its rows: the diagonal of
    # (i, sub-block), taken as a strided slice.
    blocks = out[:, :, :k * group].reshape(batch, num_kv_heads // k, k * k,
                                           group, head_dim)
    return blocks[:, :, ::k + 1].reshape(batch, num_heads, head_dim)
