"""Tests of storage.chunk_writer: the direct writer's chunk files are TensorStore's.

The reference is TensorStore itself: the same blocks put into a store whose
chunks TensorStore writes (`chunk_writer="tensorstore"`) and into one whose
chunks the direct writer writes must leave byte-identical chunk files, which
TensorStore then reads and checksums.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import BlockStore, ColdTierConfig
from storage import chunk_writer as chunk_writer_lib
from storage_support import o_direct_works

# (block_size, head_dim, dtype): chunk bytes a 4 KiB multiple, not one, and < 4 KiB.
SHAPES = [(16, 16, "bfloat16"), (16, 24, "float32"), (3, 16, "float16")]


def _model(head_dim: int):
  return dataclasses.replace(TINY, head_dim=head_dim)


def _store(root, block_size, head_dim, dtype, **kw) -> BlockStore:
  cache = CacheConfig(block_size=block_size, dtype=dtype)
  kw.setdefault("capacity_bytes", 1 << 24)
  return BlockStore(ColdTierConfig(root=str(root), **kw), _model(head_dim), cache)


def _blocks(rng, store, n):
  data = rng.standard_normal((n, *store.block_shape), dtype=np.float32) * 5
  return [rng.bytes(32) for _ in range(n)], data.astype(store.codec.dtype)


def _chunk_files(store) -> dict[int, bytes]:
  root = os.path.join(store.config.root, "data", "c")
  return {slot: open(os.path.join(root, str(slot), "0"), "rb").read()
          for slot in store.stored_slots()}


@pytest.mark.parametrize("codec,sync", [("raw", "syncfs"), ("int8", "syncfs"), ("raw", "fsync")])
@pytest.mark.parametrize("block_size,head_dim,dtype", SHAPES)
def test_chunk_files_are_byte_identical_to_tensorstores(tmp_path, codec, sync, block_size,
                                                        head_dim, dtype):
  rng = np.random.default_rng(block_size * head_dim)
  with _store(tmp_path / "ts", block_size, head_dim, dtype, codec=codec,
              chunk_writer="tensorstore") as ts_store, \
       _store(tmp_path / "direct", block_size, head_dim, dtype, codec=codec,
              chunk_writer="direct", sync=sync, max_batch_blocks=4) as direct:
    assert (ts_store.chunk_writer, direct.chunk_writer) == ("tensorstore", "direct")
    ids, blocks = _blocks(rng, direct, 9)
    assert ts_store.put(ids, blocks).written == 9
    assert direct.put(ids, blocks).written == 9
    reference, written = _chunk_files(ts_store), _chunk_files(direct)
    assert sorted(reference) == sorted(written) and len(written) == 9
    for slot in reference:
      assert written[slot] == reference[slot]
    # TensorStore reads the direct writer's chunks (and checks their CRC32C).
    for got, want in zip(direct.get(ids), ts_store.get(ids)):
      assert got is not None and got.tobytes() == want.tobytes()
    if codec == "raw":
      assert all(g.tobytes() == b.tobytes() for g, b in zip(direct.get(ids), blocks))
    # No temporary file is left behind.
    assert not [f for d, _, fs in os.walk(tmp_path / "direct" / "data") for f in fs
                if f.endswith(".__lock")]


def test_short_writes_are_completed(tmp_path, monkeypatch):
  """A pwritev that writes less than asked is retried from where it stopped."""
  rng = np.random.default_rng(2)
  real = os.pwritev
  calls = []

  def at_most_1000_bytes(fd, buffers, offset):
    calls.append(offset)
    first = memoryview(buffers[0])[:1000]
    return real(fd, [first], offset)

  with _store(tmp_path / "ts", 16, 24, "float32", chunk_writer="tensorstore") as ts_store, \
       _store(tmp_path / "d", 16, 24, "float32", chunk_writer="direct") as store:
    ids, blocks = _blocks(rng, store, 2)
    ts_store.put(ids, blocks)
    monkeypatch.setattr(chunk_writer_lib.os, "pwritev", at_most_1000_bytes)
    assert store.put(ids, blocks).written == 2
    monkeypatch.undo()
    assert len(calls) > 2 * blocks[0].nbytes // 1000
    assert _chunk_files(store) == _chunk_files(ts_store)


def test_a_reused_slot_is_rewritten_in_place(tmp_path):
  """Slot reuse (LRU eviction) overwrites the slot's file: same inode, TensorStore's bytes."""
  rng = np.random.default_rng(3)
  two_blocks = 2 * (2 * 2 * 2 * 16 * 16 * 2)  # TINY [L, 2, Hkv, P, D] bf16 = 4 KiB each
  with _store(tmp_path / "d", 16, 16, "bfloat16", chunk_writer="direct",
              capacity_bytes=two_blocks) as store, \
       _store(tmp_path / "ts", 16, 16, "bfloat16", chunk_writer="tensorstore",
              capacity_bytes=two_blocks) as ts_store:
    ids, blocks = _blocks(rng, store, 4)
    for s_ in (store, ts_store):
      assert s_.put(ids[:2], blocks[:2]).written == 2
    files = {slot: os.stat(store._chunk_writer.chunk_path(slot)) for slot in store.stored_slots()}
    for s_ in (store, ts_store):
      assert s_.put(ids[2:], blocks[2:]).written == 2  # evicts both, reuses their slots
    assert store.contains(ids) == [False, False, True, True]
    for slot, before in files.items():
      after = os.stat(store._chunk_writer.chunk_path(slot))
      assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert _chunk_files(store) == _chunk_files(ts_store)
    assert all(g.tobytes() == b.tobytes() for g, b in zip(store.get(ids[2:]), blocks[2:]))


def test_a_read_racing_a_rewrite_is_a_race_not_damage(tmp_path):
  """A torn chunk under a block that was evicted meanwhile: miss_raced, nothing removed."""
  rng = np.random.default_rng(13)
  with _store(tmp_path, 16, 16, "bfloat16", chunk_writer="direct", capacity_bytes=8192) as store:
    ids, blocks = _blocks(rng, store, 3)
    store.put(ids[:2], blocks[:2])
    stale = store.index.lookup(ids[:1])[0]  # a reader looked block 0 up...
    store.put(ids[2:], blocks[2:])          # ...then it was evicted and its slot rewritten
    assert store.index.lookup(ids[2:])[0].slot == stale.slot
    path = store._chunk_writer.chunk_path(stale.slot)
    good = open(path, "rb").read()
    open(path, "r+b").write(b"\x00" * 100)  # what the reader saw mid-rewrite
    batch, ok, bad = store._reader.read_chunks([stale])  # pylint: disable=protected-access
    assert ok == [False] and bad[0][1] == "corrupt"
    open(path, "wb").write(good)  # the rewrite completes
    store._bad_chunks.drop(bad)  # pylint: disable=protected-access
    stats = store.stats()
    assert (stats["miss_raced"], stats["miss_corrupt"]) == (1, 0)
    assert store.contains(ids[2:]) == [True]  # the new block and its chunk stay
    assert store.get(ids[2:])[0].tobytes() == blocks[2].tobytes()


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_corrupt_direct_chunks_are_misses(tmp_path, codec):
  rng = np.random.default_rng(4)
  with _store(tmp_path, 16, 24, "float32", codec=codec, chunk_writer="direct") as store:
    ids, blocks = _blocks(rng, store, 8)
    store.put(ids, blocks)
    slots = {r.block_id: r.slot for r in store.index.all_ready()}
    root = os.path.join(store.config.root, "data", "c")
    for block_id in ids[:3]:
      path = os.path.join(root, str(slots[block_id]), "0")
      data = bytearray(open(path, "rb").read())
      at = int(rng.integers(0, len(data)))
      data[at] ^= 0x5A
      open(path, "wb").write(bytes(data))
    got = store.get(ids)
    assert [g is None for g in got] == [True] * 3 + [False] * 5
    assert store.stats()["miss_corrupt"] == 3


def test_a_failed_write_is_not_committed(tmp_path, monkeypatch):
  rng = np.random.default_rng(5)
  with _store(tmp_path, 16, 16, "bfloat16", chunk_writer="direct") as store:
    ids, blocks = _blocks(rng, store, 4)

    def fail(path, *args):
      raise OSError(errno.EIO, "injected write failure", path)

    monkeypatch.setattr(store._chunk_writer, "_write_file", fail)
    assert store.put(ids, blocks).statuses == ["failed"] * 4
    monkeypatch.undo()
    assert store.contains(ids) == [False] * 4
    assert store.index.counts()["pending"] == 0
    assert store.stored_slots() == set()
    assert store.put(ids, blocks).written == 4  # the slots are usable again


def test_direct_writer_is_refused_where_it_cannot_apply(tmp_path):
  with pytest.raises(ValueError, match="zstd"):
    _store(tmp_path / "a", 16, 16, "bfloat16", codec="zstd", chunk_writer="direct")
  with pytest.raises(ValueError, match="local `file` kvstore"):
    _store(tmp_path / "b", 16, 16, "bfloat16", driver="ocdbt", chunk_writer="direct")
  with _store(tmp_path / "c", 16, 16, "bfloat16", codec="zstd") as store:
    assert store.chunk_writer == "tensorstore"  # auto
  with _store(tmp_path / "d", 16, 16, "bfloat16") as store:
    assert store.chunk_writer == "direct"  # auto on a local file kvstore
  with pytest.raises(ValueError, match="chunk_writer"):
    ColdTierConfig(root=str(tmp_path), chunk_writer="fast")


@pytest.mark.parametrize("sync", ["syncfs", "fsync"])
def test_each_batch_is_made_durable_before_the_index_commits(tmp_path, monkeypatch, sync):
  """syncfs: one per batch, no per-chunk fsync; fsync: file and directory per chunk."""
  rng = np.random.default_rng(7)
  events = []
  real_syncfs, real_fsync = chunk_writer_lib.syncfs, chunk_writer_lib.os.fsync
  with _store(tmp_path, 16, 16, "bfloat16", chunk_writer="direct", sync=sync,
              max_batch_blocks=4) as store:
    store._slot_dirs.ensure(range(store.num_slots))  # their fsyncs are not the writer's
    monkeypatch.setattr(chunk_writer_lib, "syncfs",
                        lambda path: events.append("syncfs") or real_syncfs(path))
    monkeypatch.setattr(chunk_writer_lib.os, "fsync",
                        lambda fd: events.append("fsync") or real_fsync(fd))
    real_commit = store.index.commit
    monkeypatch.setattr(store.index, "commit",
                        lambda refs: events.append(f"commit{len(refs)}") or real_commit(refs))
    ids, blocks = _blocks(rng, store, 10)
    assert store.put(ids, blocks).written == 10
  if sync == "syncfs":
    assert events == ["syncfs", "commit4", "syncfs", "commit4", "syncfs", "commit2"]
  else:
    per_batch = [n for n in (4, 4, 2)]
    expected = []
    for n in per_batch:
      expected += ["fsync"] * (2 * n) + [f"commit{n}"]
    assert events == expected


def test_a_failed_sync_fails_the_put(tmp_path, monkeypatch):
  rng = np.random.default_rng(8)

  def broken(path):
    raise OSError(errno.EIO, "injected writeback error", path)

  with _store(tmp_path, 16, 16, "bfloat16", chunk_writer="direct") as store:
    ids, blocks = _blocks(rng, store, 3)
    monkeypatch.setattr(chunk_writer_lib, "syncfs", broken)
    assert store.put(ids, blocks).statuses == ["failed"] * 3
    monkeypatch.undo()
    assert store.contains(ids) == [False] * 3
    assert store.stored_slots() == set()
    assert store.put(ids, blocks).written == 3


def test_bad_sync_mode_is_refused(tmp_path):
  with pytest.raises(ValueError, match="sync"):
    ColdTierConfig(root=str(tmp_path), sync="sometimes")


def test_a_failed_batch_waits_for_its_other_chunks_before_freeing_their_slots(
    tmp_path, monkeypatch):
  """A chunk still being written when another fails must land before the slots are freed."""
  import threading
  import time
  rng = np.random.default_rng(9)
  done = []
  first_fail = threading.Event()

  with _store(tmp_path, 16, 16, "bfloat16", chunk_writer="direct",
              file_io_concurrency=4) as store:
    writer = store._chunk_writer
    real = writer._write_file

    def slow_or_failing(path, *args):
      if path == writer.chunk_path(0):
        first_fail.set()
        raise OSError(errno.EIO, "injected", path)
      first_fail.wait(5)
      time.sleep(0.2)
      created = real(path, *args)
      done.append(time.perf_counter())
      return created

    ids, blocks = _blocks(rng, store, 4)
    monkeypatch.setattr(writer, "_write_file", slow_or_failing)
    statuses = store.put(ids, blocks).statuses
    returned = time.perf_counter()
    monkeypatch.undo()
    assert statuses == ["failed"] * 4
    assert len(done) == 3 and max(done) < returned
    assert store.stored_slots() == set()  # the landed chunks were removed with the rows


@pytest.mark.parametrize("block_size,head_dim,dtype", SHAPES)
def test_o_direct_writes_the_whole_pages_and_the_same_bytes(tmp_path, block_size, head_dim,
                                                            dtype):
  """file_io_mode="direct": pages with O_DIRECT, the rest buffered; identical files."""
  rng = np.random.default_rng(10)
  with _store(tmp_path / "ts", block_size, head_dim, dtype,
              chunk_writer="tensorstore") as ts_store, \
       _store(tmp_path / "d", block_size, head_dim, dtype, chunk_writer="direct",
              file_io_mode="direct") as store:
    ids, blocks = _blocks(rng, store, 5)
    ts_store.put(ids, blocks)
    store.put(ids, blocks)
    assert _chunk_files(store) == _chunk_files(ts_store)
    pages = blocks[0].nbytes // 4096 * 4096
    expected = 5 * pages if o_direct_works(str(tmp_path)) else 0
    assert store._chunk_writer.direct_bytes == expected


def test_no_o_direct_on_default_mode_and_fallback_where_refused(tmp_path, monkeypatch):
  rng = np.random.default_rng(11)
  with _store(tmp_path / "a", 16, 16, "bfloat16", chunk_writer="direct",
              file_io_mode="default") as store:
    ids, blocks = _blocks(rng, store, 2)
    store.put(ids, blocks)
    assert store._chunk_writer.direct_bytes == 0
  real_open = os.open

  def no_direct(path, flags, *args):
    if flags & os.O_DIRECT:
      raise OSError(errno.EINVAL, "O_DIRECT not supported", path)
    return real_open(path, flags, *args)

  with _store(tmp_path / "b", 16, 16, "bfloat16", chunk_writer="direct",
              file_io_mode="direct") as store:
    monkeypatch.setattr(chunk_writer_lib.os, "open", no_direct)
    ids, blocks = _blocks(rng, store, 3)
    assert store.put(ids, blocks).written == 3
    monkeypatch.undo()
    assert store._chunk_writer.direct_bytes == 0 and not store._chunk_writer.o_direct
    assert all(g.tobytes() == b.tobytes() for g, b in zip(store.get(ids), blocks))


@pytest.mark.parametrize("aligned", [True, False])
def test_page_aligned_rows_go_to_o_direct_without_a_copy(tmp_path, aligned, monkeypatch):
  import mmap
  rng = np.random.default_rng(12)
  if not o_direct_works(str(tmp_path)):
    pytest.skip(reason="tmp_path's file system has no O_DIRECT (the fallback test covers it)")
  with _store(tmp_path, 16, 16, "bfloat16", chunk_writer="direct",
              file_io_mode="direct") as store:
    writer = store._chunk_writer
    copies = []
    real_copy = writer._aligned_copy
    monkeypatch.setattr(writer, "_aligned_copy", lambda d: copies.append(1) or real_copy(d))
    ids, blocks = _blocks(rng, store, 4)
    raw = blocks.view(np.uint8).reshape(-1)
    page = np.frombuffer(mmap.mmap(-1, raw.nbytes + 8192), np.uint8)
    src = page[(0 if aligned else 64):][:raw.nbytes]
    src[:] = raw
    assert store.put(ids, src.view(blocks.dtype).reshape(blocks.shape)).written == 4
    assert len(copies) == (0 if aligned else 4)
    assert all(g.tobytes() == b.tobytes() for g, b in zip(store.get(ids), blocks))


def test_auto_sync_uses_syncfs_where_the_platform_has_it(tmp_path, monkeypatch):
  with _store(tmp_path / "a", 16, 16, "bfloat16", chunk_writer="direct") as store:
    assert store.config.sync == "auto" and store._chunk_writer.sync == "syncfs"
  monkeypatch.setattr(chunk_writer_lib, "has_syncfs", lambda: False)  # e.g. macOS
  with _store(tmp_path / "b", 16, 16, "bfloat16", chunk_writer="direct") as store:
    assert store._chunk_writer.sync == "fsync"
  with pytest.raises(ValueError, match="syncfs"):
    _store(tmp_path / "c", 16, 16, "bfloat16", chunk_writer="direct", sync="syncfs")


_EXIT_WITHOUT_CLOSE = """
import sys, numpy as np, ml_dtypes
from dualpath_jax.config import TINY, CacheConfig
from storage import BlockStore, ColdTierConfig
store = BlockStore(ColdTierConfig(root=sys.argv[1], chunk_writer=sys.argv[2]), TINY,
                   CacheConfig(block_size=16, dtype="bfloat16"))
rng = np.random.default_rng(0)
blocks = rng.standard_normal((48, *store.block_shape), dtype=np.float32).astype(ml_dtypes.bfloat16)
ids = [bytes([i + 1]) * 32 for i in range(48)]
for lo in range(0, 48, 4):
  store.put_async(ids[lo:lo + 4], blocks[lo:lo + 4])
"""


@pytest.mark.parametrize("writer", ["direct", "tensorstore"])
def test_puts_queued_when_the_program_exits_are_completed(tmp_path, writer):
  """A program that exits without close(): its queued write-back still lands, durable."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(tmp_path), writer],
                        cwd=repo, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "failed" not in done.stderr, done.stderr[-2000:]
  rng = np.random.default_rng(0)
  with BlockStore(ColdTierConfig(root=str(tmp_path)), TINY,
                  CacheConfig(block_size=16, dtype="bfloat16")) as store:
    want = rng.standard_normal((48, *store.block_shape), dtype=np.float32).astype(
        ml_dtypes.bfloat16)
    got = store.get([bytes([i + 1]) * 32 for i in range(48)])
    assert all(g is not None and g.tobytes() == w.tobytes() for g, w in zip(got, want))
    assert store.index.counts()["pending"] == 0
