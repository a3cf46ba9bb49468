"""Crash durability of a checkpoint save (`checkpoint.save_checkpoint`,
its `_publish`, and `checkpoint_layout.recover_interrupted_replace`).

A rename is atomic, not durable: after a power cut right after it, the
published directory could hold files whose data never reached the disk,
or the rename itself could be lost after the old checkpoint's removal
was not. Each test records the order of `os.fsync`, `os.rename` /
`os.replace` and `shutil.rmtree` calls during a save of a tiny model and
checks that every file and directory of the checkpoint is fsynced before
the rename that publishes it, the parent directory after it, and the old
checkpoint removed only after that. Files are known by (device, inode),
which a rename keeps: a file fsynced in the staging directory is the same
file in the published one. Each failed before the fsyncs were added.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from dualpath_jax import config
from dualpath_jax.model import checkpoint, checkpoint_layout


def _model():
  from dualpath_jax.model.llama import random_llama  # pylint: disable=g-import-not-at-top
  return random_llama(config.TINY, 0)


@pytest.fixture(scope="module")
def model():
  return _model()


def _ident(path) -> tuple[int, int]:
  """A file's identity, which a rename keeps."""
  st = os.stat(path)
  return st.st_dev, st.st_ino


def _dead_pid() -> int:
  """The pid of a process that has ended."""
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(done.stdout)


class _Calls:
  """Records ("fsync", (dev, inode)), ("rename", src, dst) and ("rmtree",
  path) in the order they happen, passing each on to the real call."""

  def __init__(self, monkeypatch):
    self.events: list[tuple] = []
    real_fsync, real_rename = os.fsync, os.rename
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def fsync(fd):
      st = os.fstat(fd)
      self.events.append(("fsync", (st.st_dev, st.st_ino)))
      return real_fsync(fd)

    def rename(src, dst, *args, **kw):
      self.events.append(("rename", pathlib.Path(src), pathlib.Path(dst)))
      return real_rename(src, dst, *args, **kw)

    def replace(src, dst, *args, **kw):
      self.events.append(("rename", pathlib.Path(src), pathlib.Path(dst)))
      return real_replace(src, dst, *args, **kw)

    def rmtree(path, *args, **kw):
      self.events.append(("rmtree", pathlib.Path(path)))
      return real_rmtree(path, *args, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)

  def index(self, event: tuple, after: int = -1) -> int:
    """The index of the first `event` past `after` (-1: none)."""
    for i in range(after + 1, len(self.events)):
      if self.events[i] == event:
        return i
    return -1

  def rename_to(self, dst: pathlib.Path) -> int:
    """The index of the last rename to `dst` (-1: none)."""
    found = [i for i, e in enumerate(self.events)
             if e[0] == "rename" and e[2] == dst]
    return found[-1] if found else -1

  def fsynced(self, before: int) -> set[tuple[int, int]]:
    return {e[1] for e in self.events[:before] if e[0] == "fsync"}


def _save(tmp_path, monkeypatch, model, how: str):
  """Saves a checkpoint at tmp_path/"ckpt" (`how`: "absent", "empty" or
  "replaced", what was there before), recording the calls of the save;
  returns (target, calls)."""
  target = tmp_path / "ckpt"
  if how == "empty":
    target.mkdir()
  elif how == "replaced":
    checkpoint.save_checkpoint(target, model, weights_id="old",
                               tokenizer_gguf=None)
  calls = _Calls(monkeypatch)
  checkpoint.save_checkpoint(target, model, weights_id="new",
                             tokenizer_gguf=None, overwrite=how == "replaced")
  monkeypatch.undo()
  assert checkpoint.read_metadata(target)["weights_id"] == "new"
  return target, calls


SCENARIOS = ["absent", "empty", "replaced"]


@pytest.mark.parametrize("how", SCENARIOS)
def test_every_file_and_directory_is_fsynced_before_the_publish_rename(
    tmp_path, monkeypatch, model, how):
  """Nothing was fsynced: a power cut right after the rename could leave
  the published checkpoint's files empty or short (Orbax's and
  TensorStore's files included, and the metadata file), or directory
  entries missing."""
  target, calls = _save(tmp_path, monkeypatch, model, how)
  publish = calls.rename_to(target)
  assert publish >= 0
  assert calls.events[publish][1].name.startswith(".ckpt.partial-")
  synced = calls.fsynced(before=publish)
  paths = [target]
  for root, dirs, files in os.walk(target):
    paths += [pathlib.Path(root, name) for name in dirs + files]
  assert len(paths) > 3  # state/, Orbax's files, the metadata
  missing = [str(p.relative_to(tmp_path)) for p in paths
             if _ident(p) not in synced]
  assert not missing, f"not fsynced before the publish rename: {missing}"


