"""Tests of storage.chunk_reader: the direct reader serves what TensorStore serves.

The reference is TensorStore's own read of the same chunk files: blocks put
once, then read back through a store whose chunks TensorStore reads
(`chunk_reader="tensorstore"`) and through one whose chunks the direct reader
reads, must be the bytes that were put, and the same chunks must fail the
same way (missing, corrupt, unreadable) on both.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from dualpath_jax.transfer.source import StagingRows
from dualpath_jax.disk_io import PAGE_BYTES, page_aligned_empty
from storage import BlockStore, ColdTierConfig
from storage import chunk_reader as chunk_reader_lib
from storage_support import o_direct_works

# (block_size, head_dim, dtype): chunk bytes a 4 KiB multiple, not one, and < 4 KiB.
SHAPES = [(16, 16, "bfloat16"), (16, 24, "float32"), (3, 16, "float16")]


def _store(root, block_size=16, head_dim=16, dtype="bfloat16", **kw) -> BlockStore:
  cache = CacheConfig(block_size=block_size, dtype=dtype)
  kw.setdefault("capacity_bytes", 1 << 24)
  return BlockStore(ColdTierConfig(root=str(root), **kw),
                    dataclasses.replace(TINY, head_dim=head_dim), cache)


def _blocks(rng, store, n):  # ([n] ids, [n, L, 2, Hkv, P, D]), fresh random values
  data = rng.standard_normal((n, *store.block_shape), dtype=np.float32) * 5
  return [rng.bytes(32) for _ in range(n)], data.astype(store.codec.dtype)


def _poisoned(n, store, aligned: bool) -> np.ndarray:  # [n, L, 2, Hkv, P, D]
  """A buffer of `n` rows filled with a pattern no block holds; page-aligned,
  or one that starts 64 bytes past a page."""
  nbytes = n * int(np.prod(store.block_shape)) * store.codec.dtype.itemsize
  raw = page_aligned_empty((nbytes + PAGE_BYTES,), np.uint8)
  raw = raw[:nbytes] if aligned else raw[64:64 + nbytes]
  raw.fill(0xA5)
  return raw.view(store.codec.dtype).reshape(n, *store.block_shape)


def _chunk_path(store, block_id) -> str:
  slot = store.index.lookup([block_id])[0].slot
  return os.path.join(store.config.root, "data", "c", str(slot), "0")


@pytest.mark.parametrize("writer", ["direct", "tensorstore"])
@pytest.mark.parametrize("codec", ["raw", "int8"])
@pytest.mark.parametrize("block_size,head_dim,dtype", SHAPES)
def test_reads_what_tensorstore_reads(tmp_path, writer, codec, block_size, head_dim, dtype):
  """Chunks from either writer, read by either reader: the same blocks; raw
  ones are the bytes put."""
  rng = np.random.default_rng()
  with _store(tmp_path, block_size, head_dim, dtype, codec=codec, chunk_writer=writer,
              chunk_reader="tensorstore") as store:
    ids, blocks = _blocks(rng, store, 9)
    assert store.put(ids, blocks).written == 9
    order = [ids[i] for i in rng.permutation(9)]
    want = store.get(order)
  with _store(tmp_path, block_size, head_dim, dtype, codec=codec,
              chunk_reader="direct", max_batch_blocks=4) as store:
    assert store.chunk_reader == "direct"
    got = store.get(order)
    into = store.get(order, out=_poisoned(9, store, aligned=True)) if codec == "raw" else got
  for block_id, g, i, w in zip(order, got, into, want):
    assert g.tobytes() == w.tobytes() == i.tobytes()
    if codec == "raw":
      assert g.tobytes() == blocks[ids.index(block_id)].tobytes()


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("block_size,head_dim,dtype", SHAPES)
def test_o_direct_takes_whole_page_chunks_into_aligned_rows(tmp_path, aligned, block_size,
                                                           head_dim, dtype):
  """file_io_mode="direct": O_DIRECT exactly where the row starts on a page
  (a caller's, or the batch the store makes) and the chunk is whole pages
  (and the file system takes it); the same bytes either way."""
  rng = np.random.default_rng()
  with _store(tmp_path, block_size, head_dim, dtype, file_io_mode="direct") as store:
    ids, blocks = _blocks(rng, store, 5)
    store.put(ids, blocks)
    got = store.get(ids, out=_poisoned(5, store, aligned))
    assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    whole_pages = store.encoded_block_bytes % PAGE_BYTES == 0
    direct = whole_pages and o_direct_works(str(tmp_path))
    assert store.stats()["o_direct_read_bytes"] == (
        5 * blocks[0].nbytes if direct and aligned else 0)
    # Without `out=`, the batch the store makes is page-aligned.
    got = store.get(ids)
    assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    assert store.stats()["o_direct_read_bytes"] == (
        5 * blocks[0].nbytes * (1 + aligned) if direct else 0)


def test_staging_rows_are_page_aligned():
  """The engine's and the loader's read buffer: whole-page rows start on pages."""
  rows = StagingRows((2, 3, PAGE_BYTES // 4), np.float32, min_rows=3).rows(5)
  assert rows.ctypes.data % PAGE_BYTES == 0 and rows.shape == (5, 2, 3, PAGE_BYTES // 4)
  assert not rows.any()  # a fresh buffer reads as zeros, as np.zeros did


def test_buffered_mode_and_a_file_system_without_o_direct(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path / "a", file_io_mode="default") as store:
    ids, blocks = _blocks(rng, store, 3)
    store.put(ids, blocks)
    got = store.get(ids, out=_poisoned(3, store, aligned=True))
    assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    assert store.stats()["o_direct_read_bytes"] == 0
  real_open = os.open

  def no_direct(path, flags, *args):  # as tmpfs answers
    if flags & os.O_DIRECT:
      raise OSError(errno.EINVAL, "O_DIRECT not supported", path)
    return real_open(path, flags, *args)

  with _store(tmp_path / "b", file_io_mode="direct") as store:
    ids, blocks = _blocks(rng, store, 3)
    store.put(ids, blocks)
    monkeypatch.setattr(chunk_reader_lib.os, "open", no_direct)
    got = store.get(ids, out=_poisoned(3, store, aligned=True))
    assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    assert not store._chunk_reader.o_direct and store.stats()["o_direct_read_bytes"] == 0


@pytest.mark.parametrize("aligned", [True, False])
def test_short_reads_are_completed(tmp_path, monkeypatch, aligned):
  """preadv may return less than asked: the reader goes on from there (an
  O_DIRECT read left unaligned is redone buffered)."""
  rng = np.random.default_rng()
  real = os.preadv
  calls = []

  def short(fd, buffers, offset):
    calls.append(offset)
    views = [memoryview(b).cast("B") for b in buffers]
    first = views[0][:min(len(views[0]), 1000 + (offset % 7))]
    return real(fd, [first], offset)

  with _store(tmp_path, file_io_mode="direct") as store:
    ids, blocks = _blocks(rng, store, 4)
    store.put(ids, blocks)
    monkeypatch.setattr(chunk_reader_lib.os, "preadv", short)
    got = store.get(ids, out=_poisoned(4, store, aligned))
    monkeypatch.undo()
    assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    assert len(calls) > 4 * (blocks[0].nbytes // 1007)
    assert store.stats()["misses"] == 0


def test_a_file_that_ends_early_while_read_is_corrupt(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path) as store:
    ids, blocks = _blocks(rng, store, 3)
    store.put(ids, blocks)
    shrinking = _chunk_path(store, ids[1])
    fds = set()
    real_open, real_preadv = os.open, os.preadv

    def open_(path, flags, *args):
      fd = real_open(path, flags, *args)
      if path == shrinking:
        fds.add(fd)
      return fd

    def preadv(fd, buffers, offset):
      return 0 if fd in fds else real_preadv(fd, buffers, offset)

    def close(fd):
      fds.discard(fd)
      real_close(fd)

    real_close = os.close
    monkeypatch.setattr(chunk_reader_lib.os, "open", open_)
    monkeypatch.setattr(chunk_reader_lib.os, "preadv", preadv)
    monkeypatch.setattr(chunk_reader_lib.os, "close", close)
    got = store.get(ids)
    monkeypatch.undo()
    assert [g is None for g in got] == [False, True, False]
    assert store.stats()["miss_corrupt"] == 1 and store.contains(ids) == [True, False, True]


@pytest.mark.parametrize("damage", ["body", "trailer", "truncated", "extended", "missing",
                                    "a directory"])
@pytest.mark.parametrize("reader", ["direct", "tensorstore"])
@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_each_damage_gets_tensorstores_verdict(tmp_path, damage, reader, codec):
  """One damaged chunk among good ones: the same verdict from both readers.
  TensorStore's, the reference: a directory where the file should be is a
  missing chunk; bytes after the checksum are not read. int8 chunks (not
  whole pages) go through the padded scratch rows."""
  rng = np.random.default_rng()
  with _store(tmp_path, chunk_reader=reader, codec=codec) as store:
    ids, blocks = _blocks(rng, store, 5)
    store.put(ids, blocks)
    blocks = store.get(ids)  # what an intact read serves (int8: decoded)
    path = _chunk_path(store, ids[2])
    data = bytearray(open(path, "rb").read())
    if damage in ("body", "trailer"):
      at = (int(rng.integers(0, len(data) - 4)) if damage == "body"
            else len(data) - 1 - int(rng.integers(0, 4)))
      data[at] ^= 1 << int(rng.integers(0, 8))
      open(path, "wb").write(bytes(data))
    elif damage == "truncated":
      os.truncate(path, int(rng.integers(1, len(data))))
    elif damage == "extended":
      open(path, "ab").write(b"\0" * int(rng.integers(1, 100)))
    else:
      os.unlink(path)
      if damage == "a directory":
        os.mkdir(path)
    good = damage == "extended"  # the chunk and its checksum come first: served
    for out in (None, _poisoned(5, store, aligned=True)):
      got = store.get(ids, out=out)
      assert [g is None for g in got] == [False, False, not good, False, False], damage
      assert all(got[i].tobytes() == blocks[i].tobytes()
                 for i in ((0, 1, 2, 3, 4) if good else (0, 1, 3, 4)))
    stats = store.stats()
    if good:
      assert stats["misses"] == 0 and stats["hit_blocks"] == 15
    else:  # removed by the first read: the second finds it absent
      kind = "miss_corrupt" if damage in ("body", "trailer", "truncated") else "miss_missing"
      assert stats[kind] == stats["miss_absent"] == 1 and stats["misses"] == 2
    assert store.contains(ids) == [True, True, good, True, True]


@pytest.mark.parametrize("codec,sealed", [("int8", False), ("raw", True), ("int8", True)])
def test_decoded_stores_read_whole_pages_with_o_direct(tmp_path, codec, sealed):
  """int8 and encrypted chunks are not whole pages: they are read into the
  read thread's padded, page-aligned rows, with O_DIRECT, and serve what
  TensorStore's reads serve."""
  from storage import encryption
  rng = np.random.default_rng()
  key = None
  if sealed:
    key = str(tmp_path / "key")
    encryption.write_key_file(key)
  with _store(tmp_path / "s", codec=codec, key_file=key, file_io_mode="direct",
              chunk_reader="tensorstore") as store:
    ids, blocks = _blocks(rng, store, 11)
    store.put(ids, blocks)
    want = store.get(ids)
  with _store(tmp_path / "s", codec=codec, key_file=key, file_io_mode="direct") as store:
    assert store.encoded_block_bytes % PAGE_BYTES != 0
    for out in (None, _poisoned(11, store, aligned=False)):
      got = store.get(ids, out=out)
      assert all(g.tobytes() == w.tobytes() for g, w in zip(got, want))
    if codec == "raw":
      assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    direct = o_direct_works(str(tmp_path))
    assert store.stats()["o_direct_read_bytes"] == (
        2 * 11 * store.encoded_block_bytes if direct else 0)


def test_direct_reads_are_refused_where_they_cannot_apply(tmp_path):
  rng = np.random.default_rng()
  for kw in ({"codec": "zstd"}, {"driver": "ocdbt"}):
    with pytest.raises(ValueError, match="chunk_reader='direct' is not possible"):
      _store(tmp_path / "x", chunk_reader="direct", **kw)
    with _store(tmp_path / kw.get("codec", "ocdbt"), **kw) as store:  # auto
      assert store.chunk_reader == "tensorstore"
      ids, blocks = _blocks(rng, store, 2)
      store.put(ids, blocks)
      assert all(g is not None for g in store.get(ids))
  with pytest.raises(ValueError, match="chunk_reader='sometimes' not in"):
    ColdTierConfig(root=str(tmp_path), chunk_reader="sometimes")


def test_rows_of_another_shape_are_refused(tmp_path):
  reader = chunk_reader_lib.DirectChunkReader(str(tmp_path), 8192, 2)
  try:
    for rows in ([np.zeros(8191, np.uint8)], [np.zeros(4096, np.uint16)],
                 [np.zeros(16384, np.uint8)[::2]]):
      with pytest.raises(ValueError, match="rows must be"):
        reader.read([0], rows)
    with pytest.raises(ValueError, match="1 slots for 2 rows"):
      reader.read([0], [np.zeros(8192, np.uint8)] * 2)
    assert reader.read([7], [np.zeros(8192, np.uint8)])[0][0] == "missing"
  finally:
    reader.close()


def test_a_platform_without_o_direct_reads_and_writes_buffered(tmp_path, monkeypatch):
  """macOS has no O_DIRECT: the direct writer and reader still run, buffered."""
  rng = np.random.default_rng()
  monkeypatch.delattr(os, "O_DIRECT")
  with _store(tmp_path, file_io_mode="direct") as store:
    assert store.chunk_writer == store.chunk_reader == "direct"
    ids, blocks = _blocks(rng, store, 4)
    assert store.put(ids, blocks).written == 4
    got = store.get(ids, out=_poisoned(4, store, aligned=True))
    assert all(g.tobytes() == b.tobytes() for g, b in zip(got, blocks))
    assert store.stats()["o_direct_read_bytes"] == 0
    assert store._chunk_writer.direct_bytes == 0
