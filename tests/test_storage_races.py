"""The cold tier under concurrent writers, deleters and openers, and when its
disk or index fails: a block id is only ever served its own bytes.

The races are made deterministic by holding a writer inside its chunk write
(an Event) while the other party acts. Two `BlockStore`s on one root stand
for two processes (each has its own index connection and lease).
"""

from __future__ import annotations

import os
import sqlite3
import threading

import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import BlockStore, ColdTierConfig
from storage import block_store as block_store_lib
from storage import index as index_lib

CACHE = CacheConfig(block_size=16, dtype="bfloat16")
BLOCK_BYTES = TINY.num_layers * 2 * TINY.num_kv_heads * 16 * TINY.head_dim * 2


def _store(root, slots=4) -> BlockStore:
  return BlockStore(ColdTierConfig(root=str(root),
                                   capacity_bytes=slots * BLOCK_BYTES),
                    TINY, CACHE)


def _blocks(seed, n, store):  # ([n] ids, [n, L, 2, Hkv, P, D] bf16)
  rng = np.random.default_rng(seed)
  blocks = rng.standard_normal((n, *store.block_shape), dtype=np.float32) * 3
  return [rng.bytes(32) for _ in range(n)], blocks.astype(ml_dtypes.bfloat16)


def _same(got, want) -> bool:
  return got is not None and got.tobytes() == want.tobytes()


def _hold_writes_of(store, block_id):
  """Makes `store`'s writer wait inside the chunk write of `block_id`;
  returns (inside, release) Events."""
  inside, release = threading.Event(), threading.Event()
  write = store._writer.write_chunks  # pylint: disable=protected-access

  def held(refs, blocks):
    if any(r.block_id == block_id for r in refs):
      inside.set()
      assert release.wait(30)
    return write(refs, blocks)
  store._writer.write_chunks = held  # pylint: disable=protected-access
  return inside, release


@pytest.mark.parametrize("processes", [1, 2])
def test_a_delete_during_a_put_never_frees_the_slot_under_its_writer(
    tmp_path, processes):
  """delete_session while the session's put is writing: the slot used to be
  freed at once, the next put took it, and the late write landed on it, so
  that block was served the deleted block's bytes (also after a reopen).
  Now the writer deletes its own bytes after its write ("deleted")."""
  writer = _store(tmp_path)
  other = _store(tmp_path) if processes == 2 else writer
  x_ids, x = _blocks(1, 1, writer)
  y_ids, y = _blocks(2, 1, writer)
  inside, release = _hold_writes_of(writer, x_ids[0])
  future = writer.put_async(x_ids, x, tenant="t", session="s1")
  assert inside.wait(30)
  assert other.delete_session("t", "s1") == 0  # nothing of s1 is stored yet
  assert other.put(y_ids, y, tenant="t", session="s2").statuses == ["write"]
  release.set()
  assert future.result().statuses == [block_store_lib.DELETED]
  for store in {writer, other}:
    assert store.contains(x_ids) == [False]
    assert _same(store.get(y_ids)[0], y[0])
  assert writer.index.counts()["pending"] == 0
  for store in {writer, other}:
    store.close()
  with _store(tmp_path) as reopened:
    assert _same(reopened.get(y_ids)[0], y[0])
    assert reopened.contains(x_ids) == [False]
    # x's slot went back to the free list: the next put takes it
    z_ids, z = _blocks(3, 2, reopened)
    assert reopened.put(z_ids, z).written == 2
    assert all(_same(g, b) for g, b in zip(reopened.get(z_ids + y_ids),
                                            [*z, y[0]]))


def test_a_session_that_finds_its_block_in_flight_deletes_it_too(tmp_path):
  """Session b's put finds the block still being written by session a
  ("in_flight"); b's delete_session removes it, as it does a stored one."""
  with _store(tmp_path) as store:
    ids, blocks = _blocks(4, 2, store)
    inside, release = _hold_writes_of(store, ids[0])
    future = store.put_async(ids, blocks, tenant="t", session="a")
    assert inside.wait(30)
    assert store.put(ids, blocks, tenant="t",
                     session="b").statuses == ["in_flight"] * 2
    store.delete_session("t", "b")
    release.set()
    assert future.result().statuses == [block_store_lib.DELETED] * 2
    assert store.contains(ids) == [False, False]


