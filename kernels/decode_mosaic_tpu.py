"""Paged decode attention for TPUs: a Pallas kernel on the Mosaic TPU lowering.

The grid is `(batch, num_kv_heads)`. The block tables and lengths are
scalar-prefetched into SMEM; the pool stays in HBM (`memory_space=ANY`) and
the kernel DMAs the pages it needs, `pages_per_chunk` at a time, into a
double-buffered VMEM scratch: while chunk `i` is being reduced, chunk `i+1`
is already in flight. Each program holds all query heads of its GQA group
and keeps an online softmax in float32; only pages below `kv_lens[b]` are
copied.

TPUs have one or two TensorCores per chip, so `batch * kv_heads` programs
already keep them busy and there is no split-K here (see decode_triton.py
for the GPU version that needs it). int8 pools: each page's scales (K and V,
all heads: a few floats) are DMA'd into SMEM next to the page, since a whole
pool's scales would not fit SMEM; key scales multiply the logits, value
scales the probabilities, per page.

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
from kernels import quantize
from kernels import tpu_page_ring
from kernels.common import LOG2E, MASK_VALUE, SQUEEZED


def _tpu_decode_kernel(
    tables_ref,  # SMEM [batch, pages_padded] int32
    lens_ref,  # SMEM [batch] int32
    q_ref,  # VMEM [group, head_dim]
    kv_hbm,  # ANY [num_blocks, 2, num_kv_heads, block_size, head_dim]
    *refs,  # scales_hbm?, o_ref, k_buf, v_buf, scale_buf?, sems
    sm_scale: float,
    quantized: bool,
):
  # scales_hbm: ANY [num_blocks, 2, num_kv_heads] f32 (int8 pools only)
  # o_ref: VMEM [group, head_dim]
  # k_buf, v_buf: VMEM [2 (slot), pages_per_chunk, block_size, head_dim]
  # scale_buf: SMEM [2 (slot), pages_per_chunk, 2, num_kv_heads] f32
  # sems: DMA semaphores [3 (k / v / scales), 2 (slot)]
  if quantized:
    scales_hbm, o_ref, k_buf, v_buf, scale_buf, sems = refs
  else:
    o_ref, k_buf, v_buf, sems = refs
    scales_hbm = scale_buf = None
  b = pl.program_id(0)
  h = pl.program_id(1)
  _, pages_per_chunk, block_size, head_dim = k_buf.shape
  chunk_tokens = pages_per_chunk * block_size

  kv_len = lens_ref[b]
  num_pages = (kv_len + block_size - 1) // block_size
  num_chunks = (num_pages + pages_per_chunk - 1) // pages_per_chunk

  copies = tpu_page_ring.chunk_copies(
      tables_ref=tables_ref, kv_hbm=kv_hbm, k_buf=k_buf, v_buf=v_buf, sems=sems,
      b=b, h=h, scales_hbm=scales_hbm, scale_buf=scale_buf)

  def token_scales(slot, kv):  # [1, chunk_tokens] from one scale per page
    return jnp.concatenate(
        [jnp.full((1, block_size), scale_buf[slot, c, kv, h], jnp.float32)
         for c in range(pages_per_chunk)], axis=1)

  tpu_page_ring.start_ring(num_chunks, copies)

  q = q_ref[...].astype(jnp.float32)
  scale = sm_scale * LOG2E

  def body(i, carry):
    o, m, l = carry
    slot = tpu_page_ring.ring_step(i, num_chunks, copies)
    k = k_buf[slot].reshape(chunk_tokens, head_dim).astype(jnp.float32)
    v = v_buf[slot].reshape(chunk_tokens, head_dim).astype(jnp.float32)
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale
    if quantized:
      logits = logits * token_scales(slot, 0)
    pos = i * chunk_tokens + lax.broadcasted_iota(
        jnp.int32, (1, chunk_tokens), 1)
    logits = jnp.where(pos < kv_len, logits, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new)
    l_new = l * alpha + jnp.sum(p, axis=1, keepdims=True)
    if quantized:
      p = p * token_scales(slot, 1)
    o_new = o * alpha + jnp.dot(p, v, preferred_element_type=jnp.float32)
    return o_new, m_new, l_new

  rows = q.shape[0]
  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))
  o, _, l = lax.fori_loop(0, num_chunks, body, init)
  out = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
  o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "pages_per_chunk", "interpret"))
def paged_decode_tpu(
    q: jax.Array,  # [batch, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
    *,
    sm_scale: float | None = None,
    pages_per_chunk: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [batch, num_heads, head_dim]
  """Decode attention of one query token per sequence over paged K/V."""
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens)
  batch, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  pages_per_seq = block_tables.shape[1]
  quantize.check_scales(kv_pages, kv_scales)
  quantized = kv_scales is not None
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  if pages_per_chunk is None:
    pages_per_chunk = max(1, min(pages_per_seq, 512 // block_size))
  group = num_heads // num_kv_heads
  qg = q.reshape(batch, num_kv_heads, group, head_dim)
  pages_padded = pl.cdiv(pages_per_seq, pages_per_chunk) * pages_per_chunk
  tables = common.pad_tables(block_tables, pages_padded)
  # The reference sees at most the table's capacity; so does the kernel
  # (and it never reads past the table in SMEM).
  lens = jnp.minimum(kv_lens.astype(jnp.int32), pages_per_seq * block_size)

  sq = SQUEEZED
  q_spec = pl.BlockSpec((sq, sq, group, head_dim),
                        lambda b, h, *_: (b, h, 0, 0))
  buf = pltpu.VMEM((2, pages_per_chunk, block_size, head_dim), kv_pages.dtype)
  in_specs = [q_spec, pl.BlockSpec(memory_space=pl.ANY)]
  args = [tables, lens, qg, kv_pages]
  scratch = [buf, buf]
  if quantized:
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    args.append(kv_scales.astype(jnp.float32))
    scratch.append(pltpu.SMEM((2, pages_per_chunk, 2, num_kv_heads),
                              jnp.float32))
  scratch.append(pltpu.SemaphoreType.DMA((3, 2)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, num_kv_heads),
      in_specs=in_specs,
      out_specs=q_spec,
      scratch_shapes=scratch,
  )
  out = pl.pallas_call(
      functools.partial(_tpu_decode_kernel, sm_scale=float(sm_scale),
                        quantized=quantized),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel")),
      interpret=interpret_callback_fix.tpu_interpret_arg(interpret),
      name="paged_decode_tpu",
  )(*args)
  return out.reshape(batch, num_heads, head_dim)
