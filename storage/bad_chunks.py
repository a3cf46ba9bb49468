"""What a failed chunk read of the cold tier means, and what the store does about it.

A read serves only bytes it verified (CRC32C; the tag of a sealed chunk), so
a chunk that fails to read is a miss: the engine recomputes the block. What
happens to the stored block depends on why the read failed:

* `read_failure` tells "missing" and "corrupt" (the chunk is gone or its
  bytes are bad: proof the block is lost) from "unreadable" (the OS or the
  kvstore failed, which says nothing of the bytes). A pure function, used
  on TensorStore's errors; `storage.chunk_reader` gives the same verdicts.
* `BadChunks.drop` counts each failure in the store's stats, logs it once,
  and removes the lost blocks (index entry hidden, bytes discarded by
  `storage.removals`) so that a re-put can store them again. Unreadable
  blocks stay stored for a later read; a failure on a block evicted or
  rewritten while it was read is a race, not damage.

Why a module of its own: the read path only reports failures; deciding
which of them lose a block, and acting on it, is one policy, easier to
check apart from the reads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Sequence

from storage import index as index_lib
from storage.removals import Removals
from storage.stats import StoreStats

_log = logging.getLogger(__name__)

# A chunk that failed to read: (its block's ref, `read_failure`'s reason,
# the error's text).
ChunkFailure = tuple[index_lib.SlotRef, str, str]

# TensorStore's marks of an error the OS returned (errno), new and old.
_OS_ERROR_MARKS = ("os_error_code=", "[OS error")
# Status codes of a chunk whose bytes were read and refused: a failed
# CRC32C ("DATA_LOSS: ... Digest mismatch"), a torn or undecodable payload
# ("FAILED_PRECONDITION: ... Not enough data", a zstd error). Nothing else:
# a remote kvstore's INVALID_ARGUMENT (HTTP 400, a bad request or config)
# would have removed every block it was asked for.
_DAMAGE_CODES = ("DATA_LOSS", "FAILED_PRECONDITION")


def read_failure(err: BaseException) -> str:
  """Why a chunk read failed: "missing" (no chunk), "corrupt" (its bytes
  were read and are bad) or "unreadable" (anything else).

  Only "missing" and "corrupt" prove the stored block is gone or damaged,
  and only they remove it. An error from the OS (too many open files, an
  I/O error, a refused permission: TensorStore adds the errno to the
  message) or from a remote kvstore (unavailable, a deadline) says nothing
  of the bytes: removing the block then lost a good one for a transient
  failure. A block that stays unreadable is not removed but ages out: a
  failed read does not make it recent (`BlockIndex.touch`).
  """
  text = str(err)
  if any(mark in text for mark in _OS_ERROR_MARKS):
    return "unreadable"
  code = text.split(":", 1)[0].strip()
  if code == "NOT_FOUND":
    return "missing"
  return "corrupt" if code in _DAMAGE_CODES else "unreadable"


class BadChunks:
  """Counts, logs and removes the blocks whose chunk failed to read (see
  module docstring)."""

  def __init__(
      self,
      root: str,  # the store's root, for log messages
      index: index_lib.BlockIndex,
      removals: Removals,
      stats: StoreStats,
  ):
    self._root = root
    self._index = index
    self._removals = removals
    self._stats = stats
    self._logged: set[tuple[bytes, str]] = set()
    self._log_lock = threading.Lock()

  def drop(self, bad: Sequence[ChunkFailure]) -> None:
    """Counts, logs and removes blocks whose chunk failed to read.

    Only a missing or corrupt chunk is removed (`read_failure`). One that
    could not be read (the OS or the kvstore failed: too many open files,
    an I/O error) is a miss counted as `miss_unreadable` and stays stored,
    listed by `contains`, for a later read to serve: it used to be removed
    as corrupt, so a transient failure lost good blocks.

    A failure on a block that is no longer current (evicted while it was
    read, its slot being rewritten in place) is a race, not damage: counted
    as `miss_raced`, nothing logged or removed.

    When the index cannot write (a full disk), the bad blocks are still
    misses, counted: which are current is checked read only and they stay
    listed, for a later read to remove. This used to raise out of the whole
    read, so the batch's good blocks were lost with the bad one and nothing
    was counted. A failed removal of the bytes is logged, as in
    `Removals.discard`.
    """
    unreadable = [(ref, err) for ref, reason, err in bad if reason == "unreadable"]
    if unreadable:
      self._stats.add(miss_unreadable=len(unreadable))
      for ref, err in unreadable:
        self._log_once((ref.block_id, "unreadable"), f"cold tier block "
                       f"{ref.block_id.hex()[:16]} at slot {ref.slot} could not "
                       f"be read; a miss, kept stored: {err}")
      bad = [failure for failure in bad if failure[1] != "unreadable"]
      if not bad:
        return
    try:
      hidden = self._index.mark_deleting([ref for ref, _, _ in bad])
      current = {(r.block_id, r.gen) for r in hidden}
    except sqlite3.OperationalError as err:  # e.g. the disk is full
      _log.warning("cold tier %s: cannot remove %d bad blocks from the index "
                   "(%s); they are misses until a later read removes them",
                   self._root, len(bad), err)
      hidden = []
      now = self._index.lookup([ref.block_id for ref, _, _ in bad])
      current = {(r.block_id, r.gen) for r in now if r is not None}
    damaged = [(ref, reason, err) for ref, reason, err in bad
               if (ref.block_id, ref.gen) in current]
    self._stats.add(miss_missing=sum(r == "missing" for _, r, _ in damaged),
                    miss_corrupt=sum(r == "corrupt" for _, r, _ in damaged),
                    miss_raced=len(bad) - len(damaged))
    for ref, reason, err in damaged:
      self._log_once((ref.block_id, reason), f"cold tier block "
                     f"{ref.block_id.hex()[:16]} at slot {ref.slot} is {reason}; "
                     f"treated as a miss: {err}")
    if hidden:
      self._removals.discard(hidden)

  def _log_once(self, key: tuple[bytes, str], message: str) -> None:
    """Logs `message` the first time `key` (a block id and what happened
    to it) comes."""
    with self._log_lock:
      if key in self._logged:
        return
      if len(self._logged) > 100_000:
        self._logged.clear()
      self._logged.add(key)
    _log.warning(message)
