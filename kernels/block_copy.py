"""Block gather/scatter between the pinned-host hot tier and the device pool.

Both tiers share one layout, layer-major like the device pool:

  device pool  [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]
  hot tier     [num_layers, num_slots,  2, num_kv_heads, block_size, head_dim]

with the hot tier allocated once in `pinned_host` memory (`allocate_host_tier`)
and reused: `scatter_to_host` donates it and writes blocks into it in place.
One call moves a list of blocks for a group of consecutive layers:

* `gather_to_device(pool, host, src_slots, dst_pages)`: host -> device, e.g.
  a returning session's prefix into free pages of the pool.
* `scatter_to_host(host, pool, src_pages, dst_slots)`: device -> host, e.g.
  write-back or eviction to the hot tier.

Each block is a `dynamic_slice` of the source moved to the other memory
space. Host -> device, the moved blocks are scattered into the donated pool
in one scatter; device -> host, each is written into the donated tier by a
`dynamic_update_slice`. XLA's host offloading turns a slice of a host buffer
moved to the device (and a device slice moved into a host buffer) into one DMA
per block, so only the named blocks cross the bus. Entries `< 0` in the
destination list are skipped, so callers can pad the lists to a few bucket
sizes (the lists' lengths are static shapes). No conditionals: they could
make XLA copy a whole tier.

Overlap: the `*_core` functions are traceable; called inside an engine's
jitted step, XLA schedules their copies as async start/done pairs that can
run while another layer's attention computes. The jitted wrappers are for
standalone use and benchmarks.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

HOST_MEMORY_KIND = "pinned_host"
DEVICE_MEMORY_KIND = "device"


def _to_memory(x: jax.Array, kind: str) -> jax.Array:
  """Moves `x` to memory kind `kind` inside a traced computation."""
  space = getattr(jax, "memory", None)
  if space is not None and hasattr(space, "Space"):
    target = (space.Space.Host if kind == HOST_MEMORY_KIND
              else space.Space.Device)
    return jax.device_put(x, target)
  from jax._src.sharding_impls import TransferToMemoryKind  # older JAX
  return jax.device_put(x, TransferToMemoryKind(kind))


def allocate_host_tier(
    shape: tuple[int, ...],  # [num_layers, num_slots, 2, kv_heads, P, D]
    dtype: jnp.dtype,
    device: jax.Device | None = None,
) -> jax.Array:  # same shape, in pinned_host memory
  """Allocates the hot tier once, in pinned host memory of `device`."""
  if len(shape) != 6 or shape[2] != 2:
    raise ValueError("host tier shape must be [num_layers, num_slots, 2, "
                     f"num_kv_heads, block_size, head_dim]; got {shape}")
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(
      device, memory_kind=HOST_MEMORY_KIND)
  # From host zeros (calloc'd lazily), never through device memory. Unlike
  # a jit output, a device_put result also carries the host memory space in
  # its type, which the in-place updates in `scatter_to_host` need.
  return jax.device_put(np.zeros(shape, jnp.dtype(dtype)), sharding)


def _check(src_tier, dst_tier, src_ids, dst_ids, layer_start, num_layers):
  if src_tier.ndim != 6 or dst_tier.ndim != 6:
    raise ValueError("tiers must be [num_layers, blocks, 2, kv_heads, "
                     f"block_size, head_dim]; got {src_tier.shape}, "
                     f"{dst_tier.shape}")
  if src_tier.shape[2:] != dst_tier.shape[2:] or (
      src_tier.shape[0] != dst_tier.shape[0]):
    raise ValueError(f"tier shapes differ beyond the block axis: "
                     f"{src_tier.shape} vs {dst_tier.shape}")
  if src_tier.dtype != dst_tier.dtype:
    raise ValueError(f"dtype mismatch: {src_tier.dtype} vs {dst_tier.dtype}")
  if src_ids.shape != dst_ids.shape or src_ids.ndim != 1:
    raise ValueError(f"source and destination id lists must be 1-D and of "
                     f"equal length; got {src_ids.shape}, {dst_ids.shape}")
  if not 0 <= layer_start < layer_start + num_layers <= src_tier.shape[0]:
    raise ValueError(f"layers [{layer_start}, {layer_start + num_layers}) "
                     f"outside [0, {src_tier.shape[0]})")


def _memory_kind_of(x: jax.Array, default: str) -> str:
  """The memory kind `x` has in the traced program (its type's space)."""
  space = getattr(jax.typeof(x), "memory_space", None) if hasattr(
      jax, "typeof") else None
  name = str(space).rsplit(".", 1)[-1].lower() if space is not None else ""
  if name == "host":
    return HOST_MEMORY_KIND
  if name == "device":
    return DEVICE_MEMORY_KIND
  return default


def _read_blocks(src_tier, src_ids, layer_start, num_layers, to_kind):
  """Per block: a slice of the source moved to `to_kind` memory."""
  block_shape = (num_layers, 1) + src_tier.shape[2:]
  zeros = (0,) * (src_tier.ndim - 2)
  blocks = []
  for i in range(src_ids.shape[0]):
    src = jnp.clip(src_ids[i], 0, src_tier.shape[1] - 1)
    block = lax.dynamic_slice(src_tier, (layer_start, src) + zeros,
                              block_shape)
    blocks.append(_to_memory(block, to_kind))
  return blocks


def _gather_blocks(pool, host_tier, src_ids, dst_ids, layer_start,
                   num_layers):
  """Host blocks -> device, then one scatter into the pool (OOB dropped)."""
  kind = _memory_kind_of(pool, DEVICE_MEMORY_KIND)
  blocks = jnp.concatenate(
      _read_blocks(host_tier, src_ids, layer_start, num_layers, kind),
      axis=1)  # [num_layers, n, 2, kv_heads, P, D]
  dst = jnp.where(dst_ids >= 0, dst_ids, pool.shape[1])  # -> dropped
  layers = slice(layer_start, layer_start + num_layers)
  return pool.at[layers, dst].set(blocks, mode="drop")


def _scatter_blocks(host_tier, pool, src_ids, dst_ids, layer_start,
                    num_layers):
  """Device blocks -> host, each written in place into the host tier.

  Host memory takes dynamic-update-slices (DMAs), not scatters, and no
  conditionals around them (they could copy the tier): skipped entries
  (`< 0`) repeat the first valid entry's write instead, which changes
  nothing. At least one entry must be valid (`scatter_to_host` checks that
  when the ids are concrete).
  """
  valid = dst_ids >= 0
  first = jnp.argmax(valid)
  src_ids = jnp.where(valid, src_ids, src_ids[first])
  dst_ids = jnp.where(valid, dst_ids, dst_ids[first])
  kind = _memory_kind_of(host_tier, HOST_MEMORY_KIND)
  blocks = _read_blocks(pool, src_ids, layer_start, num_layers, kind)
  zeros = (0,) * (pool.ndim - 2)
  for i, block in enumerate(blocks):
    dst = jnp.clip(dst_ids[i], 0, host_tier.shape[1] - 1)
    host_tier = lax.dynamic_update_slice(host_tier, block,
                                         (layer_start, dst) + zeros)
  return host_tier


def gather_to_device_core(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_layers, num_slots, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 hot-tier slots to read
    dst_pages: jax.Array,  # [n] int32 pool pages to fill (< 0: skip)
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
) -> jax.Array:  # the updated pool
  """Traceable body of `gather_to_device` (use inside a jitted step)."""
  num_layers = pool.shape[0] - layer_start if num_layers is None else num_layers
  _check(host_tier, pool, src_slots, dst_pages, layer_start, num_layers)
  return _gather_blocks(pool, host_tier, src_slots, dst_pages, layer_start,
                        num_layers)


def scatter_to_host_core(
    host_tier: jax.Array,  # [num_layers, num_slots, 2, kv_heads, P, D] host
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    src_pages: jax.Array,  # [n] int32 pool pages to read
    dst_slots: jax.Array,  # [n] int32 hot-tier slots to fill (< 0: skip)
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
) -> jax.Array:  # the updated hot tier
  """Traceable body of `scatter_to_host` (use inside a jitted step)."""
  num_layers = pool.shape[0] - layer_start if num_layers is None else num_layers
  _check(pool, host_tier, src_pages, dst_slots, layer_start, num_layers)
  return _scatter_blocks(host_tier, pool, src_pages, dst_slots, layer_start,
                         num_layers)


@functools.partial(jax.jit, donate_argnums=(0,),
                   static_argnames=("layer_start", "num_layers"))
def gather_to_device(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_layers, num_slots, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32
    dst_pages: jax.Array,  # [n] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
) -> jax.Array:  # the pool, updated in place (donated)
  """Copies hot-tier blocks into pool pages for one group of layers."""
  return gather_to_device_core(pool, host_tier, src_slots, dst_pages,
                               layer_start=layer_start, num_layers=num_layers)


@functools.lru_cache(maxsize=None)
def _scatter_fn(sharding: jax.sharding.Sharding, layer_start: int,
                num_layers: int | None):
  return jax.jit(
      functools.partial(scatter_to_host_core, layer_start=layer_start,
                        num_layers=num_layers),
      donate_argnums=(0,), out_shardings=sharding)


def scatter_to_host(
    host_tier: jax.Array,  # [num_layers, num_slots, 2, kv_heads, P, D] host
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    src_pages: jax.Array,  # [n] int32
    dst_slots: jax.Array,  # [n] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
) -> jax.Array:  # the hot tier, updated in place (donated), still pinned_host
  """Copies pool pages into hot-tier slots for one group of layers.

  A list with no valid destination (all `< 0`) leaves the tier as it is.
  """
  try:
    if not np.any(np.asarray(dst_slots) >= 0):
      return host_tier
  except jax.errors.TracerArrayConversionError:
    pass  # traced ids: the caller guarantees a valid entry
  return _scatter_fn(host_tier.sharding, layer_start, num_layers)(
      host_tier, pool, src_pages, dst_slots)
