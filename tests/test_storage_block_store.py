"""Tests of storage.BlockStore on a local TensorStore directory (tmp_path)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading

import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import BlockStore, ColdTierConfig
from storage import index as index_lib

CACHE = CacheConfig(block_size=16, dtype="bfloat16")
BLOCK_BYTES = TINY.num_layers * 2 * TINY.num_kv_heads * 16 * TINY.head_dim * 2


def _store(root, **kw) -> BlockStore:
  kw.setdefault("capacity_bytes", 64 * BLOCK_BYTES)
  return BlockStore(ColdTierConfig(root=str(root), **kw), TINY, CACHE)


def _data(rng, n, store):
  blocks = rng.standard_normal((n, *store.block_shape), dtype=np.float32) * 3
  ids = [rng.bytes(32) for _ in range(n)]
  return ids, blocks.astype(ml_dtypes.bfloat16)


def _same(a, b) -> bool:
  return a is not None and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("driver", ["file", "ocdbt"])
@pytest.mark.parametrize("codec", ["raw", "zstd", "int8", "int8+zstd"])
@pytest.mark.parametrize("n", [1, 7])
def test_put_get_roundtrip(tmp_path, driver, codec, n):
  rng = np.random.default_rng(n)
  with _store(tmp_path, driver=driver, codec=codec, max_batch_blocks=4) as store:
    ids, blocks = _data(rng, n, store)
    result = store.put_async(ids, blocks, tenant="t", session="s").result()
    assert result.statuses == ["write"] * n
    absent = rng.bytes(32)
    got = store.get_async([absent] + ids).result()
    assert got[0] is None
    assert store.contains(ids + [absent]) == [True] * n + [False]
    for g, b in zip(got[1:], blocks):
      if codec in ("raw", "zstd"):
        assert _same(g, b)
      else:  # int8: at most half a step of the row's absmax / 127
        row_max = np.abs(b.astype(np.float32)).reshape(*b.shape[:3], -1).max(-1)
        err = np.abs(g.astype(np.float32) - b.astype(np.float32))
        assert np.all(err <= (row_max / 127 * 0.5 + row_max * 2**-7)[..., None, None])
        assert not _same(g, b)
    stats = store.stats()
    assert stats["hit_blocks"] == n and stats["miss_absent"] == 1
    assert stats["written_blocks"] == n and stats["index_ready"] == n
    # A second put of the same ids writes nothing.
    assert store.put(ids, blocks).statuses == ["present"] * n


def test_survives_reopen(tmp_path):
  rng = np.random.default_rng(3)
  with _store(tmp_path) as store:
    ids, blocks = _data(rng, 5, store)
    store.put_async(ids, blocks)
    store.flush()
  with _store(tmp_path) as store:
    got = store.get(ids)
    assert all(_same(g, b) for g, b in zip(got, blocks))


def test_reopen_with_other_layout_raises(tmp_path):
  with _store(tmp_path, codec="raw"):
    pass
  with pytest.raises(ValueError, match="layout"):
    _store(tmp_path, codec="int8")


@pytest.mark.parametrize("driver", ["file", "ocdbt"])
def test_a_copied_moved_or_linked_store_opens_as_itself(tmp_path, driver):
  """The index recorded the data's absolute path in its layout, so a store
  restored from a copy, moved, or reached through a symlink was refused as
  another layout. It records `<root>/data/` now."""
  rng = np.random.default_rng(41)
  with _store(tmp_path / "a", driver=driver) as store:
    ids, blocks = _data(rng, 3, store)
    assert store.put(ids, blocks).written == 3
  shutil.copytree(tmp_path / "a", tmp_path / "copy", symlinks=True)
  os.rename(tmp_path / "a", tmp_path / "moved")
  os.symlink(tmp_path / "moved", tmp_path / "link")
  for name in ("copy", "moved", "link"):
    with _store(tmp_path / name, driver=driver) as store:
      assert all(_same(g, b) for g, b in zip(store.get(ids), blocks)), name
  with pytest.raises(ValueError, match="layout"):
    _store(tmp_path / "copy", driver=driver, codec="int8")


def test_a_store_that_recorded_its_absolute_path_opens_after_a_move(tmp_path):
  """Indexes made before the location-free layout hold the absolute path
  of `<root>/data/`; such a store opens where it is and after a move, and a
  different layout is still refused."""
  rng = np.random.default_rng(42)
  with _store(tmp_path / "old") as store:
    ids, blocks = _data(rng, 2, store)
    store.put(ids, blocks)
  db = sqlite3.connect(tmp_path / "old" / "index.sqlite")
  layout = json.loads(db.execute(
      "SELECT value FROM meta WHERE key='layout'").fetchone()[0])
  assert layout["kvstore"] == {"driver": "file", "path": "<root>/data/"}
  layout["kvstore"]["path"] = str(tmp_path / "old" / "data") + "/"
  with db:
    db.execute("UPDATE meta SET value=? WHERE key='layout'",
               (json.dumps(layout, sort_keys=True),))
  db.close()
  for name in ("old", "new"):
    if name == "new":
      os.rename(tmp_path / "old", tmp_path / "new")
    with _store(tmp_path / name) as store:
      assert all(_same(g, b) for g, b in zip(store.get(ids), blocks)), name
  with pytest.raises(ValueError, match="layout"):
    _store(tmp_path / "new", codec="zstd")


@pytest.mark.parametrize("kvstore", [
    {"driver": "no_such_driver"},
    {"driver": "file", "path": "/proc/self/no_such_dir/"}])
def test_a_kvstore_that_cannot_open_leaves_no_layout_behind(tmp_path, kvstore):
  """A fresh root given a kvstore that cannot open takes no layout from it
  (it used to: the right config was then refused as another layout) and
  holds no lease; a root with blocks keeps its layout and its blocks."""
  with pytest.raises(ValueError, match="cannot open its block array"):
    _store(tmp_path / "fresh", kvstore=kvstore)
  assert os.listdir(tmp_path / "fresh" / "owners") == []
  with _store(tmp_path / "fresh") as store:
    ids, blocks = _data(np.random.default_rng(31), 2, store)
    assert store.put(ids, blocks).written == 2
  with pytest.raises(ValueError, match="layout"):
    _store(tmp_path / "fresh", kvstore=kvstore)
  with _store(tmp_path / "fresh") as store:
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


def test_lru_eviction_keeps_recently_read(tmp_path):
  rng = np.random.default_rng(4)
  with _store(tmp_path, capacity_bytes=4 * BLOCK_BYTES) as store:
    ids, blocks = _data(rng, 6, store)
    for i in range(4):
      store.put(ids[i:i + 1], blocks[i:i + 1])
    assert store.get(ids[:1])[0] is not None  # block 0 is now the most recent
    store.put(ids[4:6], blocks[4:6])  # evicts the two least recent: 1 and 2
    assert store.contains(ids) == [True, False, False, True, True, True]
    assert store.stats()["evicted_blocks"] == 2
    got = store.get([ids[0], ids[4], ids[5]])
    assert all(_same(g, b) for g, b in zip(got, blocks[[0, 4, 5]]))
    assert len(store.stored_slots()) == 4


def test_admission_second_put(tmp_path):
  rng = np.random.default_rng(5)
  with _store(tmp_path, admission="second_put") as store:
    ids, blocks = _data(rng, 3, store)
    assert store.put(ids[:2], blocks[:2]).statuses == ["deferred"] * 2
    assert store.contains(ids) == [False] * 3
    assert store.stored_slots() == set()
    assert store.put(ids, blocks).statuses == ["write", "write", "deferred"]
    assert store.contains(ids) == [True, True, False]


def test_second_put_admission_forgets_the_oldest_puts_first(tmp_path):
  """"second_put" remembers the last 4 x num_slots blocks put once: the
  oldest are forgotten first (a block put again soon is admitted, one put
  again after 4 x num_slots others is a first put again)."""
  rng = np.random.default_rng(8)
  with _store(tmp_path, admission="second_put",
              capacity_bytes=4 * BLOCK_BYTES) as store:
    assert store.num_slots == 4
    ids, blocks = _data(rng, 20, store)
    for i in range(20):  # one put each: each its own time in the record
      assert store.put(ids[i:i + 1], blocks[i:i + 1]).statuses == ["deferred"]
    assert store.put(ids[19:], blocks[19:]).statuses == ["write"]
    assert store.put(ids[4:5], blocks[4:5]).statuses == ["write"]
    assert store.put(ids[3:4], blocks[3:4]).statuses == ["deferred"]


def test_admission_session_continues(tmp_path):
  rng = np.random.default_rng(6)
  with _store(tmp_path, admission="session_continues") as store:
    ids, blocks = _data(rng, 4, store)
    assert store.put(ids[:2], blocks[:2], session="a").statuses == ["deferred"] * 2
    assert store.put(ids[2:3], blocks[2:3], session="b").statuses == ["deferred"]
    assert store.put(ids[:2], blocks[:2], session="a").statuses == ["write"] * 2
    assert store.put(ids[3:], blocks[3:], session="a").statuses == ["write"]
    assert store.contains(ids) == [True, True, False, True]


def _chunk_path(store, slot):
  return os.path.join(store.config.root, "data", store.chunk_key(slot).decode())


def test_delete_session_and_tenant_remove_bytes(tmp_path):
  rng = np.random.default_rng(7)
  with _store(tmp_path) as store:
    ids, blocks = _data(rng, 9, store)
    store.put(ids[:3], blocks[:3], tenant="x", session="s1")
    store.put(ids[3:6], blocks[3:6], tenant="x", session="s2")
    store.put(ids[6:], blocks[6:], tenant="y", session="s1")
    store.put(ids[:1], blocks[:1], tenant="x", session="s2")  # s2 also uses block 0
    slots = {r.block_id: r.slot for r in store.index.all_ready()}
    assert all(os.path.exists(_chunk_path(store, slots[i])) for i in ids)
    assert store.delete_session("x", "s1") == 3
    assert store.contains(ids) == [False] * 3 + [True] * 6
    assert not any(os.path.exists(_chunk_path(store, slots[i])) for i in ids[:3])
    assert store.delete_tenant("x") == 3
    assert store.contains(ids) == [False] * 6 + [True] * 3
    assert store.stored_slots() == {slots[i] for i in ids[6:]}
    assert all(_same(g, b) for g, b in zip(store.get(ids[6:]), blocks[6:]))
    # Freed slots are reused.
    more_ids, more = _data(rng, 6, store)
    store.put(more_ids, more)
    assert len(store.stored_slots()) == 9


def _flip_bytes(path, rng, count):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for pos in rng.choice(len(data), size=count, replace=False):
      data[pos] ^= int(rng.integers(1, 256))
    f.seek(0)
    f.write(data)


# (codec, chunk_reader): both readers where both apply; zstd is TensorStore's.
READERS = [("raw", "direct"), ("raw", "tensorstore"), ("zstd", "tensorstore"),
           ("int8", "direct"), ("int8", "tensorstore")]


@pytest.mark.parametrize("codec,reader", READERS)
def test_corrupt_torn_and_missing_chunks_are_misses(tmp_path, codec, reader):
  rng = np.random.default_rng(8)
  with _store(tmp_path, codec=codec, chunk_reader=reader) as store:
    assert store.chunk_reader == reader
    ids, blocks = _data(rng, 24, store)
    store.put(ids, blocks)
    slots = {r.block_id: r.slot for r in store.index.all_ready()}
    flipped, torn, missing = ids[0:8:2], [ids[9], ids[13]], [ids[17]]
    for bid in flipped:
      _flip_bytes(_chunk_path(store, slots[bid]), rng, int(rng.integers(1, 4)))
    for bid in torn:
      path = _chunk_path(store, slots[bid])
      os.truncate(path, int(rng.integers(1, os.path.getsize(path))))
    for bid in missing:
      os.unlink(_chunk_path(store, slots[bid]))
    bad = set(flipped + torn + missing)
    got = store.get(ids)
    for bid, g, b in zip(ids, got, blocks):
      if bid in bad:
        assert g is None
      elif codec != "int8":
        assert _same(g, b)
      else:
        assert g is not None
    stats = store.stats()
    assert stats["miss_corrupt"] == len(flipped) + len(torn)
    assert stats["miss_missing"] == len(missing)
    assert stats["hit_blocks"] == len(ids) - len(bad)
    # Bad blocks are dropped from the index and their bytes removed.
    assert store.contains(ids) == [bid not in bad for bid in ids]
    assert not store.stored_slots() & {slots[b] for b in bad}
    assert store.put(list(bad), blocks[[ids.index(b) for b in bad]]).written == len(bad)


def test_raced_slot_reuse_is_a_miss(tmp_path):
  rng = np.random.default_rng(9)
  with _store(tmp_path, capacity_bytes=2 * BLOCK_BYTES) as store:
    ids, blocks = _data(rng, 3, store)
    store.put(ids[:2], blocks[:2])
    ref = store.index.lookup(ids[:1])[0]
    store.put(ids[2:], blocks[2:])  # evicts block 0 and reuses its slot
    assert store.index.touch([ref]) == [False]
    assert store.index.lookup(ids[2:])[0].slot == ref.slot


def test_backpressure_drops_instead_of_blocking(tmp_path):
  rng = np.random.default_rng(10)
  with _store(tmp_path, max_pending_write_bytes=3 * BLOCK_BYTES, io_threads=1) as store:
    ids, blocks = _data(rng, 4, store)
    gate = threading.Event()
    real_put = store._writer.put  # pylint: disable=protected-access

    def slow_put(*args):
      gate.wait(10)
      return real_put(*args)

    store._writer.put = slow_put  # pylint: disable=protected-access
    first = store.put_async(ids[:2], blocks[:2])
    second = store.put_async(ids[2:], blocks[2:])  # 4 blocks > budget of 3
    assert second.result(timeout=1).statuses == ["dropped"] * 2
    gate.set()
    assert first.result(timeout=10).statuses == ["write"] * 2
    assert store.stats()["dropped_blocks"] == 2


def test_concurrent_puts_and_gets_from_threads(tmp_path):
  rng = np.random.default_rng(11)
  with _store(tmp_path, io_threads=3, max_batch_blocks=2) as store:
    ids, blocks = _data(rng, 24, store)
    futures = [store.put_async(ids[i:i + 3], blocks[i:i + 3], session=str(i))
               for i in range(0, 24, 3)]
    assert all(f.result().written == 3 for f in futures)
    gets = [store.get_async(ids[i::4]) for i in range(4)]
    for i, f in enumerate(gets):
      assert all(_same(g, b) for g, b in zip(f.result(), blocks[i::4]))


def test_bad_input_raises(tmp_path):
  with pytest.raises(ValueError, match="holds no block"):
    _store(tmp_path / "a", capacity_bytes=BLOCK_BYTES - 1)
  with pytest.raises(ValueError, match="codec"):
    ColdTierConfig(root=str(tmp_path), codec="gzip")
  with pytest.raises(ValueError, match="admission"):
    ColdTierConfig(root=str(tmp_path), admission="lfu")
  (tmp_path / "file").write_bytes(b"kept")
  for root in (tmp_path / "file", tmp_path / "file" / "sub"):
    with pytest.raises(ValueError, match="cannot make it a directory"):
      _store(root)
  assert (tmp_path / "file").read_bytes() == b"kept"
  with _store(tmp_path / "b") as store:
    ids, blocks = _data(np.random.default_rng(12), 2, store)
    with pytest.raises(ValueError, match="2 ids for 1 blocks"):
      store.put_async(ids, blocks[:1])
    with pytest.raises(ValueError, match="non-empty bytes"):
      store.put_async(["abc", ids[1]], blocks)
    with pytest.raises(ValueError, match="bfloat16"):
      store.put_async(ids, blocks.astype(np.float32))
    with pytest.raises(ValueError, match="non-empty bytes"):
      store.get_async([b""])


def test_bad_names_values_and_configs_change_nothing_stored(tmp_path):
  """Refused at the call, with the store's blocks as they were:
  `delete_session(tenant, None)` used to delete the whole tenant, a None
  tenant to fail inside the write (rows left pending), a bytes tenant to be
  stored under a key `delete_tenant("t")` never matched, NaN to be stored
  by the int8 codec without it, and float sizes to pass the config."""
  for kw in (dict(capacity_bytes=16.0 * BLOCK_BYTES), dict(max_batch_blocks=2.5),
             dict(io_threads=True)):
    with pytest.raises(ValueError, match="must be an integer"):
      ColdTierConfig(root=str(tmp_path / "c"), **kw)
  for codec in ("raw", "int8"):
    with _store(tmp_path / codec, codec=codec) as store:
      ids, blocks = _data(np.random.default_rng(13), 3, store)
      assert store.put(ids, blocks, tenant="t", session="s").written == 3
      before = store.get(ids)
      with pytest.raises(TypeError, match="session must be a str"):
        store.delete_session("t", None)
      with pytest.raises(TypeError, match="tenant must be a str"):
        store.delete_tenant(None)
      new_ids, new_blocks = _data(np.random.default_rng(14), 2, store)
      for tenant in (None, b"t"):
        with pytest.raises(TypeError, match="tenant must be a str"):
          store.put_async(new_ids, new_blocks, tenant=tenant)
      bad = new_blocks.copy()
      bad[0, 0, 0, 0, 0, 0] = np.nan
      bad[1, 0, 0, 0, 0, 0] = np.inf
      if codec == "int8":
        with pytest.raises(ValueError, match="cannot store NaN or inf"):
          store.put_async(new_ids, bad)
      else:  # raw keeps them bit for bit
        assert store.put(new_ids, bad).written == 2
        assert all(_same(g, b) for g, b in zip(store.get(new_ids), bad))
        assert store.delete_session("", "") == 2
      assert store.contains(new_ids) == [False, False]
      assert all(_same(g, b) for g, b in zip(store.get(ids), before))
      assert store.delete_session("t", "s") == 3


def test_index_states_hide_uncommitted_rows(tmp_path):
  rng = np.random.default_rng(13)
  idx = index_lib.BlockIndex(str(tmp_path), {"v": 1}, num_slots=4)
  ids = [rng.bytes(32) for _ in range(3)]
  res = idx.reserve(ids, "t", "s")
  assert res.statuses == ["write"] * 3
  assert idx.contains(ids) == [False] * 3  # PENDING: invisible
  assert idx.reserve(ids[:1], "t", "s").statuses == ["in_flight"]
  idx.commit(res.to_write[:2])
  assert idx.contains(ids) == [True, True, False]
  other = index_lib.BlockIndex(str(tmp_path), {"v": 1}, num_slots=4)
  assert other.dead_owner_rows() == []  # the first owner is alive
  idx.close()  # its lease is gone: its PENDING row belongs to nobody
  taken = other.dead_owner_rows()
  assert [r.block_id for r in taken] == ids[2:]
  other.release(taken)
  assert other.counts() == {"ready": 2, "pending": 0, "deleting": 0, "slots": 4}
  other.close()


def test_index_forgets_only_a_layout_it_made_unused_and_alone(tmp_path):
  """`forget_layout` undoes a failed open's layout, never one that another
  open made, one another live process uses, or one with blocks."""
  idx = index_lib.BlockIndex(str(tmp_path), {"v": 1}, num_slots=4)
  other = index_lib.BlockIndex(str(tmp_path), {"v": 1}, num_slots=4)
  assert idx.made_layout and not other.made_layout
  assert not other.forget_layout()  # not its layout
  assert not idx.forget_layout()  # `other` is alive
  other.close()
  idx.reserve([b"x" * 32], "t", "s")
  assert not idx.forget_layout()  # a block row exists
  idx.close()
  fresh = tmp_path / "fresh"
  idx = index_lib.BlockIndex(str(fresh), {"v": 1}, num_slots=4)
  assert idx.forget_layout() and not idx.forget_layout()
  idx.close()
  index_lib.BlockIndex(str(fresh), {"v": 2}, num_slots=4).close()


def test_any_kvstore_as_base(tmp_path):
  """The block bytes may live in any TensorStore kvstore (here: memory)."""
  rng = np.random.default_rng(14)
  with _store(tmp_path, kvstore={"driver": "memory", "path": "kv/"}) as store:
    ids, blocks = _data(rng, 3, store)
    store.put(ids, blocks)
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))
    assert not os.path.exists(tmp_path / "data")  # nothing went to the local disk
    assert store.delete_tenant("") == 3 and store.stored_slots() == set()


@pytest.mark.parametrize("mode", ["default", "direct"])
def test_file_io_modes_roundtrip(tmp_path, mode):
  rng = np.random.default_rng(15)
  with _store(tmp_path, file_io_mode=mode) as store:
    ids, blocks = _data(rng, 3, store)
    store.put(ids, blocks)
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


@pytest.mark.parametrize("n", [1, 5])
def test_one_file_per_block_in_its_slot_directory(tmp_path, n):
  """Layout: slot s is the file data/c/s/0, made by the store's batch mkdir."""
  rng = np.random.default_rng(n)
  with _store(tmp_path / "s") as store:
    ids, blocks = _data(rng, n, store)
    assert store.put(ids, blocks).written == n
    slots = store.stored_slots()
    assert len(slots) == n
    for slot in slots:
      path = os.path.join(store.config.root, "data", "c", str(slot), "0")
      assert os.path.isfile(path) and os.path.getsize(path) > blocks[0].nbytes
    assert all(_same(a, b) for a, b in zip(store.get(ids), blocks))


