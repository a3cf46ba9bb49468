"""Pure-jnp reference of paged attention: gather the pages, mask, softmax.

This is the `"xla"` implementation of `kernels.paged_attention` and the
reference every Pallas kernel is tested against. It materialises each
sequence's pages `[pages_per_seq * block_size]` in full, so its cost grows
with the block table's width, not with the true context length: callers
bucket the table width.

Semantics shared by every implementation:

* Sequence `b` has `kv_lens[b]` tokens of context in the pages named by
  `block_tables[b]` (token `t` lives in page `block_tables[b, t // P]` at
  offset `t % P`), new tokens included (write them with `write_kv` first).
* Its queries are the last `q_lens[b]` tokens of that context: query row `i`
  sits at position `kv_lens[b] - q_lens[b] + i` and attends causally to
  positions `<=` its own.
* Rows `i >= q_lens[b]` (padding) and sequences with `kv_lens[b] == 0` give
  zeros, whatever the pages their table names hold (a padding row of a
  batch has no context page to fill its table with).
* Every slot a call may read must be finite: the slots past `kv_lens[b]` in
  a sequence's last page, and the pages its table names past that page.
  Masked keys get probability 0 and every implementation multiplies it into
  their values, so one NaN there makes the row NaN. `write_kv` zeroes a page
  when its first slot is written; past a sequence's context, fill its table
  with its last context page (as the engine does), not page 0 or pages
  allocated ahead, which may hold what another sequence left. Kernels that
  widen a table to whole chunks follow the same rule: they repeat each
  row's last entry (`common.pad_tables`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import checks


def ref_paged_attention(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Attention of `q` over paged K/V; see the module docstring."""
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens, q_lens)
  batch, q_len, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  group = num_heads // num_kv_heads
  pages_per_seq = block_tables.shape[1]
  ctx = pages_per_seq * block_size
  if sm_scale is None:
    sm_scale = head_dim ** -0.5

  pages = kv_pages[block_tables]  # [B, S, 2, Hkv, P, D]
  pages = jnp.moveaxis(pages, 3, 1)  # [B, Hkv, S, 2, P, D]
  k = pages[:, :, :, 0].reshape(batch, num_kv_heads, ctx, head_dim)
  v = pages[:, :, :, 1].reshape(batch, num_kv_heads, ctx, head_dim)

  qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  scores = jnp.einsum("btkgd,bksd->bkgts", qg.astype(jnp.float32),
                      k.astype(jnp.float32)) * sm_scale

  q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(q_len)[None, :]  # [B, T]
  kv_pos = jnp.arange(ctx)  # [S*P]
  valid = ((kv_pos[None, None, :] <= q_pos[:, :, None])
           & (kv_pos[None, None, :] < kv_lens[:, None, None])
           & (jnp.arange(q_len)[None, :, None] < q_lens[:, None, None]))
  valid = valid[:, None, None]  # [B, 1, 1, T, S*P]
  scores = jnp.where(valid, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(valid, jnp.exp(scores - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bksd->btkgd", p, v.astype(jnp.float32))
  out = out.reshape(batch, q_len, num_heads, head_dim)
  # A row with no key (padding, an empty sequence) multiplied 0 into its
  # values: NaN where its table names a NaN page. Zeros, as the kernels give.
  live = jnp.arange(q_len)[None, :] < q_lens[:, None]  # [B, T]
  return jnp.where(live[:, :, None, None], out, 0.0).astype(q.dtype)
