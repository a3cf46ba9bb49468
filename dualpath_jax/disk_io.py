"""Host buffers and directory syncs for the files that must be durable.

The cold tier's chunk files and layout, its key files and model
checkpoints are written so that a crash leaves either the old or the new
bytes, never a torn file that looks whole: writes into page-aligned
buffers (O_DIRECT takes them without a bounce copy) and an fsync of the
directory after a rename, which is atomic but not durable until then.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any, Sequence

import numpy as np

PAGE_BYTES = 4096  # O_DIRECT's alignment of offsets, lengths and addresses

# FUSE file systems): its entries are left to the file system's ordering.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP,
                                 errno.EOPNOTSUPP})


def page_aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """A C-contiguous array of `shape` whose first byte starts a page (an
  anonymous mapping, zero-filled on first touch). Host buffers the cold
  tier reads into (`transfer.source.StagingRows`) are made so: rows of
  whole pages then take O_DIRECT reads (`storage.chunk_reader`) without a
  bounce copy."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buf = mmap.mmap(-1, max(-(-nbytes // PAGE_BYTES) * PAGE_BYTES, PAGE_BYTES))
  return np.frombuffer(buf, np.uint8, nbytes).view(dtype).reshape(shape)


def sync_directory(directory: str | os.PathLike) -> None:
  """fsyncs `directory`, making its entries (files made, renamed in or
  out, removed) durable: a rename is atomic but not durable until then.

  A file system that cannot fsync a directory (EINVAL, ENOTSUP) is let be;
  any other error, opening the directory included, is raised: a chunk, a
  key or a checkpoint whose durability is unknown must not look written.
  The one directory fsync of the project (the cold tier's chunks and
  layout, its key files, model checkpoints)."""
  fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in _NO_DIRECTORY_FSYNC:
      raise
  finally:
    os.close(fd)
