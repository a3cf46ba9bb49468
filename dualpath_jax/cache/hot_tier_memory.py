"""Where the hot tier's bytes live, and how whole blocks cross to the pool.

`cache.HotTier` decides which block sits in which slot; a block buffer
holds the slots' bytes and moves them. Two kinds:

* `"pageable"` (`PageableBlocks`): a numpy array in ordinary host memory.
  A block goes to the device pool through numpy (`pool_io.write_blocks`:
  one host-to-device copy from pageable memory, which the driver stages
  through a pinned bounce buffer) and comes back the same way. Any backend.
* `"pinned_host"` (`PinnedBlocks`): a JAX array in the `pinned_host` memory
  kind of the pool's device, allocated once (`kernels.block_copy`), so the
  DMA engines read it directly. A block goes to the pool by
  `block_copy.gather_to_device` (on a CUDA GPU one Pallas kernel reading
  every listed page from the pinned tier: 89-90% of a plain pinned -> device
  copy on an H200, docs/benchmarks.md) and comes back from the pool by
  `block_copy.scatter_to_host`, in place, with no numpy copy on the way.
  Blocks that arrive as numpy (read from the cold tier, or from another
  engine's pool) are moved to the device and written in by
  `block_copy.put_to_host`. The pool must sit on the tier's one device.

On the CPU backend the pinned tier runs the same programs, so tests there
cover its code, but it is no way to serve: XLA:CPU updates neither the
donated pool nor the donated tier in place across memory kinds, so a gather
copies the whole pool (0.2 s for a 188 MB pool on the 2-vCPU VM) and a put
the whole tier per block (16 s for 64 blocks into a 188 MB tier). On a GPU
both are in place (scatters into a pinned tier: 44-50 GB/s on the H100 and
H200). A pinned tier on a CPU device logs a warning; use "pageable" there.

Both keep the bytes exact: a block read back is the block written.
Transfers are padded to power-of-two lengths (entries `-1` skip) and cut
into calls of at most `MAX_BLOCKS_PER_CALL` blocks, so a run compiles a
handful of shapes.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np

from dualpath_jax.cache import pool_io
from dualpath_jax.buckets import next_pow2

_log = logging.getLogger(__name__)

MEMORY_KINDS = ("pageable", "pinned_host")
# Blocks per jitted pinned transfer: bounds the unrolled transfer loops
# `block_copy` compiles (one per block) and the number of shapes.
MAX_BLOCKS_PER_CALL = 64


def check_memory_kind(memory: str) -> str:
  if memory not in MEMORY_KINDS:
    raise ValueError(f"unknown hot-tier memory {memory!r}; one of "
                     f"{list(MEMORY_KINDS)}")
  return memory


def pool_device(pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                ) -> jax.Device | None:
  """The one device holding `pool`, or None for a pool over several."""
  devices = pool.sharding.device_set
  return next(iter(devices)) if len(devices) == 1 else None


class PageableBlocks:
  """Slots of whole blocks in one numpy array `[capacity, *block_shape]`."""

  memory = "pageable"

  def __init__(self, capacity: int, block_shape: Sequence[int], dtype):
    from dualpath_jax.transfer.source import StagingRows  # pylint: disable=g-import-not-at-top
    self._data = np.empty((capacity, *block_shape), dtype)
    self._data.fill(0)  # pay the first touch now, not in a turn
    # What `to_pool` copies through: reused, not a fresh array per load.
    self._staging = StagingRows(block_shape, dtype)

  @property
  def nbytes(self) -> int:
    return self._data.nbytes

  def wait(self) -> None:
    """Copies into a numpy buffer are done when their call returns."""

  def read(self, slots: Sequence[int],
           out: np.ndarray  # [>= len(slots), *block_shape]
           ) -> None:
    for k, slot in enumerate(slots):
      out[k] = self._data[slot]

  def write(self, slots: Sequence[int],
            blocks: np.ndarray  # [len(slots), *block_shape]
            ) -> None:
    for k, slot in enumerate(slots):
      self._data[slot] = blocks[k]

  def to_pool(self, pool: jax.Array,  # [L, N, 2, Hkv, P, D] (donated)
              slots: Sequence[int], pages: Sequence[int]
              ) -> jax.Array:  # the pool with the blocks at `pages`
    blocks = self._staging.rows(len(slots))
    self.read(slots, blocks)
    return pool_io.write_blocks(pool, list(pages), blocks)

  def from_pool(self, pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                pages: Sequence[int], slots: Sequence[int],
                host_blocks: np.ndarray | None = None  # [len(pages), ...]
                ) -> None:
    """Pool pages into slots; `host_blocks`, a host copy of those pages the
    caller already holds, saves reading the pool."""
    if host_blocks is None:
      host_blocks = pool_io.read_blocks(pool, list(pages))
    self.write(slots, host_blocks)


def _padded_calls(n: int):
  """(start, stop, padded length) of the calls moving n blocks."""
  for start in range(0, n, MAX_BLOCKS_PER_CALL):
    stop = min(n, start + MAX_BLOCKS_PER_CALL)
    yield start, stop, next_pow2(stop - start)


def _pad(ids: Sequence[int], size: int, fill: int) -> np.ndarray:
  padded = np.full(size, fill, np.int32)
  padded[:len(ids)] = ids
  return padded


class PinnedBlocks:
  """Slots of whole blocks in one `pinned_host` JAX array of `device`,
  moved by `kernels.block_copy`; see the module docstring."""

  memory = "pinned_host"

  def __init__(self, capacity: int, block_shape: Sequence[int], dtype,
               device: jax.Device | None = None):
    from kernels import block_copy  # pylint: disable=g-import-not-at-top
    self._copy = block_copy
    self.device = device or jax.devices()[0]
    if self.device.platform == "cpu":
      _log.warning(
          "a pinned_host hot tier on a CPU device copies the whole pool per "
          "gather and the whole tier per block put (XLA:CPU updates neither "
          "in place): it is for testing the accelerator path; serve with "
          "pageable on CPU")
    self._data = block_copy.allocate_host_tier(
        (capacity, *block_shape), dtype, self.device)
    self._dtype = np.dtype(dtype)

  @property
  def nbytes(self) -> int:
    return self._data.nbytes

  def wait(self) -> None:
    """Returns when the copies into the tier issued so far have landed
    (they are asynchronous: a later read or gather is ordered after them
    anyway; this is for timing)."""
    self._data.block_until_ready()

  def read(self, slots: Sequence[int],
           out: np.ndarray  # [>= len(slots), *block_shape]
           ) -> None:
    slots = list(slots)
    for start, stop, size in _padded_calls(len(slots)):
      moved = self._copy.fetch_to_device(self._data,
                                         _pad(slots[start:stop], size, 0))
      out[start:stop] = np.asarray(moved)[:stop - start]

  def write(self, slots: Sequence[int],
            blocks: np.ndarray  # [len(slots), *block_shape]
            ) -> None:
    slots = list(slots)
    for start, stop, size in _padded_calls(len(slots)):
      chunk = np.zeros((size, *blocks.shape[1:]), self._dtype)
      chunk[:stop - start] = blocks[start:stop]
      self._data = self._copy.put_to_host(
          self._data, jax.device_put(chunk, self.device),
          _pad(slots[start:stop], size, -1))

  def to_pool(self, pool: jax.Array,  # [L, N, 2, Hkv, P, D] (donated)
              slots: Sequence[int], pages: Sequence[int]
              ) -> jax.Array:  # the pool with the blocks at `pages`
    self._check_pool(pool)
    slots, pages = list(slots), list(pages)
    for start, stop, size in _padded_calls(len(slots)):
      pool = self._copy.gather_to_device(
          pool, self._data, _pad(slots[start:stop], size, 0),
          _pad(pages[start:stop], size, -1))
    return pool

  def from_pool(self, pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                pages: Sequence[int], slots: Sequence[int],
                host_blocks: np.ndarray | None = None  # [len(pages), ...]
                ) -> None:
    """Pool pages into slots, device -> pinned host in place. A pool on
    another device (a decode engine's, putting into a prefill engine's
    tier) goes through the host: `host_blocks` if given, else a read."""
    if pool_device(pool) != self.device:
      if host_blocks is None:
        host_blocks = pool_io.read_blocks(pool, list(pages))
      self.write(slots, host_blocks)
      return
    pages, slots = list(pages), list(slots)
    for start, stop, size in _padded_calls(len(slots)):
      self._data = self._copy.scatter_to_host(
          self._data, pool, _pad(pages[start:stop], size, 0),
          _pad(slots[start:stop], size, -1))

  def _check_pool(self, pool: jax.Array) -> None:
    if pool_device(pool) != self.device:
      raise ValueError(
          f"a pinned_host hot tier of {self.device} moves blocks into a pool "
          f"on that device only; this pool is on "
          f"{sorted(d.id for d in pool.sharding.device_set)}")


def make_blocks(memory: str, capacity: int, block_shape: Sequence[int], dtype,
                device: jax.Device | None = None):
  """A `PageableBlocks` or `PinnedBlocks` (`memory`) of `capacity` slots."""
  if check_memory_kind(memory) == "pageable":
    return PageableBlocks(capacity, block_shape, dtype)
  return PinnedBlocks(capacity, block_shape, dtype, device)