def test_close_twice_is_harmless_and_use_after_close_says_so(tmp_path):
  """A second close used to close the lease's descriptor number again, by
  then another file's (a newer store's lease: its writes were later taken
  for a dead writer's)."""
  first = _store(tmp_path)
  first.close()
  second = _store(tmp_path)
  first.close()
  ids, blocks = _blocks(5, 1, second)
  assert second.put(ids, blocks).written == 1
  lease = os.path.join(str(tmp_path), "owners", second.index.owner + ".lock")
  assert os.path.exists(lease)
  assert second.index._lease_alive(second.index.owner)  # pylint: disable=protected-access
  for call in (lambda: first.put(ids, blocks), lambda: first.get(ids)):
    with pytest.raises(RuntimeError, match="store at .* is closed"):
      call()
  with pytest.raises(RuntimeError, match="index in .* is closed"):
    first.contains(ids)
  second.close()


def test_a_lease_unlinked_before_it_is_locked_is_taken_again(
    tmp_path, monkeypatch):
  """Another process's sweep of dead leases may unlink a lease file between
  its creation and its lock; the opener then holds a lock on no file, and a
  later open took its in-flight writes for a dead writer's. `_take_lease`
  sees the file gone and takes another; and if the sweep still holds the
  file's lock, it takes another too, instead of failing the open."""
  flock = index_lib.fcntl.flock
  unlinked = []

  def flock_after_a_sweep(fd, op):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if not unlinked:  # the first lease file: swept before the lock
      os.unlink(path)
      unlinked.append(path)
    elif len(unlinked) == 1:  # the second: the sweep still holds its lock
      unlinked.append(path)
      raise BlockingIOError(11, "Resource temporarily unavailable")
    return flock(fd, op)
  monkeypatch.setattr(index_lib.fcntl, "flock", flock_after_a_sweep)
  idx = index_lib.BlockIndex(str(tmp_path), {"v": 1}, num_slots=4)
  monkeypatch.setattr(index_lib.fcntl, "flock", flock)
  lease = os.path.join(str(tmp_path), "owners", idx.owner + ".lock")
  assert len(unlinked) == 2 and lease not in unlinked
  assert os.path.exists(lease)
  other = index_lib.BlockIndex(str(tmp_path), {"v": 1}, num_slots=4)
  other.dead_owner_rows()  # sweeps dead leases
  assert os.path.exists(lease) and other._lease_alive(idx.owner)  # pylint: disable=protected-access
  other.close()
  idx.close()


@pytest.mark.parametrize("content", [b"not a database" * 100, "truncate"],
                         ids=["garbage", "zeroed"])
def test_a_damaged_index_is_a_clear_error(tmp_path, content):
  with _store(tmp_path) as store:
    ids, blocks = _blocks(6, 1, store)
    store.put(ids, blocks)
  path = tmp_path / "index.sqlite"
  if content == "truncate":
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\0" * (len(data) - 100))
  else:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=r"index.sqlite cannot be read"):
    _store(tmp_path)


def _disk_full(*_args, **_kwargs):
  raise sqlite3.OperationalError("database or disk is full")


def test_a_full_disk_reads_on_and_puts_fail_cleanly(tmp_path, monkeypatch):
  """The index cannot write (its disk is full): reads used to raise, since
  each records its access in a write transaction; they are checked read
  only instead. Puts report "failed" instead of raising from the future."""
  with _store(tmp_path, slots=8) as store:
    ids, blocks = _blocks(7, 3, store)
    store.put(ids, blocks)
    real_transaction = store.index._transaction  # pylint: disable=protected-access
    monkeypatch.setattr(store.index, "_transaction", _disk_full)
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))
    new_ids, new_blocks = _blocks(8, 2, store)
    assert store.put(new_ids, new_blocks).statuses == [
        block_store_lib.FAILED] * 2
    monkeypatch.setattr(store.index, "_transaction", real_transaction)
    assert store.contains(new_ids) == [False, False]
    assert store.put(new_ids, new_blocks).written == 2  # space again
    assert store.index.counts()["pending"] == 0


def test_a_failed_commit_leaves_no_row_and_no_bytes_served(tmp_path,
                                                           monkeypatch):
  with _store(tmp_path, slots=8) as store:
    ids, blocks = _blocks(9, 2, store)
    monkeypatch.setattr(store.index, "commit", _disk_full)
    assert store.put(ids, blocks).statuses == [block_store_lib.FAILED] * 2
    monkeypatch.undo()
    assert store.contains(ids) == [False, False]
    assert store.index.counts() == {"ready": 0, "pending": 0, "deleting": 0,
                                    "slots": 8}
