"""Regression tests for bugs found by an audit of the cold tier (`storage/`).

Each test failed before its fix: the int8 codec on rows at the ends of
float32's range, a damaged index page at open, a corrupt chunk read while the
index cannot write, a refused config that left its layout in a fresh root,
and config values that failed late with unclear errors.
"""

from __future__ import annotations

import os
import sqlite3
import warnings

import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import BlockStore, ColdTierConfig
from storage.codecs import make_codec

CACHE = CacheConfig(block_size=16, dtype="bfloat16")
BLOCK_BYTES = TINY.num_layers * 2 * TINY.num_kv_heads * 16 * TINY.head_dim * 2
SHAPE = (2, 2, 1, 4, 8)


def _store(root, **kw) -> BlockStore:
  kw.setdefault("capacity_bytes", 8 * BLOCK_BYTES)
  return BlockStore(ColdTierConfig(root=str(root), **kw), TINY, CACHE)


from tests.test_storage_races import _blocks, _same  # noqa: E402


# -- int8 codec ------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [
    float(np.finfo(np.float32).max),  # 127 * scale overflowed: inf back
    float(np.nextafter(np.finfo(np.float32).max, np.float32(0))),
    1e-44,  # amax / 127 underflowed to a scale of 0: divided by zero
    3 * float(np.finfo(np.float32).smallest_subnormal),
])
def test_int8_rows_at_the_ends_of_float32_come_back_finite_and_close(
    magnitude):
  codec = make_codec("int8", SHAPE, "float32")
  rng = np.random.default_rng(0)
  x = (rng.uniform(-1, 1, (2, *SHAPE)) * magnitude).astype(np.float32)
  x[:, :, :, :, 0, 0] = magnitude  # every row reaches +amax
  x[:, :, :, :, 0, 1] = -magnitude
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no divide-by-zero, overflow, bad cast
    back = codec.decode(codec.encode(x))
  assert np.isfinite(back).all()
  amax = np.abs(x.astype(np.float64)).max()
  step = max(amax / 127, float(np.finfo(np.float32).smallest_subnormal))
  err = np.abs(back.astype(np.float64) - x.astype(np.float64))
  assert err.max() <= step * 0.5 * (1 + 1e-5) + 1e-300


# -- index: damaged at open ------------------------------------------------


def _damage_page(path, page):
  """Overwrites part of SQLite page `page` (1-based, 4 KiB pages)."""
  with open(path, "r+b") as f:
    f.seek((page - 1) * 4096)
    f.write(os.urandom(200))


def test_a_damaged_layout_page_of_the_index_is_a_clear_error(tmp_path):
  """A damaged page that only the layout check reads raised a bare
  sqlite3.DatabaseError from the open, not the documented ValueError."""
  with _store(tmp_path) as store:
    ids, blocks = _blocks(1, 4, store)
    store.put(ids, blocks)
  path = tmp_path / "index.sqlite"
  with sqlite3.connect(path) as db:  # the page of the `meta` table
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name='meta'"
                      ).fetchone()[0]
  _damage_page(path, page)
  with pytest.raises(ValueError, match=r"index.sqlite cannot be read"):
    _store(tmp_path)
  assert os.listdir(tmp_path / "owners") == []  # no lease left behind


def test_an_index_page_damaged_under_recovery_is_a_clear_error(tmp_path):
  """A damaged page that recovery at open reads (dead writers' rows, via
  the `blocks_owner` index) raised a bare sqlite3.DatabaseError."""
  with _store(tmp_path) as store:
    ids, blocks = _blocks(2, 4, store)
    store.put(ids, blocks)
  path = tmp_path / "index.sqlite"
  with sqlite3.connect(path) as db:
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE "
                      "name='blocks_owner'").fetchone()[0]
  _damage_page(path, page)
  with pytest.raises(ValueError, match=r"index.sqlite cannot be read"):
    _store(tmp_path)
  assert os.listdir(tmp_path / "owners") == []  # the store's lease is freed


# -- a corrupt chunk while the index cannot write ----------------------------


def _disk_full(*_args, **_kwargs):
  raise sqlite3.OperationalError("database or disk is full")


