"""Configuration of the cold tier: where blocks live, how they are encoded, how many.

One frozen dataclass, `ColdTierConfig`, holds every knob of the block store so
launchers only parse flags into it. The shape and dtype of a block are not here:
they come from `dualpath_jax.config.ModelConfig` and `CacheConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dualpath_jax.utils import is_integer

CODECS = ("raw", "zstd", "int8", "int8+zstd")
DRIVERS = ("file", "ocdbt")
FILE_IO_MODES = ("default", "direct", "memmap")
ADMISSIONS = ("always", "second_put", "session_continues")
CHUNK_WRITERS = ("auto", "direct", "tensorstore")
CHUNK_READERS = ("auto", "direct", "tensorstore")
SYNC_MODES = ("auto", "syncfs", "fsync")
MAX_INT = (1 << 62) - 1  # a count or byte size above this overflows (see below)


@dataclasses.dataclass(frozen=True)
class ColdTierConfig:
  """Cold-tier (TensorStore) block store settings.

  Attributes:
    root: local directory of the store. Holds the index (SQLite), the writer
      leases and, unless `kvstore` is given, the block arrays themselves.
    kvstore: optional TensorStore kvstore spec for the block bytes, e.g.
      `{"driver": "gcs", "bucket": "b", "path": "kv/"}` or a shared file system
      `{"driver": "file", "path": "/mnt/shared/kv/"}`. None: `<root>/data/`.
    driver: "file" (one file per block, durable before the index commit) or
      "ocdbt" (blocks packed into an append-only B-tree database).
    codec: "raw" (the cache dtype, bit-exact), "zstd" (raw then zstd),
      "int8" (lossy, one float32 scale per block, layer, K/V and head) or
      "int8+zstd".
    zstd_level: zstd level for the zstd codecs.
    capacity_bytes: byte budget for encoded (pre-compression) block payloads;
      the store holds at most `capacity_bytes // encoded_block_bytes` blocks and
      evicts least recently used blocks to admit new ones.
    admission: "always" writes every put block; "second_put" writes a block
      only when it is put a second time (it was reused); "session_continues"
      writes a session's blocks only from its second put on (the session came
      back for another turn). Deferred blocks are not stored; put them again.
    io_threads: batches in flight at once (each batch is one TensorStore
      read or write of up to `max_batch_blocks` chunks).
    file_io_concurrency: concurrent file operations, the store's queue depth:
      TensorStore's limit (the threads of its file I/O pool) and the direct
      chunk writer's and reader's threads. A chunk read or write is one
      operation.
    file_io_mode: "direct", "default" (buffered) or "memmap". For the direct
      chunk writer, "direct" writes a chunk's whole pages with O_DIRECT, and
      the direct chunk reader reads whole-page chunks into page-aligned rows
      with it. TensorStore (its reads, and the writes it does) takes it as its file
      access mode; note (TensorStore 0.1.86, checked with strace) that it sets
      O_DIRECT only on reads whose extent, rounded up to 4 KiB, fits inside
      the file, which a chunk file (block + 4-byte CRC32C) never does.
    max_batch_blocks: a put or get of more blocks is split into batches.
    max_pending_write_bytes: write-back bytes queued but not yet durable; a
      put beyond it is dropped (status "dropped") instead of blocking the
      caller. It is a cache: the engine can always recompute.
    fsync: make block files durable before the index commits them (see
      `sync`). Only turn off for benchmarks that say so.
    chunk_writer: who writes chunk files. "tensorstore": TensorStore's zarr3
      write (any kvstore, any codec). "direct": `storage.chunk_writer` writes
      the same chunk files itself (hardware CRC32C, O_DIRECT pages, in
      place; local `file` kvstore and codecs without zstd only; a third to a
      half of TensorStore's write CPU, docs/storage.md "v6"). "auto": "direct"
      where it applies, else "tensorstore".
    chunk_reader: who reads chunk files. "tensorstore": TensorStore's zarr3
      read (any kvstore, any codec). "direct": `storage.chunk_reader` reads
      them itself, straight into the caller's rows (hardware CRC32C,
      O_DIRECT into page-aligned rows with `file_io_mode="direct"`; local
      `file` kvstore and codecs without zstd only; docs/storage.md "v9").
      "auto": "direct" where it applies, else "tensorstore".
    sync: how the direct chunk writer makes a batch durable: "syncfs" (one
      syncfs(2) of the store's file system per batch; Linux), "fsync" (each
      chunk, and its slot directory when new) or "auto" (syncfs where the
      platform has it, else fsync). See `storage.chunk_writer`. TensorStore's
      own writes always fsync per chunk.
    key_file: a file holding the store's AES-256 key (64 hex digits): every
      block is sealed before it is written and authenticated when read
      (`storage.encryption`). The store records the key's id and refuses
      another key, or none. None: blocks are stored in the clear. Not with
      the zstd codecs (ciphertext does not compress).
  """

  root: str
  kvstore: dict[str, Any] | None = None
  driver: str = "file"
  codec: str = "raw"
  zstd_level: int = 1
  capacity_bytes: int = 8 << 30
  admission: str = "always"
  io_threads: int = 4
  file_io_concurrency: int = 32
  file_io_mode: str = "direct"
  max_batch_blocks: int = 64
  max_pending_write_bytes: int = 1 << 30
  fsync: bool = True
  chunk_writer: str = "auto"
  chunk_reader: str = "auto"
  sync: str = "auto"
  key_file: str | None = None

  def __post_init__(self):
    if not isinstance(self.root, (str, os.PathLike)) or not str(self.root):
      raise ValueError(f"ColdTierConfig.root must be a directory path; got "
                       f"{self.root!r}")
    # A kvstore that is no spec dict, or an fsync that is no bool (TensorStore
    # takes it as `file_io_sync`), failed only at open, as "cannot open its
    # block array ... or an array of another layout is there".
    if self.kvstore is not None and not isinstance(self.kvstore, dict):
      raise ValueError(f"ColdTierConfig.kvstore must be a kvstore spec dict "
                       f"or None; got {self.kvstore!r}")
    if not isinstance(self.fsync, bool):
      raise ValueError(f"ColdTierConfig.fsync must be a bool; got {self.fsync!r}")
    if self.key_file is not None and (
        not isinstance(self.key_file, (str, os.PathLike)) or
        not str(self.key_file)):
      raise ValueError(f"ColdTierConfig.key_file must be a file path or None; "
                       f"got {self.key_file!r}")
    if self.key_file is not None and "zstd" in str(self.codec):
      raise ValueError(f"codec={self.codec!r} cannot be encrypted: ciphertext "
                       "does not compress (use raw or int8 with a key_file)")
    if self.driver not in DRIVERS:
      raise ValueError(f"driver={self.driver!r} not in {DRIVERS}")
    if self.codec not in CODECS:
      raise ValueError(f"codec={self.codec!r} not in {CODECS}")
    if self.file_io_mode not in FILE_IO_MODES:
      raise ValueError(f"file_io_mode={self.file_io_mode!r} not in {FILE_IO_MODES}")
    if self.chunk_writer not in CHUNK_WRITERS:
      raise ValueError(f"chunk_writer={self.chunk_writer!r} not in {CHUNK_WRITERS}")
    if self.chunk_reader not in CHUNK_READERS:
      raise ValueError(f"chunk_reader={self.chunk_reader!r} not in {CHUNK_READERS}")
    if self.sync not in SYNC_MODES:
      raise ValueError(f"sync={self.sync!r} not in {SYNC_MODES}")
    if self.admission not in ADMISSIONS:
      raise ValueError(f"admission={self.admission!r} not in {ADMISSIONS}")
    for name in ("capacity_bytes", "io_threads", "file_io_concurrency",
                 "max_batch_blocks", "max_pending_write_bytes", "zstd_level"):
      value = getattr(self, name)
      # An int, not a float: a float capacity was stored as the layout's
      # slot count (16.0), and a float batch size failed mid-put.
      if not is_integer(value):
        raise ValueError(f"ColdTierConfig.{name} must be an integer; got "
                         f"{value!r}")
      if value <= 0:
        raise ValueError(f"ColdTierConfig.{name} must be positive")
      # Beyond it, TensorStore's array shape (from capacity_bytes) or a C
      # integer raised OverflowError at open.
      if value > MAX_INT:
        raise ValueError(f"ColdTierConfig.{name}={value} is above {MAX_INT}")
    if not 1 <= self.zstd_level <= 22:
      raise ValueError(f"zstd_level={self.zstd_level} not in [1, 22]")

  def replace(self, **kw: Any) -> "ColdTierConfig":
    return dataclasses.replace(self, **kw)
