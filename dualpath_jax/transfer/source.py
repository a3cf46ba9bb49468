"""Where loaded blocks come from: the `BlockSource` protocol and a fake.

The loaders need one call of the cold tier: read blocks by id. `BlockSource`
is that call; `storage.BlockStore` satisfies it as is (its `get`), and
`InMemoryBlockSource` stands in for it in tests and the simulator.
A block is `[L, 2, Hkv, P, D]` (every layer of `block_size` tokens); a block
the tier cannot serve (missing, corrupt) is None: a miss to recompute.
"""

from __future__ import annotations

import threading
from typing import Mapping, Protocol, Sequence

import numpy as np


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
