"""Paged decode attention for Hopper GPUs: a Pallas kernel on Mosaic GPU.

The algorithm is the one of `decode_triton.py` (split-K, "flash-decoding"):
the grid is `(batch, num_kv_heads, num_splits)`, one program takes one
sequence, one KV head with all the query heads of its GQA group, and one
contiguous slice of the sequence's block table. Each program writes an
unnormalised partial output with its running max and sum (base 2); the XLA
epilogue of `common.merge_splits` (or, with `tiling.one_reduce_merge`, of
`common.merge_splits_one_reduce`) combines the splits.

Inside a program (one warpgroup, 128 threads; the page ring, matmuls and
int8 dequantization live in `mosaic_gpu_ring.PageRing`, shared with the
prefill kernel):

* Pages are gathered by id with TMA: a step of `T = pages_per_chunk *
  block_size / page_parts` tokens is `pages_per_chunk` whole pages (or one
  `1/page_parts` slice of a large page), each its own
  `copy_gmem_to_smem(kv_pages.at[page, 0 or 1, head], ...)` into one slot of
  a `num_stages`-deep SMEM ring of K and V tiles `[T, head_dim]`. One
  barrier per slot and per K/V counts the copies of a step. Steps `i + 1 ..
  i + num_stages - 1` are in flight while step `i` is reduced; a slot is
  refilled as soon as its step is consumed.
* The group's query rows sit in a 64-row SMEM tile (Hopper's warpgroup
  matmul height); `wgmma` computes `q @ K^T` and `p @ V` in float32
  accumulators. Decode needs few FLOPs, so the tile's extra rows only cost
  tensor-core time that would otherwise idle; the bytes that matter (K/V)
  are read once. Where the GQA group allows (a multiple of 8, or 1, 2 or 4
  with a multiple of 8 query heads: `query_rows.DecodeQueryBlocks`) a
  program copies its rows by TMA straight from the unpadded queries (an
  8-row block may hold a neighbouring KV head's rows too, computed and
  dropped); otherwise an XLA op pads each group to 64 rows before the
  launch (a launch of ~3 us on an H100; `tiling.pad_query` forces it).
* Online softmax in base 2 in registers; tokens past `kv_lens[b]` are
  masked. Steps past a sequence's last token are never copied; within its
  last step, the pages past it are (table entries clamped into the pool, so
  junk ids stay in bounds), because a step's barrier counts a fixed number
  of copies and un-copied SMEM could hold NaN that `p @ V` would spread.

* int8 pools (with `kv_scales`, one scale per page, K/V and head): the ring
  holds int8 tiles, so TMA moves half the bytes. Before each matmul the
  step's K (then V) tile is loaded into registers in the upcasting WGMMA
  layout, converted and stored as a bf16 tile of the same integers (exact)
  that `wgmma` reads (`commit_smem` orders the store before it); queries are
  bf16. The page scales multiply columns instead, as in the Triton kernel:
  K's the logits `q @ K^T`, V's the probabilities before `p @ V`
  (unmeasured on a GPU in this form; docs/benchmarks.md has the history).

Supported: bfloat16 / float16 pools (queries are cast to the pool's dtype)
and int8 pools, `head_dim` 64 or 128 (256 would leave no SMEM for a ring),
`block_size` a power of 2 >= 16, GQA groups up to 64 query heads per KV
head. Not supported (ValueError; `"auto"` takes the Triton kernel instead):
float32 pools (`wgmma` would round them to tf32, and 32-bit `wgmma` can
neither transpose an operand, as V `[T, head_dim]` must be, nor take p from
registers). Prefill (`q_len > 1`) is `prefill_mosaic_gpu.py`'s, on the same
page ring. `"auto"` keeps int8 pools on Triton until this kernel's int8
path is measured (an earlier form ran at 0.4-0.5x its bf16 path). With
`tiling.copy_warpgroup` a second warpgroup reads the page ids and issues
the copies while the first only computes; for int8 pools it also
converts each step's tiles (into two alternating bf16 tile pairs, with
their page scales), so the computing warpgroup never converts.

Testing without a GPU: Mosaic GPU's interpret mode (`interpret_params`;
private in jax 0.10, public from 0.11) runs the kernel on CPU, simulating
SMEM, TMA copies and barriers. It cannot run `wgmma` on a transposed or a
register operand, nor `layout_cast` (no CPU rule), so with `interpret=True`
the two matmuls are `lax.dot_general` on the same SMEM tiles, the layout
casts are identities and the int8 tiles are read as plain arrays: everything
else (page gather, ring, barriers, masks,
softmax, split merge) is the compiled kernel's code. `jax.export(...,
platforms=["cuda"])` lowers the real kernel (wgmma included) through Mosaic
GPU on CPU, which also checks the SMEM budget.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import checks
from kernels import quantize
from kernels import tuning
from kernels.common import (LOG2E, MASK_VALUE, merge_splits,
                            merge_splits_one_reduce)
# interpret_params: Mosaic GPU's CPU interpret mode, re-exported here for the
# tests and callers that use it.
from kernels.mosaic_gpu_ring import (WGMMA_ROWS, converts, in_ring_scope,  # pylint: disable=unused-import
                                     interpret_arg, interpret_params, plgpu,
                                     ring_barriers)
from kernels.query_rows import DecodeQueryBlocks

# Rows of the partial outputs written per program (the group padded to a
# multiple of 8, the row granularity of a swizzled SMEM tile).
ROW_ALIGN = 8
SUPPORTED_DTYPES = ("bfloat16", "float16")
# Shared memory our buffers may use: H100/H200 allow 227 KB per block, and
# Mosaic adds ~3.6 KB (barriers, the cross-warp reduction scratch); the
# lowering raises past the limit.
SMEM_BUDGET = 227 * 1024 - 4096


def is_hopper(device: jax.Device | None = None) -> bool:
  """Whether `device` (default: the first JAX device) is a Hopper GPU
  (compute capability 9.x), the only chips with the `wgmma` this kernel uses."""
  device = device or jax.devices()[0]
  if device.platform not in ("gpu", "cuda"):
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return str(capability).split(".")[0] == "9"
  return any(n in device.device_kind for n in ("H100", "H200", "H800", "GH200"))


def supports(*, q_len: int, head_dim: int, block_size: int, quantized: bool,
             dtype: str | None, group: int | None = None) -> bool:
  """Whether the kernel handles a call (the `"auto"` capability check);
  `dtype` is the pool's (None: unknown, so no); `quantized`: an int8 pool
  with its scales."""
  dtype_ok = (dtype == "int8") if quantized else dtype in SUPPORTED_DTYPES
  return (q_len == 1 and dtype_ok
          and head_dim in (64, 128)
          and block_size >= 16 and not block_size & (block_size - 1)
          and (group is None or group <= WGMMA_ROWS))


def check_supported(
    q: jax.Array,  # [batch, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    kv_scales: jax.Array | None,  # [num_blocks, 2, num_kv_heads] f32
    kernel: str = "decode",
) -> None:
  """Raises ValueError for a call the kernel does not handle; the message
  names `kernel` ("decode", or "prefill" where the prefill kernel, which
  shares these limits, checks its call)."""
  num_heads, head_dim = q.shape[1:]
  block_size, num_kv_heads = kv_pages.shape[3], kv_pages.shape[2]
  dtype = jnp.dtype(kv_pages.dtype).name
  quantized = kv_scales is not None
  if dtype not in SUPPORTED_DTYPES + ("int8",):
    raise ValueError(
        f"the Mosaic GPU {kernel} kernel takes {SUPPORTED_DTYPES} or int8 pools;"
        f" got {dtype} (use implementation='pallas_triton')")
  group = num_heads // num_kv_heads
  if not supports(q_len=1, head_dim=head_dim, block_size=block_size,
                  quantized=quantized, dtype=dtype, group=group):
    raise ValueError(
        f"the Mosaic GPU {kernel} kernel needs head_dim 64 or 128, block_size "
        "a power of 2 >= 16 and at most 64 query heads per "
        f"KV head; got head_dim={head_dim}, block_size={block_size}, "
        f"group={group}")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static shape of one kernel instance."""

  block_size: int
  head_dim: int
  rows_out: int  # group padded to ROW_ALIGN: rows of the partial outputs
  pages_per_split: int
  pages_per_chunk: int
  page_parts: int
  num_stages: int
  sm_scale: float
  interpret: bool
  quantized: bool = False  # int8 ring, dequantized per step into bf16 tiles
  ids_first: bool = False  # a step's page ids all read before its copies
  copy_warpgroup: bool = False  # wg 1 issues the copies, wg 0 computes
  # Query rows a program copies and the KV heads sharing one copied block
  # (`query_rows.DecodeQueryBlocks`; 64 and 1: the padded groups).
  q_rows: int = WGMMA_ROWS
  q_heads_per_block: int = 1

  @property
  def tokens(self) -> int:  # tokens per step
    return self.pages_per_chunk * self.block_size // self.page_parts

  @property
  def tokens_per_split(self) -> int:
    return self.pages_per_split * self.block_size


