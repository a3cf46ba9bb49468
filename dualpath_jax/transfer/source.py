"""Where loaded blocks come from: the `BlockSource` protocol and a fake.

The loaders need one call of the cold tier: read blocks by id. `BlockSource`
is that call; `storage.BlockStore` satisfies it as is (its `get`), and
`InMemoryBlockSource` stands in for it in tests and the simulator. A source
whose `get` also takes `out=` (the store) reads into a caller's buffer:
`StagingRows` is that buffer, reused.
A block is `[L, 2, Hkv, P, D]` (every layer of `block_size` tokens); a block
the tier cannot serve (missing, corrupt) is None: a miss to recompute.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from dualpath_jax.disk_io import page_aligned_empty


class BlockSource(Protocol):
  """Reads blocks by id."""

  def get(self, ids: Sequence[bytes]) -> list[np.ndarray | None]:
    """One `[L, 2, Hkv, P, D]` array (or None for a miss) per id, in order."""
    ...


class InMemoryBlockSource:
  """A dict of blocks; counts reads. Thread-safe."""

  def __init__(self, blocks: Mapping[bytes, np.ndarray] | None = None):
    self._blocks = dict(blocks or {})
    self._lock = threading.Lock()
    self.reads = 0
    self.blocks_read = 0

  def put(self, block_id: bytes, block: np.ndarray) -> None:  # [L, 2, Hkv, P, D]
    with self._lock:
      self._blocks[block_id] = np.array(block, copy=True)

  def get(self, ids: Sequence[bytes]) -> list[np.ndarray | None]:
    with self._lock:
      self.reads += 1
      self.blocks_read += len(ids)
      return [self._blocks.get(i) for i in ids]


class StagingRows:
  """One reused host buffer `[n, *row_shape]` for reads into a caller's buffer.

  `storage.BlockStore.get(ids, out=...)` reads into it instead of fresh result
  arrays, whose first touch costs more CPU than the disk read on small hosts
  (docs/storage.md "v4"). It grows to the next power of two (at least
  `min_rows`) and never shrinks. Its rows start on a page where the row
  is whole pages (a page-aligned mapping), so the store's direct chunk
  reader reads into them with O_DIRECT. The rows are overwritten by the next
  read: hand JAX a copy (`pool_io.write_blocks` makes one), since on a CPU
  backend `jax.device_put` of an aligned array aliases its memory. Not
  thread-safe: one per reading thread.
  """

  def __init__(self, row_shape: Sequence[int], dtype: Any, min_rows: int = 16):
    self.row_shape = tuple(int(d) for d in row_shape)
    self.dtype = np.dtype(dtype)
    self.min_rows = min_rows
    self._buffer: np.ndarray | None = None  # [capacity, *row_shape]

  def rows(self, n: int) -> np.ndarray:  # [n, *row_shape]
    """The first `n` rows (their content is whatever the last read left)."""
    if self._buffer is None or self._buffer.shape[0] < n:
      capacity = max(self.min_rows, 1 << max(n - 1, 0).bit_length())
      self._buffer = page_aligned_empty((capacity, *self.row_shape), self.dtype)
    return self._buffer[:n]
