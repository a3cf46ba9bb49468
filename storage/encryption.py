"""Encryption at rest of cold-tier blocks: AES-256-GCM under one store key.

Why: a KV block is its prompt in another form (the tokens can be recovered
from their keys and values), and the cold tier may sit on a shared file
system or an object store that other tenants, or operators, can read. With
a key (`ColdTierConfig.key_file`), every block's stored bytes, as its codec
made them (raw or int8), are sealed before they leave the process and
opened after they are read, so the chunks hold ciphertext only.

A sealed chunk, `[encoded_block_bytes + OVERHEAD]` uint8:

    salt (32 random bytes) | AES-256-GCM ciphertext | tag (16 bytes)

* **One key per chunk write.** The chunk's key is HMAC-SHA256(store key,
  salt), with a fresh random salt at every write, and GCM's nonce is fixed
  (each derived key seals one message). Random 96-bit nonces under one key
  are safe to about 2^32 writes, which a busy write-back could reach within
  days; two chunk keys collide only if two 256-bit salts do.
* **Bound to the block id.** The associated data is the block id and the
  store's layout (`context`): a chunk moved under another id, or into a
  store of another model, codec or block shape, fails its tag. Without a
  key, a chunk swapped on disk for another block's valid chunk would be
  served under the wrong id: its CRC32C checks the bytes, not whose they are.
* **A failed tag is a corrupt block**: a miss, counted, removed and
  recomputed, as a failed checksum is (`BlockStore`). A wrong key is not
  that: the layout records the key's id (`key_id`, a keyed hash that
  reveals nothing of the key), so a store opened with another key, or none,
  is refused at open and nothing in it is touched.

The key file holds the 32-byte key as 64 hex digits (`write_key_file`
makes one, readable by its owner only, and never overwrites). Rotating a
key is cloning the store into a new one under the new key
(`storage.clone.clone_store`: every block is opened and sealed again).

Cost: sealing and opening run at 16-19 GB/s a core on the 2-vCPU benchmark
VM (AES-NI), against 1-3 GB/s of disk; the key derivation adds ~2 us a
block (`launch.bench_storage --configs=file:raw@key_file=K` measures a
store).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import threading
from typing import Sequence

import numpy as np

from dualpath_jax.disk_io import sync_directory

_log = logging.getLogger(__name__)

ALGORITHM = "aes-256-gcm, hmac-sha256 chunk keys"
KEY_BYTES = 32
SALT_BYTES = 32
TAG_BYTES = 16
OVERHEAD = SALT_BYTES + TAG_BYTES  # bytes a sealed chunk adds
MAX_KEY_FILE_BYTES = 4096  # a key file is 65 bytes; anything past this is refused
_NONCE = bytes(12)  # each chunk key seals one message
_KEY_ID_LABEL = b"dualpath-jax cold tier key id"
_CHUNK_KEY_LABEL = b"dualpath-jax cold tier chunk key\0"


def _aesgcm():
  """`cryptography`'s AES-GCM class and the error of a failed tag (imported
  on first use: a store without a key does not need the package)."""
  try:
    from cryptography.exceptions import InvalidTag  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ValueError("an encrypted cold tier needs the `cryptography` "
                     "package (pip install cryptography)") from err
  return AESGCM, InvalidTag


def load_key(path: str) -> bytes:
  """The 32-byte key in the file at `path` (64 hex digits, whitespace
  around them ignored).

  Only a regular file (or a link to one) of at most `MAX_KEY_FILE_BYTES` is
  read: a FIFO, a terminal or another device used to block the open (or the
  read) forever, a launcher hanging before it said anything, and a file
  longer than that had only its first 4 KiB looked at (a key followed by
  blank space and anything else was taken). The `cryptography` package is
  checked here too, so a launcher that reads the key before the weights
  load (`launch.cluster_flags`) refuses its absence then, not at the
  store's open after the model loaded.

  Raises:
    ValueError: the file cannot be read or holds anything else (its
      content is never echoed), or `cryptography` is not installed.
  """
  try:
    # O_NONBLOCK: opening a FIFO without a writer returns at once (no
    # effect on a regular file); O_NOCTTY: a terminal never becomes ours.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
                 | getattr(os, "O_CLOEXEC", 0))
  except OSError as err:
    raise ValueError(f"cold tier key file {path}: cannot read it "
                     f"({err.strerror})") from None
  try:
    mode = os.fstat(fd).st_mode  # of what was opened, not of the path now
    if not stat.S_ISREG(mode):
      raise ValueError(f"cold tier key file {path} is not a regular file")
    parts, size = [], 0
    while size <= MAX_KEY_FILE_BYTES:
      part = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
      if not part:
        break
      parts.append(part)
      size += len(part)
  except OSError as err:
    raise ValueError(f"cold tier key file {path}: cannot read it "
                     f"({err.strerror})") from None
  finally:
    os.close(fd)
  text = b"".join(parts)
  if len(text) > MAX_KEY_FILE_BYTES:
    raise ValueError(f"cold tier key file {path} is larger than "
                     f"{MAX_KEY_FILE_BYTES} bytes; it must hold only a "
                     f"{KEY_BYTES}-byte key as {2 * KEY_BYTES} hex digits")
  try:
    key = bytes.fromhex(text.strip().decode("ascii"))
  except (UnicodeDecodeError, ValueError):
    key = b""
  if len(key) != KEY_BYTES:
    raise ValueError(f"cold tier key file {path} must hold a {KEY_BYTES}-byte "
                     f"key as {2 * KEY_BYTES} hex digits (python -m "
                     "launch.make_cold_tier_key writes one)")
  if mode & (stat.S_IRWXG | stat.S_IRWXO):
    _log.warning("cold tier key file %s can be read by other users (mode "
                 "%o); chmod 600 it", path, stat.S_IMODE(mode))
  _aesgcm()  # ValueError without the package, before any weights load
  return key


def write_key_file(path: str) -> str:
  """Writes a fresh random key to a new file at `path`, readable by its
  owner only; returns the key's id. Missing folders above it are made,
  readable by the owner only (`--out=/tmp/keys/k` on a fresh machine).

  Raises:
    ValueError: `path` exists (a key is never overwritten: the blocks
      sealed under it would be lost) or cannot be made.
  """
  folder = os.path.dirname(os.path.abspath(path))
  missing = []
  probe = folder
  while not os.path.exists(probe):  # makedirs' mode reaches only the leaf
    missing.append(probe)
    probe = os.path.dirname(probe)
  try:
    for made in reversed(missing):
      os.mkdir(made, 0o700)
  except OSError as err:
    raise ValueError(f"cannot make the key file's folder {folder} "
                     f"({err.strerror})") from None
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:
    raise ValueError(f"{path} exists; a key file is never overwritten (the "
                     "blocks sealed under its key would be unreadable)") from None
  except OSError as err:
    raise ValueError(f"cannot make the key file {path} ({err.strerror})") from None
  key = os.urandom(KEY_BYTES)
  # A failed write (a full disk) used to leave an empty or partial file,
  # which every later call refused to replace, and raised OSError (the
  # launcher's traceback). The file is removed and ValueError raised; the
  # directory is synced too, so a key whose blocks were sealed is not lost
  # with its directory entry in a power cut.
  try:
    with os.fdopen(fd, "w", encoding="ascii") as f:
      f.write(key.hex() + "\n")
      f.flush()
      os.fsync(f.fileno())
    sync_directory(os.path.dirname(os.path.abspath(path)))
  except OSError as err:
    try:
      os.unlink(path)
      left = "nothing was left there"
    except OSError:
      left = "remove the file it left before trying again"
    raise ValueError(f"cannot write the key file {path} "
                     f"({err.strerror or err}); {left}") from None
  return key_id(key)


def key_id(key: bytes) -> str:
  """A name for `key` that reveals nothing of it (a keyed hash), recorded in
  the store's layout so that another key is refused at open."""
  return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