def _decode_kernel(*refs, st: _Static, compute_dtype, pool_dtype):
  """One program: one sequence, one KV head, one split of the block table.

  Refs, in order (`*` only for an int8 pool, `st.quantized`; `+` only with
  `st.copy_warpgroup`):
    lens_ref     GMEM [batch] int32
    tables_ref   GMEM [batch, pages_per_seq] int32 (clamped on use)
    q_ref        GMEM [batch, blocks, q_rows, head_dim]: the program's
                 query rows are block h // q_heads_per_block
                 (`DecodeQueryBlocks.operand`), copied into the tile's first
                 q_rows rows; the rest of the tile is never copied (its rows
                 meet only themselves, and are not stored)
    kv_ref       GMEM [num_blocks, 2, num_kv_heads, block_size, head_dim]
    scales_ref*  GMEM [num_blocks, 2, num_kv_heads] f32
    o_ref        GMEM [batch, num_kv_heads, splits, rows_out, head_dim] f32
    m_ref, l_ref GMEM [batch, num_kv_heads, splits, rows_out] f32
    q_barrier    [1]
    k_barriers, v_barriers  [num_stages], pages_per_chunk arrivals each
    k_consumed+, v_consumed+  [num_stages] (int8: [2], per converted tile
                 pair), one arrival each
    k_ready+, v_ready+  int8 only: [2], a converted tile pair's K / V ready

  Shared memory comes in two scopes, one after the other, so the second
  reuses the first's bytes: the loop's (`mosaic_gpu_ring.ring_buffers`: the
  query tile, the K/V ring, int8's dequantized tiles and page scales), then
  the output's (`o_smem [64, head_dim]`, `m_smem`, `l_smem [64]` f32, staged
  for the copy to GMEM). A program's footprint is the larger scope, not
  their sum: 32 KB less at head_dim 128, which lets two programs share an SM
  with a 2-slot ring (1 x 32k decode, docs/benchmarks.md). With
  `st.copy_warpgroup` warpgroup 1 only issues the ring's copies, refilling a
  slot once warpgroup 0, which computes, has released its K and V; for an
  int8 pool it converts each slot into a bf16 tile pair and refills the
  slot at once (`PageRing.convert_all`).
  """
  refs = list(refs)
  lens_ref, tables_ref, q_ref, kv_ref = refs[:4]
  scales_ref = refs.pop(4) if st.quantized else None
  o_ref, m_ref, l_ref, q_barrier, k_barriers, v_barriers = refs[4:10]
  consumed = tuple(refs[10:12]) if st.copy_warpgroup else None
  ready = tuple(refs[12:14]) if converts(st) else None
  b = lax.axis_index("batch")
  h = lax.axis_index("kv_head")
  split = lax.axis_index("split")
  tokens = st.tokens
  rows = WGMMA_ROWS

  # The reference sees at most the table's capacity; so does the kernel.
  kv_len = jnp.minimum(lens_ref[b], tables_ref.shape[1] * st.block_size)
  first_token = split * st.tokens_per_split
  split_tokens = jnp.clip(kv_len - first_token, 0, st.tokens_per_split)
  num_steps = (split_tokens + tokens - 1) // tokens
  scale = st.sm_scale * LOG2E  # softmax in base 2

  def attend(ring):
    """The loop's scope: (acc, m, l) of this program's split, in the
    computing warpgroup's registers."""
    cast, tile_layout = ring.cast, ring.tile_layout

    def step_fn(step, carry):
      def mask(s):  # keys past the sequence's end
        start = first_token + step * tokens
        token_ids = cast(lax.broadcasted_iota(jnp.int32, (rows, tokens), 1),
                         tile_layout)
        return jnp.where(start + token_ids < kv_len, s, MASK_VALUE), None
      return ring.softmax_step(step, carry, scale=scale, num_steps=num_steps,
                               mask=mask, consumed=consumed)

    def compute():
      q_tile = (ring.q_smem if st.q_rows == rows
                else ring.q_smem.at[pl.ds(0, st.q_rows)])
      plgpu.copy_gmem_to_smem(q_ref.at[b, h // st.q_heads_per_block], q_tile,
                              q_barrier.at[0])
      if not st.copy_warpgroup:
        ring.fill(num_steps)
      plgpu.barrier_wait(q_barrier.at[0])
      return lax.fori_loop(0, num_steps, step_fn, ring.initial_state())

    if not st.copy_warpgroup:
      return compute()

    def copy():  # warpgroup 1; its (acc, m, l) are never stored
      if ring.converts:
        ring.convert_all(num_steps, consumed)
      else:
        ring.copy_all(num_steps, consumed)
      return ring.initial_state()
    return lax.cond(lax.axis_index("wg") == 0, compute, copy)

  # Both warpgroups of a warp-specialized program enter each scope.
  collective = ("wg",) if st.copy_warpgroup else ()
  acc, m, l = in_ring_scope(
      st, attend, compute_dtype, pool_dtype, collective_axes=collective, b=b,
      h=h, table_base=split * st.pages_per_split, tables_ref=tables_ref,
      kv_ref=kv_ref, scales_ref=scales_ref, k_barriers=k_barriers,
      v_barriers=v_barriers, ready=ready)

  def store(o_smem, m_smem, l_smem):
    """The output's scope: the partial rows staged and copied to GMEM."""
    o_smem[...] = acc
    m_smem[...] = m
    l_smem[...] = l
    plgpu.commit_smem()
    out_rows = pl.ds(0, st.rows_out)
    plgpu.copy_smem_to_gmem(o_smem.at[out_rows], o_ref.at[b, h, split])
    plgpu.copy_smem_to_gmem(m_smem.at[out_rows], m_ref.at[b, h, split])
    plgpu.copy_smem_to_gmem(l_smem.at[out_rows], l_ref.at[b, h, split])
    plgpu.wait_smem_to_gmem(0)

  staging = (plgpu.SMEM((rows, st.head_dim), jnp.float32),
             plgpu.SMEM((rows,), jnp.float32),
             plgpu.SMEM((rows,), jnp.float32))
  def store_once(*buffers):  # by the computing warpgroup only
    if st.copy_warpgroup:
      pl.when(lax.axis_index("wg") == 0)(lambda: store(*buffers))
    else:
      store(*buffers)
  pl.run_scoped(store_once, *staging, collective_axes=collective)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "tiling", "interpret"))