@pytest.mark.parametrize("codec,reader", READERS)
def test_get_into_a_caller_buffer(tmp_path, codec, reader):
  """get(ids, out=buf): hits land in buf's rows (views), misses are None."""
  rng = np.random.default_rng(21)
  with _store(tmp_path, codec=codec, max_batch_blocks=3, chunk_reader=reader) as store:
    ids, blocks = _data(rng, 7, store)
    store.put(ids[:5], blocks[:5])
    order = [ids[0], ids[6], ids[2], ids[5], ids[4], ids[1], ids[3]]  # 2 misses inside
    buf = np.zeros((len(order), *store.block_shape), blocks.dtype)
    got = store.get(order, out=buf)
    fresh = store.get(order)
    assert [g is None for g in got] == [f is None for f in fresh] == [
        False, True, False, True, False, False, False]
    for i, (g, f) in enumerate(zip(got, fresh)):
      if g is not None:
        assert g.tobytes() == f.tobytes() and np.shares_memory(g, buf[i])
    if codec != "int8":
      assert all(_same(got[order.index(b)], blocks[i]) for i, b in enumerate(ids[:5]))


def test_get_into_rejects_a_wrong_buffer(tmp_path):
  rng = np.random.default_rng(22)
  with _store(tmp_path) as store:
    ids, blocks = _data(rng, 2, store)
    store.put(ids, blocks)
    for bad in (np.zeros((1, *store.block_shape), blocks.dtype),  # too few rows
                np.zeros((2, *store.block_shape), np.float32),  # wrong dtype
                np.zeros((2, *store.block_shape), blocks.dtype)[:, ::-1]):  # not contiguous
      with pytest.raises(ValueError, match="out must be"):
        store.get(ids, out=bad)


