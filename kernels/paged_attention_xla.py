"""Paged attention in plain XLA, chunked with an online softmax.

The `"xla_chunked"` implementation: the fastest portable path, and the one
the engine uses on CPU. It walks each batch's pages in chunks of
`chunk_pages` with a `fori_loop` whose trip count is set at run time by the
longest `kv_len` in the batch, so the cost follows the true context length,
not the width of the (padded) block table. Per chunk it gathers the pages,
scores them against every query of the GQA group at once, and folds them
into a running max / sum / accumulator (flash-attention's recurrence), so
no `[q_len, context]` score matrix is ever materialised.

Semantics are those of `paged_attention_ref.ref_paged_attention` (the test
reference); int8 pools are dequantized chunk by chunk with `kv_scales`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import checks
from kernels import common

# Tokens per chunk: small chunks keep prefill's score tile in cache, large
# chunks amortise the loop for decode.
PREFILL_CHUNK_TOKENS = 128
DECODE_CHUNK_TOKENS = 512


def chunk_pages_for(q_len: int, block_size: int, pages_per_seq: int) -> int:
  """Pages per loop iteration for a call of this shape."""
  tokens = DECODE_CHUNK_TOKENS if q_len <= 8 else PREFILL_CHUNK_TOKENS
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

  def load(chunk_table, kv):  # -> [B, cp, Hkv, P, D] float32
    pages = kv_pages[chunk_table, kv].astype(jnp.float32)
    if kv_scales is not None:
      pages = pages * kv_scales[chunk_table, kv][..., None, None]
    return pages

  def body(c, carry):
    m, l, acc = carry  # [B,T,Hkv,G], [B,T,Hkv,G], [B,T,Hkv,G,D]
    chunk_table = jax.lax.dynamic_slice_in_dim(tables, c * cp, cp, axis=1)
    k, v = load(chunk_table, 0), load(chunk_table, 1)
    s = jnp.einsum("btkgd,bckpd->btkgcp", qg, k)
    s = s.reshape(batch, q_len, num_kv_heads, group, chunk_tokens)
    kv_pos = c * chunk_tokens + jnp.arange(chunk_tokens)
    valid = ((kv_pos[None, None, :] <= q_pos[:, :, None])
             & (kv_pos[None, None, :] < key_limit[:, None, None]))
    s = jnp.where(valid[:, :, None, None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("btkgcp,bckpd->btkgd",
                    p.reshape(batch, q_len, num_kv_heads, group, cp, block_size), v)
    return m_new, l, acc * alpha[..., None] + pv

  init = (jnp.full((batch, q_len, num_kv_heads, group), -jnp.inf, jnp.float32),
          jnp.zeros((batch, q_len, num_kv_heads, group), jnp.float32),
          jnp.zeros((batch, q_len, num_kv_heads, group, head_dim), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
  out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
  real = (jnp.arange(q_len)[None, :] < q_lens[:, None])[:, :, None, None, None]
  out = jnp.where(real, out, 0.0)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
