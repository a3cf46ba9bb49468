"""Block gather/scatter between the pinned-host hot tier and the device pool.

The device pool is layer-major (what attention reads), the hot tier
block-major (what crosses the bus):

  device pool  [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]
  hot tier     [num_slots, num_layers, 2, num_kv_heads, block_size, head_dim]

so that one block of a group of layers is one contiguous run of host memory,
one transfer, as in the cold tier, where a chunk is one block with all its layers.
(With a layer-major hot tier each block was `num_layers` separate runs of one
page: on an H100, 16-token pages of 8 x 128 bf16, 64 KiB each, moved at 49% of
a plain pinned -> device copy, 64-token pages at 86%; docs/benchmarks.md.)
The hot tier is allocated once in `pinned_host` memory (`allocate_host_tier`)
and reused: `scatter_to_host` donates it and writes blocks into it in place.
One call moves a list of blocks for a group of consecutive layers:

* `gather_to_device(pool, host, src_slots, dst_pages)`: host -> device, e.g.
  a returning session's prefix into free pages of the pool. With
  `run_length=R`, each source entry names a run of R consecutive hot-tier
  slots (a hot tier that allocates in runs, e.g. a session's blocks) and
  the run moves as one transfer of R blocks.
* `scatter_to_host(host, pool, src_pages, dst_slots)`: device -> host, e.g.
  write-back or eviction to the hot tier.

Host -> device on a CUDA GPU (`implementation="auto"`), one Pallas kernel
reads every listed page from the pinned tier and writes it into the pool in
place (`host_gather_triton`): 89-90% of a plain pinned -> device copy on an
H200. Elsewhere (`"transfers"`), each run of blocks (one block by default)
is a `dynamic_slice` of the tier moved to the device; the moved blocks,
transposed to layer-major there, go into the donated pool by one scatter.
Device -> host, the named pages are gathered block-major on the device first
(one gather), then each block is moved to the host and written into the
donated tier by a `dynamic_update_slice`. XLA's host offloading turns a
slice of a host buffer moved to the device (and a device slice moved into a
host buffer) into one transfer per slice, so only the named blocks cross the
bus. A slice at a runtime offset is not a copy-engine DMA but an
asynchronous `dynamic-slice`: a small kernel on a side stream that reads
the pinned tier over PCIe (XLA's source says so, and the compiled gather of
the H200 run shows a `fusion-start`/`fusion-done` pair per block); only
whole buffers and offsets known at compile time or linear in a loop counter
become memcpys. Each transfer costs a fixed few microseconds besides its
bytes: the H100 gathers of 2026-11-26 fit ~7.5 us per transfer plus 50 GB/s
(512 KiB blocks moved at 53% of a plain pinned -> device copy, 2 MiB blocks
at 77%), a cost `run_length` spreads over R blocks and the one-kernel
gather does not pay per block; on TPU, `host_gather_tpu` DMAs each block
from host memory (`pl.HOST`) in one kernel (not yet run on a TPU, so not
picked by "auto"). Entries `< 0` in the destination list are
skipped, so callers can pad the lists to a few bucket sizes (the lists'
lengths are static shapes).
No conditionals: they could make XLA copy a whole tier.

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
  target = (jax.memory.Space.Host if kind == HOST_MEMORY_KIND
            else jax.memory.Space.Device)
  return jax.device_put(x, target)


def allocate_host_tier(
    shape: tuple[int, ...],  # [num_slots, num_layers, 2, kv_heads, P, D]
    dtype: jnp.dtype,
    device: jax.Device | None = None,
) -> jax.Array:  # same shape, in pinned_host memory
  """Allocates the hot tier once, in pinned host memory of `device`."""
  if len(shape) != 6 or shape[2] != 2:
    raise ValueError("host tier shape must be [num_slots, num_layers, 2, "
                     f"num_kv_heads, block_size, head_dim]; got {shape}")
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(
      device, memory_kind=HOST_MEMORY_KIND)
  # From host zeros (calloc'd lazily), never through device memory. Unlike
  # a jit output, a device_put result also carries the host memory space in
  # its type, which the in-place updates in `scatter_to_host` need.
  return jax.device_put(np.zeros(shape, jnp.dtype(dtype)), sharding)


def check_arguments(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D]
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D]
    pool_ids: jax.Array,  # [n * run_length] int32
    host_ids: jax.Array,  # [n] int32
    layer_start: int,
    num_layers: int,
    run_length: int = 1,
) -> None:
  """Raises ValueError for a pool, tier, id lists or layer range that do
  not fit together (shared with the one-call gathers, `host_gather_*`)."""
  if pool.ndim != 6 or host_tier.ndim != 6:
    raise ValueError("expected pool [num_layers, num_blocks, 2, kv_heads, "
                     "block_size, head_dim] and hot tier [num_slots, "
                     "num_layers, 2, kv_heads, block_size, head_dim]; got "
                     f"{pool.shape}, {host_tier.shape}")
  if pool.shape[2:] != host_tier.shape[2:] or (
      pool.shape[0] != host_tier.shape[1]):
    raise ValueError(f"pool {pool.shape} and hot tier {host_tier.shape} "
                     "differ in layers or block shape")
  if pool.dtype != host_tier.dtype:
    raise ValueError(f"dtype mismatch: {pool.dtype} vs {host_tier.dtype}")
  if not 1 <= run_length <= host_tier.shape[0]:
    raise ValueError(f"run_length must be in [1, {host_tier.shape[0]}] (the "
                     f"hot tier's slots); got {run_length}")
  if (pool_ids.ndim != 1 or host_ids.ndim != 1
      or pool_ids.shape[0] != host_ids.shape[0] * run_length):
    what = ("of equal length" if run_length == 1 else
            f"with {run_length} pool pages per hot-tier run")
    raise ValueError(f"source and destination id lists must be 1-D and "
                     f"{what}; got pool ids {pool_ids.shape}, hot-tier ids "
                     f"{host_ids.shape}")
  if not 0 <= layer_start < layer_start + num_layers <= pool.shape[0]:
    raise ValueError(f"layers [{layer_start}, {layer_start + num_layers}) "
                     f"outside [0, {pool.shape[0]})")


def memory_kind_of(x: jax.Array,  # any shape
                   default: str) -> str:
  """The memory kind `x` has in the traced program (its type's space)."""
  space = getattr(jax.typeof(x), "memory_space", None)
  name = str(space).rsplit(".", 1)[-1].lower() if space is not None else ""
  if name == "host":
    return HOST_MEMORY_KIND
  if name == "device":
    return DEVICE_MEMORY_KIND
  return default


def fetch_blocks_core(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 hot-tier slots (run starts) to read
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    kind: str = DEVICE_MEMORY_KIND,
    run_length: int = 1,
) -> jax.Array:  # [n * run_length, num_layers, 2, kv_heads, P, D] in `kind`
  """The first half of a gather: the layer group of each named run of
  `run_length` consecutive slots moved to the device as one transfer,
  block-major. Traceable."""
  if num_layers is None:
    num_layers = host_tier.shape[1] - layer_start
  block_shape = (run_length, num_layers) + host_tier.shape[2:]
  zeros = (0,) * (host_tier.ndim - 2)
  blocks = []
  for i in range(src_slots.shape[0]):
    src = jnp.clip(src_slots[i], 0, host_tier.shape[0] - run_length)
    block = lax.dynamic_slice(host_tier, (src, layer_start) + zeros,
                              block_shape)
    blocks.append(_to_memory(block, kind))
  return jnp.concatenate(blocks, axis=0)


def place_blocks_core(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    blocks: jax.Array,  # [n, group_layers, 2, kv_heads, P, D] device
    dst_pages: jax.Array,  # [n] int32 pool pages to fill (< 0: skip)
    *,
    layer_start: int = 0,
) -> jax.Array:  # the updated pool
  """The second half of a gather: fetched blocks, transposed to layer-major,
  written into pool pages by one scatter. Traceable."""
  dst = jnp.where(dst_pages >= 0, dst_pages, pool.shape[1])  # -> dropped
  layers = slice(layer_start, layer_start + blocks.shape[1])
  return pool.at[layers, dst].set(jnp.swapaxes(blocks, 0, 1), mode="drop")


def _gather_blocks(pool, host_tier, src_ids, dst_ids, layer_start,
                   num_layers, run_length):
  """Host runs of blocks -> device (one transfer each), then one scatter into
  the pool."""
  moved = fetch_blocks_core(
      host_tier, src_ids, layer_start=layer_start, num_layers=num_layers,
      kind=memory_kind_of(pool, DEVICE_MEMORY_KIND), run_length=run_length)
  return place_blocks_core(pool, moved, dst_ids, layer_start=layer_start)


def _scatter_blocks(host_tier, pool, src_ids, dst_ids, layer_start,
                    num_layers):
  """Device pages -> host: gathered block-major on the device, then each
  block moved (one DMA) and written in place into the host tier.

  Host memory takes dynamic-update-slices (DMAs), not scatters, and no
  conditionals around them (they could copy the tier): skipped entries
  (`< 0`) repeat the first valid entry's write instead, which changes
  nothing. At least one entry must be valid (`scatter_to_host` checks that
  when the ids are concrete).
  """
  valid = dst_ids >= 0
  first = jnp.argmax(valid)
  src_ids = jnp.where(valid, src_ids, src_ids[first])
  src = jnp.clip(src_ids, 0, pool.shape[1] - 1)
  layers = lax.slice_in_dim(pool, layer_start, layer_start + num_layers)
  staged = jnp.swapaxes(layers[:, src], 0, 1)  # [n, num_layers, 2, kvh, P, D]
  return _write_blocks_to_host(host_tier, staged, dst_ids, layer_start)


def _write_blocks_to_host(host_tier, blocks, dst_ids, layer_start):
  """Each of `blocks [n, group_layers, 2, kvh, P, D]` (device, block-major)
  moved to the host (one DMA) and written in place at slot `dst_ids[i]`;
  entries `< 0` repeat the first valid entry's write (see
  `_scatter_blocks`)."""
  valid = dst_ids >= 0
  first = jnp.argmax(valid)
  src = jnp.where(valid, jnp.arange(dst_ids.shape[0]), first)
  dst_ids = jnp.where(valid, dst_ids, dst_ids[first])
  kind = memory_kind_of(host_tier, HOST_MEMORY_KIND)
  zeros = (0,) * (host_tier.ndim - 2)
  for i in range(dst_ids.shape[0]):
    block = _to_memory(lax.dynamic_slice_in_dim(blocks, src[i], 1), kind)
    dst = jnp.clip(dst_ids[i], 0, host_tier.shape[0] - 1)
    host_tier = lax.dynamic_update_slice(host_tier, block,
                                         (dst, layer_start) + zeros)
  return host_tier


# How `gather_to_device` moves blocks: "transfers" (one XLA transfer per run
# of blocks, then one scatter into the pool; any backend) or
# "pallas_triton" (one Pallas kernel reading every listed page from the
# pinned tier, `host_gather_triton`; GPUs, interpret mode on CPU).
GATHER_IMPLEMENTATIONS = ("transfers", "pallas_triton")


def resolve_gather(implementation: str, host_tier_shape: tuple[int, ...]
                   ) -> str:
  """Maps `"auto"` to a name of `GATHER_IMPLEMENTATIONS`; checks the others.

  `"auto"` is `"pallas_triton"` on a CUDA GPU where its tiles fit (pages
  and head_dim powers of 2), `"transfers"` elsewhere. On an H200 the kernel
  moved 8 layers of 256 16-token blocks (or of 64 64-token ones) at 89.6%
  and 89.1% of a plain pinned -> device copy of the same bytes, the
  transfers at 51.6% and 74.8% (runs of 16 blocks: 78.3%);
  docs/benchmarks.md, "GPU: 2026-11-27".
  """
  if implementation == "auto":
    # Imported here: host_gather_triton imports this module.
    from kernels import host_gather_triton  # pylint: disable=g-import-not-at-top
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    return ("pallas_triton" if on_gpu
            and host_gather_triton.supports(host_tier_shape) else "transfers")
  if implementation not in GATHER_IMPLEMENTATIONS:
    raise ValueError(f"unknown gather implementation {implementation!r}; "
                     f"available: {list(GATHER_IMPLEMENTATIONS)} or 'auto'")
  return implementation


def run_slots(src_slots: jax.Array,  # [n] int32
              run_length: int, num_slots: int
              ) -> jax.Array:  # [n * run_length] int32
  """The slot of every block of each run of `run_length` slots starting at
  `src_slots [n]`, a run past the tier's end moved back to end there (as a
  transfer's `dynamic_slice` clamps)."""
  starts = jnp.clip(src_slots.astype(jnp.int32), 0, num_slots - run_length)
  return (starts[:, None] + jnp.arange(run_length, dtype=jnp.int32)
          ).reshape(-1)


def gather_to_device_core(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 hot-tier slots (run starts) to read
    dst_pages: jax.Array,  # [n * run_length] int32 pool pages (< 0: skip)
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    run_length: int = 1,
    implementation: str = "auto",
) -> jax.Array:  # the updated pool
  """Traceable body of `gather_to_device` (use inside a jitted step).

  Slot `src_slots[i] + j` goes to page `dst_pages[i * run_length + j]`; a
  run that would pass the tier's end is moved back to end there (as a
  `dynamic_slice` clamps), so callers keep runs inside the tier.
  `implementation`: see `resolve_gather`; the one-kernel gather takes runs
  block by block (it has no per-transfer cost to spread).
  """
  num_layers = pool.shape[0] - layer_start if num_layers is None else num_layers
  check_arguments(pool, host_tier, dst_pages, src_slots, layer_start,
                  num_layers, run_length)
  if resolve_gather(implementation, host_tier.shape) == "pallas_triton":
    from kernels import host_gather_triton  # pylint: disable=g-import-not-at-top
    slots = (src_slots if run_length == 1
             else run_slots(src_slots, run_length, host_tier.shape[0]))
    return host_gather_triton.gather_to_device_core(
        pool, host_tier, slots, dst_pages, layer_start=layer_start,
        num_layers=num_layers, interpret=jax.default_backend() == "cpu")
  return _gather_blocks(pool, host_tier, src_slots, dst_pages, layer_start,
                        num_layers, run_length)


def scatter_to_host_core(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    src_pages: jax.Array,  # [n] int32 pool pages to read
    dst_slots: jax.Array,  # [n] int32 hot-tier slots to fill (< 0: skip)
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
) -> jax.Array:  # the updated hot tier
  """Traceable body of `scatter_to_host` (use inside a jitted step)."""
  num_layers = pool.shape[0] - layer_start if num_layers is None else num_layers
  check_arguments(pool, host_tier, src_pages, dst_slots, layer_start,
                  num_layers)
  return _scatter_blocks(host_tier, pool, src_pages, dst_slots, layer_start,
                         num_layers)


def _check_ids(ids, low: int, high: int, what: str) -> None:
  """ValueError if a concrete id list has an entry outside [low, high) (a
  negative entry passes where `low` < 0: it means "skip"). Traced ids are
  not checked: under jit the kernels clamp, so an eager call is where a
  wrong id can be caught before it overwrites another block."""
  try:
    values = np.asarray(ids)
  except jax.errors.TracerArrayConversionError:
    return
  bad = values[(values < low) | (values >= high)] if values.size else values
  if bad.size:
    raise ValueError(f"{what} must be in [{max(low, 0)}, {high})"
                     f"{' or < 0 to skip' if low < 0 else ''}; got "
                     f"{int(bad[0])}")


def _check_slots_and_skip_empty(dst_slots, num_slots: int) -> bool:
  """Checks eager destination slots (each < `num_slots`, or < 0 to skip);
  True when none is valid: the write leaves the tier as it is, and the
  jitted write must not run (it repeats its first valid entry). Traced
  slots: False (the caller guarantees a valid entry)."""
  _check_ids(dst_slots, -(1 << 31), num_slots, "destination hot-tier slots")
  try:
    return not np.any(np.asarray(dst_slots) >= 0)
  except jax.errors.TracerArrayConversionError:
    return False


@functools.partial(jax.jit, donate_argnums=(0,),
                   static_argnames=("layer_start", "num_layers", "run_length",
                                    "implementation"))
def gather_to_device_unchecked(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 slots (run starts)
    dst_pages: jax.Array,  # [n * run_length] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    run_length: int = 1,
    implementation: str = "auto",
) -> jax.Array:  # the pool, updated in place (donated)
  """`gather_to_device` without its id checks: the jitted call (`.lower`,
  `.trace`), ids out of range clamped."""
  return gather_to_device_core(pool, host_tier, src_slots, dst_pages,
                               layer_start=layer_start, num_layers=num_layers,
                               run_length=run_length,
                               implementation=implementation)


def gather_to_device(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 slots (run starts)
    dst_pages: jax.Array,  # [n * run_length] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    run_length: int = 1,
    implementation: str = "auto",
) -> jax.Array:  # the pool, updated in place (donated)
  """Copies hot-tier blocks (runs of `run_length` consecutive slots) into
  pool pages for one group of layers: on a GPU in one kernel reading the
  pinned tier, elsewhere one transfer per run (`resolve_gather`).

  Ids given on the host (numpy arrays, lists: what a caller's bookkeeping
  holds) are checked: a run past the tier or a page past the pool is a
  ValueError, where the kernels would clamp the source (reading another
  block) or drop the write. Ids already in a JAX array are not read back
  (that would wait on the device each call) and are clamped, as under jit.
  """
  if not isinstance(src_slots, jax.Array):
    src_slots = np.asarray(src_slots, np.int32)
    _check_ids(src_slots, 0, host_tier.shape[0] - run_length + 1,
               f"source hot-tier slots (starts of runs of {run_length})")
  if not isinstance(dst_pages, jax.Array):
    dst_pages = np.asarray(dst_pages, np.int32)
    _check_ids(dst_pages, -(1 << 31), pool.shape[1], "destination pool pages")
  return gather_to_device_unchecked(
      pool, host_tier, src_slots, dst_pages, layer_start=layer_start,
      num_layers=num_layers, run_length=run_length,
      implementation=implementation)


@functools.lru_cache(maxsize=None)
def _scatter_fn(sharding: jax.sharding.Sharding, layer_start: int,
                num_layers: int | None):
  return jax.jit(
      functools.partial(scatter_to_host_core, layer_start=layer_start,
                        num_layers=num_layers),
      donate_argnums=(0,), out_shardings=sharding)


def scatter_to_host(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    src_pages: jax.Array,  # [n] int32
    dst_slots: jax.Array,  # [n] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
) -> jax.Array:  # the hot tier, updated in place (donated), still pinned_host
  """Copies pool pages into hot-tier slots for one group of layers.

  A list with no valid destination (all `< 0`) leaves the tier as it is.
  Called eagerly, ids outside the pool or the tier are a ValueError: under
  jit they are clamped, and a clamped destination overwrites another
  block's slot.
  """
  _check_ids(src_pages, 0, pool.shape[1], "source pool pages")
  if _check_slots_and_skip_empty(dst_slots, host_tier.shape[0]):
    return host_tier
  return _scatter_fn(host_tier.sharding, layer_start, num_layers)(
      host_tier, pool, src_pages, dst_slots)


def put_to_host_core(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    blocks: jax.Array,  # [n, num_layers, 2, kv_heads, P, D] device
    dst_slots: jax.Array,  # [n] int32 hot-tier slots to fill (< 0: skip)
) -> jax.Array:  # the updated hot tier
  """Traceable body of `put_to_host`."""
  if (blocks.ndim != host_tier.ndim or blocks.shape[1:] != host_tier.shape[1:]
      or blocks.dtype != host_tier.dtype):
    raise ValueError(f"blocks {blocks.shape} {blocks.dtype} are not blocks of "
                     f"the hot tier {host_tier.shape} {host_tier.dtype}")
  if dst_slots.ndim != 1 or dst_slots.shape[0] != blocks.shape[0]:
    raise ValueError(f"{blocks.shape[0]} blocks need as many destination "
                     f"slots; got {dst_slots.shape}")
  return _write_blocks_to_host(host_tier, blocks, dst_slots, 0)


@functools.lru_cache(maxsize=None)
def _put_fn(sharding: jax.sharding.Sharding):
  return jax.jit(put_to_host_core, donate_argnums=(0,), out_shardings=sharding)


def put_to_host(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    blocks: jax.Array,  # [n, num_layers, 2, kv_heads, P, D] device
    dst_slots: jax.Array,  # [n] int32, < 0 skips
) -> jax.Array:  # the hot tier, updated in place (donated), still pinned_host
  """Writes whole blocks already on the device (e.g. read from the cold tier
  and moved there, or received from another engine) into hot-tier slots.

  The blocks cross the bus once each, device -> host, as `scatter_to_host`'s
  do; eager ids outside the tier are a ValueError, and a list with no valid
  destination leaves the tier as it is.
  """
  if _check_slots_and_skip_empty(dst_slots, host_tier.shape[0]):
    return host_tier
  return _put_fn(host_tier.sharding)(host_tier, blocks, dst_slots)


@functools.partial(jax.jit, static_argnames=("kind",))
def fetch_to_device(
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 slots to read (clamped into the tier)
    *,
    kind: str = DEVICE_MEMORY_KIND,
) -> jax.Array:  # [n, num_layers, 2, kv_heads, P, D] on the device
  """Hot-tier blocks moved to the device, block-major, one transfer each
  (the first half of a gather, for callers that want the blocks themselves,
  e.g. to copy them on to the host's numpy memory or to another engine)."""
  return fetch_blocks_core(host_tier, src_slots, kind=kind)
