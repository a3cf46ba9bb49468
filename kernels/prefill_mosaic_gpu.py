"""Paged prefill attention for Hopper GPUs: a Pallas kernel on Mosaic GPU.

A ragged batch of new-token chunks, as in `prefill_triton.py`: sequence `b`
brings `q_lens[b]` new tokens, the last `q_lens[b]` of its `kv_lens[b]`
context tokens; each attends causally to the chunk and fully to the paged
prefix before it (an agent turn: a few hundred tokens onto tens of
thousands).

The grid is `(batch, num_kv_heads, query_blocks)`. A program holds one
warpgroup matmul tile of 64 query rows: `64 / group_pad` new tokens times
every query head of one GQA group (the group padded to a power of 2), rows
ordered (token, head), so each K/V page it copies serves the whole group.
It walks the sequence's pages through the same TMA ring as the decode kernel
(`mosaic_gpu_ring.PageRing`: steps of 64-256 tokens, `wgmma` for `q @ K^T`
and `p @ V`, int8 pages converted per step and their scales applied to the
logits and probabilities), up to the last key its rows
may see, so the causal triangle's far side and the table's tail are never
read. Steps wholly before the block's first position run unmasked; the
causal tail runs masked. Online softmax in base 2, float32 accumulation; the
program normalises its rows and writes them (rows past `q_lens[b]` as
zeros). Query blocks are independent: no split-K.

Supported: bfloat16 / float16 pools and int8 pools with scales, head_dim 64
or 128, block_size a power of 2 >= 16, GQA groups up to 64. Selectable as
`implementation="pallas_mosaic_gpu"` (q_len > 1); `"auto"` takes it on
Hopper for pages of 64 tokens or more (`paged_attention`). A tiling with
`consumers=2` runs the warp-specialized variant instead
(`prefill_mosaic_gpu_ws.py`).

Testing without a GPU: Mosaic GPU's interpret mode runs it on CPU (matmuls
as dots on the SMEM tiles, see `mosaic_gpu_ring`), and `jax.export(...,
platforms=["cuda"])` lowers the real `wgmma` kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import checks
from kernels import decode_mosaic_gpu
from kernels import quantize
from kernels import query_rows
from kernels import tuning
from kernels.common import LOG2E, MASK_VALUE, tile_steps
from kernels.mosaic_gpu_ring import (WGMMA_ROWS, in_ring_scope,
                                     interpret_arg, plgpu, ring_barriers)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static shape of one kernel instance."""

  block_size: int
  head_dim: int
  group_pad: int  # query heads per KV head, padded to a power of 2
  capacity: int  # tokens the block table holds
  pages_per_chunk: int
  page_parts: int
  num_stages: int
  sm_scale: float
  interpret: bool
  quantized: bool
  ids_first: bool = False  # a step's page ids all read before its copies

  @property
  def tokens(self) -> int:  # keys per step
    return self.pages_per_chunk * self.block_size // self.page_parts

  @property
  def block_tokens(self) -> int:  # new tokens per program
    return WGMMA_ROWS // self.group_pad


class TileSteps:
  """Where one 64-row query tile (`64 / group_pad` new tokens) starts and
  which ring steps it needs: `num_steps` up to its last key, of which the
  first `num_free` lie wholly at or before its first position (no mask)."""

  def __init__(self, st, tile: int,
               kv_len: jax.Array,  # [] int32: the sequence's context
               q_len: jax.Array):  # [] int32: its new tokens
    """`tile` is the program's query tile index (static per loop trip)."""
    self.first_row = tile * st.block_tokens  # the tile's first new token
    self.key_limit, self.num_steps, self.num_free = tile_steps(
        first_row=self.first_row, tile_tokens=st.block_tokens, kv_len=kv_len,
        q_len=q_len, capacity=st.capacity, step_tokens=st.tokens)


def causal_mask(
    st, ring, step: jax.Array,  # [] int32
    s: jax.Array,  # [64, T] f32 logits
    *,
    first_row: jax.Array,  # [] int32: the tile's first new token
    kv_len: jax.Array,  # [] int32
    q_len: jax.Array,  # [] int32
    key_limit: jax.Array,  # [] int32: keys past it are not the tile's
) -> tuple[jax.Array, jax.Array]:  # [64, T] f32, [64, T] bool
  """Step `step`'s logits [64, T] of the tile starting at new token
  `first_row`, masked causally, to the table and to real rows; and where
  they are valid. Built per masked step (the causal tail), not before the
  loops: held across the unmasked loop, these tiles would only cost
  registers."""
  rows, tokens = WGMMA_ROWS, st.tokens
  row_ids = ring.cast(lax.broadcasted_iota(jnp.int32, (rows, tokens), 0),
                      ring.tile_layout)
  new_token = first_row + row_ids // st.group_pad
  q_pos = kv_len - q_len + new_token
  row_ok = new_token < q_len
  key_ids = ring.cast(lax.broadcasted_iota(jnp.int32, (rows, tokens), 1),
                      ring.tile_layout)
  k_pos = step * tokens + key_ids
  valid = (k_pos <= q_pos) & (k_pos < key_limit) & row_ok
  return jnp.where(valid, s, MASK_VALUE), valid


