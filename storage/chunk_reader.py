"""Chunk reads from a local `file` kvstore, without TensorStore's read path.

Why: reading into a reused buffer (`BlockStore.get(ids, out=...)`), the
store spent 0.6-2.1 CPU seconds per GB in TensorStore on the benchmark VM
(docs/storage.md "v4", "v8", "v9"): `pread` through the page cache (its kernel
copy alone a fifth of the samples), its portable software CRC32C, one more
copy out of its own read buffer into the caller's, the page faults of that
buffer. On two vCPUs that is CPU the engine computing beside the reads
does not get. This reader reads each chunk file (the store's
`c/<slot>/0`: the stored block's little-endian bytes, then the zarr3
`crc32c` codec's 4-byte trailer; `storage.chunk_writer` writes them, or
TensorStore) straight into the caller's row:

* with O_DIRECT (the store's `file_io_mode="direct"`, its default) where
  the row starts on a page and the chunk is whole pages, so the disk's DMA
  fills the row and the page cache is not touched; the trailer lands in a
  reused page of the reading thread. A chunk of part pages (int8,
  encrypted) goes O_DIRECT into a page-aligned row padded to whole pages
  (`padded_bytes`: the store's read scratch), trailer included. Elsewhere
  (an unaligned row, a file system that refuses O_DIRECT such as tmpfs, a
  platform without it) one buffered `preadv` into the row and the trailer;
* the checksum by the CPU's CRC32C instruction (the `crc32c` package, ~13
  GB/s here, the GIL released) instead of a software table;
* the chunks of a batch by `concurrency` threads at once (the store's
  queue depth, as TensorStore's file I/O pool was).

A chunk's verdict is the one TensorStore's read gives (tested side by side),
in `bad_chunks.read_failure`'s words: no file (or a directory in its
place) is "missing"; a file shorter than a chunk and its checksum, or one
whose CRC32C does not match, is "corrupt" (bytes after the checksum are not
read); the OS refusing or failing the open or the read otherwise (too many
open files, EIO) is "unreadable", which proves nothing about the bytes. A
read racing an in-place rewrite of its slot sees a torn chunk whose CRC32C
fails; the store then finds the block no longer current and counts a
race, never serving those bytes (`chunk_writer`'s module docstring).

Only for a local `file` kvstore and codecs without zstd (decompression runs
inside TensorStore's codec chain): `BlockStore` chooses
(`ColdTierConfig.chunk_reader`).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import os
import stat
import threading
from typing import Sequence

import numpy as np

from dualpath_jax.disk_io import page_aligned_empty
from storage import chunk_writer as chunk_writer_lib
from storage.io_pool import submit_or_run

ALIGNMENT = chunk_writer_lib.ALIGNMENT
TRAILER_BYTES = 4  # the zarr3 crc32c codec's checksum, little endian

# A chunk read's failure: (reason, message), reason one of
# `bad_chunks.read_failure`'s ("missing", "corrupt", "unreadable").
Failure = tuple[str, str]


class DirectChunkReader:
  """Reads whole chunks of a zarr3 slot array in a local directory (see the
  module docstring).

  Args:
    array_dir: the array's directory (holds `c/<slot>/0`).
    chunk_bytes: bytes of one stored chunk before its trailer.
    concurrency: chunk reads in flight at once (threads).
    o_direct: read with O_DIRECT into page-aligned rows that hold whole
      pages (a whole-page chunk's, or `padded_bytes`); cleared for good if
      the file system refuses it.
  """

  def __init__(self, array_dir: str, chunk_bytes: int, concurrency: int,
               o_direct: bool = False):
    ok, why = chunk_writer_lib.available()
    if not ok:
      raise RuntimeError(f"direct chunk reads unavailable: {why}")
    if concurrency <= 0 or chunk_bytes <= 0:
      raise ValueError("concurrency and chunk_bytes must be positive")
    self.array_dir = array_dir
    self.chunk_bytes = int(chunk_bytes)
    # A row that holds the whole file, rounded up to pages: any chunk goes
    # O_DIRECT into it, the checksum included.
    self.padded_bytes = -(-(self.chunk_bytes + TRAILER_BYTES) // ALIGNMENT) * ALIGNMENT
    self.o_direct = o_direct and hasattr(os, "O_DIRECT")  # none on macOS
    self.direct_bytes = 0  # bytes read with O_DIRECT (stats, tests)
    self._local = threading.local()
    self._count_lock = threading.Lock()
    self._pool = cf.ThreadPoolExecutor(concurrency,
                                       thread_name_prefix="cold-chunk-read")

  def chunk_path(self, slot: int) -> str:
    return os.path.join(self.array_dir, "c", str(int(slot)), "0")

  def read(self, slots: Sequence[int],
           rows: Sequence[np.ndarray],  # each [chunk_bytes] or [padded_bytes] uint8
           ) -> list[Failure | None]:
    """Reads slot `slots[i]`'s chunk into `rows[i]` and verifies it.

    A row is the chunk's `chunk_bytes`, or `padded_bytes` (the file rounded
    up to pages: the chunk lands in its first `chunk_bytes`, and a
    page-aligned one is read with O_DIRECT whatever the chunk's size).
    Returns, per chunk, None (read and verified) or its failure. A row whose
    chunk failed holds unspecified bytes. Waits for every read.
    """
    if len(slots) != len(rows):
      raise ValueError(f"{len(slots)} slots for {len(rows)} rows")
    sizes = {(self.chunk_bytes,), (self.padded_bytes,)}
    for row in rows:
      if (row.dtype != np.uint8 or row.shape not in sizes or
          not row.flags.c_contiguous or not row.flags.writeable):
        raise ValueError(f"rows must be writable C-contiguous [{self.chunk_bytes}] "
                         f"or [{self.padded_bytes}] uint8 arrays, got {row.dtype} "
                         f"{row.shape}")
    futures = [submit_or_run(self._pool, self._read_one, int(slot), row)
               for slot, row in zip(slots, rows)]
    return [f.result() for f in futures]

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  def _read_one(self, slot: int, row: np.ndarray) -> Failure | None:
    path = self.chunk_path(slot)
    padded = len(row) == self.padded_bytes
    direct = (self.o_direct and row.ctypes.data % ALIGNMENT == 0 and
              (padded or self.chunk_bytes % ALIGNMENT == 0))
    try:
      fd, direct = self._open(path, direct)
      try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # TensorStore: no chunk there either
          return ("missing", f"{path}: not a regular file")
        expected = self.chunk_bytes + TRAILER_BYTES
        # Shorter: torn. Longer: the chunk and its checksum come first and
        # decide, as TensorStore reads such a file.
        if st.st_size < expected:
          return ("corrupt", f"{path}: {st.st_size} bytes, a chunk has {expected} "
                  "(torn or truncated)")
        trailer = self._read_file(fd, row, direct, padded)
      finally:
        os.close(fd)
    except FileNotFoundError:
      return ("missing", f"{path}: no such chunk file")
    except _Shrank as err:
      return ("corrupt", f"{path}: {err}")
    except OSError as err:
      return ("unreadable", f"{path}: {err.strerror or err} [OS error "
              f"{err.errno}]")
    stored = int.from_bytes(trailer, "little")
    computed = int.from_bytes(chunk_writer_lib.crc32c_bytes(row[:self.chunk_bytes]),
                              "little")
    if computed != stored:
      return ("corrupt", f"{path}: CRC32C {computed:08x} does not match the "
              f"stored {stored:08x}")
    return None

  def _open(self, path: str, direct: bool) -> tuple[int, bool]:
    """A read-only descriptor of `path`, with O_DIRECT if `direct` and the
    file system takes it; and whether it has it."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    if direct:
      try:
        return os.open(path, flags | os.O_DIRECT), True
      except OSError as err:
        if err.errno != errno.EINVAL:
          raise
      fd = os.open(path, flags)
      try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
      except OSError:
        os.close(fd)
        raise
      if regular:  # a file system without O_DIRECT (tmpfs)
        self.o_direct = False  # buffered from now on
      return fd, False
    return os.open(path, flags), False

  def _read_file(self, fd: int, row: np.ndarray, direct: bool,
                 padded: bool) -> bytes:
    """Reads the open chunk file into `row` (`padded`: of `padded_bytes`)
    and returns its trailer."""
    want = self.chunk_bytes + TRAILER_BYTES
    if direct:
      # The whole file into the padded row, or the chunk into the row and
      # the checksum's page into this thread's page. A longer file fills
      # more of that last page: its first bytes count.
      parts = [row] if padded else [row, self._tail_page()]
      try:
        _read_all(fd, parts, want)
      except OSError as err:
        if err.errno != errno.EINVAL:
          raise
        # Refused after the open (a short read left the rest unaligned):
        # this chunk again, buffered.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        return self._read_file(fd, row, False, padded)
      with self._count_lock:
        self.direct_bytes += self.chunk_bytes
      tail = row[self.chunk_bytes:] if padded else parts[1]
      return bytes(tail[:TRAILER_BYTES])
    if padded:
      _read_all(fd, [row[:want]], want)
      return bytes(row[self.chunk_bytes:want])
    trailer = bytearray(TRAILER_BYTES)
    _read_all(fd, [row, trailer], want)
    return bytes(trailer)

  def _tail_page(self) -> np.ndarray:
    """This thread's reused page (O_DIRECT needs whole aligned pages) that
    the trailer's page is read into."""
    page = getattr(self._local, "page", None)
    if page is None:
      page = page_aligned_empty((ALIGNMENT,), np.uint8)
      self._local.page = page
    return page


class _Shrank(Exception):
  """The chunk file ended before its checked size while it was read."""


def _read_all(fd: int, parts: list, want: int) -> None:
  """Reads from offset 0 into the buffers in order until at least `want`
  bytes came (retrying short reads). A file that ends first raises
  `_Shrank`: its size was checked, so it changed while read."""
  views = [memoryview(p).cast("B") for p in parts if len(p)]
  offset = 0
  while offset < want:
    n = os.preadv(fd, views, offset)
    if n <= 0:
      raise _Shrank(f"the file ended at byte {offset} of {want} while read")
    offset += n
    chunk_writer_lib.advance(views, n)
    if not views:
      break
