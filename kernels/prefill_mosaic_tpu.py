"""Paged prefill attention for TPUs: a Pallas kernel on the Mosaic TPU lowering.

A ragged batch of new-token chunks (the semantics of
`paged_attention_ref.py`): sequence `b` brings `q_lens[b]` new tokens, the
last `q_lens[b]` of its `kv_lens[b]` context tokens; row `i` sits at position
`kv_lens[b] - q_lens[b] + i`, attends causally within the chunk and fully to
the paged prefix before it. Rows past `q_lens[b]` come out as zeros.

The grid is `(batch, num_kv_heads, query_blocks)`. A program holds
`block_tokens` new tokens times every query head of one GQA group, laid out
head-major (`[group, block_tokens, head_dim]`, flattened to `group *
block_tokens` rows), so each page it copies serves the whole group and no
row is padding for the group's sake. `block_tokens` is a power of 2 >= 16,
so a row's token is `row & (block_tokens - 1)`: no vector division.

Like `decode_mosaic_tpu.py`, the block tables and lengths are
scalar-prefetched into SMEM, the pool stays in HBM (`memory_space=ANY`) and
the program DMAs `pages_per_chunk` pages at a time into a two-slot VMEM
ring, chunk `i + 1` in flight while chunk `i` is reduced. It walks the
sequence's pages only up to the last key its rows may see (the block's last
valid position + 1, the table's capacity), so neither the causal triangle
beyond the block nor the unused table tail is read. Chunks wholly at or
before the block's first query position run unmasked; only the tail that
overlaps the new tokens is masked. Online softmax in base 2; the matmuls take
the pool's dtype (bf16 on the MXU) and accumulate in float32.

On CPU it runs in TPU interpret mode (`interpret=True` selects
`pltpu.InterpretParams()`), which simulates the DMAs and semaphores.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from kernels import checks
from kernels import common
from kernels import interpret_callback_fix
from kernels import tpu_page_ring
from kernels import tuning
from kernels.common import LOG2E, MASK_VALUE, SQUEEZED, tile_steps


def _tpu_prefill_kernel(
    tables_ref,  # SMEM [batch, pages_padded] int32
    kv_lens_ref,  # SMEM [batch] int32
    q_lens_ref,  # SMEM [batch] int32
    q_ref,  # VMEM [group, block_tokens, head_dim]
    kv_hbm,  # ANY [num_blocks, 2, num_kv_heads, block_size, head_dim]
    o_ref,  # VMEM [group, block_tokens, head_dim]
    k_buf,  # VMEM [2 (slot), pages_per_chunk, block_size, head_dim]
    v_buf,  # VMEM [2 (slot), pages_per_chunk, block_size, head_dim]
    sems,  # DMA semaphores [2 (k / v), 2 (slot)]
    *,
    sm_scale: float,
    capacity: int,
):
  b = pl.program_id(0)
  h = pl.program_id(1)
  t = pl.program_id(2)
  _, pages_per_chunk, block_size, head_dim = k_buf.shape
  group, block_tokens, _ = q_ref.shape
  rows = group * block_tokens
  chunk_tokens = pages_per_chunk * block_size

  kv_len = kv_lens_ref[b]
  q_len = q_lens_ref[b]
  first_row = t * block_tokens  # the block's first new token
  # The chunks this block walks; the first num_free need no mask.
  key_limit, num_chunks, num_free = tile_steps(
      first_row=first_row, tile_tokens=block_tokens, kv_len=kv_len,
      q_len=q_len, capacity=capacity, step_tokens=chunk_tokens)

  copies = tpu_page_ring.chunk_copies(
      tables_ref=tables_ref, kv_hbm=kv_hbm, k_buf=k_buf, v_buf=v_buf, sems=sems,
      b=b, h=h)
  tpu_page_ring.start_ring(num_chunks, copies)

  q = q_ref[...].reshape(rows, head_dim)
  scale = sm_scale * LOG2E
  # Row r is head r // block_tokens, token r % block_tokens of the block.
  row_ids = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  tokens = first_row + (row_ids & (block_tokens - 1))  # [rows, 1]
  q_pos = kv_len - q_len + tokens

  def body(i, carry, masked: bool):
    o, m, l = carry
    slot = tpu_page_ring.ring_step(i, num_chunks, copies)
    k = k_buf[slot].reshape(chunk_tokens, head_dim)
    v = v_buf[slot].reshape(chunk_tokens, head_dim)
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale
    if masked:
      k_pos = i * chunk_tokens + lax.broadcasted_iota(
          jnp.int32, (1, chunk_tokens), 1)
      valid = (k_pos <= q_pos) & (k_pos < key_limit)  # [rows, chunk_tokens]
      logits = jnp.where(valid, logits, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new)
    if masked:  # a row with no key yet has m_new == MASK_VALUE
      p = jnp.where(valid, p, 0.0)
    l_new = l * alpha + jnp.sum(p, axis=1, keepdims=True)
    o_new = o * alpha + jnp.dot(p.astype(v.dtype), v,
                                preferred_element_type=jnp.float32)
    return o_new, m_new, l_new

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))
  carry = lax.fori_loop(0, num_free, functools.partial(body, masked=False),
                        init)
  o, _, l = lax.fori_loop(num_free, num_chunks,
                          functools.partial(body, masked=True), carry)
  keep = (tokens < q_len) & (l > 0)
  out = jnp.where(keep, o / jnp.where(keep, l, 1.0), 0.0)
  o_ref[...] = out.reshape(group, block_tokens, head_dim).astype(o_ref.dtype)


def check_tiling(tiling: tuning.TpuPrefillTiling) -> None:
  """Static checks of a tiling (separate from the kernel body)."""
  bt = tiling.block_tokens
  if bt < 16 or bt & (bt - 1):
    raise ValueError(f"bad tiling {tiling}: block_tokens must be a power of "
                     "2 >= 16")
  if tiling.pages_per_chunk < 1:
    raise ValueError(f"bad tiling {tiling}: pages_per_chunk must be >= 1")


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "tiling", "interpret"))
def paged_prefill_tpu(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    sm_scale: float | None = None,
    tiling: tuning.TpuPrefillTiling | None = None,
    interpret: bool = False,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Causal attention of ragged new-token chunks over their paged context.

  Same semantics as `kernels.paged_attention_ref.ref_paged_attention`;
  float32 or bfloat16 pools (no int8).
  """
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens, q_lens)
  batch, q_len, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  pages_per_seq = block_tables.shape[1]
  if jnp.dtype(kv_pages.dtype) not in (jnp.float32, jnp.bfloat16):
    raise ValueError("the Mosaic TPU prefill kernel takes float32 or bfloat16 "
                     f"pools; got {kv_pages.dtype}")
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  group = num_heads // num_kv_heads
  if tiling is None:
    tiling = tuning.tpu_prefill_tiling(
        q_len=q_len, group=group, pages_per_seq=pages_per_seq,
        block_size=block_size)
  check_tiling(tiling)
  bt = tiling.block_tokens
  chunk = tiling.pages_per_chunk

  # [B, T, Hq, D] -> [B, Hkv, group, T_pad, D]: head-major rows per block.
  q_blocks = pl.cdiv(q_len, bt)
  t_pad = q_blocks * bt
  qg = q.astype(kv_pages.dtype).reshape(batch, q_len, num_kv_heads, group,
                                        head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, t_pad - q_len), (0, 0), (0, 0), (0, 0)))
  qg = qg.transpose(0, 2, 3, 1, 4)
  pages_padded = pl.cdiv(pages_per_seq, chunk) * chunk
  tables = common.pad_tables(block_tables, pages_padded)

  sq = SQUEEZED
  q_spec = pl.BlockSpec((sq, sq, group, bt, head_dim),
                        lambda b, h, t, *_: (b, h, 0, t, 0))
  buf = pltpu.VMEM((2, chunk, block_size, head_dim), kv_pages.dtype)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, num_kv_heads, q_blocks),
      in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=q_spec,
      scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2, 2))],
  )
  out = pl.pallas_call(
      functools.partial(_tpu_prefill_kernel, sm_scale=float(sm_scale),
                        capacity=pages_per_seq * block_size),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret_callback_fix.tpu_interpret_arg(interpret),
      name="paged_prefill_tpu",
  )(tables, kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32), qg,
    kv_pages)
  out = out[:, :, :, :q_len].transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, num_heads, head_dim)