def normalized_rows(
    st, ring,
    acc: jax.Array,  # [64, head_dim] f32: unnormalised output rows
    l: jax.Array,  # [64] f32: their softmax sums
    *,
    first_row: jax.Array,  # [] int32
    q_len: jax.Array,  # [] int32
) -> jax.Array:  # [64, head_dim] f32
  """The tile's output rows: `acc / l`, zeros for rows past `q_len` (they
  saw the unmasked steps) and rows with no keys."""
  row_token = first_row + ring.cast(
      lax.broadcasted_iota(jnp.int32, (WGMMA_ROWS,), 0),
      ring.row_layout) // st.group_pad
  has_keys = (row_token < q_len) & (l > 0)
  inv = jnp.where(has_keys, 1.0 / jnp.where(has_keys, l, 1.0), 0.0)
  return acc * lax.broadcast_in_dim(inv, acc.shape, (0,))


def _prefill_kernel(*refs, st: _Static, compute_dtype, pool_dtype):
  """One program: one sequence, one KV head, one block of new tokens.

  Refs, in order (`*` only for an int8 pool, `st.quantized`):
    lens_ref, q_lens_ref  GMEM [batch] int32
    tables_ref   GMEM [batch, pages] int32 (clamped on use)
    q_ref        GMEM [batch, num_kv_heads, query_blocks, 64, head_dim]
    kv_ref       GMEM [num_blocks, 2, num_kv_heads, block_size, head_dim]
    scales_ref*  GMEM [num_blocks, 2, num_kv_heads] f32
    o_ref        GMEM [batch, num_kv_heads, query_blocks, 64, head_dim] f32
    q_barrier    [1]
    k_barriers, v_barriers  [num_stages]

  Shared memory, as in the decode kernel, in two scopes one after the
  other: the loop's (`mosaic_gpu_ring.ring_buffers`: the query tile, the
  K/V ring, int8's dequantized tiles and page scales), then the output's
  (`o_smem [64, head_dim]` f32), which reuses the ring's bytes: 32 KB less
  at head_dim 128, room for two programs per SM with a 2-slot ring of
  64-key steps (80 KB), whose `wgmma` and softmax could then interleave.
  """
  refs = list(refs)
  lens_ref, q_lens_ref, tables_ref, q_ref, kv_ref = refs[:5]
  scales_ref = refs.pop(5) if st.quantized else None
  o_ref, q_barrier, k_barriers, v_barriers = refs[5:9]
  b = lax.axis_index("batch")
  h = lax.axis_index("kv_head")
  block = lax.axis_index("q_block")
  kv_len = lens_ref[b]
  q_len = q_lens_ref[b]
  tile = TileSteps(st, block, kv_len, q_len)
  first_row, key_limit = tile.first_row, tile.key_limit
  num_free, num_steps = tile.num_free, tile.num_steps
  scale = st.sm_scale * LOG2E  # softmax in base 2

  def attend(ring):
    """The loop's scope: the tile's normalized rows, in registers."""
    plgpu.copy_gmem_to_smem(q_ref.at[b, h, block], ring.q_smem,
                            q_barrier.at[0])
    ring.fill(num_steps)
    mask = functools.partial(causal_mask, st, ring, first_row=first_row,
                             kv_len=kv_len, q_len=q_len, key_limit=key_limit)

    def step_fn(step, carry, masked: bool):
      return ring.softmax_step(step, carry, scale=scale, num_steps=num_steps,
                               mask=functools.partial(mask, step) if masked
                               else None)

    plgpu.barrier_wait(q_barrier.at[0])
    carry = lax.fori_loop(0, num_free,
                          functools.partial(step_fn, masked=False),
                          ring.initial_state())
    acc, _, l = lax.fori_loop(num_free, num_steps,
                              functools.partial(step_fn, masked=True), carry)
    return normalized_rows(st, ring, acc, l, first_row=first_row,
                           q_len=q_len)

  rows = in_ring_scope(st, attend, compute_dtype, pool_dtype, b=b, h=h,
                       table_base=0, tables_ref=tables_ref, kv_ref=kv_ref,
                       scales_ref=scales_ref, k_barriers=k_barriers,
                       v_barriers=v_barriers)

  def store(o_smem):
    """The output's scope: the rows staged and copied to GMEM."""
    o_smem[...] = rows
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, block])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((WGMMA_ROWS, st.head_dim), jnp.float32))


def supports(*, q_len: int, head_dim: int, block_size: int, quantized: bool,
             dtype: str | None, group: int | None = None) -> bool:
  """Whether the kernel handles a prefill call (q_len > 1)."""
  return q_len > 1 and decode_mosaic_gpu.supports(
      q_len=1, head_dim=head_dim, block_size=block_size, quantized=quantized,
      dtype=dtype, group=group)


