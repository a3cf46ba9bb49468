"""The K/V page ring one Mosaic GPU attention program walks (decode and
prefill kernels share it).

A step of `T = pages_per_chunk * block_size / page_parts` tokens is
`pages_per_chunk` whole pages (or one `1/page_parts` slice of a large page),
each its own TMA copy `kv_pages[page, 0 or 1, head, rows] -> SMEM` into one
slot of a `num_stages`-deep ring of K and V tiles `[T, head_dim]`, counted by
one barrier per slot and per K/V. The program fills the ring, then per step:
waits for the slot's K, (int8: converts it into a bf16 tile of the same
integers,) multiplies `q @ K^T` on the tensor cores (int8: then each column
by its token's K page scale), ..., waits for V, `p @ V` (int8: V converted,
`p`'s columns times V's page scales first), and refills the slot with the
step `num_stages` ahead.

With a converting copier (int8 pools, decode's `copy_warpgroup`) a second
warpgroup issues the copies, waits for each slot, converts its int8 K and V
into one of two alternating bf16 tile pairs (with the slot's page scales)
and refills the slot at once; the computing warpgroup waits for converted
tiles and releases each one after its matmul, so conversion and refills
overlap its matmuls and softmax.

Interpret mode (CPU): the matmuls are `lax.dot_general` on the same SMEM
tiles (its `wgmma` takes neither a transposed nor a register operand), the
layout casts identities and int8 tiles plain arrays; everything else is the
compiled code.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import interpret_callback_fix
from kernels import interpret_compile_fix
from kernels.common import MASK_VALUE

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - jaxlib without Mosaic GPU
  plgpu = None

# Rows of a Hopper warpgroup matmul (wgmma M): a program's query tile.
WGMMA_ROWS = 64


class PageRing:
  """One program's page ring; built inside the kernel body.

  `st` is the kernel's static description (block_size, head_dim,
  pages_per_chunk, page_parts, num_stages, tokens, interpret, quantized,
  and for decode copy_warpgroup); `b`, `h` the program's sequence and KV
  head; `table_base` the first table entry of its pages. `scales_ref`,
  `k_work`, `v_work`, `scale_slots`: int8 pools only (`k_work`, `v_work`
  SMEM [T, head_dim] bf16, or [2, T, head_dim] with a converting copier;
  `scale_slots` SMEM [num_stages, 2, pages_per_chunk] f32: each ring slot's
  page scales, written when its copies are issued). A converting copier
  (`converts`) also takes `work_scales` (SMEM [2, 2, pages_per_chunk] f32,
  the scales of the tiles in `k_work`/`v_work`) and `ready` (the K and V
  barriers [2] its conversions arrive on).
  """

  def __init__(self, st: Any, *, b, h, table_base, tables_ref, kv_ref,
               scales_ref, q_smem, k_smem, v_smem, k_work, v_work,
               k_barriers, v_barriers, scale_slots=None, work_scales=None,
               ready=None):
    """Holds the program's refs (shapes in the class docstring) and the
    WGMMA layouts its vectors and tiles take; issues nothing yet."""
    self.st = st
    self.b, self.h, self.table_base = b, h, table_base
    self.tables_ref, self.kv_ref, self.scales_ref = (tables_ref, kv_ref,
                                                     scales_ref)
    self.q_smem, self.k_smem, self.v_smem = q_smem, k_smem, v_smem
    self.k_work, self.v_work = k_work, v_work
    self.scale_slots = scale_slots
    self.work_scales, self.ready = work_scales, ready
    self.k_barriers, self.v_barriers = k_barriers, v_barriers
    self.tokens = st.tokens
    self.row_layout = None if st.interpret else plgpu.Layout.WGMMA.reduce(1)
    # A vector along a tile's columns (one value per key token).
    self.col_layout = None if st.interpret else plgpu.Layout.WGMMA.reduce(0)
    self.tile_layout = None if st.interpret else plgpu.Layout.WGMMA

  @property
  def converts(self) -> bool:
    """Whether a copying warpgroup converts the int8 tiles (int8 decode
    with `copy_warpgroup`), leaving the computing one converted tiles."""
    return converts(self.st)

  def cast(self, x: jax.Array,  # any shape: a tile or a vector of one
           layout) -> jax.Array:
    """`layout_cast`, an identity in interpret mode (no layouts there)."""
    return x if self.st.interpret else plgpu.layout_cast(x, layout)

  def _page(self, step, c):
    """Pool page id of page `c` of step `step` (its only page with parts).

    Clamped here rather than by XLA ops before the launch (each a kernel of
    a few microseconds, a tenth of a 1 x 32k decode): a step past the
    table's end reads its last entry, and a junk id (past a sequence's
    pages) names a real page, so every copy stays in bounds; the tokens of
    such pages lie past the sequence's length and are masked.
    """
    st = self.st
    if st.page_parts == 1:
      entry = self.table_base + step * st.pages_per_chunk + c
    else:
      entry = self.table_base + lax.div(step, st.page_parts)
    entry = jnp.minimum(entry, self.tables_ref.shape[1] - 1)
    return jnp.clip(self.tables_ref[self.b, entry], 0,
                    self.kv_ref.shape[0] - 1)

  def issue(self, step, slot):
    """Starts the TMA copies of step `step`'s pages into ring slot `slot`
    (with `st.ids_first`, after reading all the step's page ids).

    int8 pools: first the step's page ids, then their K and V scales (loads
    that do not wait on each other), kept in the slot's `scale_slots` row,
    from which `token_scales` reads them in SMEM: no global load at the
    point of use.
    """
    st, tokens = self.st, self.tokens
    ids_first = st.ids_first or st.quantized
    pages = ([self._page(step, c) for c in range(st.pages_per_chunk)]
             if ids_first else None)
    if st.quantized:
      # Every load before the first store (each SMEM store waits at a
      # warpgroup barrier).
      scales = [[self.scales_ref[page, kv, self.h] for page in pages]
                for kv in (0, 1)]
      for kv in (0, 1):
        for c in range(st.pages_per_chunk):
          self.scale_slots[slot, kv, c] = scales[kv][c]
    for c in range(st.pages_per_chunk):
      page = pages[c] if ids_first else self._page(step, c)
      if st.page_parts == 1:
        rows_in_page = pl.ds(0, st.block_size)
        dst_rows = pl.ds(c * st.block_size, st.block_size)
      else:
        part = lax.rem(step, st.page_parts)
        rows_in_page = pl.ds(part * tokens, tokens)
        dst_rows = pl.ds(0, tokens)
      plgpu.copy_gmem_to_smem(self.kv_ref.at[page, 0, self.h, rows_in_page],
                              self.k_smem.at[slot, dst_rows],
                              self.k_barriers.at[slot])
      plgpu.copy_gmem_to_smem(self.kv_ref.at[page, 1, self.h, rows_in_page],
                              self.v_smem.at[slot, dst_rows],
                              self.v_barriers.at[slot])

  def fill(self, num_steps):
    """Issues the first `num_stages` steps (those that exist)."""
    for i in range(self.st.num_stages):
      pl.when(i < num_steps)(functools.partial(self.issue, i, i))

  def copy_all(self, num_steps, consumed):
    """A copying warpgroup's whole work: the ring's first steps, then each
    later step into its slot once the computing warpgroup(s) have released
    it (`consumed`: the slots' K and V barriers), then the last releases
    (awaited, so that every barrier phase is observed and no copy is left
    pending)."""
    st = self.st
    self.fill(num_steps)
    k_consumed, v_consumed = consumed

    def released(step):
      slot = lax.rem(step, st.num_stages)
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])
      return slot

    def refill(step, _):
      self.issue(step + st.num_stages, released(step))

    def drain(step, _):
      released(step)

    lax.fori_loop(0, num_steps - st.num_stages, refill, None)
    lax.fori_loop(jnp.maximum(num_steps - st.num_stages, 0), num_steps,
                  drain, None)

  def convert_all(self, num_steps, consumed):
    """A converting copier's whole work (int8 decode, `copy_warpgroup`):
    fills the ring, then per step waits for its slot's K, for the computing
    warpgroup's release of the converted K tile two steps back, converts
    into that tile and arrives on `ready`; the same for V; then refills the
    slot, which it alone reads. Lastly awaits the releases of the last two
    steps, so that every phase of `consumed` is observed in order."""
    st = self.st
    self.fill(num_steps)
    k_consumed, v_consumed = consumed
    k_ready, v_ready = self.ready

    def convert(step, _):
      slot = lax.rem(step, st.num_stages)
      pair = lax.rem(step, 2)
      for kv, (full, released, ready, src, dst) in enumerate((
          (self.k_barriers, k_consumed, k_ready, self.k_smem, self.k_work),
          (self.v_barriers, v_consumed, v_ready, self.v_smem, self.v_work))):
        plgpu.barrier_wait(full.at[slot])
        pl.when(step >= 2)(
            lambda released=released: plgpu.barrier_wait(released.at[pair]))
        scales = [self.scale_slots[slot, kv, c]
                  for c in range(st.pages_per_chunk)]
        for c, scale in enumerate(scales):
          self.work_scales[pair, kv, c] = scale
        self.dequantize(src.at[slot], dst.at[pair])  # commits the stores
        plgpu.barrier_arrive(ready.at[pair])
      self.refill(step, slot, num_steps)

    def drain(step, _):
      plgpu.barrier_wait(k_consumed.at[lax.rem(step, 2)])
      plgpu.barrier_wait(v_consumed.at[lax.rem(step, 2)])

    lax.fori_loop(0, num_steps, convert, None)
    lax.fori_loop(jnp.maximum(num_steps - 2, 0), num_steps, drain, None)

  def refill(self, step, slot, num_steps):
    """After step `step` is consumed: its slot takes step + num_stages."""
    nxt = step + self.st.num_stages
    pl.when(nxt < num_steps)(functools.partial(self.issue, nxt, slot))

  def qk(self, k_tile):  # [64, T] f32; k_tile: SMEM [T, head_dim]
    """Logits of the query block against a K tile: `q @ K^T` on `wgmma`
    (a plain dot in interpret mode), float32."""
    if self.st.interpret:
      return lax.dot_general(self.q_smem[...], k_tile[...],
                             (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    def body(acc_ref):
      plgpu.wgmma(acc_ref, self.q_smem, k_tile.transpose((1, 0)))
      return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC((WGMMA_ROWS, self.tokens),
                                         jnp.float32))

  def pv(self, p: jax.Array,  # [64, T] in V's compute dtype
         v_tile,  # SMEM [T, head_dim]
         ) -> jax.Array:  # [64, head_dim] f32
    """`p @ V` of one step on `wgmma` (a plain dot in interpret mode)."""
    if self.st.interpret:
      return lax.dot_general(p, v_tile[...], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    def body(acc_ref):
      plgpu.wgmma(acc_ref, p, v_tile)
      return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC((WGMMA_ROWS, self.st.head_dim),
                                         jnp.float32))

  def _scales(self, step):
    """(SMEM scales ref, its row) holding step `step`'s page scales: its
    ring slot's, or with a converting copier its converted tiles'."""
    if self.converts:
      return self.work_scales, lax.rem(step, 2)
    return self.scale_slots, lax.rem(step, self.st.num_stages)

  def token_scales(self, step, kv):  # [T] f32: each token's page scale
    """The page scales of step `step` (K: kv=0, V: 1), one per token (a
    vector along the step's logit columns)."""
    st, tokens = self.st, self.tokens
    scales, row = self._scales(step)
    if st.page_parts > 1:  # the step is part of one page
      return self.cast(jnp.full((tokens,), scales[row, kv, 0],
                                jnp.float32), self.col_layout)
    page_of_token = self.cast(lax.broadcasted_iota(jnp.int32, (tokens,), 0),
                              self.col_layout) // st.block_size
    out = self.cast(jnp.zeros((tokens,), jnp.float32), self.col_layout)
    for c in range(st.pages_per_chunk):
      out = jnp.where(page_of_token == c, scales[row, kv, c], out)
    return out

  def scale_columns(self, x, step, kv):  # x: [64, T] f32, logits or p
    """`x` times each key token's page scale (int8 pools): K's scales
    multiply the logits `q @ K^T`, V's the probabilities before `p @ V`, so
    the int8 tiles are only converted, never multiplied."""
    return x * lax.broadcast_in_dim(self.token_scales(step, kv), x.shape,
                                    (1,))

  def dequantize(self,
                 src,  # SMEM [T, head_dim] int8
                 dst,  # SMEM [T, head_dim] bf16
                 ) -> None:
    """int8 SMEM tile [T, head_dim] -> bf16 SMEM tile of the same integers
    (exact: |x| <= 127 < 2^8), visible to `wgmma` when this returns."""
    if self.st.interpret:
      x = src[...]
    else:
      x = _load_whole(src, plgpu.Layout.WGMMA_UPCAST_2X)
      x = plgpu.layout_cast(x, plgpu.Layout.WGMMA)
    dst[...] = x.astype(dst.dtype)
    plgpu.commit_smem()

  def k_tile(self, step):
    """Waits for step `step`'s K; its tile for `qk` (converted for int8)."""
    if self.converts:
      plgpu.barrier_wait(self.ready[0].at[lax.rem(step, 2)])
      return self.k_work.at[lax.rem(step, 2)]
    slot = lax.rem(step, self.st.num_stages)
    plgpu.barrier_wait(self.k_barriers.at[slot])
    tile = self.k_smem.at[slot]
    if self.st.quantized:
      self.dequantize(tile, self.k_work)
      tile = self.k_work
    return tile

  def v_tile(self, step):
    """Waits for step `step`'s V; its tile for `pv` (converted for int8)."""
    if self.converts:
      plgpu.barrier_wait(self.ready[1].at[lax.rem(step, 2)])
      return self.v_work.at[lax.rem(step, 2)]
    slot = lax.rem(step, self.st.num_stages)
    plgpu.barrier_wait(self.v_barriers.at[slot])
    tile = self.v_smem.at[slot]
    if self.st.quantized:
      self.dequantize(tile, self.v_work)
      tile = self.v_work
    return tile

  def initial_state(self):
    """(acc [64, head_dim], running max [64], running sum [64]), f32."""
    return (self.cast(jnp.zeros((WGMMA_ROWS, self.st.head_dim), jnp.float32),
                      self.tile_layout),
            self.cast(jnp.full((WGMMA_ROWS,), MASK_VALUE, jnp.float32),
                      self.row_layout),
            self.cast(jnp.zeros((WGMMA_ROWS,), jnp.float32), self.row_layout))

  def softmax_step(self, step, carry, *, scale: float, num_steps,
                   mask: Callable[[Any], tuple[Any, Any]] | None = None,
                   consumed: tuple[Any, Any] | None = None):
    """Step `step` of online-softmax attention (base 2) over the ring.

    `carry` is `initial_state()`'s triple; `scale` multiplies the logits
    (sm_scale * log2 e). `mask(s) -> (s, keep)` masks the step's logits
    [64, T] (called after `q @ K^T`); `keep`, if not None, also zeroes `p`
    where False (for rows that may see none of the step's keys). The slot is
    refilled once both matmuls are done; with `consumed` (the K and V
    "consumed" barriers of a warp-specialized kernel: per ring slot, or per
    converted tile pair with a converting copier) it is not refilled here
    but its K and V are each released as soon as their matmul is done.
    """
    acc, m, l = carry
    slot = lax.rem(step, self.st.num_stages)
    released = lax.rem(step, 2) if self.converts else slot
    s = self.qk(self.k_tile(step)) * scale
    if self.st.quantized:
      s = self.scale_columns(s, step, 0)
    if consumed is not None:
      plgpu.barrier_arrive(consumed[0].at[released])
    keep = None
    if mask is not None:
      s, keep = mask(s)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, (0,)))
    if keep is not None:
      p = jnp.where(keep, p, 0.0)
    l_new = l * alpha + jnp.sum(p, axis=1)
    v_tile = self.v_tile(step)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, (0,))
    if self.st.quantized:
      p = self.scale_columns(p, step, 1)
    acc = acc + self.pv(p.astype(self.q_smem.dtype), v_tile)
    # The slot is consumed (the matmuls above have been awaited): refill it.
    if consumed is None:
      self.refill(step, slot, num_steps)
    else:
      plgpu.barrier_arrive(consumed[1].at[released])
    return acc, m_new, l_new