def paged_decode(
    q: jax.Array,  # [batch, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
    *,
    sm_scale: float | None = None,
    tiling: tuning.MosaicDecodeTiling | None = None,
    interpret: bool | object = False,
) -> jax.Array:  # [batch, num_heads, head_dim]
  """Decode attention of one query token per sequence over paged K/V.

  Sequence `b` attends to its first `kv_lens[b]` tokens (0 gives zeros).
  `interpret`: True (or an `interpret_params(...)` object) runs Mosaic GPU's
  CPU interpret mode.
  """
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens)
  if plgpu is None:  # pragma: no cover
    raise NotImplementedError("this jaxlib has no Pallas Mosaic GPU")
  quantize.check_scales(kv_pages, kv_scales)
  check_supported(q, kv_pages, kv_scales)
  quantized = kv_scales is not None
  # Queries, the matmuls' operands and the dequantized int8 tiles: the pool's
  # dtype, bf16 for an int8 pool.
  compute_dtype = jnp.bfloat16 if quantized else kv_pages.dtype
  batch, num_heads, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  pages_per_seq = block_tables.shape[1]
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  if tiling is None:
    tiling = default_tiling(q, kv_pages, block_tables, kv_scales)
  check_tiling(tiling, block_size, head_dim, quantized=quantized)
  if tiling.consumers != 1:
    raise ValueError(f"bad tiling {tiling}: decode takes consumers=1")
  chunk, splits, parts = (tiling.pages_per_chunk, tiling.num_splits,
                          tiling.page_parts)

  group = num_heads // num_kv_heads
  rows_out = pl.cdiv(group, ROW_ALIGN) * ROW_ALIGN
  q_blocks = query_blocks(num_heads, num_kv_heads, pad=tiling.pad_query)
  qg = q_blocks.operand(q, num_kv_heads, compute_dtype)

  # Every split owns a whole number of steps; entries past the table's end
  # and junk page ids are clamped in the kernel (PageRing._page), as are
  # lengths past the table's capacity.
  pages_per_split = pl.cdiv(pl.cdiv(pages_per_seq, splits), chunk) * chunk

  st = _Static(block_size=block_size,
               head_dim=head_dim, rows_out=rows_out,
               pages_per_split=pages_per_split, pages_per_chunk=chunk,
               page_parts=parts, num_stages=tiling.num_stages,
               sm_scale=float(sm_scale), interpret=interpret is not False,
               quantized=quantized, ids_first=tiling.ids_first,
               copy_warpgroup=tiling.copy_warpgroup,
               q_rows=q_blocks.rows,
               q_heads_per_block=q_blocks.heads_per_block)
  # The copier's barriers: the computing warpgroup's releases (of ring slots,
  # or of converted int8 tile pairs) and the conversions' ready signals.
  pairs = 2 if converts(st) else st.num_stages
  consumed = ([plgpu.Barrier(num_barriers=pairs)] * 2
              if st.copy_warpgroup else [])
  ready = [plgpu.Barrier(num_barriers=2)] * 2 if converts(st) else []
  scratch = [*ring_barriers(st), *consumed, *ready]
  threads = (dict(num_threads=2, thread_name="wg") if st.copy_warpgroup
             else {})
  partial_shape = (batch, num_kv_heads, splits, rows_out)
  out_type = (
      jax.ShapeDtypeStruct(partial_shape + (head_dim,), jnp.float32),
      jax.ShapeDtypeStruct(partial_shape, jnp.float32),
      jax.ShapeDtypeStruct(partial_shape, jnp.float32),
  )
  kernel = plgpu.kernel(
      functools.partial(_decode_kernel, st=st, compute_dtype=compute_dtype,
                        pool_dtype=kv_pages.dtype),
      out_type=out_type,
      scratch_types=scratch,
      grid=(batch, num_kv_heads, splits),
      grid_names=("batch", "kv_head", "split"),
      interpret=interpret_arg(interpret),
      **threads,
  )
  scales = ((kv_scales.astype(jnp.float32),) if quantized else ())
  o, m, l = kernel(kv_lens.astype(jnp.int32), block_tables.astype(jnp.int32),
                   qg, kv_pages, *scales)
  merge = merge_splits_one_reduce if tiling.one_reduce_merge else merge_splits
  out = q_blocks.own_rows(merge(o, m, l), num_heads)
  return out.astype(q.dtype)


