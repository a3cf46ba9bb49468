"""Fixes from an audit of the cold tier's encryption at rest (`storage.encryption`).

Each test failed before its fix:

* a key file that is a FIFO (or a terminal, another device) blocked
  `load_key` forever, so a launcher given one hung before saying anything;
* a key file longer than 4 KiB had only its first 4 KiB read: a key, blank
  space, then anything else was taken as a key;
* a key file whose write failed (a full disk) was left behind, empty or
  partial, refused by every later `write_key_file` ("never overwritten"),
  and the failure was an OSError (a traceback from `make_cold_tier_key`);
* without the `cryptography` package, `load_key` (what the launchers run
  before the weights load) passed, and the store's open failed only after
  the model had loaded.

And one guard of what the audit found sound: blocks an encrypted store
returns never alias the I/O threads' reused scratch.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import encryption
from storage.block_store import BlockStore
from storage.config import ColdTierConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = np.dtype(ml_dtypes.bfloat16)
CACHE = CacheConfig(block_size=16, dtype="bfloat16")
BLOCK = (TINY.num_layers, 2, TINY.num_kv_heads, 16, TINY.head_dim)


def _unblock(fifo: str) -> None:
  """Lets a reader blocked in the open of `fifo` go on (it reads EOF)."""
  try:
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
  except OSError:  # no reader waiting
    return
  os.close(fd)


def test_a_fifo_key_file_is_refused_not_waited_on(tmp_path):
  fifo = str(tmp_path / "kv.key")
  os.mkfifo(fifo)
  outcome = []

  def load():
    try:
      encryption.load_key(fifo)
      outcome.append("loaded")
    except ValueError as err:
      outcome.append(str(err))

  thread = threading.Thread(target=load, daemon=True)
  thread.start()
  thread.join(10)
  hung = thread.is_alive()
  _unblock(fifo)  # the old code's reader, so that no thread is left behind
  thread.join(10)
  assert not hung, "load_key blocked on a FIFO"
  assert outcome and "not a regular file" in outcome[0]


def test_a_launcher_refuses_a_fifo_key_file_at_once(tmp_path):
  fifo = str(tmp_path / "kv.key")
  os.mkfifo(fifo)
  cmd = [sys.executable, "-m", "launch.agent_eval", "--noprogress",
         f"--cold_tier={tmp_path / 'kv'}", f"--cold_tier_key_file={fifo}",
         f"--report={tmp_path / 'r.json'}"]
  try:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  except subprocess.TimeoutExpired:
    pytest.fail("agent_eval hung on a FIFO --cold_tier_key_file")
  assert done.returncode != 0
  assert "not a regular file" in done.stderr, done.stderr[-2000:]
  assert "Traceback" not in done.stderr


def test_a_directory_key_file_is_refused(tmp_path):
  with pytest.raises(ValueError, match="not a regular file|cannot read"):
    encryption.load_key(str(tmp_path))


def test_a_key_file_with_more_than_a_key_is_refused_whatever_its_length(
    tmp_path):
  key = os.urandom(32).hex()
  path = tmp_path / "kv.key"
  path.write_text(key + " " * 5000 + "not a key\n")  # past the first 4 KiB
  with pytest.raises(ValueError, match="larger than 4096 bytes"):
    encryption.load_key(str(path))
  # What the parser always took still loads: upper case, blank space
  # around, a CRLF line end, a link to the file.
  path.write_text("\n  " + key.upper() + "\r\n")
  os.chmod(path, 0o600)
  os.symlink(path, tmp_path / "link.key")
  assert encryption.load_key(str(tmp_path / "link.key")) == bytes.fromhex(key)


def test_a_failed_key_write_leaves_no_file_and_says_so(tmp_path, monkeypatch):
  path = str(tmp_path / "kv.key")

  def full_disk(fd):
    del fd
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(encryption.os, "fsync", full_disk)
  with pytest.raises(ValueError, match="cannot write the key file"):
    encryption.write_key_file(path)
  assert not os.path.exists(path)
  monkeypatch.undo()
  kid = encryption.write_key_file(path)  # the next try is not refused
  assert encryption.key_id(encryption.load_key(path)) == kid


def test_a_key_without_the_cryptography_package_is_refused_when_loaded(
    tmp_path, monkeypatch):
  path = str(tmp_path / "kv.key")
  encryption.write_key_file(path)
  monkeypatch.setitem(sys.modules,
                      "cryptography.hazmat.primitives.ciphers.aead", None)
  with pytest.raises(ValueError, match="needs the `cryptography` package"):
    encryption.load_key(path)


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_returned_blocks_never_alias_the_reused_scratch(tmp_path, codec):
  """Sound already: a block read without `out` is its own array, with `out`
  a row of it; later reads (which refill the read threads' scratch) never
  change either."""
  rng = np.random.default_rng(0)
  n = 20
  ids = [rng.bytes(16) for _ in range(n)]
  blocks = rng.standard_normal((n, *BLOCK)).astype(BF16)
  key = str(tmp_path / "kv.key")
  encryption.write_key_file(key)
  config = ColdTierConfig(root=str(tmp_path / "s"), codec=codec, key_file=key,
                          capacity_bytes=1 << 22, io_threads=2)
  with BlockStore(config, TINY, CACHE) as store:
    store.put(ids, blocks)
    first = store.get(ids[:10])
    out = np.zeros((10, *BLOCK), BF16)
    into = store.get(ids[:10], out=out)
    kept = [b.copy() for b in first] + [b.copy() for b in into]
    for _ in range(3):  # refill every read thread's scratch
      store.get(ids[10:])
      store.get(ids[10:], out=np.zeros((10, *BLOCK), BF16))
    for block in first + into:
      assert not any(np.shares_memory(block, b) for b in first + into
                     if b is not block)
    for block, copy in zip(first + into, kept):
      assert block.tobytes() == copy.tobytes()
    if codec == "raw":
      assert all(b.tobytes() == w.tobytes() for b, w in zip(first, blocks))
