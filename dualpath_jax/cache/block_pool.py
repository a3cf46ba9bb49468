"""The device page pool's bookkeeping: refcounts, cached identities, eviction.

Every block (page) of the KV pool is in exactly one of three states:

  referenced  refcount > 0: some sequence's block table holds it. Never handed
              out again and never evicted while referenced. It may carry an
              identity (a `BlockHash`), in which case other sequences may
              `acquire` it too (prefix sharing).
  cached      refcount == 0 but it still holds the full block named by its
              identity. `lookup` finds it, `acquire` revives it; `allocate`
              may evict it, least recently released first.
  free        refcount == 0 and no identity: plain free space.

`allocate` hands out free blocks first and evicts cached ones only when no
free block is left, so the cache keeps as much as the pool allows. Identities
are unique: `register` keeps the first block that holds an identity, so
`lookup` always has one answer.

This module is pure Python: it moves no bytes. The engine writes the KV, the
`KVCacheManager` decides which blocks a sequence holds.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable

from dualpath_jax.cache.block_hash import BlockHash
from dualpath_jax.utils import is_integer

EvictionCallback = Callable[[int, BlockHash], None]


def _as_int(value: object) -> int | None:
  """`value` as an int if it is a Python or numpy integer (not a bool)."""
  return int(value) if is_integer(value) else None


class OutOfBlocksError(RuntimeError):
  """The pool has too few free or evictable blocks for a request right now."""


@dataclasses.dataclass
class BlockPoolStats:
  """Counters since the pool was made (a snapshot when read from the pool)."""

  allocations: int = 0  # blocks handed out by `allocate`
  evictions: int = 0  # cached blocks whose identity `allocate` dropped
  acquires: int = 0  # `acquire` calls
  revivals: int = 0  # acquires that took a block out of the evictable queue
  releases: int = 0  # blocks passed to `release`
  registrations: int = 0  # identities newly cached by `register`
  duplicate_registrations: int = 0  # `register` calls that kept an older block
  dropped: int = 0  # identities dropped by `release(..., keep_cached=False)`
  lookups: int = 0
  lookup_hits: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def __getitem__(self, name: str) -> int:
    """Mapping-style access, `stats["evictions"]`, for report code."""
    if not isinstance(name, str) or name not in self.as_dict():
      raise KeyError(name)
    return getattr(self, name)


class BlockPool:
  """Refcounted blocks with prefix-cache identities and LRU eviction.

  Args:
    num_blocks: number of blocks (pages) in the pool.
    on_evict: called as `on_evict(block, identity)` just before `allocate`
      hands out a cached block, while its bytes are still intact (a host tier
      may copy them out). Optional.
  """

  def __init__(self, num_blocks: int, *,
               on_evict: EvictionCallback | None = None):
    count = _as_int(num_blocks)
    if count is None or count <= 0:
      raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    num_blocks = count
    self.num_blocks = num_blocks
    self._on_evict = on_evict
    self._ref_counts = [0] * num_blocks
    self._identity_of: dict[int, BlockHash] = {}
    self._block_of: dict[BlockHash, int] = {}
    self._free: collections.deque[int] = collections.deque(range(num_blocks))
    # Cached blocks with refcount 0, least recently released first.
    self._evictable: collections.OrderedDict[int, None] = (
        collections.OrderedDict())
    self._stats = BlockPoolStats()

  # --- queries -------------------------------------------------------------

  @property
  def num_free(self) -> int:
    """Blocks `allocate` can hand out now: free plus evictable cached ones."""
    return len(self._free) + len(self._evictable)

  @property
  def num_cached(self) -> int:
    """Blocks carrying an identity, referenced or not."""
    return len(self._block_of)

  @property
  def num_evictable(self) -> int:
    """Cached blocks with refcount 0."""
    return len(self._evictable)

  @property
  def num_referenced(self) -> int:
    """Blocks with refcount > 0."""
    return self.num_blocks - self.num_free

  @property
  def stats(self) -> BlockPoolStats:
    """A snapshot of the counters."""
    return dataclasses.replace(self._stats)

  def ref_count(self, block: int) -> int:
    """How many holders the block has."""
    return self._ref_counts[self._block_index(block)]

  def identity(self, block: int) -> BlockHash | None:
    """The identity the block holds, or None."""
    return self._identity_of.get(self._block_index(block))

  def eviction_order(self) -> list[int]:
    """Evictable cached blocks, the next one `allocate` would evict first."""
    return list(self._evictable)

  def lookup(self, h: BlockHash) -> int | None:
    """The block holding identity `h` (referenced or not), or None."""
    self._check_identity(h)
    self._stats.lookups += 1
    block = self._block_of.get(h)
    if block is not None:
      self._stats.lookup_hits += 1
    return block

  # --- state changes -------------------------------------------------------

  def allocate(self, n: int) -> list[int]:
    """Hands out `n` blocks, each with refcount 1 and no identity.

    Free blocks go first; then cached blocks are evicted, least recently
    released first, and their identities dropped.

    Raises:
      OutOfBlocksError: fewer than `n` blocks are free or evictable; nothing
        changes in that case.
    """
    count = _as_int(n)
    if count is None or count < 0:
      raise ValueError(f"n must be a non-negative int, got {n!r}")
    n = count
    if n > self.num_free:
      raise OutOfBlocksError(
          f"cannot allocate {n} blocks: only {self.num_free} of "
          f"{self.num_blocks} are free or evictable ({self.num_referenced} are "
          f"held by running sequences)")
    blocks: list[int] = []
    while len(blocks) < n and self._free:
      blocks.append(self._free.popleft())
    try:
      while len(blocks) < n:
        block, _ = self._evictable.popitem(last=False)
        identity = self._identity_of.pop(block)
        del self._block_of[identity]
        self._stats.evictions += 1
        blocks.append(block)
        if self._on_evict is not None:
          self._on_evict(block, identity)
    except BaseException:
      # A callback that raised fails the allocation, not the pool: every
      # block taken goes back as free (the evicted ones without identity).
      self._free.extendleft(reversed(blocks))
      raise
    for block in blocks:
      self._ref_counts[block] = 1
    self._stats.allocations += n
    return blocks

  def acquire(self, block: int) -> None:
    """Adds a holder to a referenced or cached block.

    A cached block with refcount 0 leaves the evictable queue. A plain free
    block cannot be acquired: it holds nothing; use `allocate`.
    """
    block = self._block_index(block)
    if self._ref_counts[block] == 0:
      if block not in self._evictable:
        raise ValueError(
            f"block {block} is free and holds no cached identity; "
            "use allocate() to obtain free blocks")
      del self._evictable[block]
      self._stats.revivals += 1
    self._ref_counts[block] += 1
    self._stats.acquires += 1

  def release(self, blocks: Iterable[int], keep_cached: bool = True) -> None:
    """Drops one holder from each block, in order.

    A block reaching refcount 0 stays cached (and evictable) when it carries
    an identity and `keep_cached`, else it becomes free (its identity
    dropped). Blocks released later are evicted later, so pass a sequence's
    blocks with the one to keep longest last.

    Raises:
      ValueError: a block would drop below refcount 0; nothing changes then.
    """
    blocks = [self._block_index(block) for block in blocks]
    for block, count in collections.Counter(blocks).items():
      if count > self._ref_counts[block]:
        raise ValueError(
            f"cannot release block {block} {count} time(s): its refcount is "
            f"{self._ref_counts[block]}")
    for block in blocks:
      self._ref_counts[block] -= 1
      if self._ref_counts[block] == 0:
        if block in self._identity_of and keep_cached:
          self._evictable[block] = None
        else:
          identity = self._identity_of.pop(block, None)
          if identity is not None:
            del self._block_of[identity]
            self._stats.dropped += 1
          self._free.append(block)
    self._stats.releases += len(blocks)

  def forget_cached(self, identities: Iterable[BlockHash]) -> int:
    """Frees the unreferenced cached blocks holding any of `identities`
    (their bytes become unreachable: no lookup finds them, the next
    allocation overwrites them); returns how many. A block a sequence
    still holds keeps its identity until released (then it is cached as
    any other)."""
    identities = list(identities)
    for h in identities:  # all checked first: a bad one changes nothing
      self._check_identity(h)
    n = 0
    for h in identities:
      block = self._block_of.get(h)
      if block is None or self._ref_counts[block]:
        continue
      del self._evictable[block]
      del self._block_of[h]
      del self._identity_of[block]
      self._free.append(block)
      self._stats.dropped += 1
      n += 1
    return n

  def register(self, block: int, h: BlockHash) -> int:
    """Records that referenced `block` now holds the full block named `h`.

    First writer wins: if another block already holds `h`, that one stays the
    cached copy and `block` stays without identity (it is freed, not cached,
    when released).

    Returns:
      The block that holds `h` after the call (`block` or the older one).
    """
    block = self._block_index(block)
    self._check_identity(h)
    if self._ref_counts[block] == 0:
      raise ValueError(
          f"block {block} is not referenced; only a held block can be "
          "registered")
    current = self._identity_of.get(block)
    if current is not None:
      if current != h:
        raise ValueError(
            f"block {block} already holds identity {current.hex()[:16]}..., "
            f"cannot re-register it as {h.hex()[:16]}...")
      return block
    holder = self._block_of.get(h)
    if holder is not None:
      self._stats.duplicate_registrations += 1
      return holder
    self._identity_of[block] = h
    self._block_of[h] = block
    self._stats.registrations += 1
    return block

  # --- validation ----------------------------------------------------------

  def _block_index(self, block: int) -> int:
    """Validates a block id (Python or numpy int) and returns it as an int."""
    index = _as_int(block)
    if index is None or not 0 <= index < self.num_blocks:
      raise ValueError(
          f"block must be an int in [0, {self.num_blocks}), got {block!r}")
    return index

  @staticmethod
  def _check_identity(h: BlockHash) -> None:
    if not isinstance(h, bytes) or not h:
      raise ValueError(f"a block identity must be non-empty bytes, got {h!r}")