def test_a_corrupt_chunk_is_a_counted_miss_while_the_index_cannot_write(
    tmp_path, monkeypatch):
  """With the index's disk full, reads are checked read only; a corrupt
  chunk among them made the whole read raise (removing it from the index
  failed): the good blocks were lost with it and no miss was counted."""
  with _store(tmp_path) as store:
    ids, blocks = _blocks(3, 4, store)
    store.put(ids, blocks)
    slot = {r.block_id: r.slot for r in store.index.all_ready()}[ids[1]]
    path = os.path.join(store._chunk_root, str(slot), "0")  # pylint: disable=protected-access
    with open(path, "r+b") as f:
      f.seek(100)
      byte = f.read(1)
      f.seek(100)
      f.write(bytes([byte[0] ^ 0xFF]))
    real_transaction = store.index._transaction  # pylint: disable=protected-access
    monkeypatch.setattr(store.index, "_transaction", _disk_full)
    got = store.get(ids)
    assert [g is not None for g in got] == [True, False, True, True]
    assert all(_same(got[i], blocks[i]) for i in (0, 2, 3))
    assert store.stats()["miss_corrupt"] == 1
    assert store.contains(ids) == [True] * 4  # listed until it can be removed
    monkeypatch.setattr(store.index, "_transaction", real_transaction)
    got = store.get(ids)  # the index writes again: removed now
    assert [g is not None for g in got] == [True, False, True, True]
    assert store.stats()["miss_corrupt"] == 2
    assert store.contains(ids) == [True, False, True, True]
    assert slot not in store.stored_slots()
    assert store.index.counts()["deleting"] == 0
    assert store.put([ids[1]], blocks[1:2]).written == 1
    assert _same(store.get([ids[1]])[0], blocks[1])


# -- a refused config leaves nothing behind -----------------------------------


@pytest.mark.parametrize("refused", [
    dict(codec="zstd", chunk_writer="direct"),
    dict(driver="ocdbt", chunk_writer="direct"),
], ids=["zstd", "ocdbt"])
def test_a_refused_chunk_writer_leaves_no_layout_and_no_lease(tmp_path, refused):
  """chunk_writer="direct" where it cannot apply was refused only after the
  index had stored the refused config's layout (and taken a lease it never
  freed): the next open of the fresh root with a config that works failed
  as a layout mismatch."""
  with pytest.raises(ValueError, match="chunk_writer='direct' is not possible"):
    _store(tmp_path, **refused)
  if (tmp_path / "owners").exists():
    assert os.listdir(tmp_path / "owners") == []
  with _store(tmp_path) as store:  # raw, file: another layout
    ids, blocks = _blocks(4, 2, store)
    assert store.put(ids, blocks).written == 2
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


# -- config values that failed late --------------------------------------------


@pytest.mark.parametrize("bad,match", [
    (dict(fsync="no"), "fsync must be a bool"),
    (dict(fsync=0), "fsync must be a bool"),
    (dict(kvstore="file:///tmp/kv"), "kvstore must be a kvstore spec dict"),
    (dict(root=5), "root must be a directory path"),
    (dict(capacity_bytes=10**30), "capacity_bytes=.* is above"),
    (dict(file_io_concurrency=1 << 70), "file_io_concurrency=.* is above"),
], ids=["fsync_str", "fsync_int", "kvstore_str", "root_int", "capacity_huge",
        "concurrency_huge"])
def test_bad_config_values_are_clear_value_errors(tmp_path, bad, match):
  """Each was accepted by ColdTierConfig and failed at open: fsync and a
  string kvstore as "cannot open its block array", a huge capacity with
  OverflowError, a non-path root with TypeError."""
  kw = {"root": str(tmp_path / "store"), **bad}
  with pytest.raises(ValueError, match=match):
    ColdTierConfig(**kw)
  assert not (tmp_path / "store").exists()


def test_good_config_values_still_pass(tmp_path):
  ColdTierConfig(root=tmp_path, fsync=False, kvstore={"driver": "memory"},
                 capacity_bytes=(1 << 62) - 1)


# -- clone keeps who put each block -------------------------------------------


def test_a_clone_keeps_tenants_and_sessions_for_deletion(tmp_path):
  """clone_store put every block under the empty tenant and session: on the
  clone, delete_tenant/delete_session removed nothing and the tenant's
  blocks stayed readable."""
  from storage.clone import clone_store  # pylint: disable=import-outside-toplevel
  with _store(tmp_path / "src", capacity_bytes=16 * BLOCK_BYTES) as src, \
      _store(tmp_path / "dst", capacity_bytes=16 * BLOCK_BYTES) as dst:
    a_ids, a_blocks = _blocks(5, 3, src)
    b_ids, b_blocks = _blocks(6, 2, src)
    c_ids, c_blocks = _blocks(7, 2, src)
    src.put(a_ids, a_blocks, tenant="a", session="s1")
    src.put(b_ids, b_blocks, tenant="b", session="s2")
    src.put(c_ids, c_blocks, tenant="b", session="s3")
    src.put(a_ids[:1], a_blocks[:1], tenant="b", session="s3")  # shared
    assert clone_store(src, dst, batch_blocks=4) == 7
    ids = a_ids + b_ids + c_ids
    blocks = np.concatenate([a_blocks, b_blocks, c_blocks])
    assert all(_same(g, b) for g, b in zip(dst.get(ids), blocks))
    assert dst.delete_session("b", "s3") == 3  # c's two and the shared one
    assert dst.contains(ids) == [False, True, True, True, True, False, False]
    assert dst.delete_tenant("a") == 2
    assert dst.contains(ids) == [False] * 3 + [True] * 2 + [False] * 2
    assert dst.delete_tenant("b") == 2
    assert not any(dst.contains(ids))
