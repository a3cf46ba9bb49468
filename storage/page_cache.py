"""Evicting a directory's files from the OS page cache, for cold-read benchmarks.

`drop_page_cache(path)` syncs, then calls `posix_fadvise(POSIX_FADV_DONTNEED)`
on every file under `path`: that evicts exactly those files' clean pages, needs
no privilege and leaves other processes' caches alone (the machine may be
shared). With `global_drop=True` it writes `/proc/sys/vm/drop_caches` instead
where permitted (root). It returns the method used, so a benchmark can say how
cold its "cold" figures are.
"""

from __future__ import annotations

import os


def drop_page_cache(path: str, global_drop: bool = False) -> str:
  """Evicts cached pages of the files under `path`; returns the method used."""
  os.sync()
  if global_drop:
    try:
      with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
      return "drop_caches"
    except OSError:
      pass
  if not hasattr(os, "posix_fadvise"):
    return "none (no posix_fadvise; figures are warm)"
  paths = [path] if os.path.isfile(path) else [
      os.path.join(d, name) for d, _, names in os.walk(path) for name in names]
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
