"""Paged prefill attention for GPUs: a Pallas kernel on the Triton lowering.

A ragged batch of new-token chunks: sequence `b` brings `q_lens[b]` new
tokens, the last `q_lens[b]` of its `kv_lens[b]` context tokens. Each new
token attends causally to the chunk itself and fully to the paged prefix
before it (the agent turn: a few hundred tokens onto tens of thousands).

The grid is `(batch, num_kv_heads, query_blocks)`. A program holds
`block_q` rows: `block_q / group` new tokens times every query head of one
GQA group (the group padded to a power of 2), so each K/V tile it gathers
serves the whole group. It walks the sequence's pages a few at a time,
gathering them by id from the pool, up to the last key its rows may see (so
the causal triangle and the unused table tail are never read); tiles wholly
before the block's first position run unmasked. Online softmax in base 2,
float32 accumulation. Rows past `q_lens[b]` are written as zeros. Query
blocks are independent, so a long prefix needs no split-K here.

Runs on CPU with `interpret=True` (tests) and lowers to Triton on GPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import checks
from kernels import common
from kernels import quantize
from kernels import query_rows
from kernels import tuning
from kernels.common import LOG2E, MASK_VALUE, SQUEEZED, tile_steps
from kernels.decode_triton import (MIN_DOT_ROWS, ChunkLoader, check_supported,
                                   check_tiling, compiler_params, dot_nn,
                                   dot_nt)


def _prefill_kernel(
    kv_len_ref,  # [1] int32
    q_len_ref,  # [1] int32
    tables_ref,  # [pages_padded] int32: this sequence's page ids
    q_ref,  # [block_q, head_dim]: rows are (token, head of the group)
    k_ref,  # [num_blocks, block_size, head_dim]
    v_ref,  # [num_blocks, block_size, head_dim]
    *refs,  # (k_scale_ref [num_blocks], v_scale_ref [num_blocks])?, o_ref
    sm_scale: float,
    pages_per_chunk: int,
    page_parts: int,
    group_pad: int,
    capacity: int,
    quantized: bool,
):
  if quantized:
    k_scale_ref, v_scale_ref, o_ref = refs
  else:
    (o_ref,) = refs
  q_block = pl.program_id(2)
  num_blocks, block_size, head_dim = k_ref.shape
  block_q = q_ref.shape[0]
  loader = ChunkLoader(tables_ref, num_blocks, block_size, pages_per_chunk,
                       page_parts)
  chunk_tokens = loader.tokens

  kv_len = kv_len_ref[0]
  q_len = q_len_ref[0]
  block_tokens = block_q // group_pad
  first_row = q_block * block_tokens  # first new token of the block
  # lax.div, not `//`: non-negative, and jnp's sign fix-up does not lower.
  rows = first_row + lax.div(jnp.arange(block_q, dtype=jnp.int32),
                             group_pad)
  q_pos = kv_len - q_len + rows  # [block_q]
  row_valid = rows < q_len
  # The chunks this block walks; the first num_free need no mask.
  key_limit, num_chunks, num_free = tile_steps(
      first_row=first_row, tile_tokens=block_tokens, kv_len=kv_len,
      q_len=q_len, capacity=capacity, step_tokens=chunk_tokens)

  q = q_ref[...]
  compute_dtype = q.dtype
  scale = sm_scale * LOG2E

  def step(i, carry, masked: bool):
    o, m, l = carry
    ids = loader.page_ids(i)
    k = loader.load(k_ref, ids, i, compute_dtype)
    logits = dot_nt(q, k) * scale  # [block_q, chunk_tokens]
    if quantized:
      logits = logits * loader.scales(k_scale_ref, ids)
    if masked:
      k_pos = i * chunk_tokens + jnp.arange(chunk_tokens, dtype=jnp.int32)
      valid = ((k_pos[None, :] <= q_pos[:, None])
               & (k_pos < key_limit)[None, :]
               & row_valid[:, None])
      logits = jnp.where(valid, logits, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new[:, None])
    if masked:
      p = jnp.where(valid, p, 0.0)
    l_new = l * alpha + jnp.sum(p, axis=1)
    if quantized:
      p = p * loader.scales(v_scale_ref, ids)
    v = loader.load(v_ref, ids, i, compute_dtype)
    o_new = o * alpha[:, None] + dot_nn(p.astype(compute_dtype), v)
    return o_new, m_new, l_new

  # The unmasked chunks, then the causal tail, masked.
  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  carry = lax.fori_loop(0, num_free,
                        functools.partial(step, masked=False), init)
  o, _, l = lax.fori_loop(num_free, num_chunks,
                          functools.partial(step, masked=True), carry)
  l = jnp.where(row_valid, l, 0.0)
  has_keys = l > 0
  out = jnp.where(has_keys[:, None], o / jnp.where(has_keys, l, 1.0)[:, None],
                  0.0)
  o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "tiling", "interpret"))
def paged_prefill(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
    *,
    sm_scale: float | None = None,
    tiling: tuning.PrefillTiling | None = None,
    interpret: bool = False,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Causal attention of ragged new-token chunks over their paged context.

  Same semantics as `kernels.paged_attention_ref.ref_paged_attention`.
  """
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens, q_lens)
  batch, q_len, num_heads, head_dim = q.shape
  num_blocks, _, num_kv_heads, block_size, _ = kv_pages.shape
  pages_per_seq = block_tables.shape[1]
  quantize.check_scales(kv_pages, kv_scales)
  check_supported(kv_pages, head_dim)
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  if tiling is None:
    tiling = tuning.prefill_tiling(
        block_size=block_size, head_dim=head_dim,
        itemsize=jnp.dtype(q.dtype if kv_scales is not None
                           else kv_pages.dtype).itemsize)
  group = num_heads // num_kv_heads
  group_pad = pl.next_power_of_2(group)
  # Rows per program: tokens x padded group, a power of 2 >= 16.
  block_q = max(MIN_DOT_ROWS, group_pad,
                min(tiling.block_q, pl.next_power_of_2(q_len) * group_pad))
  block_tokens = block_q // group_pad
  chunk = tiling.pages_per_chunk
  check_tiling(tiling, chunk, tiling.page_parts, block_size)
  if tiling.block_q & (tiling.block_q - 1):
    raise ValueError(f"bad tiling {tiling}: block_q must be a power of 2")
  quantized = kv_scales is not None
  compute_dtype = q.dtype if quantized else kv_pages.dtype

  # [B, T, Hq, D] -> [B, Hkv, T_pad * group_pad, D], rows (token, head).
  q_blocks = pl.cdiv(q_len, block_tokens)
  t_pad = q_blocks * block_tokens
  qg = query_rows.group_rows(q, num_kv_heads, group_pad, t_pad, compute_dtype)
  pages_padded = pl.cdiv(pages_per_seq, chunk) * chunk
  tables = common.pad_tables(block_tables, pages_padded)
  kv_lens2 = kv_lens.astype(jnp.int32).reshape(batch, 1)
  q_lens2 = q_lens.astype(jnp.int32).reshape(batch, 1)

  sq = SQUEEZED
  page_spec = lambda kv: pl.BlockSpec(  # noqa: E731
      (num_blocks, sq, sq, block_size, head_dim),
      lambda b, h, t: (0, kv, h, 0, 0))
  q_spec = pl.BlockSpec((sq, sq, block_q, head_dim),
                        lambda b, h, t: (b, h, t, 0))
  in_specs = [
      pl.BlockSpec((sq, 1), lambda b, h, t: (b, 0)),
      pl.BlockSpec((sq, 1), lambda b, h, t: (b, 0)),
      pl.BlockSpec((sq, pages_padded), lambda b, h, t: (b, 0)),
      q_spec,
      page_spec(0),
      page_spec(1),
  ]
  args = [kv_lens2, q_lens2, tables, qg, kv_pages, kv_pages]
  if quantized:
    scale_spec = lambda kv: pl.BlockSpec(  # noqa: E731
        (num_blocks, sq, sq), lambda b, h, t: (0, kv, h))
    in_specs += [scale_spec(0), scale_spec(1)]
    args += [kv_scales.astype(jnp.float32)] * 2
  kernel = functools.partial(
      _prefill_kernel, sm_scale=float(sm_scale), pages_per_chunk=chunk,
      page_parts=tiling.page_parts, group_pad=group_pad,
      capacity=pages_per_seq * block_size, quantized=quantized)
  out = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, q_blocks),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=compiler_params(tiling.num_warps, tiling.num_stages),
      interpret=interpret,
      name="paged_prefill",
  )(*args)
  return query_rows.ungroup_rows(out, q_len, num_heads, group_pad)
