"""Regression tests for the open points of the cold tier audit (`storage/`).

Each test failed before its fix:

* a read that the OS failed (too many open files, an I/O error, a refused
  permission) or an unavailable kvstore removed the block as corrupt;
* a pwritev that wrote nothing made the chunk writer loop forever;
* a delete whose byte removal failed left its rows hidden until the process
  ended: their slots lost to puts, a re-put "in_flight", a retried delete a
  no-op; the same failure during the open's recovery failed the open;
* `clone_store` into a store with an admission rule deferred blocks;
* a batch's syncfs descriptor, opened after its writes, missed a writeback
  error that another batch's syncfs had seen first.

Faults are injected (monkeypatch) where a real one cannot be made on demand;
running out of file descriptors is made for real.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import os
import resource

import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import BlockStore, ColdTierConfig
from storage import block_store as block_store_lib
from storage import chunk_reader as chunk_reader_lib
from storage import chunk_writer as chunk_writer_lib
from storage import encryption
from storage import removals as removals_lib
from storage.clone import clone_store

CACHE = CacheConfig(block_size=16, dtype="bfloat16")
BLOCK_BYTES = TINY.num_layers * 2 * TINY.num_kv_heads * 16 * TINY.head_dim * 2


def _store(root, slots=16, **kw) -> BlockStore:
  return BlockStore(ColdTierConfig(root=str(root), capacity_bytes=slots * BLOCK_BYTES,
                                   **kw), TINY, CACHE)


def _blocks(rng, n, store):  # ([n] ids, [n, L, 2, Hkv, P, D] bf16), fresh each call
  blocks = rng.standard_normal((n, *store.block_shape), dtype=np.float32) * 3
  return [rng.bytes(32) for _ in range(n)], blocks.astype(ml_dtypes.bfloat16)


def _same(got, want) -> bool:
  return got is not None and got.tobytes() == want.tobytes()


def _slots(store, ids):
  by_id = {r.block_id: r.slot for r in store.index.all_ready()}
  return [by_id[i] for i in ids]


# -- 1. a read the OS fails keeps the block ------------------------------------

# Errors as TensorStore raises them (`[os_error_code=...]`: the errno it
# got), and one of a remote kvstore.
_TRANSIENT = {
    "emfile": "RESOURCE_EXHAUSTED: Error reading local file \"{path}\": Failed "
              "to open: \"{path}\": Too many open files [os_error_code='24']",
    "eio": "FAILED_PRECONDITION: Error reading local file \"{path}\": Failed "
           "to read: Input/output error [os_error_code='5']",
    "eacces": "PERMISSION_DENIED: Error reading local file \"{path}\": Failed "
              "to open: \"{path}\": Permission denied [os_error_code='13']",
    "unavailable": "UNAVAILABLE: Error reading \"{path}\": connection reset",
}


class _FailingReads:
  """A store's slot array whose reads of `slots` fail with `messages[slot]`
  (TensorStore raises ValueError); everything else goes to the real one."""

  def __init__(self, array, messages: dict[int, str]):
    self._array = array
    self._messages = messages

  def __getitem__(self, index):
    slots = np.atleast_1d(np.asarray(index)).tolist()
    failing = [s for s in slots if s in self._messages]
    if failing:
      return _FailedRead(self._messages[failing[0]])
    return self._array[index]

  def __getattr__(self, name):
    return getattr(self._array, name)


class _FailedRead:
  def __init__(self, message: str):
    self.message = message

  def read(self) -> cf.Future:
    future: cf.Future = cf.Future()
    future.set_exception(ValueError(self.message))
    return future


# The same errors where the direct chunk reader meets them: the OS call that
# fails, and its errno.
_TRANSIENT_OS = {"emfile": ("open", errno.EMFILE), "eio": ("preadv", errno.EIO),
                 "eacces": ("open", errno.EACCES)}


class _FailingOs:
  """`os` for `storage.chunk_reader`, whose `call` on a chunk path in
  `paths` fails with `err`; everything else goes to the real module."""

  def __init__(self, call: str, err: int, paths: set[str]):
    self._call, self._err, self._paths, self._fds = call, err, paths, set()

  def open(self, path, flags, *args):
    if path in self._paths and self._call == "open":
      raise OSError(self._err, os.strerror(self._err), path)
    fd = os.open(path, flags, *args)
    if path in self._paths:
      self._fds.add(fd)
    return fd

  def preadv(self, fd, buffers, offset):
    if fd in self._fds:
      raise OSError(self._err, os.strerror(self._err))
    return os.preadv(fd, buffers, offset)

  def close(self, fd):
    self._fds.discard(fd)
    os.close(fd)

  def __getattr__(self, name):
    return getattr(os, name)


@pytest.mark.parametrize("reader,error", [
    *[("tensorstore", e) for e in sorted(_TRANSIENT)],
    *[("direct", e) for e in sorted(_TRANSIENT_OS)]])
@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("into", [False, True])
def test_a_read_the_os_fails_is_a_miss_and_keeps_the_block(tmp_path, monkeypatch, reader,
                                                           error, sealed, into):
  """Only a missing or corrupt chunk is removed; an OS or kvstore error is
  a miss and the block stays, served by the next read. Through TensorStore
  (its error messages) and through the direct chunk reader (the OS call's
  errno)."""
  rng = np.random.default_rng()
  key = None
  if sealed:
    key = str(tmp_path / "key")
    encryption.write_key_file(key)
  with _store(tmp_path / "store", key_file=key, chunk_reader=reader) as store:
    ids, blocks = _blocks(rng, 6, store)
    assert store.put(ids, blocks).written == 6
    slots = _slots(store, ids)
    failing = sorted(rng.choice(6, size=2, replace=False).tolist())
    corrupt = next(i for i in range(6) if i not in failing)
    path = os.path.join(store._chunk_root, str(slots[corrupt]), "0")
    with open(path, "r+b") as f:  # real damage, next to the injected errors
      f.seek(int(rng.integers(0, os.path.getsize(path) - 4)))
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
    if reader == "tensorstore":  # the read path's slot array fails them
      broken = _FailingReads(store.array, {
          slots[i]: _TRANSIENT[error].format(path=f"c/{slots[i]}/0") for i in failing})
      monkeypatch.setattr(store._reader, "_array", broken)  # pylint: disable=protected-access
    else:
      assert store.chunk_reader == "direct"
      monkeypatch.setattr(chunk_reader_lib, "os", _FailingOs(
          *_TRANSIENT_OS[error],
          {os.path.join(store._chunk_root, str(slots[i]), "0") for i in failing}))
    out = np.zeros((6, *store.block_shape), blocks.dtype) if into else None
    got = store.get(ids, out=out)
    for i in range(6):
      if i in failing or i == corrupt:
        assert got[i] is None, i
      else:
        assert _same(got[i], blocks[i]), i
    stats = store.stats()
    assert stats["miss_unreadable"] == 2 and stats["miss_corrupt"] == 1
    assert stats["misses"] == 3
    # The unreadable blocks are still stored (index and bytes); the corrupt
    # one is gone.
    assert store.contains(ids) == [i != corrupt for i in range(6)]
    assert store.stored_slots() == {s for i, s in enumerate(slots) if i != corrupt}
    monkeypatch.undo()  # the OS recovers
    got = store.get([ids[i] for i in failing])
    assert all(_same(g, blocks[i]) for g, i in zip(got, failing))


def test_running_out_of_file_descriptors_does_not_remove_blocks(tmp_path):
  """A real EMFILE: every descriptor of the process in use while a read
  runs. The blocks read then are misses, and are served afterwards."""
  rng = np.random.default_rng()
  with _store(tmp_path) as store:
    ids, blocks = _blocks(rng, 4, store)
    assert store.put(ids, blocks).written == 4
    store._slot_dirs.wait()  # no background mkdir while descriptors run out
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
      highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
      limit = highest + 64 if hard == resource.RLIM_INFINITY else min(highest + 64, hard)
      resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
      with pytest.raises(OSError):
        while True:
          held.append(os.open("/dev/null", os.O_RDONLY))
      got = store.get(ids)
    finally:
      for fd in held:
        os.close(fd)
      resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got == [None] * 4
    assert store.stats()["miss_unreadable"] == 4
    assert store.contains(ids) == [True] * 4
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


def test_read_failures_are_told_apart_by_what_they_prove():
  """Real TensorStore messages (tests/test_storage_block_store.py makes
  the damaged ones) and OS errors of another form."""
  corrupt = [
      'DATA_LOSS: Error reading local file "c/0/0": Digest mismatch, stored '
      'digest is 0x4ff70aa5 but computed digest is 0xdbf20b0b',
      'FAILED_PRECONDITION: Error reading local file "c/1/0": Not enough '
      'data: expected at least 4096 or 3996 more; at byte 100',
      'FAILED_PRECONDITION: Error reading local file "c/0/0": '
      'ZSTD_decompressStream() failed: Dictionary is corrupted; at byte 0',
  ]
  unreadable = list(_TRANSIENT.values()) + [
      'FAILED_PRECONDITION: Error reading "c/0/0" [OS error: Input/output error]',
      "DEADLINE_EXCEEDED: reading c/0/0", "UNKNOWN: something", "no code here",
      "INVALID_ARGUMENT: HTTP response code: 400",
  ]
  assert [block_store_lib.read_failure(ValueError(m)) for m in corrupt] == \
      ["corrupt"] * len(corrupt)
  assert [block_store_lib.read_failure(ValueError(m)) for m in unreadable] == \
      ["unreadable"] * len(unreadable)
  assert block_store_lib.read_failure(ValueError(
      'NOT_FOUND: chunk {2, 0} stored at local file "c/2/0" is missing')) == "missing"
  assert block_store_lib.read_failure(MemoryError()) == "unreadable"


# -- 2. a pwritev that writes nothing ------------------------------------------


class _Spinning(Exception):
  """Raised by the fake pwritev once it was called far more than needed."""


def _pwritev_writing_nothing(monkeypatch, calls):
  def pwritev(fd, buffers, offset):
    calls.append(offset)
    if len(calls) > 200:
      raise _Spinning(f"pwritev called {len(calls)} times without progress")
    return 0
  monkeypatch.setattr(chunk_writer_lib.os, "pwritev", pwritev)


def test_a_pwritev_that_writes_nothing_raises_instead_of_looping(tmp_path, monkeypatch):
  data = np.random.default_rng().integers(0, 256, 5000, dtype=np.uint8)
  calls = []
  fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    _pwritev_writing_nothing(monkeypatch, calls)
    with pytest.raises(OSError, match="wrote nothing at offset 7") as info:
      chunk_writer_lib._write_all(fd, [data, b"crc!"], 7)
  finally:
    os.close(fd)
  assert info.value.errno == errno.EIO
  assert calls == [7]


def test_a_put_whose_writes_make_no_progress_fails_and_stores_nothing(
    tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path, chunk_writer="direct") as store:
    ids, blocks = _blocks(rng, 3, store)
    calls = []
    _pwritev_writing_nothing(monkeypatch, calls)
    assert store.put(ids, blocks).statuses == ["failed"] * 3
    assert len(calls) == 3  # one try per chunk
    monkeypatch.undo()
    assert store.contains(ids) == [False] * 3
    assert store.put(ids, blocks).written == 3
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


# -- 3. a delete whose byte removal fails --------------------------------------


def _fail_removals(monkeypatch, store):
  """Makes the store's chunk removals fail as an unavailable kvstore's do."""
  def broken(refs):
    raise ValueError(f"UNAVAILABLE: cannot delete {len(refs)} chunks (injected)")
  monkeypatch.setattr(store._removals, "delete_bytes", broken)  # pylint: disable=protected-access


def test_a_failed_delete_hides_its_blocks_and_a_retried_delete_removes_them(
    tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path, slots=8) as store:
    ids, blocks = _blocks(rng, 5, store)
    store.put(ids[:3], blocks[:3], tenant="t", session="s")
    store.put(ids[3:], blocks[3:], tenant="t", session="other")
    slots = _slots(store, ids)
    _fail_removals(monkeypatch, store)
    with pytest.raises(OSError, match="3 deleted blocks failed.*no longer served"):
      store.delete_session("t", "s")
    # Deleted for readers at once; the bytes are still there.
    assert store.contains(ids) == [False] * 3 + [True] * 2
    assert store.get(ids[:3]) == [None] * 3
    assert store.stored_slots() == set(slots)
    monkeypatch.undo()
    assert store.delete_session("t", "s") == 0  # the client retries
    assert store.stored_slots() == set(slots[3:])
    stats = store.stats()
    assert stats["index_deleting"] == 0 and stats["deleted_blocks"] == 3
    assert all(_same(g, b) for g, b in zip(store.get(ids[3:]), blocks[3:]))


def test_the_slots_of_a_failed_delete_come_back_at_the_next_put(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path, slots=4) as store:
    ids, blocks = _blocks(rng, 4, store)
    assert store.put(ids, blocks, tenant="t", session="s").written == 4
    _fail_removals(monkeypatch, store)
    with pytest.raises(OSError):
      store.delete_tenant("t")
    monkeypatch.undo()
    # The same blocks again: they were "in_flight" (or, new ones, "no_space")
    # until the process ended.
    assert store.put(ids, blocks, tenant="t", session="s").statuses == ["write"] * 4
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))
    more_ids, more = _blocks(rng, 4, store)
    assert store.put(more_ids, more).written == 4  # evicting, all slots usable
    assert store.stats()["index_deleting"] == 0


def test_a_failed_delete_stays_queued_while_removals_keep_failing(tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path, slots=4) as store:
    ids, blocks = _blocks(rng, 2, store)
    store.put(ids, blocks, tenant="t", session="s")
    _fail_removals(monkeypatch, store)
    with pytest.raises(OSError):
      store.delete_session("t", "s")
    more_ids, more = _blocks(rng, 2, store)
    assert store.put(more_ids, more).written == 2  # a failed retry is not the put's
    assert store.stats()["index_deleting"] == 2
    monkeypatch.undo()
    assert store.delete_session("t", "nobody") == 0
    assert store.stats()["index_deleting"] == 0
    assert store.contains(ids + more_ids) == [False] * 2 + [True] * 2


def test_puts_back_off_from_removals_that_keep_failing(tmp_path, monkeypatch):
  """A put retries a failed removal at once; once that retry fails too,
  puts leave it alone for a backoff that doubles with each failure, and
  a delete still tries at once."""
  rng = np.random.default_rng()
  clock = [100.0]
  monkeypatch.setattr(removals_lib, "_monotonic", lambda: clock[0])
  tries = []
  with _store(tmp_path, slots=16) as store:
    ids, blocks = _blocks(rng, 2, store)
    store.put(ids, blocks, tenant="t", session="s")

    def broken(refs):
      tries.append(len(refs))
      raise ValueError("UNAVAILABLE: cannot delete (injected)")
    monkeypatch.setattr(store._removals, "delete_bytes", broken)  # pylint: disable=protected-access
    with pytest.raises(OSError):
      store.delete_session("t", "s")
    assert len(tries) == 1

    def put_one():
      more_ids, more = _blocks(rng, 1, store)
      assert store.put(more_ids, more).written == 1

    put_one()  # retries at once: fails, backs off 0.5 s
    assert len(tries) == 2
    put_one()
    clock[0] += 0.4
    put_one()
    assert len(tries) == 2  # within the backoff: not tried
    clock[0] += 0.2
    put_one()  # past it: tried, fails, backs off 1 s
    assert len(tries) == 3
    clock[0] += 0.9
    put_one()
    assert len(tries) == 3
    clock[0] += 0.2
    put_one()
    assert len(tries) == 4
    assert store.delete_session("t", "nobody") == 0  # a delete always tries
    assert len(tries) == 5
    monkeypatch.setattr(store._removals, "delete_bytes",  # pylint: disable=protected-access
                        lambda refs: None)
    put_one()  # still backing off (2 s from the delete's failure)
    assert store.stats()["index_deleting"] == 2
    clock[0] += 60
    put_one()  # removed; the backoff starts over
    assert store.stats()["index_deleting"] == 0
    assert store._removals._backoff_s == 0  # pylint: disable=protected-access


def test_an_open_whose_recovery_cannot_remove_bytes_opens_and_retries(
    tmp_path, monkeypatch):
  rng = np.random.default_rng()
  with _store(tmp_path, slots=4) as dead:
    ids, blocks = _blocks(rng, 3, dead)
    dead.index.reserve(ids, "t", "s")  # its writer dies before the commit
  def broken(self, refs):
    raise ValueError(f"UNAVAILABLE: cannot delete {len(refs)} chunks (injected)")
  monkeypatch.setattr(removals_lib.Removals, "delete_bytes", broken)
  store = _store(tmp_path, slots=4)  # raised out of the open before
  try:
    assert store.stats()["index_deleting"] == 3
    monkeypatch.undo()
    more_ids, more = _blocks(rng, 4, store)
    assert store.put(more_ids, more).written == 4  # every slot usable again
    stats = store.stats()
    assert stats["index_deleting"] == 0 and stats["recovered_blocks"] == 3
  finally:
    store.close()


# -- 4. cloning into a store with an admission rule ----------------------------


@pytest.mark.parametrize("admission", ["second_put", "session_continues"])
def test_clone_copies_every_block_whatever_the_admission_rule(tmp_path, admission):
  rng = np.random.default_rng()
  with _store(tmp_path / "src", slots=32) as src:
    ids, blocks = _blocks(rng, 12, src)
    src.put(ids[:5], blocks[:5], tenant="a", session="s1")
    src.put(ids[5:9], blocks[5:9], tenant="a", session="s2")
    src.put(ids[9:], blocks[9:], tenant="b", session="s1")
    src.put(ids[:2], blocks[:2], tenant="b", session="s1")  # shared
    with _store(tmp_path / "dst", slots=32, admission=admission) as dst:
      assert clone_store(src, dst, batch_blocks=4) == 12
      assert all(_same(g, b) for g, b in zip(dst.get(ids), blocks))
      assert dst.index.owners(ids) == src.index.owners(ids)
      assert dst.stats()["deferred_blocks"] == 0
      # The rule still holds for the store's own puts.
      new_ids, new = _blocks(rng, 2, dst)
      assert dst.put(new_ids, new, tenant="c", session="fresh").statuses == \
          ["deferred"] * 2


# -- extra: a writeback error seen first by another batch's syncfs -------------


class _WritebackErrors:
  """A file system's writeback error sequence as Linux keeps it (errseq):
  a descriptor samples it when opened, and syncfs on the descriptor reports
  an error recorded since then, or one that nobody has seen yet."""

  def __init__(self):
    self.seq, self.seen, self.samples = 0, True, {}

  def record(self) -> None:
    self.seq, self.seen = self.seq + 1, False

  def sample(self, fd: int) -> None:
    self.samples[fd] = self.seq if self.seen else self.seq - 1

  def check(self, fd: int) -> bool:
    """What syncfs(fd) does: True if it reports an error."""
    failed = self.samples.get(fd, self.seq) != self.seq
    self.samples[fd], self.seen = self.seq, True
    return failed


def test_a_writeback_error_seen_first_by_another_batch_still_fails_the_put(
    tmp_path, monkeypatch):
  """The batch's syncfs descriptor was opened after its writes: an error of
  its writeback that another batch's syncfs (another I/O thread) reported
  first was not reported again, and the batch was committed."""
  rng = np.random.default_rng()
  errors = _WritebackErrors()
  real_open, real_pwritev = os.open, os.pwritev

  def opening(path, flags, *args, **kw):
    fd = real_open(path, flags, *args, **kw)
    if flags & os.O_DIRECTORY:
      errors.sample(fd)
    return fd

  def fake_syncfs(fd):
    if errors.check(fd):
      ctypes.set_errno(errno.EIO)
      return -1
    return 0

  def writing(fd, buffers, offset):
    n = real_pwritev(fd, buffers, offset)
    if not errors.seq:  # this batch's writeback fails, and another batch's
      errors.record()   # syncfs (its descriptor opened long before) sees it
      errors.check(-1)
    return n

  with _store(tmp_path, chunk_writer="direct", sync="syncfs") as store:
    store._slot_dirs.ensure(range(store.num_slots))
    ids, blocks = _blocks(rng, 3, store)
    errors.sample(-1)
    monkeypatch.setattr(chunk_writer_lib.os, "open", opening)
    monkeypatch.setattr(chunk_writer_lib.os, "pwritev", writing)
    monkeypatch.setattr(chunk_writer_lib, "_syncfs", fake_syncfs)
    assert store.put(ids, blocks).statuses == ["failed"] * 3
    monkeypatch.undo()
    assert store.contains(ids) == [False] * 3
    assert store.put(ids, blocks).written == 3
