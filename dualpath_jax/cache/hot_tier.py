"""The hot tier: whole KV blocks in host DRAM, by identity, scored for eviction.

Between the device pool (HBM, small, what attention reads) and the cold tier
(SSD, large, durable) sits host memory: tens to hundreds of GB per host, read
back into HBM at PCIe speed instead of at the storage NIC's. The engine's
tier connector (`engine.cold_tier.ColdTierConnector`) puts every full block
a finished turn holds here (the same host copy the cold tier's write-back
makes) and, when a later turn's prefix is no longer in the pool, reads the
leading blocks it finds here before it asks the cold tier for the rest.

Blocks live in one buffer `[capacity, *block_shape]`, allocated and touched
once when the tier is built (a first touch costs more than the copy): a
numpy array (`memory="pageable"`), or a JAX array in `pinned_host` memory
that `kernels.block_copy` gathers into the device pool and scatters back
from it without a numpy copy (`memory="pinned_host"`; `hot_tier_memory.py`
says what each costs). A block is only ever copied in whole and read back
in whole: a block's bytes are exactly what its identity names, as in every
tier (the invariant of docs/DESIGN).

Eviction keeps what a future turn is likeliest to read, by three signals:

* **reuse** (segmented LRU): a block put or read again (a session's next
  turn, another session of the tenant sharing its system prompt) moves to
  the protected segment, at most `protected_fraction` of the tier; blocks
  seen once sit in probation and are evicted first;
* **recency**: within a segment, least recently used first;
* **position in its chain**: the blocks of one call are ordered deepest
  first, so of a turn's blocks the deepest go first. A prefix is usable
  only up to its first missing block, so losing block `i` of a chain makes
  every later block useless; keeping the shallow ones keeps the prefix.
  A chain extended in two calls (the P/D cluster puts a prompt, then the
  blocks with generated tokens) keeps its head: the second `put` names
  the head in `keep`, and `refresh` then orders the whole chain.

Beyond these, a caller that knows who reads next can **pin** blocks
(`set_pins`): no put evicts a pinned block. The prefetcher (the P/D
cluster's, or one engine's) pins the prefixes of the turns and sessions it
predicts next, so the blocks it read for them are not pushed out by other
turns' puts before they are used.

Not thread-safe: one engine thread calls it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Collection, Sequence

import numpy as np

if TYPE_CHECKING:  # JAX loads with the tier's memory, not with this module
  import jax


@dataclasses.dataclass
class HotTierStats:
  """Counters of one hot tier (blocks unless named otherwise)."""

  lookups: int = 0  # ids asked about by `read_run`
  hits: int = 0  # of them, read back
  puts: int = 0  # blocks copied in
  refreshes: int = 0  # reads, puts and touches of blocks already held
  promotions: int = 0  # moved to the protected segment
  evictions: int = 0
  dropped: int = 0  # blocks of one put past the capacity (deepest first)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class HotTier:
  """Host-DRAM block cache; see the module docstring."""

  def __init__(self, capacity_blocks: int,
               block_shape: Sequence[int],  # [L, 2, Hkv, P, D]
               dtype, *, protected_fraction: float = 0.8,
               memory: str = "pageable", device: jax.Device | None = None):
    """`memory`: "pageable" or "pinned_host" (in `device`'s pinned host
    memory, default the first device; pools it moves blocks into must sit
    on that device)."""
    if (isinstance(capacity_blocks, bool) or
        not isinstance(capacity_blocks, int) or capacity_blocks < 1):
      raise ValueError(f"a hot tier holds at least one block, got "
                       f"capacity_blocks={capacity_blocks!r}")
    if not (isinstance(protected_fraction, (int, float))
            and 0 <= protected_fraction < 1):
      raise ValueError("protected_fraction must be in [0, 1), got "
                       f"{protected_fraction!r}")
    self.capacity = capacity_blocks
    self.block_shape = tuple(int(d) for d in block_shape)
    self.dtype = np.dtype(dtype)
    self.protected_cap = int(capacity_blocks * protected_fraction)
    from dualpath_jax.cache import hot_tier_memory  # loads JAX
    self._blocks = hot_tier_memory.make_blocks(
        memory, capacity_blocks, self.block_shape, self.dtype, device)
    # id -> slot; OrderedDicts run from least to most recently used.
    self._probation: collections.OrderedDict[bytes, int] = (
        collections.OrderedDict())
    self._protected: collections.OrderedDict[bytes, int] = (
        collections.OrderedDict())
    self._free = list(range(capacity_blocks - 1, -1, -1))
    # id -> which put placed the held copy (a serial number): a block
    # evicted and put again is another copy (`generation`).
    self._generations: dict[bytes, int] = {}
    self._copies_placed = 0
    self._pins_by_owner: dict[str, frozenset[bytes]] = {}
    self._pinned: frozenset[bytes] = frozenset()  # the owners' union
    self.stats = HotTierStats()

  @classmethod
  def for_bytes(cls, capacity_bytes: int, block_shape: Sequence[int], dtype,
                **kw) -> "HotTier":
    """A tier of as many whole blocks as `capacity_bytes` holds."""
    block_bytes = math.prod(block_shape) * np.dtype(dtype).itemsize
    blocks = int(capacity_bytes) // block_bytes
    if blocks < 1:
      raise ValueError(f"a hot tier of {capacity_bytes} bytes holds no block "
                       f"of {block_bytes} bytes")
    return cls(blocks, block_shape, dtype, **kw)

  # ------------------------------------------------------------ queries
  @property
  def nbytes(self) -> int:
    return self._blocks.nbytes

  def wait(self) -> None:
    """Returns when every copy into the tier issued so far has landed (a
    pinned tier's are asynchronous; for timing: reads are ordered after
    them without it)."""
    self._blocks.wait()

  @property
  def memory(self) -> str:
    """Where the bytes live: "pageable" or "pinned_host"."""
    return self._blocks.memory

  def __len__(self) -> int:
    return len(self._probation) + len(self._protected)

  def __contains__(self, block_id: bytes) -> bool:
    return block_id in self._probation or block_id in self._protected

  def contains(self, ids: Sequence[bytes]) -> list[bool]:
    """Whether each id is held (no effect on eviction)."""
    return [i in self for i in ids]

  def room(self, keep: Collection[bytes] = ()) -> int:
    """Blocks a `put` could take now without evicting any of `keep`: the
    free slots plus the held blocks neither in `keep` nor pinned."""
    return (len(self._free) + len(self) -
            sum(i in self for i in set(keep) | self._pinned))

  def set_pins(self, ids: Collection[bytes], owner: str = "default") -> None:
    """Makes `ids` the blocks `owner` pins (replacing that owner's previous
    pins; others' stay): while held, no put evicts a block any owner pins.
    Ids not held are remembered, so a block put later is pinned too. Keep
    pins well under the capacity: a put past the unpinned room stores less
    (`stats.dropped`).

    Owners let two callers pin at once without undoing each other: one
    engine's load pins the hot run in front of its cold read ("load")
    while its prefetcher pins the prefixes it predicts next ("prefetch").
    """
    if ids:
      self._pins_by_owner[owner] = frozenset(ids)
    else:
      self._pins_by_owner.pop(owner, None)
    self._pinned = frozenset().union(*self._pins_by_owner.values())

  def generation(self, block_id: bytes) -> int | None:
    """Which copy of `block_id` the tier holds: a number no other copy of
    any block had, so a caller that noted it at a put can tell whether the
    block was evicted (or discarded) and put again since. None if not
    held."""
    return self._generations.get(block_id)

  @property
  def pinned(self) -> frozenset[bytes]:
    """The blocks some owner pins (`set_pins`)."""
    return self._pinned

  def leading_run(self, ids: Sequence[bytes]) -> int:
    """How many of `ids`, from the first, are held."""
    for n, block_id in enumerate(ids):
      if block_id not in self:
        return n
    return len(ids)

  # ------------------------------------------------------------ reads
  def read_run(self, ids: Sequence[bytes],
               out: np.ndarray  # [>= len(ids), *block_shape]
               ) -> int:
    """Copies the leading run of `ids` that is held into `out[:n]`; returns n.

    `ids` are consecutive blocks of one chain, shallowest first. Every block
    read counts as reused (promoted).
    """
    self._check_out(out, len(ids))
    self.stats.lookups += len(ids)
    n = self.leading_run(ids)
    self._blocks.read([self._slot(i) for i in ids[:n]], out)
    self._reuse(ids[:n])
    self.stats.hits += n
    return n

  def read_run_to_pool(self, ids: Sequence[bytes],
                       pool: jax.Array,  # [L, N, 2, Hkv, P, D] (donated)
                       pages: Sequence[int]  # [>= len(ids)] pool pages
                       ) -> tuple[jax.Array, int]:
    """Copies the leading run of `ids` that is held into pool pages
    `pages[:n]` (straight from the tier's memory: no numpy copy for a
    pinned tier); returns (the pool, n). Counts as `read_run` does."""
    if len(pages) < len(ids):
      raise ValueError(f"{len(ids)} blocks need as many pool pages; got "
                       f"{len(pages)}")
    self.stats.lookups += len(ids)
    n = self.leading_run(ids)
    if n:
      pool = self._blocks.to_pool(pool, [self._slot(i) for i in ids[:n]],
                                  pages[:n])
    self._reuse(ids[:n])
    self.stats.hits += n
    return pool, n

  # ------------------------------------------------------------ writes
  def put(self, ids: Sequence[bytes],
          blocks: np.ndarray,  # [len(ids), *block_shape]
          *, keep: Sequence[bytes] = ()) -> int:
    """Holds `blocks` under `ids` (one chain's blocks, shallowest first).

    An id already held is not copied again; it counts as reused. Room is
    made by evicting blocks of other calls (see the module docstring), never
    this call's own, those in `keep` (e.g. the shallower blocks of the
    chain `ids` extends) nor pinned ones; new blocks past that room are not
    stored, the deepest first (`stats.dropped`). Returns how many were
    copied in.
    """
    if blocks.shape != (len(ids), *self.block_shape):
      raise ValueError(f"blocks {blocks.shape} do not match {len(ids)} ids of "
                       f"{self.block_shape}")
    if blocks.dtype != self.dtype:
      raise ValueError(f"blocks are {blocks.dtype}, the tier holds "
                       f"{self.dtype}")
    placed = self._place(ids, keep)
    if placed:
      with self._undone_on_error(ids, placed):
        self._blocks.write([slot for _, slot in placed],
                           blocks[[k for k, _ in placed]])
    return len(placed)

  def put_from_pool(self, ids: Sequence[bytes],
                    pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                    pages: Sequence[int],  # [len(ids)] where the blocks are
                    *, keep: Sequence[bytes] = (),
                    host_blocks: np.ndarray | None = None
                    ) -> int:
    """`put` of the blocks at pool pages `pages` (a pinned tier copies them
    device -> host in place). `host_blocks [len(ids), *block_shape]`: a
    host copy of those pages the caller already made (e.g. for the cold
    tier), which a pageable tier copies instead of reading the pool."""
    if len(pages) != len(ids):
      raise ValueError(f"{len(ids)} ids need as many pool pages; got "
                       f"{len(pages)}")
    if host_blocks is not None and (
        host_blocks.shape != (len(ids), *self.block_shape)):
      raise ValueError(f"host_blocks {host_blocks.shape} do not match "
                       f"{len(ids)} ids of {self.block_shape}")
    placed = self._place(ids, keep)
    if placed:
      rows = [k for k, _ in placed]
      with self._undone_on_error(ids, placed):
        self._blocks.from_pool(
            pool, [pages[k] for k in rows], [slot for _, slot in placed],
            None if host_blocks is None else host_blocks[rows])
    return len(placed)

  @contextlib.contextmanager
  def _undone_on_error(self, ids: Sequence[bytes],
                       placed: list[tuple[int, int]]):
    """A copy that raises leaves its blocks out of the tier (their slots
    free), never held under an id with bytes that are not the block's."""
    try:
      yield
    except BaseException:
      self.stats.puts -= len(placed)
      self.discard([ids[k] for k, _ in placed])
      raise

  def _place(self, ids: Sequence[bytes], keep: Sequence[bytes]
             ) -> list[tuple[int, int]]:
    """A put's bookkeeping: (index in `ids`, slot) of each block to copy in,
    slots made by eviction; reuses the held ones (see `put`)."""
    if len(set(ids)) != len(ids):
      raise ValueError("a put names one block id twice")
    mine = set(ids) | set(keep) | self._pinned
    held = [i for i in ids if i in self]
    new = [(k, i) for k, i in enumerate(ids) if i not in self]
    room = len(self._free) + len(self) - sum(i in self for i in mine)
    if len(new) > room:
      self.stats.dropped += len(new) - room
      new = new[:room]
    placed = []
    for k, block_id in reversed(new):  # deepest first: evicted first
      slot = self._free.pop() if self._free else self._evict(mine)
      placed.append((k, slot))
      self._probation[block_id] = slot
      self._copies_placed += 1
      self._generations[block_id] = self._copies_placed
    self.stats.puts += len(new)
    # After the new blocks: a held block this reuse demotes from the
    # protected segment is shallower than them, so it goes out after them.
    self._reuse(held)
    return placed

  def touch(self, ids: Sequence[bytes]) -> None:
    """Marks the held ones among `ids` reused (a turn used them again)."""
    self._reuse([i for i in ids if i in self])

  def refresh(self, ids: Sequence[bytes]) -> None:
    """Makes the held ones among `ids` (one chain, shallowest first) the
    most recent of their segment, deepest first, without promoting any.

    For a chain extended by a `put` of its deeper blocks, by the turn that
    put the shallower ones: refreshed after the put, the shallower blocks
    go out after the new deeper ones, so eviction never cuts a hole at the
    head of the chain, and one turn does not count as a reuse.
    """
    held = [i for i in ids if i in self]
    self.stats.refreshes += len(held)
    for block_id in reversed(held):
      segment = (self._probation if block_id in self._probation
                 else self._protected)
      segment.move_to_end(block_id)

  def discard(self, ids: Sequence[bytes]) -> int:
    """Drops the held ones among `ids`; returns how many it dropped."""
    n = 0
    for block_id in ids:
      for segment in (self._probation, self._protected):
        slot = segment.pop(block_id, None)
        if slot is not None:
          self._free.append(slot)
          self._generations.pop(block_id, None)
          n += 1
    return n

  # ------------------------------------------------------------ internals
  def _check_out(self, out: np.ndarray, n: int) -> None:
    if (out.shape[0] < n or tuple(out.shape[1:]) != self.block_shape or
        out.dtype != self.dtype):
      raise ValueError(f"out {out.shape} {out.dtype} cannot take {n} blocks "
                       f"of {self.block_shape} {self.dtype}")

  def _slot(self, block_id: bytes) -> int:
    slot = self._probation.get(block_id)
    return self._protected[block_id] if slot is None else slot

  def _reuse(self, ids: Sequence[bytes]) -> None:
    """Moves `ids` (held, shallowest first) to the protected segment's
    most recent end, deepest first, demoting its oldest past the cap."""
    self.stats.refreshes += len(ids)
    for block_id in reversed(ids):
      slot = self._probation.pop(block_id, None)
      if slot is None:
        self._protected.move_to_end(block_id)
        continue
      self.stats.promotions += 1
      self._protected[block_id] = slot
    while len(self._protected) > self.protected_cap:
      block_id, slot = self._protected.popitem(last=False)
      self._probation[block_id] = slot  # back to probation, most recent
    # Ordered deepest-first above, so the shallowest are the most recent.

  def _evict(self, keep: set) -> int:
    """Frees the slot of the least valuable block not in `keep`."""
    for segment in (self._probation, self._protected):
      for block_id in segment:  # least recently used first
        if block_id not in keep:
          slot = segment.pop(block_id)
          self._generations.pop(block_id, None)
          self.stats.evictions += 1
          return slot
    raise AssertionError("no block to evict outside the current call")