@pytest.mark.parametrize("how", SCENARIOS)
def test_the_parent_directory_is_fsynced_after_the_publish_rename(
    tmp_path, monkeypatch, model, how):
  """The rename itself was left to the file system's own time: a power
  cut could undo it after `save_checkpoint` (or `convert`) returned."""
  target, calls = _save(tmp_path, monkeypatch, model, how)
  publish = calls.rename_to(target)
  assert publish >= 0
  assert calls.index(("fsync", _ident(tmp_path)), after=publish) > publish


def test_a_replaced_checkpoint_is_removed_only_after_the_parent_fsync(
    tmp_path, monkeypatch, model):
  """The old checkpoint, renamed aside, was removed right after the new
  one's rename: a power cut could keep the removal and lose the rename,
  leaving neither. It is removed once the rename is durable."""
  target, calls = _save(tmp_path, monkeypatch, model, "replaced")
  publish = calls.rename_to(target)
  old = tmp_path / f".ckpt.old-{os.getpid()}"
  assert calls.rename_to(old) >= 0  # the old one went aside
  removed = calls.index(("rmtree", old), after=publish)
  parent_synced = calls.index(("fsync", _ident(tmp_path)), after=publish)
  assert removed > publish and not old.exists()
  assert -1 < parent_synced < removed


def test_parent_folders_the_save_makes_are_fsynced(tmp_path, monkeypatch,
                                                   model):
  """A checkpoint saved into folders the save made was lost with them in
  a power cut (their own entries never synced): each new folder's entry
  is fsynced in its parent."""
  target = tmp_path / "a" / "b" / "ckpt"
  calls = _Calls(monkeypatch)
  checkpoint.save_checkpoint(target, model, weights_id="w",
                             tokenizer_gguf=None)
  monkeypatch.undo()
  publish = calls.rename_to(target)
  assert publish >= 0
  made_in = calls.fsynced(before=publish)  # the entries of a/ and a/b/
  assert _ident(tmp_path) in made_in and _ident(tmp_path / "a") in made_in
  assert calls.index(("fsync", _ident(tmp_path / "a" / "b")),
                     after=publish) > publish  # the checkpoint's own


def test_recovery_fsyncs_the_parent_before_it_removes_anything(
    tmp_path, monkeypatch, model):
  """`recover_interrupted_replace` renamed the old checkpoint back and
  removed the staged one, or removed an old one left beside a published
  one, without making the rename (its own or the killed save's) durable
  first: a power cut could leave neither checkpoint."""
  target = tmp_path / "ckpt"
  checkpoint.save_checkpoint(target, model, weights_id="old",
                             tokenizer_gguf=None)
  pid = _dead_pid()
  old, staged = tmp_path / f".ckpt.old-{pid}", tmp_path / f".ckpt.partial-{pid}"
  os.rename(target, old)  # killed between the two renames
  checkpoint.save_checkpoint(staged, model, weights_id="new",
                             tokenizer_gguf=None)
  calls = _Calls(monkeypatch)
  assert checkpoint_layout.recover_interrupted_replace(target)
  monkeypatch.undo()
  back = calls.index(("rename", old, target))
  synced = calls.index(("fsync", _ident(tmp_path)), after=back)
  assert -1 < back < synced < calls.index(("rmtree", staged))
  assert checkpoint.read_metadata(target)["weights_id"] == "old"

  leftover = tmp_path / f".ckpt.old-{_dead_pid()}"  # killed removing it
  shutil.copytree(target, leftover)
  calls = _Calls(monkeypatch)
  assert not checkpoint_layout.recover_interrupted_replace(target)
  monkeypatch.undo()
  synced = calls.index(("fsync", _ident(tmp_path)))
  assert -1 < synced < calls.index(("rmtree", leftover))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("name,raises", [
    ("EINVAL", False), ("ENOTSUP", False), ("EIO", True), ("ENOSPC", True)])
def test_a_directory_fsync_the_file_system_cannot_do_is_skipped_only(
    tmp_path, monkeypatch, name, raises):
  """A file system that cannot fsync a directory (EINVAL, ENOTSUP: some
  network and FUSE ones) leaves its entries to its own ordering; any other
  failure (EIO: the data may be lost) is raised, as is a directory that
  cannot be opened."""
  code = getattr(errno, name)
  def fsync(fd):
    raise OSError(code, os.strerror(code))
  monkeypatch.setattr(os, "fsync", fsync)
  if raises:
    with pytest.raises(OSError) as e:
      checkpoint_layout.sync_directory(tmp_path)
    assert e.value.errno == code
  else:
    checkpoint_layout.sync_directory(tmp_path)
  monkeypatch.undo()
  with pytest.raises(FileNotFoundError):
    checkpoint_layout.sync_directory(tmp_path / "missing")
