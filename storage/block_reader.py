"""The cold tier's read path: block ids in, verified blocks (or None) out.

`BlockReader.read` serves one batch of a `BlockStore.get` (at most
`max_batch_blocks` ids, on a read-pool thread):

  1. looks the ids up in the index (an absent id is a miss);
  2. reads their chunks: on a local `file` kvstore by `storage.chunk_reader`,
     else one TensorStore read for the batch, and one per chunk when that
     fails, to find the bad ones. Every chunk's CRC32C is verified;
  3. hands the chunks that failed to `storage.bad_chunks` (counted, logged,
     the lost blocks removed);
  4. re-checks in the index that each block read is still current (not
     evicted or rewritten while it was read) and makes it recent in the LRU;
  5. returns the blocks. Raw and zstd chunks are the blocks: they are read
     straight into the caller's `out` rows, or into a new batch. Sealed and
     int8 chunks are read `SCRATCH_READ_CHUNKS` at a time into a scratch the
     thread reuses, then authenticated, decrypted and decoded into the `out`
     rows, or new blocks.

Why a class of its own: the read path has its own state (each read thread's
scratch) and its own costs to watch (a fresh result array's first touch was
slower than the disk on the benchmark VM: docs/storage.md), and it needs
from the store only the index, the slot array or the chunk reader, and
`BadChunks`.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
import tensorstore as ts

from dualpath_jax.disk_io import page_aligned_empty
from storage import chunk_reader as chunk_reader_lib
from storage import encryption
from storage import index as index_lib
from storage import layout
from storage.bad_chunks import BadChunks, ChunkFailure, read_failure
from storage.codecs import BlockCodec
from storage.stats import StoreStats

# Chunks a read of a decoded store (encrypted, or int8) takes at a time
# (`_read_decoded`): they are still all in flight at once, and the scratch
# that holds them stays small (a whole batch's, 64 chunks, cost each read
# thread its first touch: 90 MB at 1.4 MiB a block, slower than the disk).
SCRATCH_READ_CHUNKS = 8


class BlockReader:
  """Reads verified blocks of a `BlockStore` (see module docstring)."""

  def __init__(
      self,
      block_shape: tuple[int, ...],  # [L, 2, Hkv, P, D]
      codec: BlockCodec | encryption.SealedCodec,  # the store's
      sealed: bool,
      index: index_lib.BlockIndex,
      array: ts.TensorStore,  # the slot array [num_slots, chunk_elems]
      chunk_reader: chunk_reader_lib.DirectChunkReader | None,
      bad_chunks: BadChunks,
      stats: StoreStats,
  ):
    self._block_shape = block_shape
    self._codec = codec
    self._sealed = sealed
    self._index = index
    self._array = array
    self._chunk_reader = chunk_reader
    self._bad_chunks = bad_chunks
    self._stats = stats
    self._local = threading.local()  # a read thread's scratch (`_read_scratch`)

  def read(
      self,
      ids: list[bytes],
      out: np.ndarray | None,  # [len(ids), L, 2, Hkv, P, D] or None
  ) -> list[np.ndarray | None]:
    """One `[L, 2, Hkv, P, D]` block or None (a miss) per id; with `out`,
    the blocks are views of its rows."""
    start = time.perf_counter()
    refs = self._index.lookup(ids)
    rows = [i for i, r in enumerate(refs) if r is not None]  # rows of `out`
    present = [refs[i] for i in rows]
    found: dict[bytes, np.ndarray] = {}
    if present and not self._codec.identity:  # encrypted, int8
      found = self._read_decoded(present, rows, out)
    elif present:
      # Identity codecs (raw, zstd) read straight into `out`: no result copy.
      # Without `out`, the reader allocates the batch (TensorStore's own
      # read(), or the direct reader's page-aligned batch).
      into = None if out is None else out.reshape(len(out), -1)
      batch, ok, bad = self.read_chunks(present, into, rows)
      if bad:
        self._bad_chunks.drop(bad)
      keep = self._still_current(present, [i for i in range(len(present))
                                           if ok[i]])
      if out is not None:
        found = {present[i].block_id: out[rows[i]] for i in keep}
      else:
        found = {present[i].block_id: batch[i] for i in keep}
    hits = sum(block_id in found for block_id in ids)
    self._stats.add(
        hit_blocks=hits, read_bytes=hits * self._codec.encoded_block_bytes,
        miss_absent=sum(r is None for r in refs),
        read_seconds=time.perf_counter() - start)
    return [found.get(block_id) for block_id in ids]

  def _read_decoded(
      self,
      refs: list[index_lib.SlotRef],
      rows: list[int],  # row of `out` for each ref
      out: np.ndarray | None,  # [>= max(rows) + 1, L, 2, Hkv, P, D] or None
  ) -> dict[bytes, np.ndarray]:
    """`read` for a store whose chunks are not the blocks (encrypted,
    int8): `SCRATCH_READ_CHUNKS` chunks at a time land in this thread's
    scratch (reused: a fresh array per read costs its first touch, on the
    benchmark VM slower than the disk), then each is decoded (and first
    authenticated and decrypted) into its `out` row, or a new block. A
    failed tag is a corrupt block: changed, or another block's chunk."""
    blocks: list[np.ndarray | None] = []
    bad: list[ChunkFailure] = []
    enc = self._codec.encoded_block_bytes
    for lo in range(0, len(refs), SCRATCH_READ_CHUNKS):
      part = refs[lo:lo + SCRATCH_READ_CHUNKS]
      scratch = self._read_scratch(len(part))  # [k, >= encoded_block_bytes] uint8
      _, ok, failed = self.read_chunks(
          part, scratch if self._chunk_reader is not None
          else scratch.view(self._codec.stored_dtype), list(range(len(part))))
      scratch = scratch[:, :enc]  # [k, encoded_block_bytes]: the chunks
      bad += failed
      dests = (None if out is None else
               [out[row] for row in rows[lo:lo + len(part)]])
      if self._sealed:
        got = self._codec.decode(
            scratch, [r.block_id if good else None for r, good in zip(part, ok)], dests)
        for ref, good, block in zip(part, ok, got):
          if good and block is None:
            bad.append((ref, "corrupt", "its authentication tag does not match "
                        "(changed, or another block's chunk)"))
      else:
        got = []
        for j, good in enumerate(ok):
          if not good:
            got.append(None)
            continue
          dest = (np.empty(self._block_shape, self._codec.dtype) if dests is None
                  else dests[j])
          self._codec.decode_into(
              scratch[j].view(self._codec.stored_dtype).reshape(self._codec.stored_shape), dest)
          got.append(dest)
      blocks += got
    if bad:
      self._bad_chunks.drop(bad)
    keep = self._still_current(refs, [i for i, block in enumerate(blocks)
                                      if block is not None])
    return {refs[i].block_id: blocks[i] for i in keep}

  def _still_current(self, refs: Sequence[index_lib.SlotRef],
                     read: list[int]) -> list[int]:
    """Of the chunks read intact (`read`, indices into `refs`), those whose
    block is still current: makes them recent in the LRU, counts the rest
    (evicted or rewritten while read) as `miss_raced`."""
    valid = self._index.touch([refs[i] for i in read]) if read else []
    keep = [i for i, still_there in zip(read, valid) if still_there]
    self._stats.add(miss_raced=len(read) - len(keep))
    return keep

  def _read_scratch(self, n: int) -> np.ndarray:  # [n, row bytes] uint8
    """This read thread's reused rows for `n` (<= `SCRATCH_READ_CHUNKS`)
    chunks: with the direct chunk reader page-aligned rows of the chunk
    file rounded up to pages (`DirectChunkReader.padded_bytes`, read with
    O_DIRECT whatever the chunk's size), else rows of one chunk."""
    buf = getattr(self._local, "read_scratch", None)
    if buf is None:
      if self._chunk_reader is not None:
        buf = page_aligned_empty(
            (SCRATCH_READ_CHUNKS, self._chunk_reader.padded_bytes), np.uint8)
      else:
        buf = np.empty((SCRATCH_READ_CHUNKS, self._codec.encoded_block_bytes), np.uint8)
      self._local.read_scratch = buf
    return buf[:n]

  def read_chunks(
      self,
      refs: Sequence[index_lib.SlotRef],
      # [m, chunk_elems] stored dtype, or None; with the direct chunk reader
      # also [m, padded_bytes] uint8 (`_read_scratch`)
      into: np.ndarray | None = None,
      rows: Sequence[int] = (),  # row of `into` for each ref
  ) -> tuple[np.ndarray | None, list[bool], list[ChunkFailure]]:
    """Reads chunks: one batched read, else one per chunk to find the bad ones.

    Without `into`, returns the chunks as `[n, *stored_shape]`; with it, the
    chunk of `refs[i]` lands in `into[rows[i]]` and None is returned in their
    place. Also returns whether each chunk was read intact, and the failures
    with their reason ("missing", "corrupt" or "unreadable": `read_failure`).
    """
    slots = np.array([r.slot for r in refs], np.int64)
    stored = (len(refs), *self._codec.stored_shape)
    if self._chunk_reader is not None:
      return self._read_chunks_direct(refs, into, rows)
    try:
      if into is None:
        return self._array[slots].read().result().reshape(stored), [True] * len(refs), []
      target = ts.array(into, copy=False, write=True)
      if list(rows) != list(range(len(into))):
        target = target[np.asarray(rows, np.int64)]
      target.write(self._array[slots]).result()
      return None, [True] * len(refs), []
    except Exception:  # pylint: disable=broad-except
      pass  # find out which chunks failed, one read each
    batch = (np.zeros((len(refs), layout.chunk_elems(self._codec)), self._codec.stored_dtype)
             if into is None else None)
    futures = [self._array[int(r.slot)].read() for r in refs]
    ok, failures = [], []
    for i, (ref, future) in enumerate(zip(refs, futures)):
      try:
        chunk = future.result()
        if into is None:
          batch[i] = chunk
        else:
          into[rows[i]] = chunk
        ok.append(True)
      except Exception as err:  # pylint: disable=broad-except
        ok.append(False)
        failures.append((ref, read_failure(err), str(err)))
    return (None if batch is None else batch.reshape(stored)), ok, failures

  def _read_chunks_direct(
      self,
      refs: Sequence[index_lib.SlotRef],
      into: np.ndarray | None,  # as `read_chunks`'
      rows: Sequence[int],
  ) -> tuple[np.ndarray | None, list[bool], list[ChunkFailure]]:
    """`read_chunks` by the direct chunk reader: each chunk straight into
    its row of `into`, or of a new batch `[n, *stored_shape]` (returned)."""
    batch = None
    if into is None:  # page-aligned, so that whole-page chunks go O_DIRECT
      batch = page_aligned_empty((len(refs), layout.chunk_elems(self._codec)),
                                 self._codec.stored_dtype)
      into, rows = batch, range(len(refs))
    dest = into.view(np.uint8)  # [m, chunk_bytes]
    verdicts = self._chunk_reader.read([r.slot for r in refs],
                                       [dest[row] for row in rows])
    failures = [(ref, *failure) for ref, failure in zip(refs, verdicts)
                if failure is not None]
    if batch is not None:
      batch = batch.reshape(len(refs), *self._codec.stored_shape)
    return batch, [v is None for v in verdicts], failures