@pytest.mark.parametrize("reader", ["direct", "tensorstore"])
def test_get_into_a_buffer_with_a_corrupt_chunk(tmp_path, reader):
  """The bad chunk is a miss, the others land in the buffer (TensorStore:
  by its per-chunk fallback)."""
  rng = np.random.default_rng(23)
  with _store(tmp_path, chunk_reader=reader) as store:
    ids, blocks = _data(rng, 4, store)
    store.put(ids, blocks)
    slot = store.index.lookup(ids[1:2])[0].slot
    path = os.path.join(store.config.root, "data", "c", str(slot), "0")
    with open(path, "r+b") as f:
      f.seek(100)
      byte = f.read(1)
      f.seek(100)
      f.write(bytes([byte[0] ^ 0xFF]))
    buf = np.zeros((4, *store.block_shape), blocks.dtype)
    got = store.get(ids, out=buf)
    assert got[1] is None and store.stats()["miss_corrupt"] == 1
    assert all(_same(got[i], blocks[i]) for i in (0, 2, 3))


def test_reads_do_not_sync_the_index_but_writes_do(tmp_path):
  """touch() commits with synchronous=NORMAL and restores FULL for the rest."""
  rng = np.random.default_rng(24)
  with _store(tmp_path) as store:
    ids, blocks = _data(rng, 2, store)
    store.put(ids, blocks)
    seen = []
    real = store.index._db

    class Spy:  # records the synchronous level each COMMIT runs under
      def execute(self, sql, *args):
        if sql == "COMMIT":
          seen.append(real.execute("PRAGMA synchronous").fetchone()[0])
        return real.execute(sql, *args)

      def __getattr__(self, name):
        return getattr(real, name)

    store.index._db = Spy()
    try:
      assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))  # touch
      store.put(*_data(rng, 1, store))  # reserve + commit
    finally:
      store.index._db = real
    assert seen == [1, 2, 2]  # NORMAL for the touch, FULL for reserve and commit
    assert real.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_slot_directories_are_made_a_group_at_a_time(tmp_path):
  """The first write makes its slot's aligned group of 256 directories, and the next."""
  rng = np.random.default_rng(25)
  with _store(tmp_path, capacity_bytes=600 * BLOCK_BYTES) as store:
    ids, blocks = _data(rng, 1, store)
    store.put(ids, blocks)
    chunk_root = os.path.join(store.config.root, "data", "c")
    store._slot_dirs.wait()  # the group made ahead is complete
    assert sorted(map(int, os.listdir(chunk_root))) == list(range(512))
  from storage import layout
  dirs = layout.SlotDirectories(chunk_root, 600)  # as after a reopen
  dirs.ensure([599])  # the last group, clipped to num_slots; nothing after it
  dirs.close()
  assert sorted(map(int, os.listdir(chunk_root))) == list(range(600))


