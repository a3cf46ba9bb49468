"""Tests of storage.page_cache: evicting a directory's files and checking they are out."""

from __future__ import annotations

import os

import pytest

from storage.page_cache import drop_page_cache, resident_bytes


def _fs_type(path: str) -> str:
  """The file system type of the mount holding `path` (from /proc/mounts)."""
  best, kind = "", ""
  with open("/proc/mounts") as f:
    for line in f:
      mount, fs = line.split()[1:3]
      if path.startswith(mount) and len(mount) > len(best):
        best, kind = mount, fs
  return kind


def test_drop_then_resident_is_zero_and_a_read_brings_pages_back(tmp_path):
  if resident_bytes(str(tmp_path)) is None:
    pytest.skip(reason="no mincore here")
  if _fs_type(str(tmp_path)) in ("tmpfs", "ramfs"):
    pytest.skip(reason="tmpfs pages cannot be evicted")
  paths = [tmp_path / "a", tmp_path / "sub" / "b"]
  paths[1].parent.mkdir()
  for p in paths:
    p.write_bytes(os.urandom(1 << 20))
  assert resident_bytes(str(tmp_path))[1] == 2 << 20
  assert drop_page_cache(str(tmp_path)) == "posix_fadvise(DONTNEED)"
  assert resident_bytes(str(tmp_path)) == (0, 2 << 20)
  with open(paths[0], "rb") as f:
    f.read(4096)
  resident, total = resident_bytes(str(tmp_path))
  assert 4096 <= resident <= 1 << 20 and total == 2 << 20
  assert resident_bytes(str(paths[1])) == (0, 1 << 20)  # a single file works too


def test_empty_files_and_missing_paths(tmp_path):
  (tmp_path / "empty").write_bytes(b"")
  got = resident_bytes(str(tmp_path))
  assert got is None or got == (0, 0)
  assert drop_page_cache(str(tmp_path / "nothing")) == "posix_fadvise(DONTNEED)"
