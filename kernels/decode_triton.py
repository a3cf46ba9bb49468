"""Paged decode attention for GPUs: a Pallas kernel on the Triton lowering.

One query token per sequence attends to its paged K/V. The grid is
`(batch, num_kv_heads, num_splits)`: each program takes one sequence, one KV
head with all the query heads of its GQA group (padded to 16 rows, the
smallest matmul Triton emits), and one contiguous slice of the sequence's
block table (split-K, "flash-decoding"). It walks its slice a few pages at a
time, gathering the pages by id straight from the pool, and keeps an online
softmax. Each program writes an unnormalised partial output with its running
max and sum; a small XLA epilogue merges the splits. The pages a split never
needs (past `kv_lens[b]`) are never read.

Pool layout: `kv_pages [num_blocks, 2, num_kv_heads, block_size, head_dim]`,
so one head's keys of one page are one contiguous `block_size * head_dim`
run. int8 pools carry `kv_scales [num_blocks, 2, num_kv_heads]`: key scales
multiply the logits per column, value scales the probabilities per column,
so the int8 pages are only widened in registers. With `tiling.int8_query`
the queries are rounded to int8 too (a scale per query head), so K is not
even widened: q @ K^T is an int8 matmul with int32 sums.

Runs on CPU with `interpret=True` (tests) and lowers to Triton on GPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from kernels import checks
from kernels import common
from kernels import quantize
from kernels import tuning
from kernels.common import LOG2E, MASK_VALUE, SQUEEZED, merge_splits

MIN_DOT_ROWS = 16  # tl.dot needs M >= 16


def compiler_params(num_warps: int, num_stages: int):
  """The Triton lowering's compiler parameters."""
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_nt(a: jax.Array,  # [m, k]
           b: jax.Array,  # [n, k]
           ) -> jax.Array:  # [m, n] float32
  """`a @ b.T` accumulated in float32 (full precision for float32 inputs)."""
  precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         precision=precision,
                         preferred_element_type=jnp.float32)


def dot_nt_int8(a: jax.Array,  # [m, k] int8
                b: jax.Array,  # [n, k] int8
                ) -> jax.Array:  # [m, n] float32
  """`a @ b.T` of int8 operands, summed exactly in int32, as float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.int32).astype(jnp.float32)


def dot_nn(a: jax.Array,  # [m, k]
           b: jax.Array,  # [k, n]
           ) -> jax.Array:  # [m, n] float32
  """`a @ b` accumulated in float32 (full precision for float32 inputs)."""
  precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=jnp.float32)


class ChunkLoader:
  """Loads step `i`'s K/V tokens of a sequence, gathering pages by id.

  A step covers `pages_per_chunk` whole pages, or, with `page_parts > 1`
  (large pages), one `1/page_parts` slice of one page; either way steps are
  contiguous in token order, `tokens` tokens each. Table entries are clamped
  into the pool: slots past a sequence's length may hold junk ids (their
  tokens are masked by the caller).
  """

  def __init__(self,
               tables_ref,  # Ref [pages_per_seq] int32: one sequence's table
               num_blocks: int, block_size: int,
               pages_per_chunk: int, page_parts: int):
    """`tables_ref` is read a step at a time (`page_ids`); the rest is
    static: the pool's page count (for the clamp) and the step's shape."""
    if page_parts > 1 and pages_per_chunk != 1:
      raise ValueError("page_parts > 1 needs pages_per_chunk == 1")
    self.tables_ref = tables_ref
    self.num_blocks = num_blocks
    self.block_size = block_size
    self.pages_per_chunk = pages_per_chunk
    self.page_parts = page_parts
    self.tokens = pages_per_chunk * block_size // page_parts

  def page_ids(self, i: jax.Array,  # [] int32 step
               ) -> jax.Array:  # [pages_per_chunk] or [] int32
    """The step's page ids: a vector of whole pages, or one scalar id."""
    if self.page_parts == 1:
      ids = self.tables_ref[pl.ds(i * self.pages_per_chunk,
                                  self.pages_per_chunk)]
    else:
      ids = self.tables_ref[lax.div(i, self.page_parts)]  # i >= 0
    return jnp.clip(ids, 0, self.num_blocks - 1)

  def load(self,
           kv_ref,  # Ref [num_blocks, P, head_dim]: K or V of one KV head
           ids: jax.Array,  # page_ids(i)
           i: jax.Array,  # [] int32 step
           dtype) -> jax.Array:  # [tokens, head_dim]
    """K or V tokens of step `i` from `kv_ref [num_blocks, P, head_dim]`."""
    if self.page_parts == 1:
      x = kv_ref[ids].reshape(self.tokens, kv_ref.shape[-1])
    else:
      # lax.rem, not `%`: i >= 0, and jnp's sign fix-up does not lower.
      offset = pl.multiple_of(lax.rem(i, self.page_parts) * self.tokens,
                              self.tokens)
      x = kv_ref[ids, pl.ds(offset, self.tokens), :]
    return x.astype(dtype)

  def load_transposed(
      self,
      vt_ref,  # Ref [num_blocks, head_dim, P]: V^T pages of one KV head
      ids: jax.Array,  # page_ids(i)
      i: jax.Array,  # [] int32 step
      dtype) -> jax.Array:  # [head_dim, tokens]
    """V^T of step `i`, `[head_dim, tokens]`, from `vt_ref [num_blocks,
    head_dim, P]`: a pool whose V pages are stored transposed. Each page
    gives its `P` (or `P / page_parts`) token columns; a step of several
    pages gathers every element by (page, dim, slot), so the tile comes
    out in the order p @ V wants, tokens along its last axis."""
    head_dim = vt_ref.shape[1]
    if self.page_parts > 1:
      offset = pl.multiple_of(lax.rem(i, self.page_parts) * self.tokens,
                              self.tokens)
      return vt_ref[ids, :, pl.ds(offset, self.tokens)].astype(dtype)
    if self.pages_per_chunk == 1:
      return vt_ref[ids].reshape(head_dim, self.tokens).astype(dtype)
    token = jnp.arange(self.tokens, dtype=jnp.int32)[None, :]
    dim = jnp.arange(head_dim, dtype=jnp.int32)[:, None]
    return vt_ref[self.per_token(ids), dim,
                  lax.rem(token, self.block_size)].astype(dtype)

  def per_token(self, per_page: jax.Array,  # [pages_per_chunk]
                ) -> jax.Array:  # [1, tokens]
    """A whole-page step's `per_page [pages]` values, one per token."""
    per_token = jnp.broadcast_to(per_page[:, None],
                                 (self.pages_per_chunk, self.block_size))
    return per_token.reshape(1, self.tokens)

  def scales(self, scale_ref, ids) -> jax.Array:  # [1, tokens] or scalar
    """Per-token int8 scales of the step from `scale_ref [num_blocks]`."""
    if self.page_parts > 1:
      return scale_ref[ids]  # one page: one scale
    return self.per_token(scale_ref[ids])