def test_a_slot_directory_that_cannot_be_made_fails_the_put_and_is_retried(tmp_path):
  rng = np.random.default_rng(26)
  with _store(tmp_path) as store:
    chunk_root = os.path.join(store.config.root, "data", "c")
    store._slot_dirs.wait()  # the directories made at open...
    shutil.rmtree(chunk_root)
    open(chunk_root, "w").close()  # ...replaced by a file
    ids, blocks = _data(rng, 2, store)
    assert store.put(ids, blocks).statuses == ["failed"] * 2
    os.unlink(chunk_root)  # the next put makes the directories again
    assert store.put(ids, blocks).written == 2
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


def test_opening_a_store_starts_the_directories_of_its_next_fresh_slots(tmp_path):
  rng = np.random.default_rng(27)
  chunk_root = os.path.join(str(tmp_path), "data", "c")
  with _store(tmp_path, capacity_bytes=600 * BLOCK_BYTES) as store:
    store._slot_dirs.wait()  # for the background group
    assert sorted(map(int, os.listdir(chunk_root))) == list(range(256))
    ids, blocks = _data(rng, 300, store)
    assert store.put(ids, blocks).written == 300
  assert sorted(map(int, os.listdir(chunk_root))) == list(range(600))
  for s in range(300, 600):  # as if never made
    os.rmdir(os.path.join(chunk_root, str(s)))
  with _store(tmp_path, capacity_bytes=600 * BLOCK_BYTES) as store:
    assert store.index.next_fresh_slot() == 300
    store._slot_dirs.wait()
    # The group of slot 300 ([256, 512)) is made again at open; slots >= 512 wait for a put.
    assert sorted(map(int, os.listdir(chunk_root))) == list(range(512))
