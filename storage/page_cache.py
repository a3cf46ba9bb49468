"""The OS page cache and a directory's files: evict them, and check that they are out.

Cold-read benchmarks need two things: the files' pages gone from the page
cache before a read pass, and proof that they are gone.

`drop_page_cache(path)` flushes each file under `path` (`fdatasync`, so its
pages are clean) and calls `posix_fadvise(POSIX_FADV_DONTNEED)` on it: that
evicts exactly those files' clean pages, needs no privilege and leaves other
processes' caches alone (the machine may be shared; a global `sync` would also
flush their dirty data). With `global_drop=True` it writes
`/proc/sys/vm/drop_caches` instead where permitted (root). It returns the
method used, so a benchmark can say how cold its "cold" figures are.

`resident_bytes(path)` counts the bytes of the files under `path` that are in
the page cache now (`mincore` on a read-only mapping; it does not fault pages
in), so a benchmark can record that a "cold" pass really started cold.

Neither can reach a cache below the guest OS (a hypervisor's or a disk's own
cache): a benchmark on a virtual disk should say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os


def _files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  return [os.path.join(d, name) for d, _, names in os.walk(path) for name in names]


def drop_page_cache(path: str, global_drop: bool = False) -> str:
  """Evicts cached pages of the files under `path`; returns the method used."""
  paths = _files(path)
  for file_path in paths:  # dirty pages cannot be evicted: write them first
    try:
      fd = os.open(file_path, os.O_RDONLY)
    except OSError:
      continue
    try:
      os.fdatasync(fd)
    except OSError:
      pass
    finally:
      os.close(fd)
  if global_drop:
    try:
      with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
      return "drop_caches"
    except OSError:
      pass
  if not hasattr(os, "posix_fadvise"):
    return "none (no posix_fadvise; figures are warm)"
  for file_path in paths:
    try:
      fd = os.open(file_path, os.O_RDONLY)
    except OSError:
      continue
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
  return "posix_fadvise(DONTNEED)"


_libc = None


def _load_libc():
  """libc with `mmap`/`mincore`/`munmap` typed, or None where unavailable."""
  global _libc
  if _libc is None:
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
      libc.mmap.restype = ctypes.c_void_p
      libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, ctypes.c_long]
      libc.mincore.restype = ctypes.c_int
      libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
      libc.munmap.restype = ctypes.c_int
      libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
      _libc = libc
    except (OSError, AttributeError, TypeError):
      _libc = False
  return _libc or None


def resident_bytes(path: str) -> tuple[int, int] | None:
  """(bytes in the page cache, total bytes) of the files under `path`.

  None where `mincore` is unavailable. Resident bytes are counted in whole
  pages, so a partly cached last page counts fully.
  """
  libc = _load_libc()
  if libc is None:
    return None
  page = mmap.PAGESIZE
  resident = total = 0
  for file_path in _files(path):
    try:
      fd = os.open(file_path, os.O_RDONLY)
    except OSError:
      continue
    try:
      size = os.fstat(fd).st_size
      total += size
      if size == 0:
        continue
      addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
      if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
      try:
        pages = -(-size // page)
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, size, vec) != 0:
          return None
        resident += sum(b & 1 for b in vec.raw) * page
      finally:
        libc.munmap(addr, size)
    finally:
      os.close(fd)
  return resident, total