def check_tiling(tiling: tuning.MosaicDecodeTiling, block_size: int,
                 head_dim: int, itemsize: int, quantized: bool = False) -> None:
  """Raises ValueError for a tiling the prefill kernels cannot run: the
  decode kernel's ring rules, one split, 1 or 2 computing warpgroups (2 for
  bf16/f16 pools only, their ring within the shared memory beside two query
  tiles), no copying warpgroup of the decode kind. `itemsize`: the pool's."""
  if tiling.num_splits != 1:
    raise ValueError(f"bad tiling {tiling}: prefill takes num_splits=1")
  decode_mosaic_gpu.check_tiling(tiling, block_size, head_dim,
                                 quantized=quantized)
  if tiling.consumers not in (1, 2) or (tiling.consumers == 2 and quantized):
    raise ValueError(f"bad tiling {tiling}: consumers is 1, or 2 for bf16/f16 "
                     "pools")
  if tiling.copy_warpgroup:
    raise ValueError(f"bad tiling {tiling}: prefill gets its copying "
                     "warpgroup with consumers=2")
  if tiling.consumers == 2:
    from kernels import prefill_mosaic_gpu_ws  # pylint: disable=g-import-not-at-top
    chunk_tokens = (tiling.pages_per_chunk * block_size
                    // tiling.page_parts)
    if prefill_mosaic_gpu_ws.smem_bytes(
        chunk_tokens, head_dim, tiling.num_stages,
        itemsize) > decode_mosaic_gpu.SMEM_BUDGET:
      raise ValueError(f"bad tiling {tiling}: two query tiles and a ring of "
                       f"{tiling.num_stages} x {chunk_tokens} keys exceed "
                       f"{decode_mosaic_gpu.SMEM_BUDGET} bytes of SMEM")


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
    tiling: tuning.MosaicDecodeTiling | None = None,
    interpret: bool | object = False,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Causal attention of ragged new-token chunks over their paged context.

  Same semantics as `kernels.paged_attention_ref.ref_paged_attention`.
  `tiling`: the page ring's step and depth (`num_splits` must be 1);
  default `tuning.mosaic_prefill_tiling`.
  """
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens, q_lens)
  if plgpu is None:  # pragma: no cover
    raise NotImplementedError("this jaxlib has no Pallas Mosaic GPU")
  quantize.check_scales(kv_pages, kv_scales)
  decode_mosaic_gpu.check_supported(q[:, 0], kv_pages, kv_scales,
                                    kernel="prefill")
  quantized = kv_scales is not None
  compute_dtype = jnp.bfloat16 if quantized else kv_pages.dtype
  batch, q_len, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  pages_per_seq = block_tables.shape[1]
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  if tiling is None:
    tiling = tuning.mosaic_prefill_tiling(
        block_size=block_size, head_dim=head_dim,
        itemsize=jnp.dtype(kv_pages.dtype).itemsize, quantized=quantized)
  check_tiling(tiling, block_size, head_dim,
               jnp.dtype(kv_pages.dtype).itemsize, quantized=quantized)
  chunk = tiling.pages_per_chunk

  group = num_heads // num_kv_heads
  group_pad = pl.next_power_of_2(group)
  block_tokens = WGMMA_ROWS // group_pad
  q_blocks = pl.cdiv(q_len, block_tokens)
  # [B, T, Hq, D] -> [B, Hkv, q_blocks, 64, D], rows (token, head).
  qg = query_rows.group_rows(q, num_kv_heads, group_pad,
                             q_blocks * block_tokens, compute_dtype)
  qg = qg.reshape(batch, num_kv_heads, q_blocks, WGMMA_ROWS, head_dim)
  # Entries past the table's end (a last partial step) and junk page ids
  # are clamped in the kernel (PageRing._page): their keys are masked or
  # never reached.
  tables = block_tables.astype(jnp.int32)

  st = _Static(block_size=block_size, head_dim=head_dim, group_pad=group_pad,
               capacity=pages_per_seq * block_size, pages_per_chunk=chunk,
               page_parts=tiling.page_parts, num_stages=tiling.num_stages,
               sm_scale=float(sm_scale), interpret=interpret is not False,
               quantized=quantized, ids_first=tiling.ids_first)
  if tiling.consumers == 2:
    from kernels import prefill_mosaic_gpu_ws  # pylint: disable=g-import-not-at-top
    return prefill_mosaic_gpu_ws.paged_prefill_ws(
        q, kv_pages, block_tables, kv_lens, q_lens, st=st,
        interpret=interpret)
  kernel = plgpu.kernel(
      functools.partial(_prefill_kernel, st=st, compute_dtype=compute_dtype,
                        pool_dtype=kv_pages.dtype),
      out_type=jax.ShapeDtypeStruct(qg.shape, jnp.float32),
      scratch_types=ring_barriers(st),
      grid=(batch, num_kv_heads, q_blocks),
      grid_names=("batch", "kv_head", "q_block"),
      interpret=interpret_arg(interpret),
  )
  scales = ((kv_scales.astype(jnp.float32),) if quantized else ())
  out = kernel(kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32), tables,
               qg, kv_pages, *scales)
  out = out.reshape(batch, num_kv_heads, q_blocks * WGMMA_ROWS, head_dim)
  return query_rows.ungroup_rows(out, q_len, num_heads,
                                 group_pad).astype(q.dtype)
