"""Paged prefill for Hopper with two computing warpgroups and a copying one.

The same attention as `prefill_mosaic_gpu.py` (ragged new-token chunks, each
causal over itself and full over its paged prefix), organised as
FlashAttention-3 organises dense attention. On an H100 the one-warpgroup
kernel kept the tensor cores busy a third of the time: its single warpgroup
alternates `wgmma` and the softmax, and nothing else on the SM can fill the
gaps (Nsight Compute: issue slots busy 32% of cycles, one program per SM;
docs/benchmarks.md). Here a program holds two 64-row query tiles, each owned
by a computing warpgroup, so that one warpgroup's softmax can run while the
other's matmuls do, and a third warpgroup does nothing but keep the K/V page
ring full:

* the copying warpgroup (`wg == 2`, registers lowered to 40) issues the TMA
  copies of the program's pages step by step (`PageRing.copy_all`),
  refilling a ring slot once both computing warpgroups have released it;
* each computing warpgroup (`wg` 0 and 1, registers raised to 232) walks the
  steps its tile needs with `PageRing.softmax_step`, releasing the slot's K
  after `q @ K^T` and its V after `p @ V` (the "consumed" barriers, two
  arrivals each), then waits out and releases the steps the other tile needs
  beyond its own (its causal limit is up to one tile earlier), and writes
  its normalised rows through its own query tile's shared memory.

Both tiles read every K/V page the program copies, so each page crossing
HBM serves 128 rows instead of 64. Output rows come back in the pool's
dtype. bf16/f16 pools only (int8 pools would need a dequantized tile per
computing warpgroup); selected by `MosaicDecodeTiling.consumers == 2`
through `prefill_mosaic_gpu.paged_prefill`. Correct in Mosaic GPU's
interpret mode and lowered for CUDA on CPU; not yet run on a GPU, so no
default tiling picks it.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import query_rows
from kernels.common import LOG2E
from kernels.mosaic_gpu_ring import (WGMMA_ROWS, PageRing, interpret_arg,
                                     plgpu, ring_barriers, ring_buffers,
                                     swizzled)
from kernels.prefill_mosaic_gpu import (TileSteps, causal_mask,
                                        normalized_rows)

CONSUMERS = 2  # computing warpgroups; the copying one is `wg == CONSUMERS`
# Register split between the warpgroups (FlashAttention-3's): 2 x 232 + 40
# of the 512 registers a thread triple may hold.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40


def smem_bytes(tokens: int, head_dim: int, num_stages: int,
               itemsize: int = 2) -> int:
  """Shared memory of one program: two query tiles (also the output
  tiles) and the K/V ring."""
  return (CONSUMERS * WGMMA_ROWS * head_dim * itemsize
          + 2 * num_stages * tokens * head_dim * itemsize)


def _kernel(lens_ref, q_lens_ref, tables_ref, q_ref, kv_ref, o_ref, *, st):
  """One program: one sequence, one KV head, two query tiles.

  Refs: lens_ref, q_lens_ref GMEM [batch] int32; tables_ref GMEM [batch,
  pages] int32 (clamped on use); q_ref, o_ref GMEM [batch, num_kv_heads,
  tiles, 64, head_dim] (pool dtype); kv_ref GMEM [num_blocks, 2,
  num_kv_heads, block_size, head_dim].
  """
  b = lax.axis_index("batch")
  h = lax.axis_index("kv_head")
  block = lax.axis_index("q_block")
  wg = lax.axis_index("wg")
  kv_len = lens_ref[b]
  q_len = q_lens_ref[b]
  # The later tile needs the most steps (none if it has no rows).
  program_steps = jnp.maximum(
      TileSteps(st, block * CONSUMERS, kv_len, q_len).num_steps,
      TileSteps(st, block * CONSUMERS + 1, kv_len, q_len).num_steps)

  def body(q_tiles, k_smem, v_smem, q_barriers, k_barriers, v_barriers,
           k_consumed, v_consumed):
    consumed = (k_consumed, v_consumed)

    def ring(q_smem):
      return PageRing(st, b=b, h=h, table_base=0, tables_ref=tables_ref,
                      kv_ref=kv_ref, scales_ref=None, q_smem=q_smem,
                      k_smem=k_smem, v_smem=v_smem, k_work=None, v_work=None,
                      k_barriers=k_barriers, v_barriers=v_barriers)

    def release(step):  # both halves of a step's slot, for the copier
      slot = lax.rem(step, st.num_stages)
      plgpu.barrier_wait(k_barriers.at[slot])
      plgpu.barrier_wait(v_barriers.at[slot])
      plgpu.barrier_arrive(k_consumed.at[slot])
      plgpu.barrier_arrive(v_consumed.at[slot])

    @pl.when(wg < CONSUMERS)
    def _compute():
      if not st.interpret:
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
      q_smem = q_tiles.at[wg]
      tile = TileSteps(st, block * CONSUMERS + wg, kv_len, q_len)
      plgpu.copy_gmem_to_smem(q_ref.at[b, h, block * CONSUMERS + wg], q_smem,
                              q_barriers.at[wg])
      r = ring(q_smem)
      mask = functools.partial(causal_mask, st, r, first_row=tile.first_row,
                               kv_len=kv_len, q_len=q_len,
                               key_limit=tile.key_limit)
      scale = st.sm_scale * LOG2E  # softmax in base 2

      def step_fn(step, carry, masked: bool):
        return r.softmax_step(step, carry, scale=scale,
                              num_steps=program_steps, consumed=consumed,
                              mask=functools.partial(mask, step) if masked
                              else None)

      plgpu.barrier_wait(q_barriers.at[wg])
      carry = lax.fori_loop(0, tile.num_free,
                            functools.partial(step_fn, masked=False),
                            r.initial_state())
      acc, _, l = lax.fori_loop(tile.num_free, tile.num_steps,
                                functools.partial(step_fn, masked=True),
                                carry)
      # Steps only the other tile needs: wait for them, then release them.
      lax.fori_loop(tile.num_steps, program_steps,
                    lambda step, _: release(step), None)
      out = normalized_rows(st, r, acc, l, first_row=tile.first_row,
                            q_len=q_len)
      q_smem[...] = out.astype(q_smem.dtype)  # the query tile is free now
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, block * CONSUMERS + wg])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _copy():
      if not st.interpret:
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
      ring(None).copy_all(program_steps, consumed)

  q_tiles = swizzled((CONSUMERS, WGMMA_ROWS, st.head_dim), kv_ref.dtype)
  _, k_ring, v_ring = ring_buffers(st, kv_ref.dtype, kv_ref.dtype)
  _, k_barriers, v_barriers = ring_barriers(st)
  released = plgpu.Barrier(num_arrivals=CONSUMERS,
                           num_barriers=st.num_stages)
  pl.run_scoped(body, q_tiles, k_ring, v_ring,
                plgpu.Barrier(num_barriers=CONSUMERS), k_barriers,
                v_barriers, released, released, collective_axes="wg")


def paged_prefill_ws(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    st,  # prefill_mosaic_gpu._Static, consumers == 2, not quantized
    interpret,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim], q's dtype
  """The warp-specialized kernel's call; `prefill_mosaic_gpu.paged_prefill`
  checks the arguments and builds `st`."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = kv_pages.shape[2]
  tiles_per_program = CONSUMERS * st.block_tokens
  q_blocks = pl.cdiv(q_len, tiles_per_program)
  tiles = q_blocks * CONSUMERS
  # [B, T, Hq, D] -> [B, Hkv, tiles, 64, D], rows (token, head).
  qg = query_rows.group_rows(q, num_kv_heads, st.group_pad,
                             tiles * st.block_tokens, kv_pages.dtype)
  qg = qg.reshape(batch, num_kv_heads, tiles, WGMMA_ROWS, head_dim)
  kernel = plgpu.kernel(
      functools.partial(_kernel, st=st),
      out_type=jax.ShapeDtypeStruct(qg.shape, kv_pages.dtype),
      grid=(batch, num_kv_heads, q_blocks),
      grid_names=("batch", "kv_head", "q_block"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      interpret=interpret_arg(interpret),
  )
  out = kernel(kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32),
               block_tables.astype(jnp.int32), qg, kv_pages)
  out = out.reshape(batch, num_kv_heads, tiles * WGMMA_ROWS, head_dim)
  return query_rows.ungroup_rows(out, q_len, num_heads,
                                 st.group_pad).astype(q.dtype)