def _decode_kernel(
    lens_ref,  # [1] int32: this sequence's kv_len
    tables_ref,  # [pages_per_split] int32: this split's page ids
    q_ref,  # [group_pad, head_dim] (int8 with int8_query)
    k_ref,  # [num_blocks, block_size, head_dim]
    v_ref,  # [num_blocks, block_size, head_dim] ([..., head_dim,
            # block_size] with v_transposed)
    *refs,  # (k_scale_ref [num_blocks], v_scale_ref [num_blocks])?,
            # q_scale_ref [group_pad]?, outputs
    sm_scale: float,
    pages_per_chunk: int,
    page_parts: int,
    quantized: bool,
    int8_query: bool = False,
    query_dtype: str | None = None,  # with int8_query: the queries' dtype
    v_transposed: bool = False,
):
  refs = list(refs)
  q_scale_ref = refs.pop(2) if int8_query else None
  if quantized:
    k_scale_ref, v_scale_ref, o_ref, m_ref, l_ref = refs
  else:
    o_ref, m_ref, l_ref = refs
  split = pl.program_id(2)
  pages_per_split = tables_ref.shape[0]
  num_blocks, block_size, head_dim = k_ref.shape
  loader = ChunkLoader(tables_ref, num_blocks, block_size, pages_per_chunk,
                       page_parts)
  step_tokens = loader.tokens

  kv_len = lens_ref[0]
  first_token = split * pages_per_split * block_size
  tokens = jnp.clip(kv_len - first_token, 0, pages_per_split * block_size)
  num_steps = (tokens + step_tokens - 1) // step_tokens

  q = q_ref[...]
  # The matmuls' dtype: the queries' (p @ V's, with int8 queries).
  compute_dtype = jnp.dtype(query_dtype) if int8_query else q.dtype
  rows = q.shape[0]
  scale = sm_scale * LOG2E  # softmax in base 2
  if int8_query:  # each row's query scale folded into the logits' scale
    row_scale = (q_scale_ref[...] * scale)[:, None]

  def body(i, carry):
    o, m, l = carry
    ids = loader.page_ids(i)
    if int8_query:  # K as stored: an int8 matmul, exact int32 sums
      logits = dot_nt_int8(q, loader.load(k_ref, ids, i, jnp.int8))
      logits = logits * row_scale
    else:
      k = loader.load(k_ref, ids, i, compute_dtype)
      logits = dot_nt(q, k) * scale  # [rows, step_tokens]
    if quantized:
      logits = logits * loader.scales(k_scale_ref, ids)
    start = first_token + i * step_tokens
    valid = start + jnp.arange(step_tokens, dtype=jnp.int32) < kv_len
    logits = jnp.where(valid[None, :], logits, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new[:, None])
    l_new = l * alpha + jnp.sum(p, axis=1)
    if quantized:
      p = p * loader.scales(v_scale_ref, ids)
    if v_transposed:  # V^T [head_dim, tokens]: tokens are the inner axis
      pv = dot_nt(p.astype(compute_dtype),
                  loader.load_transposed(v_ref, ids, i, compute_dtype))
    else:
      pv = dot_nn(p.astype(compute_dtype),
                  loader.load(v_ref, ids, i, compute_dtype))
    o_new = o * alpha[:, None] + pv
    return o_new, m_new, l_new

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  o, m, l = lax.fori_loop(0, num_steps, body, init)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def dot_rows(group: int) -> int:
  """Rows of a program's query tile: the GQA group's query heads, padded
  to a power of 2 and to at least `MIN_DOT_ROWS`."""
  return max(MIN_DOT_ROWS, pl.next_power_of_2(group))