class BlockCipher:
  """Seals and opens a store's chunks under its key (module docstring).

  Args:
    key: the store key (`load_key`).
    context: bytes naming the store's layout (model, block shape, codec),
      authenticated with every chunk.
  """

  def __init__(self, key: bytes, context: bytes):
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
      raise ValueError(f"a cold tier key is {KEY_BYTES} bytes")
    self._aes, self._invalid_tag = _aesgcm()
    self._key = key
    self._context = bytes(context)
    self.key_id = key_id(key)

  def _chunk_key(self, salt: bytes):
    return self._aes(hmac.new(self._key, _CHUNK_KEY_LABEL + salt,
                              hashlib.sha256).digest())

  def _aad(self, block_id: bytes) -> bytes:
    return b"%d:" % len(block_id) + block_id + self._context

  def seal_into(self, plain: np.ndarray,  # [m] uint8
                block_id: bytes,
                out: np.ndarray,  # [m + OVERHEAD] uint8, written
                ) -> None:
    """Seals one block's bytes under a fresh chunk key, bound to its id."""
    salt = os.urandom(SALT_BYTES)
    out[:SALT_BYTES] = np.frombuffer(salt, np.uint8)
    key, aad = self._chunk_key(salt), self._aad(block_id)
    data = memoryview(np.ascontiguousarray(plain)).cast("B")
    if hasattr(key, "encrypt_into"):  # newer cryptography: no copy
      key.encrypt_into(_NONCE, data, aad, memoryview(out[SALT_BYTES:]))
    else:
      out[SALT_BYTES:] = np.frombuffer(key.encrypt(_NONCE, data, aad), np.uint8)

  def open_into(self, sealed: np.ndarray,  # [m + OVERHEAD] uint8
                block_id: bytes,
                out: np.ndarray,  # [m] uint8, C-contiguous, written
                ) -> bool:
    """Decrypts one chunk into `out`; False if its tag fails (bytes changed,
    or sealed for another id, layout or key). `out` is then partly written
    or not at all: nothing of a failed chunk may be used."""
    if sealed.shape != (out.size + OVERHEAD,):
      return False
    key = self._chunk_key(sealed[:SALT_BYTES].tobytes())
    data = memoryview(sealed[SALT_BYTES:])
    try:
      if hasattr(key, "decrypt_into"):
        key.decrypt_into(_NONCE, data, self._aad(block_id), memoryview(out))
      else:
        out[:] = np.frombuffer(key.decrypt(_NONCE, data, self._aad(block_id)),
                               np.uint8)
    except self._invalid_tag:  # anything else (MemoryError) is not the bytes'
      return False
    return True

  def seal(
      self,
      plain: np.ndarray,  # [n, m] uint8: each block's encoded bytes
      ids: Sequence[bytes],  # n block ids
      out: np.ndarray | None = None,  # [n, m + OVERHEAD] uint8, reused
  ) -> np.ndarray:  # [n, m + OVERHEAD] uint8
    """Each row sealed (`seal_into`)."""
    n, m = plain.shape
    if len(ids) != n:
      raise ValueError(f"{len(ids)} ids for {n} blocks")
    if out is None:
      out = np.empty((n, m + OVERHEAD), np.uint8)
    for i, block_id in enumerate(ids):
      self.seal_into(plain[i], block_id, out[i])
    return out

  def open(
      self,
      sealed: np.ndarray,  # [n, m + OVERHEAD] uint8
      ids: Sequence[bytes],  # n block ids
  ) -> tuple[np.ndarray, list[bool]]:  # [n, m] uint8, authentic per row
    """Each row opened (`open_into`); a row whose tag fails is zero."""
    n, width = sealed.shape
    out = np.zeros((n, width - OVERHEAD), np.uint8)
    ok = []
    for i, block_id in enumerate(ids):
      ok.append(self.open_into(sealed[i], block_id, out[i]))
      if not ok[-1]:
        out[i] = 0
    return out, ok


