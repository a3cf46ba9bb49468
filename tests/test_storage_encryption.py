"""The cold tier's encryption at rest (`storage.encryption`, `key_file`).

The cipher against the `cryptography` package's plain AES-GCM (an
independent decryption of what `seal` wrote), tags bound to ids and
layouts, key files, and a `BlockStore` with a key: round trips, no
plaintext on disk, swapped chunks refused, other keys refused at open,
key rotation by cloning.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.config import TINY, CacheConfig
from storage import block_store, encryption
from storage.block_store import BlockStore
from storage.clone import clone_store
from storage.config import ColdTierConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
CACHE = CacheConfig(block_size=16, dtype="bfloat16")
BLOCK = (TINY.num_layers, 2, TINY.num_kv_heads, 16, TINY.head_dim)


def _blocks(rng, n):
  return rng.standard_normal((n, *BLOCK)).astype(BF16)


def _ids(rng, n):
  return [rng.bytes(16) for _ in range(n)]


@pytest.fixture
def key_file(tmp_path):
  path = str(tmp_path / "kv.key")
  encryption.write_key_file(path)
  return path


def _store(root, key_file=None, codec="raw", **kw):
  return BlockStore(ColdTierConfig(root=str(root), codec=codec,
                                   key_file=key_file, capacity_bytes=1 << 20,
                                   **kw), TINY, CACHE)


def _chunk_files(root):
  return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "data"))
          for f in fs if "/c/" in os.path.join(d, f)]


# ------------------------------------------------------------ the cipher
def test_sealed_rows_decrypt_with_plain_aes_gcm_under_the_derived_key():
  from cryptography.hazmat.primitives.ciphers.aead import AESGCM
  rng = np.random.default_rng()
  key, context = rng.bytes(32), b"layout"
  cipher = encryption.BlockCipher(key, context)
  plain = rng.integers(0, 256, (3, 100), dtype=np.uint8)
  ids = _ids(rng, 3)
  sealed = cipher.seal(plain, ids)
  assert sealed.shape == (3, 100 + encryption.OVERHEAD)
  for i, block_id in enumerate(ids):  # the format, decrypted independently
    salt = sealed[i, :32].tobytes()
    chunk_key = hmac.new(key, b"dualpath-jax cold tier chunk key\0" + salt,
                         hashlib.sha256).digest()
    aad = b"%d:" % len(block_id) + block_id + context
    got = AESGCM(chunk_key).decrypt(bytes(12), sealed[i, 32:].tobytes(), aad)
    assert got == plain[i].tobytes()
    assert plain[i].tobytes() not in sealed[i].tobytes()
  opened, ok = cipher.open(sealed, ids)
  assert ok == [True] * 3
  np.testing.assert_array_equal(opened, plain)
  # Two seals of the same bytes differ (a fresh chunk key each time).
  assert not np.array_equal(cipher.seal(plain, ids), sealed)


def test_a_row_opens_only_under_its_id_layout_and_key_unchanged():
  rng = np.random.default_rng()
  key = rng.bytes(32)
  cipher = encryption.BlockCipher(key, b"layout")
  plain = rng.integers(0, 256, (2, 64), dtype=np.uint8)
  ids = _ids(rng, 2)
  sealed = cipher.seal(plain, ids)
  assert cipher.open(sealed, ids[::-1])[1] == [False, False]  # swapped ids
  assert encryption.BlockCipher(key, b"other").open(sealed, ids)[1] == \
      [False, False]
  assert encryption.BlockCipher(rng.bytes(32), b"layout").open(
      sealed, ids)[1] == [False, False]
  for where in (3, 40, 64 + 40):  # salt, ciphertext, tag
    bad = sealed.copy()
    bad[1, where] ^= 1
    opened, ok = cipher.open(bad, ids)
    assert ok == [True, False]
    np.testing.assert_array_equal(opened[0], plain[0])
    assert not opened[1].any()  # nothing of a failed row is given out


def test_without_the_into_methods_the_same_chunks_come_out():
  """cryptography before `encrypt_into`/`decrypt_into`: the copying calls."""
  from cryptography.hazmat.primitives.ciphers.aead import AESGCM

  class OldAESGCM:  # the API of older releases only
    def __init__(self, key):
      self._aes = AESGCM(key)

    def encrypt(self, nonce, data, aad):
      return self._aes.encrypt(nonce, data, aad)

    def decrypt(self, nonce, data, aad):
      return self._aes.decrypt(nonce, data, aad)

  rng = np.random.default_rng()
  key, ids = rng.bytes(32), _ids(rng, 3)
  plain = rng.integers(0, 256, (3, 80), dtype=np.uint8)
  new, old = (encryption.BlockCipher(key, b"c") for _ in range(2))
  old._aes = OldAESGCM
  for sealer, opener in ((new, old), (old, new), (old, old)):
    opened, ok = opener.open(sealer.seal(plain, ids), ids)
    assert ok == [True] * 3
    np.testing.assert_array_equal(opened, plain)
  bad = old.seal(plain, ids)
  bad[0, -1] ^= 1
  assert old.open(bad, ids)[1] == [False, True, True]


# ------------------------------------------------------------ key files
def test_a_key_file_is_owner_only_never_overwritten_and_checked(tmp_path):
  path = str(tmp_path / "k")
  kid = encryption.write_key_file(path)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  key = encryption.load_key(path)
  assert len(key) == 32 and encryption.key_id(key) == kid
  with pytest.raises(ValueError, match="never overwritten"):
    encryption.write_key_file(path)
  assert encryption.load_key(path) == key  # untouched
  for content in (b"", b"zz" * 32, b"ab" * 31, b"ab" * 33, os.urandom(32)):
    bad = tmp_path / "bad"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="64 hex digits"):
      encryption.load_key(str(bad))
  with pytest.raises(ValueError, match="cannot read"):
    encryption.load_key(str(tmp_path / "absent"))
  # Folders above a new key file are made, owner-only (the documented
  # `--out=/tmp/keys/bench.key` failed on a machine without /tmp/keys).
  deep = tmp_path / "keys" / "sub" / "k"
  kid2 = encryption.write_key_file(str(deep))
  assert encryption.key_id(encryption.load_key(str(deep))) == kid2
  assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match="cannot make the key file .*Not a dir"):
    encryption.write_key_file(str(tmp_path / "a_file" / "k"))


def test_the_key_launcher_writes_a_key_and_refuses_an_existing_file(tmp_path):
  path = tmp_path / "k"
  cmd = [sys.executable, "-m", "launch.make_cold_tier_key", f"--out={path}"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  kid = encryption.key_id(encryption.load_key(str(path)))
  assert kid in run.stdout
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0 and "never overwritten" in again.stderr
  assert encryption.key_id(encryption.load_key(str(path))) == kid


@pytest.mark.parametrize("bad", [
    dict(key_file=""), dict(key_file=3), dict(codec="zstd", key_file="k"),
    dict(codec="int8+zstd", key_file="k")])
def test_the_config_refuses_a_bad_key_file_or_a_compressed_codec(bad):
  with pytest.raises(ValueError, match="key_file|compress"):
    ColdTierConfig(root="r", **bad)


# ------------------------------------------------------------ the store
def _same(a, b) -> bool:
  return a is not None and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("codec", ["raw", "int8"])
@pytest.mark.parametrize("writer", ["direct", "tensorstore"])
def test_an_encrypted_store_returns_what_a_clear_one_does(tmp_path, key_file,
                                                          codec, writer):
  rng = np.random.default_rng()
  n = 2 * block_store.SCRATCH_READ_CHUNKS + 3  # a read in three parts
  ids, blocks = _ids(rng, n), _blocks(rng, n)
  with _store(tmp_path / "clear", codec=codec, chunk_writer=writer) as clear, \
       _store(tmp_path / "sealed", key_file, codec=codec,
              chunk_writer=writer) as sealed:
    assert sealed.chunk_writer == writer
    assert sealed.put(ids, blocks).written == n
    clear.put(ids, blocks)
    want = clear.get(ids)
    got = sealed.get(ids)
    assert all(_same(g, w) for g, w in zip(got, want))
    if codec == "raw":
      assert all(_same(g, b) for g, b in zip(got, blocks))
    out = np.full((n + 1, *BLOCK), np.nan, BF16)  # a miss in the middle
    got = sealed.get(ids[:9] + [b"absent"] + ids[9:], out=out)
    assert got[9] is None
    assert all(_same(g, w) for g, w in zip(got[:9] + got[10:], want))
    assert all(np.shares_memory(g, out) for g in got[:9] + got[10:])
    assert sealed.stats()["miss_corrupt"] == 0


def test_no_block_is_on_disk_in_the_clear(tmp_path, key_file):
  rng = np.random.default_rng()
  ids, blocks = _ids(rng, 4), _blocks(rng, 4)
  for root, key in ((tmp_path / "clear", None), (tmp_path / "sealed", key_file)):
    with _store(root, key) as store:
      store.put(ids, blocks)
    disk = b"".join(open(f, "rb").read() for f in _chunk_files(str(root)))
    assert len(disk) >= blocks.nbytes
    # Any 64 bytes of any block: found in the clear store's files only.
    found = [blocks[i].tobytes()[k:k + 64] in disk
             for i in range(4) for k in (0, 1000)]
    assert all(found) if key is None else not any(found)


def test_a_chunk_swapped_for_another_blocks_is_a_miss_not_its_bytes(
    tmp_path, key_file):
  rng = np.random.default_rng()
  ids, blocks = _ids(rng, 2), _blocks(rng, 2)
  for root, key in ((tmp_path / "clear", None), (tmp_path / "sealed", key_file)):
    with _store(root, key) as store:
      store.put(ids, blocks)
      slot = {r.block_id: r.slot for r in store.index.all_ready()}
      path = [os.path.join(str(root), "data", store.chunk_key(slot[i]).decode())
              for i in ids]
      data = [open(p, "rb").read() for p in path]
      with open(path[0], "wb") as f:  # block 0's file now holds block 1's
        f.write(data[1])              # chunk, its checksum intact
      got = store.get(ids)
      if key is None:  # the hole a key closes: served under the wrong id
        assert _same(got[0], blocks[1])
        continue
      assert got[0] is None and _same(got[1], blocks[1])
      assert store.stats()["miss_corrupt"] == 1
      assert store.contains(ids) == [False, True]  # removed, recomputed


def test_another_key_or_none_is_refused_at_open_and_nothing_is_lost(
    tmp_path, key_file):
  rng = np.random.default_rng()
  ids, blocks = _ids(rng, 3), _blocks(rng, 3)
  other = str(tmp_path / "other.key")
  encryption.write_key_file(other)
  root = tmp_path / "s"
  with _store(root, key_file) as store:
    store.put(ids, blocks)
  for key in (other, None):
    with pytest.raises(ValueError, match="opens only with the key"):
      _store(root, key)
  with pytest.raises(ValueError, match="opens only with the key"):
    with _store(tmp_path / "clear") as clear:
      clear.put(ids, blocks)
    _store(tmp_path / "clear", key_file)
  with _store(root, key_file) as store:
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))


def test_a_key_is_rotated_by_cloning_into_a_new_store(tmp_path, key_file):
  rng = np.random.default_rng()
  ids, blocks = _ids(rng, 6), _blocks(rng, 6)
  new_key = str(tmp_path / "new.key")
  encryption.write_key_file(new_key)
  with _store(tmp_path / "clear") as clear, \
       _store(tmp_path / "old", key_file) as old, \
       _store(tmp_path / "new", new_key) as new:
    clear.put(ids[:3], blocks[:3], tenant="t", session="a")
    clear.put(ids[3:], blocks[3:], tenant="t", session="b")
    assert clone_store(clear, old) == 6  # encrypting a clear store
    assert clone_store(old, new) == 6  # and re-keying it
    assert all(_same(g, b) for g, b in zip(new.get(ids), blocks))
    assert new.delete_session("t", "a") == 3
    assert new.contains(ids) == [False] * 3 + [True] * 3


def test_a_decryption_that_fails_for_another_reason_removes_nothing(
    tmp_path, key_file, monkeypatch):
  """Only a failed tag proves a chunk bad; a MemoryError while decrypting
  fails the read and the block stays."""
  rng = np.random.default_rng()
  ids, blocks = _ids(rng, 2), _blocks(rng, 2)
  with _store(tmp_path / "s", key_file) as store:
    store.put(ids, blocks)
    cipher = store.codec.cipher

    class NoMemory:  # its decryption fails, not for the bytes
      def __init__(self, key):
        del key

      def decrypt_into(self, *args):
        raise MemoryError("no room")

    monkeypatch.setattr(cipher, "_aes", NoMemory)
    with pytest.raises(MemoryError):
      store.get(ids)
    monkeypatch.undo()
    assert store.contains(ids) == [True, True]
    assert all(_same(g, b) for g, b in zip(store.get(ids), blocks))
    assert store.stats()["miss_corrupt"] == 0
