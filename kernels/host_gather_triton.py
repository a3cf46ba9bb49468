"""Block gather host -> device in one kernel that reads the pinned tier.

`block_copy.gather_to_device` moves each block (or run of blocks) as its own
transfer: by XLA's source, a slice of the pinned tier at a runtime offset
becomes one small kernel on a side stream, and on an H100 each cost ~7.5 us
besides its bytes (docs/benchmarks.md), so 512 KiB blocks moved at ~53% of a
plain pinned -> device copy. This module moves the whole list in ONE Pallas
kernel (Triton lowering): program `(i, layer, kv_head_row)` reads page-layer
`[block_size, head_dim]` of hot-tier slot `src_slots[i]` and writes it into
pool page `dst_pages[i]`, in place (the pool is aliased to the output), so
there is neither a per-block launch nor a staging buffer nor the scatter of
the XLA path. The tier's pages are read straight from pinned host memory
over PCIe (CUDA's unified addressing maps pinned memory into the device's
address space), the way host-offloading caches' copy kernels do.

Status: `block_copy.gather_to_device`'s path on CUDA GPUs
(`implementation="auto"`). Nothing in JAX documents a Pallas operand in
`pinned_host` memory: `pallas_call` does not check its operands' memory
space and XLA passes a host-space parameter to the Triton custom call as it
is (its pinned pointer). On an H200 (jax 0.11.2, 2026-11-27) it compiled to
one custom call with no copy of the tier, passed its GPU tests
(tests/gpu/test_host_gather_gpu.py) and moved 8 layers of 256 16-token
blocks at 89.6% of a plain pinned -> device copy of the same bytes (the
per-block transfers: 51.6%). On CPU it runs in interpret mode
(tests/test_kernels_host_gather.py), which checks the indexing, the skipped
entries and the aliasing, not the bus.

Same contract as `block_copy.gather_to_device` with `run_length=1`: slots
are clamped into the tier, entries with `dst_pages < 0` (padding) or past
the pool are skipped, other pages keep their contents. Distinct
destinations are the caller's job (two writes to one page race).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import block_copy
from kernels.common import SQUEEZED
from kernels.decode_triton import compiler_params


def _copy_page_kernel(src_ref, dst_ref, host_ref, pool_in_ref, pool_ref):
  """One page-layer: `host_ref [num_slots, P, D]` slot -> `pool_ref
  [num_blocks, P, D]` page (aliased to `pool_in_ref`, never read here)."""
  del pool_in_ref  # the same buffer as pool_ref: pages not written stay
  num_slots, num_blocks = host_ref.shape[0], pool_ref.shape[0]
  slot = jnp.clip(src_ref[0], 0, num_slots - 1)
  page = dst_ref[0]

  @pl.when((page >= 0) & (page < num_blocks))
  def _():
    pool_ref[page] = host_ref[slot]


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def supports(host_tier_shape: tuple[int, ...]) -> bool:
  """Whether the Triton lowering tiles this tier's pages: a program's tile
  `[block_size, head_dim]` needs powers of 2."""
  return all(map(_pow2, host_tier_shape[-2:]))


def check_supported(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D]
) -> None:
  """Raises ValueError for pages `supports` refuses, naming the size."""
  block_size, head_dim = host_tier.shape[-2:]
  for name, n in (("block_size", block_size), ("head_dim", head_dim)):
    if not _pow2(n):
      raise ValueError(f"the one-kernel gather needs {name} to be a power "
                       f"of 2; got {n}")


def gather_to_device_core(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 hot-tier slots to read
    dst_pages: jax.Array,  # [n] int32 pool pages to fill (< 0: skip)
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:  # the updated pool
  """Traceable body of `gather_to_device`."""
  num_layers = pool.shape[0] - layer_start if num_layers is None else num_layers
  block_copy.check_arguments(pool, host_tier, dst_pages, src_slots, layer_start,
                       num_layers)
  check_supported(host_tier)
  n = src_slots.shape[0]
  if n == 0:
    return pool
  num_blocks, _, kv_heads, block_size, head_dim = pool.shape[1:]
  num_slots = host_tier.shape[0]
  sq = SQUEEZED
  rows = 2 * kv_heads  # (K or V, kv head) pairs: one program each

  def kv_and_head(j):
    return j // kv_heads, j % kv_heads

  def ids_spec():
    return pl.BlockSpec((sq, 1), lambda i, l, j: (i, 0))

  host_spec = pl.BlockSpec(
      (num_slots, sq, sq, sq, block_size, head_dim),
      lambda i, l, j: (0, layer_start + l, *kv_and_head(j), 0, 0))
  pool_spec = pl.BlockSpec(
      (sq, num_blocks, sq, sq, block_size, head_dim),
      lambda i, l, j: (layer_start + l, 0, *kv_and_head(j), 0, 0))
  return pl.pallas_call(
      _copy_page_kernel,
      grid=(n, num_layers, rows),
      in_specs=[ids_spec(), ids_spec(), host_spec, pool_spec],
      out_specs=pool_spec,
      out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
      input_output_aliases={3: 0},
      compiler_params=compiler_params(num_warps, 1),
      interpret=interpret,
      name="gather_pinned_pages",
  )(src_slots.astype(jnp.int32).reshape(n, 1),
    dst_pages.astype(jnp.int32).reshape(n, 1), host_tier, pool)


@functools.partial(jax.jit, donate_argnums=(0,),
                   static_argnames=("layer_start", "num_layers", "num_warps",
                                    "interpret"))
def gather_to_device(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32
    dst_pages: jax.Array,  # [n] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:  # the pool, updated in place (donated)
  """Copies hot-tier blocks into pool pages for one group of layers, in one
  kernel reading the pinned tier."""
  return gather_to_device_core(pool, host_tier, src_slots, dst_pages,
                               layer_start=layer_start, num_layers=num_layers,
                               num_warps=num_warps, interpret=interpret)