def tileable(n: int) -> bool:
  """Whether the Triton kernels tile a head_dim or page size of `n`: a power
  of 2, at least `MIN_DOT_ROWS`."""
  return n >= MIN_DOT_ROWS and not n & (n - 1)


def check_supported(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    head_dim: int) -> None:
  """Raises ValueError for shapes the Triton lowering cannot tile."""
  block_size = kv_pages.shape[3]
  for name, n in (("head_dim", head_dim), ("block_size", block_size)):
    if not tileable(n):
      raise ValueError(f"the Triton kernels need {name} to be a power of 2 "
                       f">= 16; got {n}")


def default_tiling(
    q,  # [batch, num_heads, head_dim] (an array or its ShapeDtypeStruct)
    kv_pages,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables,  # [batch, pages_per_seq]
    kv_scales=None,  # [num_blocks, 2, num_kv_heads]: an int8 pool's scales
) -> tuning.DecodeTiling:
  """The tiling `paged_decode` runs when given none, from the static shapes
  only: tiles sized by the dtype the kernel computes in (the queries' for
  an int8 pool), and an int8 pool's own rule (`quantized`). The benchmark
  and the sweep take their "default" rows from here too."""
  batch, _, head_dim = q.shape
  _, _, num_kv_heads, block_size, _ = kv_pages.shape
  quantized = kv_scales is not None
  return tuning.decode_tiling(
      batch=batch, num_kv_heads=num_kv_heads,
      pages_per_seq=block_tables.shape[1], block_size=block_size,
      head_dim=head_dim,
      itemsize=jnp.dtype(q.dtype if quantized else kv_pages.dtype).itemsize,
      quantized=quantized)


def check_tiling(tiling, pages_per_chunk: int, page_parts: int,
                 block_size: int) -> None:
  """Raises ValueError for a tiling the loader cannot walk."""
  def pow2(n):
    return n >= 1 and not n & (n - 1)
  if not (pow2(pages_per_chunk) and pow2(page_parts)
          and (page_parts == 1 or pages_per_chunk == 1)
          and block_size // page_parts >= 16):
    raise ValueError(
        f"bad tiling {tiling}: pages_per_chunk and page_parts must be powers "
        "of 2, one of them 1, and a page part >= 16 tokens")


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "tiling", "v_transposed",
                              "interpret"))
