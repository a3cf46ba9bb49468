"""Paged attention in plain XLA, chunked with an online softmax.

The `"xla_chunked"` implementation: the fastest portable path, and the one
the engine uses on CPU. It walks the pages in chunks of `chunk_pages` with a
`fori_loop` whose trip count is set at run time by the true context lengths,
so the cost follows them, not the width of the (padded) block table. Per
chunk it gathers the pages, scores them against every query of the GQA
group at once, and folds them into a running max / sum / accumulator
(flash-attention's recurrence), so no `[q_len, context]` score matrix is
ever materialised. Prefill calls walk every row's chunks together, for as
long as the longest row needs; decode calls walk each row's own chunks
(`_decode_work_items`).

Semantics are those of `paged_attention_ref.ref_paged_attention` (the test
reference); int8 pools are dequantized chunk by chunk with `kv_scales`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import checks
from kernels import common

# Tokens per chunk: small chunks keep prefill's score tile in cache. For
# decode a chunk is one work item (one row's pages; `_decode_work_items`),
# DECODE_ITEMS of them per loop iteration.
PREFILL_CHUNK_TOKENS = 128
DECODE_CHUNK_TOKENS = 128
DECODE_ITEMS = 8


# Calls with more query rows than this take the prefill layout.
DECODE_MAX_Q_LEN = 8


def chunk_pages_for(q_len: int, block_size: int, pages_per_seq: int) -> int:
  """Pages per loop iteration for a call of this shape."""
  tokens = (DECODE_CHUNK_TOKENS if q_len <= DECODE_MAX_Q_LEN
            else PREFILL_CHUNK_TOKENS)
  return max(1, min(pages_per_seq, tokens // block_size))


def xla_chunked_paged_attention(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    sm_scale: float | None = None,
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
    chunk_pages: int | None = None,
    decode_items: int | None = None,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Causal attention of the last `q_lens[b]` tokens over paged K/V."""
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens, q_lens)
  batch, q_len, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  group = num_heads // num_kv_heads
  pages_per_seq = block_tables.shape[1]
  cp = chunk_pages or chunk_pages_for(q_len, block_size, pages_per_seq)
  num_chunks_max = -(-pages_per_seq // cp)
  tables = common.pad_tables(block_tables, num_chunks_max * cp)
  chunk_tokens = cp * block_size
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale

  qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  qg = qg.astype(jnp.float32) * scale
  q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(q_len)[None, :]  # [B, T]
  # Keys exist only within the table's capacity, as in the reference: a
  # length past it must not re-read the clamped last chunk or the padding.
  key_limit = jnp.minimum(kv_lens, pages_per_seq * block_size)  # [B]
  num_chunks = (jnp.max(key_limit) + chunk_tokens - 1) // chunk_tokens

  if q_len > DECODE_MAX_Q_LEN:
    return _prefill_rows_layout(q, kv_pages, tables, kv_lens, q_lens, q_pos,
                                key_limit, num_chunks, cp, scale, kv_scales)

  return _decode_work_items(qg, kv_pages, tables, q_lens, q_pos, key_limit,
                            cp, decode_items or DECODE_ITEMS, kv_scales
                            ).astype(q.dtype)


def _prefill_rows_layout(
    q: jax.Array,  # [B, T, H, D]
    kv_pages: jax.Array,  # [N, 2, Hkv, P, D]
    tables: jax.Array,  # [B, S] int32, padded to whole chunks
    kv_lens: jax.Array,  # [B] int32
    q_lens: jax.Array,  # [B] int32
    q_pos: jax.Array,  # [B, T] int32: each query row's position
    key_limit: jax.Array,  # [B] int32: keys a row may see at most
    num_chunks: jax.Array,  # [] int32: loop trip count
    cp: int,  # pages per chunk
    scale: float,
    kv_scales: jax.Array | None,  # [N, 2, Hkv] f32 for an int8 pool
) -> jax.Array:  # [B, T, H, D]
  """The same online softmax with every GQA group's queries as the rows of
  one matrix per KV head: q `[B, Hkv, T*G, D]` (transposed once, outside
  the loop), each chunk's K/V `[B, Hkv, C, D]`, scores `[B, Hkv, T*G, C]`.
  XLA CPU runs both products as plain batched matmuls, with no transpose
  of a `[T, G, C]` score tile per chunk. For prefill chunks (more than
  `DECODE_MAX_Q_LEN` rows): with the engine's 384-token bucket of the same
  change, the main job's prefill went from 104 to 211 tokens/s on the
  2-core CPU, the same greedy tokens (`launch.agent_eval`,
  `engine.prefill_tok_s`; docs/benchmarks.md, 2026-11-30). Decode keeps
  the layout above: its few rows gain nothing."""
  del kv_lens  # `key_limit` carries it
  batch, q_len, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  group = num_heads // num_kv_heads
  rows = q_len * group
  ct = cp * block_size
  qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  qg = qg.astype(jnp.float32) * scale
  qg = qg.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, rows, head_dim)
  row_pos = jnp.repeat(q_pos, group, axis=1)  # [B, T*G], t-major as qg

  def body(c, carry):
    m, l, acc = carry  # [B,Hkv,R], [B,Hkv,R], [B,Hkv,R,D]
    chunk_table = jax.lax.dynamic_slice_in_dim(tables, c * cp, cp, axis=1)
    pages = kv_pages[chunk_table].astype(jnp.float32)  # [B,cp,2,Hkv,P,D]
    if kv_scales is not None:
      pages = pages * kv_scales[chunk_table][..., None, None]
    pages = pages.transpose(0, 2, 3, 1, 4, 5).reshape(
        batch, 2, num_kv_heads, ct, head_dim)
    k, v = pages[:, 0], pages[:, 1]
    s = jnp.einsum("bkrd,bksd->bkrs", qg, k)
    kv_pos = c * ct + jnp.arange(ct)
    valid = ((kv_pos[None, None, :] <= row_pos[:, :, None])
             & (kv_pos[None, None, :] < key_limit[:, None, None]))
    s = jnp.where(valid[:, None], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkrs,bksd->bkrd", p, v)
    return m_new, l, acc * alpha[..., None] + pv

  init = (jnp.full((batch, num_kv_heads, rows), -jnp.inf, jnp.float32),
          jnp.zeros((batch, num_kv_heads, rows), jnp.float32),
          jnp.zeros((batch, num_kv_heads, rows, head_dim), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
  out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
  out = out.reshape(batch, num_kv_heads, q_len, group, head_dim)
  out = out.transpose(0, 2, 1, 3, 4)  # [B, T, Hkv, G, D]
  real = (jnp.arange(q_len)[None, :] < q_lens[:, None])[:, :, None, None, None]
  out = jnp.where(real, out, 0.0)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def _decode_work_items(
    qg: jax.Array,  # [B, T, Hkv, G, D] f32, pre-scaled
    kv_pages: jax.Array,  # [N, 2, Hkv, P, D]
    tables: jax.Array,  # [B, S] int32, padded to whole chunks
    q_lens: jax.Array,  # [B] int32
    q_pos: jax.Array,  # [B, T] int32: each query row's position
    key_limit: jax.Array,  # [B] int32: keys a row may see at most
    cp: int,  # pages per work item
    items: int,  # work items per loop iteration
    kv_scales: jax.Array | None,  # [N, 2, Hkv] f32 for an int8 pool
) -> jax.Array:  # [B, T, H, D] f32
  """Decode (at most `DECODE_MAX_Q_LEN` query rows): the online softmax over
  WORK ITEMS, an item being `cp` pages of one batch row's context, `items`
  of them per loop iteration.

  Each row gets the items its own context needs (none for a padding row),
  listed row by row, and the loop's trip count is the batch's total over
  `items`. The loop this replaces walked chunks of the whole batch, every
  row for as long as the longest one: over the main job's 204 decode steps
  (`launch.agent_eval` defaults, batches of up to 8 rows whose contexts
  differ by hundreds of tokens) its 512-token chunks read 1.48x the
  context tokens there were; 128-token items read 1.05x. Items of one row
  (an iteration may hold several) are folded into the row's running max /
  sum / accumulator with scatters.

  An item's K and V are gathered as `[Hkv, cp * P, D]`, the layout both
  products take as it is: scores as `K @ q^T` (then a small transpose of
  the `[ct, T * G]` tile) and the output as `p @ V`. The batch loop's
  einsums had XLA gather V transposed, `[D, tokens]`, every chunk.
  """
  batch, q_len, num_kv_heads, group, head_dim = qg.shape
  block_size = kv_pages.shape[3]
  width = tables.shape[1]
  max_chunks = width // cp  # `tables` holds whole chunks
  ct = cp * block_size
  chunks = jnp.where(q_lens > 0, (key_limit + ct - 1) // ct, 0)  # [B]
  ends = jnp.cumsum(chunks)
  total = ends[-1]
  slots = -(-batch * max_chunks // items) * items  # static: every item
  item_row = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), chunks,
                        total_repeat_length=slots)
  item_chunk = (jnp.arange(slots, dtype=jnp.int32)
                - (ends - chunks)[item_row])

  rows = q_len * group
  # [B, Hkv, T*G, D]: the GQA group's queries of every row, t-major.
  qk = qg.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, rows, head_dim)

  def load(page_ids, kv):  # [J, cp] -> [J, Hkv, ct, D] float32
    pages = kv_pages[page_ids, kv].astype(jnp.float32)  # [J, cp, Hkv, P, D]
    if kv_scales is not None:
      pages = pages * kv_scales[page_ids, kv][..., None, None]
    return pages.transpose(0, 2, 1, 3, 4).reshape(
        items, num_kv_heads, ct, head_dim)

  def body(i, carry):
    m, l, acc = carry  # [B, Hkv, R], [B, Hkv, R], [B, Hkv, R, D]
    first = i * items
    row = jnp.clip(jax.lax.dynamic_slice_in_dim(item_row, first, items),
                   0, batch - 1)  # [J]
    chunk = jax.lax.dynamic_slice_in_dim(item_chunk, first, items)
    live = first + jnp.arange(items) < total  # [J]
    chunk = jnp.clip(jnp.where(live, chunk, 0), 0, max_chunks - 1)
    cols = chunk[:, None] * cp + jnp.arange(cp)[None, :]  # [J, cp]
    page_ids = tables[row[:, None], cols]
    k, v = load(page_ids, 0), load(page_ids, 1)  # [J, Hkv, ct, D]
    # K @ q^T: K as the product's left operand in its gathered layout.
    s = jnp.einsum("jksd,jkrd->jksr", k, qk[row])
    s = s.transpose(0, 1, 3, 2)  # [J, Hkv, R, ct], a small tile
    kv_pos = chunk[:, None] * ct + jnp.arange(ct)[None, :]  # [J, ct]
    valid = ((kv_pos[:, None, :] <= q_pos[row][:, :, None])
             & (kv_pos[:, None, :] < key_limit[row][:, None, None])
             & live[:, None, None])  # [J, T, ct]
    valid = jnp.repeat(valid, group, axis=1)  # [J, R, ct], t-major as qk
    s = jnp.where(valid[:, None], s, -jnp.inf)
    dest = jnp.where(live, row, batch)  # dead items scatter nowhere
    m_new = m.at[dest].max(jnp.max(s, axis=-1), mode="drop")
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[row][..., None])
    alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    l = l * alpha + jnp.zeros_like(l).at[dest].add(
        jnp.sum(p, axis=-1), mode="drop")
    pv = jnp.einsum("jkrs,jksd->jkrd", p, v)  # V in its gathered layout
    acc = acc * alpha[..., None] + jnp.zeros_like(acc).at[dest].add(
        pv, mode="drop")
    return m_new, l, acc

  shape = (batch, num_kv_heads, rows)
  init = (jnp.full(shape, -jnp.inf, jnp.float32),
          jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (head_dim,), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, (total + items - 1) // items, body, init)
  out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
  out = out.reshape(batch, num_kv_heads, q_len, group, head_dim)
  out = out.transpose(0, 2, 1, 3, 4)  # [B, T, Hkv, G, D]
  real = (jnp.arange(q_len)[None, :] < q_lens[:, None])[:, :, None, None, None]
  out = jnp.where(real, out, 0.0)
  return out.reshape(batch, q_len, num_kv_heads * group, head_dim)