def query_blocks(num_heads: int, num_kv_heads: int,
                 pad: bool = False) -> DecodeQueryBlocks:
  """How this kernel's programs take their query rows (unpadded where the
  GQA group allows; `pad` forces the padded form)."""
  return DecodeQueryBlocks.choose(num_heads, num_kv_heads,
                                  tile_rows=WGMMA_ROWS, align=ROW_ALIGN,
                                  pad=pad)


def default_tiling(
    q,  # [batch, num_heads, head_dim] (an array or its ShapeDtypeStruct)
    kv_pages,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables,  # [batch, pages_per_seq]
    kv_scales=None,  # [num_blocks, 2, num_kv_heads]: an int8 pool's scales
    copy_warpgroup: bool | None = None,
) -> tuning.MosaicDecodeTiling:
  """The tiling `paged_decode` runs when given none, from the static shapes
  only (steps sized by the pool's dtype); `copy_warpgroup` (None: the
  default's choice) forces the variant. The benchmark and the sweep take
  their rows of each variant from here too."""
  batch = q.shape[0]
  _, _, num_kv_heads, block_size, head_dim = kv_pages.shape
  return tuning.mosaic_decode_tiling(
      batch=batch, num_kv_heads=num_kv_heads,
      pages_per_seq=block_tables.shape[1], block_size=block_size,
      head_dim=head_dim, itemsize=jnp.dtype(kv_pages.dtype).itemsize,
      quantized=kv_scales is not None, copy_warpgroup=copy_warpgroup)


def check_tiling(tiling, block_size: int, head_dim: int,
                 quantized: bool = False) -> None:
  """Raises ValueError for a tiling the kernel cannot run."""
  def pow2(n):
    return n >= 1 and not n & (n - 1)
  chunk, parts = tiling.pages_per_chunk, tiling.page_parts
  ok = (pow2(chunk) and pow2(parts) and (parts == 1 or chunk == 1)
        and tiling.num_splits >= 1 and tiling.num_stages >= 1)
  tokens = chunk * block_size // max(parts, 1) if ok else 0
  if not (ok and tokens in (64, 128, 256)
          and tuning.mosaic_smem_bytes(
              tokens, head_dim, tiling.num_stages, quantized=quantized,
              copy_warpgroup=tiling.copy_warpgroup) <= SMEM_BUDGET):
    raise ValueError(
        f"bad tiling {tiling}: pages_per_chunk and page_parts must be powers "
        "of 2 (one of them 1), a step 64, 128 or 256 tokens (wgmma's "
        "contraction of p @ V), num_splits and num_stages >= 1, and the "
        f"program within {SMEM_BUDGET} bytes of SMEM")
