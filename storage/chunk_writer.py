"""Durable chunk writes into a local `file` kvstore, without TensorStore's write path.

Why: on the benchmark VM, TensorStore's `file` kvstore spends 1.4-2.0 CPU
seconds per GB written (its portable software CRC32C, a fresh encode buffer
per chunk, a new temporary file and inode per write; docs/storage.md "v4",
"v6"), so two vCPUs capped the cold tier's writes near half of the disk. This
writer produces the same chunk files TensorStore would (the stored block's
little-endian bytes followed by the 4-byte CRC32C of the zarr3 `crc32c`
codec, under the same key `c/<slot>/0`) straight from the caller's array:

* the checksum from the `crc32c` package (the CPU's CRC32C instruction,
  ~13 GB/s here, GIL released) instead of a software table;
* no encode buffer; with `o_direct` (the store's `file_io_mode="direct"`,
  its default) the chunk's whole 4 KiB pages are written with O_DIRECT (from
  the caller's row if page-aligned, else via one reused aligned buffer per
  thread), so they are not copied into the page cache; the last partial page
  and the checksum are written buffered on the same descriptor. A file system
  without O_DIRECT (tmpfs) gets buffered writes;
* in place: a slot's file is created on its first write and overwritten on
  later ones, so a long-running store that reuses slots (LRU eviction)
  allocates no inode and no block per write. Measured on this VM in one
  process, 14 alternating rounds of rewriting a full store: 3.4-4.0 GB/s at
  0.3 CPU s/GB, against 1.9-2.1 GB/s at 0.6-0.7 for a temporary file renamed
  over the chunk (TensorStore's protocol; a new inode per write, and ext4's
  inode allocator slowing as deleted inodes pile up);
* the chunks of a batch written by `concurrency` threads at once (the
  store's queue depth).

Why in place is safe here although a reader may then see a half-written
chunk: a slot is rewritten only after the index has durably taken it from its
previous block (`BlockIndex.reserve` evicts the old row in the same durable
transaction that hands the slot out), and a reader serves a block only if
its chunk's CRC32C checks (TensorStore verifies it) and, after the read, the
index still has the block at that slot and generation. A read racing a
rewrite is therefore a miss (`miss_raced`), never bytes of another block. A
crash during a write leaves the batch's rows PENDING; recovery deletes their
chunks.

`write` returns once every chunk of the batch is durable, before the caller
commits the index:

* `sync="syncfs"` ("auto" where Linux has it): one `syncfs(2)` of the store's
  file system after the batch: one journal commit for all its chunks and new
  directory entries, instead of an fsync per chunk. It also flushes other
  dirty data of that file system, so give the cold tier its own file system
  when other writers share the machine. Needs Linux >= 5.8 for syncfs to
  report writeback errors.
* `sync="fsync"`: fsync each chunk (and its slot directory when the file is
  new): portable, more commits.

Measured on the benchmark VM (docs/storage.md "v6"): against TensorStore's
writes, 4-27 points more of the raw disk's bandwidth on fresh stores at a
third to a half of the CPU.

The files are ordinary zarr3 chunks (tests/test_storage_chunk_writer.py
compares them byte for byte with TensorStore's own writes): TensorStore or
`storage.chunk_reader` reads them and verifies each chunk's CRC32C. Only for
a local `file` kvstore and codecs without zstd (`BlockStore` chooses;
`ColdTierConfig.chunk_writer`).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import fcntl
import os
import sys
import threading
from typing import Sequence

import numpy as np

from dualpath_jax.disk_io import PAGE_BYTES, page_aligned_empty, sync_directory
from storage.io_pool import submit_or_run

try:
  import crc32c as _crc32c  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - the package is a dependency
  _crc32c = None

ALIGNMENT = PAGE_BYTES  # O_DIRECT offset, length and address alignment
SYNC_MODES = ("auto", "syncfs", "fsync")  # auto: syncfs where the platform has it

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def has_syncfs() -> bool:
  """Whether this platform has syncfs(2) (Linux)."""
  return _syncfs is not None


def open_fs(path: str) -> int:
  """A descriptor of directory `path`, for `syncfs` (the caller closes it)."""
  return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def syncfs(target: str | int) -> None:
  """Makes everything written to the file system holding `target` durable.

  `target` is a path, or a descriptor from `open_fs`. Linux reports a
  writeback error to a descriptor only if it came after the descriptor
  was opened or nobody has seen it yet: to learn of every error of some
  writes, open the descriptor before them (`DirectChunkWriter.write`).
  """
  fd = open_fs(target) if isinstance(target, str) else target
  try:
    if _syncfs(fd) != 0:
      err = ctypes.get_errno()
      raise OSError(err, f"syncfs failed: {os.strerror(err)}", _fd_path(fd))
  finally:
    if fd is not target:
      os.close(fd)


def _fd_path(fd: int) -> str:
  """The path descriptor `fd` was opened at (for error messages)."""
  try:
    return os.readlink(f"/proc/self/fd/{fd}")
  except OSError:
    return f"descriptor {fd}"


def available() -> tuple[bool, str]:
  """Whether this process can write (and read) chunks directly, and why not."""
  if not (hasattr(os, "pwritev") and hasattr(os, "preadv")):
    return False, "this platform has no pwritev/preadv"
  if _crc32c is None:
    return False, "the crc32c package is not installed"
  if not getattr(_crc32c, "hardware_based", False):
    return False, "crc32c has no hardware CRC32C on this CPU (software would be slower)"
  if sys.byteorder != "little":
    return False, "zarr3 chunks are little endian and this host is not"
  return True, ""


def crc32c_bytes(data: np.ndarray) -> bytes:
  """The zarr3 `crc32c` codec's 4-byte trailer (little endian) of `data`'s bytes."""
  return int(_crc32c.crc32c(data)).to_bytes(4, "little")


class DirectChunkWriter:
  """Writes whole chunks of a zarr3 array in a local directory (see module docstring)."""

  def __init__(self, array_dir: str, concurrency: int, sync: str = "auto",
               durable: bool = True, o_direct: bool = False):
    ok, why = available()
    if not ok:
      raise RuntimeError(f"direct chunk writes unavailable: {why}")
    if concurrency <= 0:
      raise ValueError("concurrency must be positive")
    if sync not in SYNC_MODES:
      raise ValueError(f"sync={sync!r} not in {SYNC_MODES}")
    if sync == "auto":
      sync = "syncfs" if has_syncfs() else "fsync"
    if sync == "syncfs" and not has_syncfs():
      raise ValueError("sync='syncfs' needs syncfs(2) (Linux); use sync='fsync'")
    self.array_dir = array_dir
    self.sync = sync
    self.durable = durable  # False only for benchmarks that say so
    # Cleared if the file system refuses O_DIRECT (tmpfs); never set where
    # the platform has none (macOS).
    self.o_direct = o_direct and hasattr(os, "O_DIRECT")
    self.direct_bytes = 0  # bytes written with O_DIRECT (stats, tests)
    self._local = threading.local()
    self._count_lock = threading.Lock()
    self._pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix="cold-chunk")

  def chunk_path(self, slot: int) -> str:
    return os.path.join(self.array_dir, "c", str(int(slot)), "0")

  def write(
      self,
      slots: Sequence[int],
      chunks: np.ndarray,  # [n, chunk_bytes] uint8, C-contiguous
  ) -> None:
    """Writes chunk i to slot `slots[i]`; returns once all are durable, else raises.

    The slot directories must exist (`layout.SlotDirectories`).
    """
    if chunks.ndim != 2 or chunks.dtype != np.uint8 or not chunks.flags.c_contiguous:
      raise ValueError(f"chunks must be a C-contiguous [n, bytes] uint8 array, got "
                       f"{chunks.dtype} {chunks.shape}")
    if len(slots) != chunks.shape[0]:
      raise ValueError(f"{len(slots)} slots for {chunks.shape[0]} chunks")
    # The syncfs descriptor is opened before the writes: opened after, it
    # missed a writeback error of this batch that another batch's syncfs
    # (another I/O thread) had seen first, and the batch was committed with
    # bytes that never reached the disk.
    fs_fd = (open_fs(self.array_dir)
             if self.durable and self.sync == "syncfs" and len(slots) else None)
    try:
      futures = [submit_or_run(self._pool, self._write_one, int(slot), chunks[i])
                 for i, slot in enumerate(slots)]
      # Wait for every chunk before raising: a write still running after the
      # caller released its slots could land on a slot already handed out again.
      errors = [f.exception() for f in futures]
      for err in errors:
        if err is not None:
          raise err
      if fs_fd is not None:
        syncfs(fs_fd)
    finally:
      if fs_fd is not None:
        os.close(fs_fd)

  def close(self) -> None:
    self._pool.shutdown(wait=True)

  def _write_one(self, slot: int, chunk: np.ndarray) -> None:  # chunk: [bytes] uint8
    trailer = crc32c_bytes(chunk)
    path = self.chunk_path(slot)
    body = len(chunk) // ALIGNMENT * ALIGNMENT if self.o_direct else 0
    retried = False
    if body:
      try:
        created = self._write_file(path, chunk, trailer, body)
      except OSError as err:
        if err.errno != errno.EINVAL:
          raise
        self.o_direct = False  # no O_DIRECT here (e.g. tmpfs): buffered from now on
        body, retried = 0, True
    if not body:
      created = self._write_file(path, chunk, trailer, 0)
    # After a retry the file may be new although the retry found it there.
    if (created or retried) and self.durable and self.sync == "fsync":
      sync_directory(os.path.dirname(path))  # the new directory entry
    if body:
      with self._count_lock:
        self.direct_bytes += body

  def _write_file(self, path: str, chunk: np.ndarray, trailer: bytes, body: int) -> bool:
    """`chunk` + `trailer` over `path` in place, the first `body` bytes with O_DIRECT.

    Returns whether the file was created (a new directory entry).
    """
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_DIRECT if body else 0)
    created = False
    try:
      fd = os.open(path, flags)
    except FileNotFoundError:
      fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
      created = True
    try:
      if body:
        pages = chunk[:body]
        if pages.ctypes.data % ALIGNMENT:
          pages = self._aligned_copy(pages)
        _write_all(fd, [pages], 0)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
      _write_all(fd, [chunk[body:], trailer], body)
      size = len(chunk) + len(trailer)
      if not created and os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)  # never with a fixed layout; cheap to be sure
      if self.durable and self.sync == "fsync":
        os.fsync(fd)
    finally:
      os.close(fd)
    return created

  def _aligned_copy(self, data: np.ndarray) -> np.ndarray:
    """`data` copied into this thread's reused page-aligned buffer."""
    buf = getattr(self._local, "buffer", None)
    if buf is None or len(buf) < len(data):
      buf = page_aligned_empty((len(data),), np.uint8)
      self._local.buffer = buf
    out = buf[:len(data)]
    out[:] = data
    return out


def _write_all(fd: int, parts: list, offset: int) -> None:
  """Writes the buffers in order from `offset` (retries short writes).

  A write that makes no progress (pwritev returns 0 for a non-empty
  buffer) raises OSError: retrying it looped forever, holding the put.
  """
  parts = [memoryview(p).cast("B") for p in parts if len(p)]
  while parts:
    n = os.pwritev(fd, parts, offset)
    if n <= 0:
      left = sum(len(p) for p in parts)
      raise OSError(errno.EIO, f"pwritev wrote nothing at offset {offset} "
                    f"({left} bytes left to write); the file system makes no "
                    "progress")
    offset += n
    advance(parts, n)


def advance(views: list[memoryview], n: int) -> None:
  """Drops the first `n` bytes of `views`, the buffers of a vectored read or
  write that moved `n` bytes, so the next call goes on from there."""
  while views and n >= len(views[0]):
    n -= len(views[0])
    views.pop(0)
  if views:
    views[0] = views[0][n:]
