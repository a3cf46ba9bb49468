"""The two-slot page DMA ring of the Mosaic TPU paged-attention kernels.

Both TPU kernels (`decode_mosaic_tpu`, `prefill_mosaic_tpu`) walk one
sequence's pages a chunk of `pages_per_chunk` pages at a time: while chunk i
is reduced from ring slot i % 2, chunk i + 1's pages are already being DMA'd
from HBM into the other slot. This module holds that ring once:
`chunk_copies` builds a chunk's DMAs (K, V and, for int8 pools, the pages'
scales), `start_ring` starts chunk 0 before the loop, and `ring_step` (at the
top of each loop step) starts the next chunk and waits for the current one.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

Copies = Callable[[jax.Array, jax.Array], list]  # (chunk, slot) -> DMAs


def chunk_copies(
    *,
    tables_ref,  # SMEM [batch, pages_per_seq] int32 (scalar-prefetched)
    kv_hbm,  # HBM [num_blocks, 2, num_kv_heads, block_size, head_dim]
    k_buf,  # VMEM [2 (slot), pages_per_chunk, block_size, head_dim]
    v_buf,  # VMEM, as k_buf
    sems,  # DMA semaphores [2 or 3 (k / v / scales), 2 (slot)]
    b: jax.Array,  # [] int32: the sequence
    h: jax.Array,  # [] int32: the KV head
    scales_hbm=None,  # HBM [num_blocks, 2, num_kv_heads] f32 (int8 pools)
    scale_buf=None,  # SMEM [2 (slot), pages_per_chunk, 2, num_kv_heads] f32
) -> Copies:
  """`copies(chunk, slot)`: the DMAs of chunk `chunk`'s pages into `slot`."""
  pages_per_chunk = k_buf.shape[1]
  num_blocks = kv_hbm.shape[0]

  def copies(chunk, slot):
    out = []
    for c in range(pages_per_chunk):
      page = tables_ref[b, chunk * pages_per_chunk + c]
      page = jnp.clip(page, 0, num_blocks - 1)  # unused slots may be junk
      out.append(pltpu.make_async_copy(
          kv_hbm.at[page, 0, h], k_buf.at[slot, c], sems.at[0, slot]))
      out.append(pltpu.make_async_copy(
          kv_hbm.at[page, 1, h], v_buf.at[slot, c], sems.at[1, slot]))
      if scales_hbm is not None:
        out.append(pltpu.make_async_copy(
            scales_hbm.at[page], scale_buf.at[slot, c], sems.at[2, slot]))
    return out

  return copies


def start_ring(num_chunks: jax.Array,  # [] int32
               copies: Copies) -> None:
  """Starts chunk 0's DMAs into slot 0 (if there is a chunk)."""

  @pl.when(num_chunks > 0)
  def _():
    for copy in copies(0, 0):
      copy.start()


def ring_step(i: jax.Array,  # [] int32: the chunk to consume
              num_chunks: jax.Array,  # [] int32
              copies: Copies) -> jax.Array:  # [] int32
  """Starts chunk i + 1 into the other slot, waits for chunk i; its slot."""
  slot = i % 2

  @pl.when(i + 1 < num_chunks)
  def _():
    for copy in copies(i + 1, 1 - slot):
      copy.start()

  for copy in copies(i, slot):
    copy.wait()
  return slot
