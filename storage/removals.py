"""The cold tier's removals: a block's bytes deleted, then its row freed.

A block leaves the store in two steps (`storage.index`): its row is hidden
first (DELETING; a write's own rows are still PENDING), so that no reader is
served it, then its chunk is deleted from the kvstore and only then the row
and its slot are freed. `Removals` is that second step for `BlockStore`:

* `delete` and `remove` take the rows a delete or a recovery hid. When their
  bytes cannot be removed (the kvstore refuses, the index cannot write),
  the rows stay hidden, holding their slots, and are queued; `retry` (a
  put's, with a backoff; a delete's; `close`'s) removes them later. What is
  still queued when the process ends is the next open's (`BlockStore.recover`).
* `discard` takes rows this process holds that no reader sees (a write that
  failed or that a delete doomed, a bad chunk a reader hid): their slots are
  freed even when the bytes stay, since no READY row points at them.

Why a class of its own: the queue of failed removals, its lock and the
retry backoff are one piece of state that deletes, puts, reads (bad chunks),
recovery and `close` share.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Sequence

import tensorstore as ts

from storage import index as index_lib
from storage import layout
from storage.stats import StoreStats

_log = logging.getLogger(__name__)
# A put retries removals that keep failing at most this often, the wait
# doubling from the first to the second (`Removals.retry`).
_REMOVAL_BACKOFF_S = 0.5
_REMOVAL_BACKOFF_MAX_S = 30.0
_monotonic = time.monotonic  # the backoff's clock (tests set their own)


class Removals:
  """Deletes blocks' chunks and frees their rows; queues and retries the
  removals that fail (see module docstring)."""

  def __init__(
      self,
      root: str,  # the store's root, for log and error messages
      index: index_lib.BlockIndex,
      kvstore: ts.KvStore,  # the slot array's
      slot_dirs: layout.SlotDirectories | None,
      stats: StoreStats,
  ):
    self._root = root
    self._index = index
    self._kvstore = kvstore
    self._slot_dirs = slot_dirs
    self._stats = stats
    self._lock = threading.Lock()
    # Hidden rows whose removal failed, with their counter (`remove`), and
    # when a put may next retry them (`retry`).
    self._unremoved: list[tuple[list[index_lib.SlotRef], str]] = []
    self._backoff_s = 0.0
    self._next_retry = 0.0

  def delete(self, refs: list[index_lib.SlotRef]) -> int:
    """Removes the bytes of blocks a delete hid, then frees their rows;
    returns how many.

    When that fails (the kvstore refuses the removal, the index cannot
    write), the blocks stay deleted for readers (hidden: `get` misses them,
    `contains` is False) and their rows stay DELETING, holding the slots
    whose bytes are still to be removed. They are queued: the next put or
    delete of this store removes them (or its `close`; rows a process left
    behind when it ended are the next open's, `recover`), and OSError says
    so. They used to be left until the process ended: their slots were lost
    to puts (all "no_space" once the rest was full), a put of the same ids
    said "in_flight" and stored nothing, and a second delete found nothing
    left to do and returned 0 while the bytes stayed on disk.
    """
    self.retry()
    try:
      self.remove(refs, "deleted_blocks")
    except Exception as err:  # pylint: disable=broad-except
      raise OSError(
          f"cold tier {self._root}: removing {len(refs)} deleted blocks "
          f"failed ({err}); they are no longer served, and the next put or "
          "delete of the store finishes their removal") from err
    return len(refs)

  def remove(self, refs: Sequence[index_lib.SlotRef], counter: str) -> None:
    """Deletes the bytes of rows this process hid (DELETING), then frees the
    rows, and counts them in `counter` ("deleted_blocks" or
    "recovered_blocks"). On failure the rows stay hidden and are queued for
    `retry`, and the error is raised."""
    if not refs:
      return
    try:
      self.delete_bytes(refs)
      self._index.release(refs)
    except BaseException:
      with self._lock:
        self._unremoved.append((list(refs), counter))
      raise
    self._stats.add(**{counter: len(refs)})

  def retry(self, backoff: bool = False) -> None:
    """Removes the blocks whose removal failed before (`remove`); a new
    failure is logged and leaves them queued. Each queued block is taken by
    one caller: two removing one slot at once could delete the chunk of the
    next block written there.

    With `backoff` (a put's call), nothing is tried before the backoff
    since the last failed retry has passed: it doubles from
    `_REMOVAL_BACKOFF_S` up to `_REMOVAL_BACKOFF_MAX_S` while retries keep
    failing, so a store whose removals are down does not spend a failing
    transaction and a warning on every put. Deletes and `close` always try.
    """
    now = _monotonic()
    with self._lock:
      if not self._unremoved or (backoff and now < self._next_retry):
        return
      queued, self._unremoved = self._unremoved, []
    failed = False
    for refs, counter in queued:
      try:
        self.remove(refs, counter)
      except Exception as err:  # pylint: disable=broad-except
        failed = True
        _log.warning("cold tier %s: removing %d deleted blocks failed again "
                     "(%s); retried later", self._root, len(refs), err)
      else:
        _log.info("cold tier %s: removed %d deleted blocks whose removal "
                  "had failed", self._root, len(refs))
    with self._lock:
      if failed:
        self._backoff_s = min(_REMOVAL_BACKOFF_MAX_S,
                              max(_REMOVAL_BACKOFF_S, 2 * self._backoff_s))
        self._next_retry = _monotonic() + self._backoff_s
      else:
        self._backoff_s = 0.0
        self._next_retry = 0.0

  def discard(self, refs: Sequence[index_lib.SlotRef]) -> None:
    """Deletes the bytes of rows this process holds (reserved by its writer,
    or hidden as bad by its reader) and frees the rows."""
    if self._slot_dirs is not None:
      self._slot_dirs.forget(r.slot for r in refs)
    try:
      self.delete_bytes(refs)
    except Exception as err:  # pylint: disable=broad-except
      # Safe to free the slots anyway: no READY row points at them, and
      # their next write replaces whatever bytes are left.
      _log.error("cold tier: removing the bytes of %d unstored blocks failed: %s",
                 len(refs), err)
    try:
      self._index.release(refs)
    except sqlite3.OperationalError as err:
      # They stay reserved (in flight) until this process ends; the next
      # open recovers them as a dead writer's.
      _log.error("cold tier: freeing %d unstored blocks failed: %s", len(refs), err)

  def delete_bytes(self, refs: Sequence[index_lib.SlotRef]) -> None:
    """Deletes the chunks of `refs` (absent chunks are fine)."""
    if not refs:
      return
    txn = ts.Transaction()
    kv = self._kvstore.with_transaction(txn)
    for ref in refs:
      key = layout.chunk_key(ref.slot)
      kv.delete_range(ts.KvStore.KeyRange(key, key + b"\x00")).result()
    txn.commit_async().result()