class SealedCodec:
  """A codec (`storage.codecs`) whose stored chunks are sealed: what the
  layout and the block store see of an encrypted store.

  The chunk is `[inner.encoded_block_bytes + OVERHEAD]` uint8, never
  compressed (ciphertext does not compress, and zstd runs inside
  TensorStore, after the seal). `encode`/`decode` take the block ids: a
  chunk is bound to its id.
  """

  identity = False  # a read lands in a scratch batch, then is opened
  compress = False

  def __init__(self, inner, cipher: BlockCipher):
    if inner.compress:
      raise ValueError(f"codec {inner.full_name} cannot be encrypted: "
                       "ciphertext does not compress (use raw or int8)")
    self.inner = inner
    self.cipher = cipher
    self.name = inner.name
    self.lossy = inner.lossy
    self.block_shape = inner.block_shape
    self.dtype = inner.dtype
    self.dtype_name = inner.dtype_name
    self._local = threading.local()  # each thread's decrypted row (`_plain`)

  @property
  def stored_shape(self) -> tuple[int, ...]:
    return (self.inner.encoded_block_bytes + OVERHEAD,)

  stored_dtype_name = "uint8"
  stored_dtype = np.dtype(np.uint8)

  @property
  def encoded_block_bytes(self) -> int:
    return self.stored_shape[0]

  @property
  def full_name(self) -> str:
    return self.inner.full_name + "+aes256gcm"

  def check_blocks(self, blocks: np.ndarray) -> None:
    self.inner.check_blocks(blocks)

  def encode(
      self,
      blocks: np.ndarray,  # [n, L, 2, Hkv, P, D] cache dtype
      ids: Sequence[bytes],
      out: np.ndarray | None = None,  # [n, encoded_block_bytes] uint8
  ) -> np.ndarray:  # [n, encoded_block_bytes] uint8
    encoded = np.ascontiguousarray(self.inner.encode(blocks))
    return self.cipher.seal(encoded.reshape(len(ids), -1).view(np.uint8), ids,
                            out)

  def decode(
      self,
      stored: np.ndarray,  # [n, encoded_block_bytes] uint8
      ids: Sequence[bytes | None],  # None: not read, skipped
      out: Sequence[np.ndarray] | None = None,  # n [L, 2, Hkv, P, D] rows
  ) -> list[np.ndarray | None]:  # [L, 2, Hkv, P, D] each; None: not authentic
    """Opens and decodes each chunk: a raw block is decrypted straight into
    its `out` row (or a new block), an int8 one into this thread's scratch
    row first, then decoded into its `out` row (or a new block)."""
    blocks: list[np.ndarray | None] = []
    for i, block_id in enumerate(ids):
      if block_id is None:
        blocks.append(None)
        continue
      if self.inner.identity:
        dest = (np.empty(self.block_shape, self.dtype) if out is None
                else out[i])
        ok = self.cipher.open_into(stored[i], block_id,
                                   dest.reshape(-1).view(np.uint8))
        if not ok:
          dest[...] = 0  # no unauthenticated bytes left in a caller's row
        blocks.append(dest if ok else None)
        continue
      plain = self._plain()
      if not self.cipher.open_into(stored[i], block_id, plain):
        blocks.append(None)
        continue
      dest = np.empty(self.block_shape, self.dtype) if out is None else out[i]
      self.inner.decode_into(plain.view(self.inner.stored_dtype).reshape(
          self.inner.stored_shape), dest)
      blocks.append(dest)
    return blocks

  def _plain(self) -> np.ndarray:  # [inner.encoded_block_bytes] uint8
    """This thread's reused row that an int8 chunk is decrypted into."""
    plain = getattr(self._local, "plain", None)
    if plain is None:
      plain = np.empty(self.inner.encoded_block_bytes, np.uint8)
      self._local.plain = plain
    return plain