def paged_decode(
    q: jax.Array,  # [batch, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
    *,
    sm_scale: float | None = None,
    tiling: tuning.DecodeTiling | None = None,
    v_transposed: bool = False,
    interpret: bool = False,
) -> jax.Array:  # [batch, num_heads, head_dim]
  """Decode attention of one query token per sequence over paged K/V.

  Sequence `b` attends to its first `kv_lens[b]` tokens (0 gives zeros).
  `v_transposed`: the pool stores each V page transposed, its
  `block_size * head_dim` elements in `[head_dim, block_size]` order
  (`quantize.transpose_v_pages`), so p @ V reads tokens along the
  contiguous axis and an int8 page widens without a shuffle.
  """
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens)
  batch, num_heads, head_dim = q.shape
  num_blocks, _, num_kv_heads, block_size, _ = kv_pages.shape
  pages_per_seq = block_tables.shape[1]
  quantize.check_scales(kv_pages, kv_scales)
  check_supported(kv_pages, head_dim)
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  if tiling is None:
    tiling = default_tiling(q, kv_pages, block_tables, kv_scales)
  chunk = tiling.pages_per_chunk
  splits = tiling.num_splits
  check_tiling(tiling, chunk, tiling.page_parts, block_size)
  if splits < 1:
    raise ValueError(f"bad tiling {tiling}: num_splits must be >= 1")

  group = num_heads // num_kv_heads
  rows = dot_rows(group)
  quantized = kv_scales is not None
  if tiling.int8_query and not quantized:
    raise ValueError(f"bad tiling {tiling}: int8_query needs an int8 pool")
  compute_dtype = q.dtype if quantized else kv_pages.dtype
  row_pad = ((0, 0), (0, 0), (0, rows - group))
  if tiling.int8_query:
    q_int8, q_scales = quantize.quantize_rows(q)
    qg = jnp.pad(q_int8.reshape(batch, num_kv_heads, group, head_dim),
                 row_pad + ((0, 0),))
    q_scales = jnp.pad(q_scales.reshape(batch, num_kv_heads, group), row_pad)
  else:
    qg = q.reshape(batch, num_kv_heads, group, head_dim).astype(compute_dtype)
    qg = jnp.pad(qg, row_pad + ((0, 0),))

  # Pad the table so every split owns a whole number of chunks.
  pages_per_split = pl.cdiv(pl.cdiv(pages_per_seq, splits), chunk) * chunk
  tables = common.pad_tables(block_tables, pages_per_split * splits)
  # The reference sees at most the table's capacity; so does the kernel.
  lens = jnp.minimum(kv_lens.astype(jnp.int32), pages_per_seq * block_size)
  lens = lens.reshape(batch, 1)

  sq = SQUEEZED
  page_spec = lambda kv, shape: pl.BlockSpec(  # noqa: E731
      (num_blocks, sq, sq) + shape, lambda b, h, s: (0, kv, h, 0, 0))
  v_shape = (head_dim, block_size) if v_transposed else (block_size, head_dim)
  in_specs = [
      pl.BlockSpec((sq, 1), lambda b, h, s: (b, 0)),
      pl.BlockSpec((sq, pages_per_split), lambda b, h, s: (b, s)),
      pl.BlockSpec((sq, sq, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
      page_spec(0, (block_size, head_dim)),
      page_spec(1, v_shape),
  ]
  # The same buffer twice; with v_transposed the second is a view of it
  # (a row-major reshape: no copy).
  args = [lens, tables, qg, kv_pages,
          kv_pages.reshape(kv_pages.shape[:3] + v_shape)]
  if quantized:
    scale_spec = lambda kv: pl.BlockSpec(  # noqa: E731
        (num_blocks, sq, sq), lambda b, h, s: (0, kv, h))
    in_specs += [scale_spec(0), scale_spec(1)]
    args += [kv_scales.astype(jnp.float32)] * 2
  if tiling.int8_query:
    in_specs.append(pl.BlockSpec((sq, sq, rows), lambda b, h, s: (b, h, 0)))
    args.append(q_scales)
  out_shape = [
      jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows, head_dim),
                           jnp.float32),
      jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows), jnp.float32),
      jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows), jnp.float32),
  ]
  out_specs = [
      pl.BlockSpec((sq, sq, sq, rows, head_dim),
                   lambda b, h, s: (b, h, s, 0, 0)),
      pl.BlockSpec((sq, sq, sq, rows), lambda b, h, s: (b, h, s, 0)),
      pl.BlockSpec((sq, sq, sq, rows), lambda b, h, s: (b, h, s, 0)),
  ]
  kernel = functools.partial(
      _decode_kernel, sm_scale=float(sm_scale), pages_per_chunk=chunk,
      page_parts=tiling.page_parts, quantized=quantized,
      int8_query=tiling.int8_query, query_dtype=jnp.dtype(q.dtype).name,
      v_transposed=v_transposed)
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params(tiling.num_warps, tiling.num_stages),
      interpret=interpret,
      name="paged_decode",
  )(*args)
  out = merge_splits(o, m, l)[:, :, :group]  # [B, Hkv, group, D]
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
