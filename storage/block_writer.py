"""The cold tier's write path: a put's blocks made durable, then visible.

`BlockWriter.put` runs one `BlockStore.put_async` on a write-pool thread:

  1. retries removals that failed before, unless they are backing off
     (`storage.removals`): their slots may be needed here;
  2. reserves slots for the ids in one index transaction (`storage.index`:
     PENDING rows, invisible to readers; the least recent blocks evicted for
     room); the other ids are "present", "in_flight", "deferred" (by the
     admission rule) or "no_space" (every slot held by a write in flight);
  3. per batch of at most `max_batch_blocks` blocks, encodes them (sealed or
     int8 into the thread's reused scratch), writes their chunks and returns
     only once they are durable (`storage.chunk_writer` on a local `file`
     kvstore, else one TensorStore transaction), then commits their rows
     (READY). A batch whose write fails has its rows and bytes discarded;
     a block whose session or tenant was deleted while it was written is
     discarded at its commit and reported "deleted".

Crash safety is the index's order, bytes durable before the commit: a
process that dies in between leaves PENDING rows that the next open
removes (`BlockStore.recover`). Rows not yet committed when a put is cut
short otherwise (an interrupt) are released at once, never left pending
for the process's life.

Why a class of its own: the write path has its own thread state (the
encode scratch) and its own outcome, a `PutResult` of per-block statuses,
and it needs from the store only the index, the slot array or the chunk
writer and slot directories, and `Removals`.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from typing import Sequence

import numpy as np
import tensorstore as ts

from storage import chunk_writer as chunk_writer_lib
from storage import encryption
from storage import index as index_lib
from storage import layout
from storage.codecs import BlockCodec
from storage.removals import Removals
from storage.stats import StoreStats

_log = logging.getLogger(__name__)

# A put's statuses besides the index's (`storage.index`: write, present,
# in_flight, deferred, no_space).
DROPPED = "dropped"
FAILED = "failed"
DELETED = "deleted"  # a delete of its session or tenant came while it was written


@dataclasses.dataclass(frozen=True)
class PutResult:
  """Per-block outcome of a put, in the order of the ids given."""

  statuses: list[str]

  @property
  def written(self) -> int:
    return sum(s == index_lib.WRITE for s in self.statuses)

  @property
  def stored(self) -> list[bool]:
    """True where the block is now in the store (written or already present)."""
    return [s in (index_lib.WRITE, index_lib.PRESENT) for s in self.statuses]


class BlockWriter:
  """Stores a put's blocks in a `BlockStore` (see module docstring)."""

  def __init__(
      self,
      root: str,  # the store's root, for log messages
      max_batch_blocks: int,  # blocks written and committed at a time
      codec: BlockCodec | encryption.SealedCodec,  # the store's
      sealed: bool,
      index: index_lib.BlockIndex,
      array: ts.TensorStore,  # the slot array [num_slots, chunk_elems]
      slot_dirs: layout.SlotDirectories | None,
      chunk_writer: chunk_writer_lib.DirectChunkWriter | None,
      removals: Removals,
      stats: StoreStats,
  ):
    self._root = root
    self._max_batch_blocks = max_batch_blocks
    self._codec = codec
    self._sealed = sealed
    self._index = index
    self._array = array
    self._slot_dirs = slot_dirs
    self._chunk_writer = chunk_writer
    self._removals = removals
    self._stats = stats
    self._local = threading.local()  # a write thread's scratch (`_scratch`)

  def put(
      self,
      ids: list[bytes],
      blocks: np.ndarray,  # [len(ids), L, 2, Hkv, P, D] cache dtype
      tenant: str,
      session: str,
      admitted: bool,  # skip the admission rule (`BlockStore.put_async`)
  ) -> PutResult:
    """Stores `blocks` under `ids` (see module docstring); their statuses."""
    start = time.perf_counter()
    self._removals.retry(backoff=True)  # their slots may be needed here
    try:
      reservation = self._index.reserve(ids, tenant, session, admitted=admitted)
    except sqlite3.OperationalError as err:  # e.g. the disk is full
      _log.error("cold tier %s: cannot reserve %d blocks: %s", self._root,
                 len(ids), err)
      self._stats.add(failed_writes=len(ids))
      return PutResult([FAILED] * len(ids))
    statuses = list(reservation.statuses)
    rows = [i for i, s in enumerate(statuses) if s == index_lib.WRITE]
    step = self._max_batch_blocks
    handled = 0  # reserved rows committed or released so far
    try:
      for lo in range(0, len(rows), step):
        batch_rows = rows[lo:lo + step]
        refs = reservation.to_write[lo:lo + step]
        contiguous = batch_rows[-1] - batch_rows[0] == len(batch_rows) - 1
        batch = (blocks[batch_rows[0]:batch_rows[-1] + 1] if contiguous  # a view, no copy
                 else blocks[batch_rows])
        try:
          self.write_chunks(refs, batch)
          committed, doomed = self._index.commit(refs)
        except Exception as err:  # pylint: disable=broad-except
          _log.error("cold tier write of %d blocks failed: %s", len(refs), err)
          self._removals.discard(refs)
          handled = lo + len(refs)
          for i in batch_rows:
            statuses[i] = FAILED
          self._stats.add(failed_writes=len(refs))
          continue
        handled = lo + len(refs)
        if doomed:
          self._removals.discard(doomed)
        lost = set(refs) - set(committed)  # doomed, or taken by a recovery
        for i, r in zip(batch_rows, refs):
          if r in lost:
            statuses[i] = DELETED if r in doomed else FAILED
    except BaseException:
      # What the handler above does not take (an interrupt, a failure to
      # discard a failed batch): the rows not yet committed are released,
      # never left pending for the process's life.
      self._index.release(reservation.to_write[handled:])
      raise
    written = sum(s == index_lib.WRITE for s in statuses)
    self._stats.add(
        written_blocks=written, written_bytes=written * self._codec.encoded_block_bytes,
        present_blocks=statuses.count(index_lib.PRESENT),
        in_flight_blocks=statuses.count(index_lib.IN_FLIGHT),
        deferred_blocks=statuses.count(index_lib.DEFERRED),
        no_space_blocks=statuses.count(index_lib.NO_SPACE),
        evicted_blocks=reservation.evicted, write_seconds=time.perf_counter() - start)
    return PutResult(statuses)

  def write_chunks(
      self,
      refs: Sequence[index_lib.SlotRef],
      blocks: np.ndarray,  # [n, L, 2, Hkv, P, D] cache dtype
  ) -> None:
    """Writes chunks and returns once they are durable (the direct writer's
    batch, or one TensorStore transaction)."""
    if self._sealed:
      encoded = self._codec.encode(blocks, [r.block_id for r in refs],
                                  self._scratch(len(refs)))
    elif self._codec.identity:
      encoded = self._codec.encode(blocks)
    else:  # int8: into this thread's scratch, not a fresh array
      encoded = self._codec.encode(blocks, self._scratch(len(refs)).view(
          self._codec.stored_dtype).reshape(len(refs), *self._codec.stored_shape))
    slots = np.array([r.slot for r in refs], np.int64)
    if self._slot_dirs is not None:
      self._slot_dirs.ensure(slots.tolist())
    encoded = encoded.reshape(len(refs), -1)  # [n, chunk_elems]: a view
    if self._chunk_writer is not None:
      chunk_bytes = np.ascontiguousarray(encoded).view(np.uint8)  # [n, chunk_bytes]
      self._chunk_writer.write(slots.tolist(), chunk_bytes)
      return
    txn = ts.Transaction()
    self._array.with_transaction(txn)[slots].write(encoded).result()
    txn.commit_async().result()

  def _scratch(self, n: int) -> np.ndarray:  # [n, encoded_block_bytes] uint8
    """This write thread's reused buffer of `n` encoded chunks (grown as
    needed: a put's batch, at most `max_batch_blocks`)."""
    buf = getattr(self._local, "scratch", None)
    if buf is None or len(buf) < n:
      buf = np.empty((n, self._codec.encoded_block_bytes), np.uint8)
      self._local.scratch = buf
    return buf[:n]