def _load_whole(src, layout):
  """`plgpu.load` of a whole SMEM ref: jax 0.10 takes the index `()`
  positionally, jax 0.11 deprecates passing an index at all."""
  idx = inspect.signature(plgpu.load).parameters["idx"]
  if idx.default is inspect.Parameter.empty:
    return plgpu.load(src, (), layout=layout)
  return plgpu.load(src, layout=layout)


def swizzled(shape: tuple[int, ...], dtype) -> Any:
  """An SMEM tile in the tiling and swizzle that TMA writes and `wgmma` (or
  an upcasting load) reads: rows of 8 x up to 128 bytes, swizzled by as many
  bytes as a row holds (128 for 16-bit tiles and int8 head_dim 128, 64 for
  int8 head_dim 64)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = min(128, shape[-1] * itemsize)
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle // itemsize)),
      plgpu.SwizzleTransform(swizzle)))


def converts(st: Any) -> bool:
  """Whether a kernel of static description `st` has a converting copier:
  an int8 pool and decode's `copy_warpgroup`."""
  return st.quantized and getattr(st, "copy_warpgroup", False)


def ring_buffers(st: Any, compute_dtype, pool_dtype) -> list[Any]:
  """SMEM scratch of a `PageRing`, in its kernels' order: the 64-row query
  tile, the K and V rings, and (int8 pools) the two dequantized tiles (two
  pairs with a converting copier), the ring slots' page scales and (with a
  converting copier) the converted tiles' scales."""
  scales = lambda rows: plgpu.SMEM((rows, 2, st.pages_per_chunk), jnp.float32)
  tile = ((2, st.tokens, st.head_dim) if converts(st)
          else (st.tokens, st.head_dim))
  work = ([swizzled(tile, compute_dtype)] * 2 + [scales(st.num_stages)]
          + ([scales(2)] if converts(st) else [])
          if st.quantized else [])
  return [swizzled((WGMMA_ROWS, st.head_dim), compute_dtype),
          swizzled((st.num_stages, st.tokens, st.head_dim), pool_dtype),
          swizzled((st.num_stages, st.tokens, st.head_dim), pool_dtype),
          *work]


