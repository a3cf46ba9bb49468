"""The cold tier's block store: KV blocks in a TensorStore zarr3 array on SSD.

A block is every layer of `block_size` tokens, `[L, 2, Hkv, P, D]` in the cache
dtype (what the engine cuts out of its pool `[L, N, 2, Hkv, P, D]` with
`pool[:, block]`). Its identity is an opaque `bytes` digest (the prefix hash
chain with the tenant salt). The store keeps blocks across process restarts
and crashes and serves only bytes that it verified.

API (numpy in, numpy out; every method is thread-safe):

    store = BlockStore(ColdTierConfig(root=...), model_config, cache_config)
    fut = store.put_async(ids, blocks, tenant="t", session="s")
    fut.result() -> PutResult   # statuses[i] in write/present/in_flight/
                                # deferred/dropped/no_space/failed
    fut = store.get_async(ids)
    fut.result() -> list[np.ndarray | None]  # [L, 2, Hkv, P, D] or None
    store.get(ids, out=buf)                  # the same, read into buf's rows
    store.contains(ids) -> list[bool]
    store.session_block_ids(tenant, session) -> [id] # what it put
    store.delete_session(tenant, session) -> int   # blocks removed
    store.delete_tenant(tenant) -> int
    store.stats() -> dict                          # counters, hit rate, B/s
    store.flush(); store.close()                   # or `with BlockStore(...)`

`put_async` returns at once: the index reservation, encoding, chunk writes
(durable) and the index commit run on the write pool, so write-back after a
turn stays off the critical path. On a local `file` kvstore the chunk files
are written by `storage.chunk_writer` (the same files TensorStore would
write, at a third to a half of its CPU); elsewhere by TensorStore. The
caller hands `blocks` over: it must not change them until the future is
done. A put whose bytes would exceed
`max_pending_write_bytes` is dropped (status "dropped"), never blocks.

`get_async` looks the ids up, reads their chunks in batches (each chunk's
CRC32C verified; on a local `file` kvstore by `storage.chunk_reader`, straight
into the caller's rows, elsewhere one TensorStore read per batch), re-checks
in the index that no block was evicted while it was read, and decodes. A missing,
torn or corrupt block is None: counted in `stats()`, logged once, and its
index entry and bytes removed so that the engine recomputes and re-puts it.
A block evicted or rewritten while it was read (raced) is None too, counted
as `miss_raced`, and nothing is removed: its slot is another block's now.
A block whose read failed without proving it bad (an OS error such as too
many open files, an unavailable kvstore) is None too, but stays stored for a
later read (`storage.bad_chunks`).
With `out=` (a `[n, L, 2, Hkv, P, D]` buffer the caller reuses, e.g. a staging
buffer), the chunks are read straight into it (raw and zstd codecs)
and the result holds views of its rows: no fresh result arrays, whose first
touch is a large part of a read's CPU cost (page faults, zeroing;
docs/storage.md).

This module opens the store (layout, codec and key, index, slot array,
which chunk writer and reader) and holds the API's checks and lifecycle;
each path is its own module, owned by the store:

* `storage.block_writer`  `BlockWriter`, a put: reserve, encode, write, commit
* `storage.block_reader`  `BlockReader`, a get: look up, read, verify, decode
* `storage.bad_chunks`    `BadChunks`, the chunks a read could not use:
                          counted, logged once, the lost blocks removed
* `storage.removals`      `Removals`, a delete's or a discard's bytes and
                          rows, and the retry of the removals that failed

Durability and visibility: see `storage.index` (bytes durable, then index
commit; dead writers' leftovers are removed by `recover()`, run on open).
Layout and kvstores: see `storage.layout`. Codecs: see `storage.codecs`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import sqlite3
from typing import Sequence

import numpy as np
import tensorstore as ts

from dualpath_jax.config import CacheConfig, ModelConfig
from storage import chunk_reader as chunk_reader_lib
from storage import chunk_writer as chunk_writer_lib
from storage import encryption
from storage import index as index_lib
from storage import layout
from storage.bad_chunks import BadChunks, read_failure
from storage.block_reader import SCRATCH_READ_CHUNKS, BlockReader
from storage.block_writer import DELETED, DROPPED, FAILED, BlockWriter, PutResult
from storage.codecs import make_codec
from storage.config import ColdTierConfig
from storage.io_pool import IoPool, completed, gather
from storage.removals import Removals
from storage.stats import StoreStats

# What other modules import from here: the store, and names that moved to
# the write and read paths' modules (still importable from here).
__all__ = ["BlockStore", "PutResult", "DROPPED", "FAILED", "DELETED",
           "SCRATCH_READ_CHUNKS", "read_failure"]

_log = logging.getLogger(__name__)


def _check_names(**names: object) -> None:
  """TypeError unless each of `names` (a tenant, a session) is a str: the
  index keys blocks by them, and a None or bytes name would be stored as
  another key (or, for deletes, match every session)."""
  for what, value in names.items():
    if not isinstance(value, str):
      raise TypeError(f"{what} must be a str; got {value!r}")


def _recorded_location_free(stored: dict) -> dict:
  """A layout read from an index, with a default kvstore's absolute path
  (what stores made before `layout.recorded_kvstore_spec` recorded) in the
  location-free form new indexes record, so such a store opens after a move
  or a copy, as a new one does."""
  if isinstance(stored.get("kvstore"), dict):
    return {**stored, "kvstore": layout.without_root_location(stored["kvstore"])}
  return stored


class BlockStore:
  """KV blocks of one model in a TensorStore cold tier (see module docstring)."""

  def __init__(self, config: ColdTierConfig, model: ModelConfig, cache: CacheConfig):
    self.config = config
    self.block_shape = (model.num_layers, 2, model.num_kv_heads, cache.block_size,
                        model.head_dim)
    self.codec = make_codec(config.codec, self.block_shape, cache.dtype)
    # With a key, the chunks are sealed (`storage.encryption`), bound to
    # their id and to this layout.
    self._sealed = config.key_file is not None
    if self._sealed:
      context = json.dumps([self.block_shape, cache.dtype, config.codec,
                            model.fingerprint()]).encode()
      self.codec = encryption.SealedCodec(self.codec, encryption.BlockCipher(
          encryption.load_key(config.key_file), context))
    self.num_slots = config.capacity_bytes // self.codec.encoded_block_bytes
    if self.num_slots < 1:
      raise ValueError(
          f"capacity_bytes={config.capacity_bytes} holds no block of "
          f"{self.codec.encoded_block_bytes} bytes")
    self._chunk_root = layout.local_chunk_root(config)
    # A chunk writer that cannot be had is refused before the index exists:
    # refused after, the refused config's layout stayed in a fresh root and
    # made the next open (with a config that works) a layout mismatch.
    self._no_direct_writer = self._direct_writer_unavailable()
    if config.chunk_writer == "direct" and self._no_direct_writer:
      raise ValueError(f"chunk_writer='direct' is not possible here: "
                       f"{self._no_direct_writer}")
    if config.chunk_reader == "direct" and self._no_direct_writer:
      raise ValueError(f"chunk_reader='direct' is not possible here: "
                       f"{self._no_direct_writer}")
    try:
      os.makedirs(config.root, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cold tier root {config.root}: cannot make it a "
                       f"directory ({e.strerror})") from None
    layout_desc = {
        "block_shape": list(self.block_shape), "dtype": cache.dtype,
        "codec": self.codec.full_name, "driver": config.driver,
        "num_slots": self.num_slots,
        "kvstore": layout.recorded_kvstore_spec(config),
        "model": model.fingerprint(),
    }
    if self._sealed:  # another key, or none, is then a layout mismatch
      layout_desc["encryption"] = {"algorithm": encryption.ALGORITHM,
                                   "key_id": self.codec.cipher.key_id}
    try:
      self.index = index_lib.BlockIndex(
          config.root, layout_desc, self.num_slots, config.admission,
          normalize=_recorded_location_free if config.kvstore is None
          else None)
    except ValueError as err:
      if "made for layout" in str(err) and ("aes256gcm" in str(err)):
        raise ValueError(f"{err}. An encrypted store opens only with the key "
                         "it was made with (key_file; its key_id is in the "
                         "layout), and a store in the clear only without "
                         "one") from None
      raise
    try:
      self.array = layout.open_slot_array(config, self.codec, self.num_slots)
    except BaseException:
      # A fresh root keeps no layout from a config whose array cannot open.
      self.index.forget_layout()
      self.index.close()
      raise
    self._kvstore = self.array.kvstore
    self._slot_dirs = (None if self._chunk_root is None else
                       layout.SlotDirectories(self._chunk_root, self.num_slots))
    self._chunk_writer = self._make_chunk_writer()
    self._chunk_reader = self._make_chunk_reader()
    self._stats = StoreStats()
    # Deletes' and discards' removal of bytes, and retries of failed ones.
    self._removals = Removals(config.root, self.index, self._kvstore,
                              self._slot_dirs, self._stats)
    # Reads' failed chunks: counted, logged, the lost blocks removed.
    self._bad_chunks = BadChunks(config.root, self.index, self._removals,
                                 self._stats)
    # The get and put paths, run on the read and write pools.
    self._reader = BlockReader(self.block_shape, self.codec, self._sealed,
                               self.index, self.array, self._chunk_reader,
                               self._bad_chunks, self._stats)
    self._writer = BlockWriter(config.root, config.max_batch_blocks, self.codec,
                               self._sealed, self.index, self.array,
                               self._slot_dirs, self._chunk_writer,
                               self._removals, self._stats)
    self._closed = False
    self._writes = IoPool(config.io_threads, config.max_pending_write_bytes, "cold-write")
    self._reads = IoPool(config.io_threads, 1 << 62, "cold-read")
    try:
      self.recover()
    except sqlite3.OperationalError as err:  # e.g. the disk is full: read on
      _log.warning("cold tier %s: recovering dead writers' rows failed (%s); "
                   "a later put, delete or open retries", config.root, err)
    except sqlite3.DatabaseError as err:  # a damaged page of the index
      self.close()
      raise index_lib.damaged_error(
          os.path.join(config.root, "index.sqlite"), err) from None
    if self._slot_dirs is not None:  # the directories the next fresh slots need
      self._slot_dirs.prefetch(self.index.next_fresh_slot())

  # -- public API ------------------------------------------------------------

  def put_async(
      self,
      ids: Sequence[bytes],
      blocks: np.ndarray,  # [n, L, 2, Hkv, P, D] cache dtype
      *,
      tenant: str = "",
      session: str = "",
      admitted: bool = False,
  ) -> cf.Future:
    """Stores blocks in the background; a future of `PutResult`.

    `admitted=True` skips the admission rule (`ColdTierConfig.admission`):
    for blocks another store admitted already (`storage.clone`), whose
    first put here must not be deferred.
    """
    self._check_open()
    _check_names(tenant=tenant, session=session)
    ids = self._check_ids(ids)
    self.codec.check_blocks(blocks)
    if len(ids) != blocks.shape[0]:
      raise ValueError(f"{len(ids)} ids for {blocks.shape[0]} blocks")
    self._stats.add(put_calls=1, put_blocks=len(ids))
    if not ids:
      return completed(PutResult([]))
    future = self._writes.try_submit(blocks.nbytes, self._writer.put, ids, blocks,
                                     tenant, session, bool(admitted))
    if future is None:
      self._stats.add(dropped_blocks=len(ids))
      return completed(PutResult([DROPPED] * len(ids)))
    return future

  def put(self, ids: Sequence[bytes], blocks: np.ndarray, *, tenant: str = "",
          session: str = "", admitted: bool = False) -> PutResult:
    """Blocking `put_async`."""
    return self.put_async(ids, blocks, tenant=tenant, session=session,
                          admitted=admitted).result()

  def get_async(
      self,
      ids: Sequence[bytes],
      out: np.ndarray | None = None,  # [len(ids), L, 2, Hkv, P, D] cache dtype
  ) -> cf.Future:
    """A future of one `[L, 2, Hkv, P, D]` array or None per id.

    With `out` (C-contiguous, writable, the cache dtype), block i is read into
    `out[i]` and the result's arrays are those rows (views); a miss's row is
    left as it was or partly written. The caller must not touch `out` until
    the future is done.
    """
    self._check_open()
    ids = self._check_ids(ids)
    if out is not None:
      self._check_out(out, len(ids))
    self._stats.add(get_calls=1, get_blocks=len(ids))
    step = self.config.max_batch_blocks
    futures = [self._reads.submit(self._reader.read, ids[i:i + step],
                                  None if out is None else out[i:i + step])
               for i in range(0, len(ids), step)]
    return gather(futures, lambda parts: [b for part in parts for b in part])

  def get(self, ids: Sequence[bytes],
          out: np.ndarray | None = None) -> list[np.ndarray | None]:
    """Blocking `get_async`."""
    return self.get_async(ids, out).result()

  def contains(self, ids: Sequence[bytes]) -> list[bool]:
    """Whether each id is stored and readable now (committed, not deleted)."""
    return self.index.contains(self._check_ids(ids))

  def session_block_ids(self, tenant: str, session: str) -> list[bytes]:
    """The ids of the blocks the session put: what `delete_session` would
    remove now (the engines drop the same ids from their hot tiers and
    pools). Thread-safe, as every call here."""
    _check_names(tenant=tenant, session=session)
    return self.index.session_ids(tenant, session)

  def delete_session(self, tenant: str, session: str) -> int:
    """Removes every block the session put (index entry and bytes); returns
    how many stored blocks it removed.

    A block of the session still being written (by any process) is removed
    by its writer once the write ends, never under it: its put reports
    "deleted". `session` must be a str: None would name every session of the
    tenant (that is `delete_tenant`).

    Raises OSError when the bytes cannot be removed now: the blocks are no
    longer served all the same, and a later put or delete removes them
    (`Removals.delete`)."""
    _check_names(tenant=tenant, session=session)
    return self._removals.delete(self.index.mark_deleting_where(tenant, session))

  def delete_tenant(self, tenant: str) -> int:
    """Removes every block any session of the tenant put (index entry and
    bytes); returns how many. Raises as `delete_session` does."""
    _check_names(tenant=tenant)
    return self._removals.delete(self.index.mark_deleting_where(tenant, None))

  def recover(self) -> int:
    """Removes half-done writes and deletions of dead processes; returns count.

    Blocks whose bytes cannot be removed now stay hidden, queued as a failed
    delete's are (`Removals.delete`): the open goes on. That failure used to
    raise out of the open, with the taken rows held by a lease nobody
    released.
    """
    refs = self.index.dead_owner_rows()
    if not refs:
      return 0
    try:
      self._removals.remove(refs, "recovered_blocks")
    except sqlite3.DatabaseError:
      raise  # the caller tells a full disk from a damaged index
    except Exception as err:  # pylint: disable=broad-except
      _log.warning("cold tier %s: removing %d blocks left by dead writers "
                   "failed (%s); the next put or delete retries",
                   self.config.root, len(refs), err)
      return 0
    _log.warning("cold tier %s: removed %d blocks left by dead writers",
                 self.config.root, len(refs))
    return len(refs)

  def stats(self) -> dict[str, float]:
    """Counters (see `storage.stats`) plus the index's block counts."""
    out = self._stats.snapshot()
    out.update({f"index_{k}": v for k, v in self.index.counts().items()})
    out["pending_write_bytes"] = self._writes.bytes_in_flight
    # Chunk bytes the direct chunk reader read with O_DIRECT (the rest of
    # its reads, and TensorStore's, went through the page cache).
    out["o_direct_read_bytes"] = (0 if self._chunk_reader is None else
                                  self._chunk_reader.direct_bytes)
    return out

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"the cold tier store at {self.config.root} is closed")

  def flush(self, timeout: float | None = None) -> bool:
    """Waits until every queued put is durable and committed."""
    return self._writes.wait_idle(timeout)

  def close(self) -> None:
    """Finishes queued work and releases the index; a second call does
    nothing."""
    if self._closed:
      return
    self._closed = True
    self.flush()
    self._writes.shutdown()
    self._reads.shutdown()
    self._removals.retry()  # what is still left, the next open recovers
    if self._chunk_writer is not None:
      self._chunk_writer.close()
    if self._chunk_reader is not None:
      self._chunk_reader.close()
    if self._slot_dirs is not None:
      self._slot_dirs.close()
    self.index.close()

  def __enter__(self) -> "BlockStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def chunk_writer(self) -> str:
    """Who writes chunk files: "direct" (`storage.chunk_writer`) or "tensorstore"."""
    return "tensorstore" if self._chunk_writer is None else "direct"

  @property
  def chunk_reader(self) -> str:
    """Who reads chunk files: "direct" (`storage.chunk_reader`) or "tensorstore"."""
    return "tensorstore" if self._chunk_reader is None else "direct"

  @property
  def encoded_block_bytes(self) -> int:
    return self.codec.encoded_block_bytes

  def chunk_key(self, slot: int) -> bytes:
    """The kvstore key (relative to the array) of a slot's chunk."""
    return layout.chunk_key(slot)

  def stored_slots(self) -> set[int]:
    """Slots that have a chunk in the kvstore (lists keys; for checks and tests)."""
    keys = self._kvstore.list(ts.KvStore.KeyRange(b"c/", b"c0")).result()
    return {int(key.split(b"/")[1]) for key in keys}

  # -- internals -------------------------------------------------------------

  def _direct_writer_unavailable(self) -> str:
    """Why the direct chunk writer cannot write this store's chunks ("": it can)."""
    if self._chunk_root is None:
      return "the chunks are not files of a local `file` kvstore"
    if self.codec.compress:
      return "zstd compression runs inside TensorStore's codec chain"
    return chunk_writer_lib.available()[1]

  def _make_chunk_writer(self) -> chunk_writer_lib.DirectChunkWriter | None:
    """The direct chunk writer where `config.chunk_writer` asks for it and it
    applies ("direct" where it does not was refused in `__init__`)."""
    if self.config.chunk_writer == "tensorstore":
      return None
    why = self._no_direct_writer
    if why:
      _log.info("cold tier %s: chunks written by TensorStore (%s)", self.config.root, why)
      return None
    return chunk_writer_lib.DirectChunkWriter(
        os.path.dirname(self._chunk_root), self.config.file_io_concurrency,
        sync=self.config.sync, durable=self.config.fsync,
        o_direct=self.config.file_io_mode == "direct")

  def _make_chunk_reader(self) -> chunk_reader_lib.DirectChunkReader | None:
    """The direct chunk reader where `config.chunk_reader` asks for it and
    it applies (the chunk writer's conditions: same files, same checksum)."""
    if self.config.chunk_reader == "tensorstore" or self._no_direct_writer:
      return None
    return chunk_reader_lib.DirectChunkReader(
        os.path.dirname(self._chunk_root),
        layout.chunk_elems(self.codec) * self.codec.stored_dtype.itemsize,
        self.config.file_io_concurrency,
        o_direct=self.config.file_io_mode == "direct")

  def _check_out(self, out: np.ndarray, n: int) -> None:  # out: [n, L, 2, Hkv, P, D]
    if (not isinstance(out, np.ndarray) or out.shape != (n, *self.block_shape)
        or out.dtype != self.codec.dtype or not out.flags.c_contiguous
        or not out.flags.writeable):
      raise ValueError(
          f"out must be a writable C-contiguous {self.codec.dtype_name} array of shape "
          f"{[n, *self.block_shape]}, got {getattr(out, 'shape', type(out).__name__)}")

  @staticmethod
  def _check_ids(ids: Sequence[bytes]) -> list[bytes]:
    ids = list(ids)
    for block_id in ids:
      if not isinstance(block_id, bytes) or not block_id:
        raise ValueError(f"block ids must be non-empty bytes, got {block_id!r:.40}")
    return ids