def in_ring_scope(st: Any, body: Callable[[PageRing], Any], compute_dtype,
                  pool_dtype, *, collective_axes=(), **ring_kwargs) -> Any:
  """`body(ring)` on a `PageRing` over its own scope of shared memory
  (`ring_buffers`), returning what `body` returns (e.g. the accumulators,
  in registers). The scope's bytes are free again afterwards, so a kernel
  can stage its output tile in them. `ring_kwargs`: `PageRing`'s arguments
  other than its buffers."""
  def scoped(q_smem, k_smem, v_smem, *int8_buffers):
    k_work, v_work, scale_slots, work_scales = (
        tuple(int8_buffers) + (None,) * (4 - len(int8_buffers)))
    return body(PageRing(st, q_smem=q_smem, k_smem=k_smem, v_smem=v_smem,
                         k_work=k_work, v_work=v_work,
                         scale_slots=scale_slots, work_scales=work_scales,
                         **ring_kwargs))
  return pl.run_scoped(scoped, *ring_buffers(st, compute_dtype, pool_dtype),
                       collective_axes=collective_axes)


def ring_barriers(st: Any) -> list[Any]:
  """The query barrier and the per-slot K and V barriers of a `PageRing`
  (one arrival per page copy of a step)."""
  return [plgpu.Barrier(num_barriers=1),
          plgpu.Barrier(num_arrivals=st.pages_per_chunk,
                        num_barriers=st.num_stages),
          plgpu.Barrier(num_arrivals=st.pages_per_chunk,
                        num_barriers=st.num_stages)]


def interpret_params(**kwargs):
  """Mosaic GPU's CPU interpret mode, `InterpretGPUParams(**kwargs)`.

  Public as `plgpu.InterpretGPUParams` from jax 0.11; private in jax 0.10
  (with `interpret_compile_fix`, the places these kernels touch JAX
  internals).
  """
  if hasattr(plgpu, "InterpretGPUParams"):
    return plgpu.InterpretGPUParams(**kwargs)
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError(
        "this JAX has no Mosaic GPU interpret mode "
        "(jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams); "
        "run the Mosaic GPU kernels on a GPU or use implementation="
        "'pallas_triton' / 'xla'") from e
  return InterpretGPUParams(**kwargs)


def interpret_arg(interpret: bool | object):
  """`plgpu.kernel`'s `interpret=` for a kernel's `interpret` argument.

  Interpreting installs `interpret_compile_fix` first (jax < 0.11 compiles
  every simulated warpgroup anew on each call without it) and
  `interpret_callback_fix` (the simulator's callbacks take numpy arguments,
  a third faster).
  """
  if interpret is False:
    return None
  interpret_compile_fix.install()
  interpret_callback_fix.install()
  return interpret_params() if interpret is True else interpret
