"""On-disk layout: one zarr3 array of block slots, opened through TensorStore.

The block bytes live in a single 2-d zarr3 array `[num_slots, chunk_elems]`
(`chunk_elems = prod(stored_shape)`, the codec's stored block flattened) whose
chunk shape is `[1, chunk_elems]`: one chunk per slot, holding every layer of
one KV block, so one read fetches one block. The codec chain of each chunk is
`bytes (little endian) -> [zstd] -> crc32c`; every read verifies the CRC32C
(TensorStore's, or `storage.chunk_reader`'s on a local `file` kvstore) and a
mismatch fails that read (the store turns it into a miss).
Chunk keys use the zarr3 "default" encoding with "/" separators, so slot `s`
is the key `c/s/0`: one file per block, one directory per slot.

Why 2-d and why the slot directories are made here: with the `file` kvstore
every directory level of a chunk key is a directory that TensorStore creates
(and syncs) on the first write of the slot. The earlier 6-d array
(`c/s/0/0/0/0/0`, five directories per slot) made a fresh store's writes
metadata-bound: about half the disk's write bandwidth on the benchmark
machine. With one directory per slot, made by `SlotDirectories` 256 slots at
a time and a group ahead of the writes (the parent synced once per group),
first writes run at the speed of rewrites (docs/storage.md, "Measurements").

Base kvstores (any TensorStore kvstore works):

* local `file` (default): `<root>/data/`, one file per chunk. Written in
  place by `storage.chunk_writer`, or (zstd codecs) by TensorStore, which
  renames a temporary file over the chunk.
* `ocdbt` on top of any base: chunks are packed into large append-only data
  files under a B-tree; a commit is an atomic manifest swap.
* a shared file system (`{"driver": "file", "path": "/mnt/nfs/kv/"}`), or
  object storage (`{"driver": "gcs", "bucket": "...", "path": "kv/"}`,
  `{"driver": "s3", "bucket": "...", "path": "kv/"}`) via
  `ColdTierConfig.kvstore`.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import threading
from typing import Any, Iterable

import tensorstore as ts

from dualpath_jax.disk_io import sync_directory
from storage.codecs import BlockCodec
from storage.config import ColdTierConfig
from storage.io_pool import submit_or_run


def base_kvstore_spec(config: ColdTierConfig) -> dict[str, Any]:
  """The kvstore spec that holds the block array (before the ocdbt wrapper)."""
  if config.kvstore is not None:
    if "driver" not in config.kvstore:
      raise ValueError(f"kvstore spec needs a 'driver': {config.kvstore}")
    return dict(config.kvstore)
  return {"driver": "file", "path": os.path.join(os.path.abspath(config.root), "data") + "/"}


def array_kvstore_spec(config: ColdTierConfig) -> dict[str, Any]:
  """The kvstore spec of the zarr3 array (`file` base, optionally under `ocdbt`)."""
  base = base_kvstore_spec(config)
  if config.driver == "ocdbt":
    return {"driver": "ocdbt", "base": base}
  return base


# What a store's index records as the default kvstore's path: the root is
# wherever the store is opened from, so a copied, moved or symlinked store
# (restored from a backup, mounted elsewhere) opens as itself.
ROOT_DATA_PATH = "<root>/data/"


def recorded_kvstore_spec(config: ColdTierConfig) -> dict[str, Any]:
  """`array_kvstore_spec` as the index's layout records it: the default
  `<root>/data/` without the root's location (`ROOT_DATA_PATH`); a
  kvstore given in the config (`ColdTierConfig.kvstore`), whose location is
  the data's, as given."""
  if config.kvstore is not None:
    return array_kvstore_spec(config)
  return without_root_location(array_kvstore_spec(config))


def without_root_location(spec: dict[str, Any]) -> dict[str, Any]:
  """A default kvstore spec (`file` at some `<root>/data/`, optionally under
  `ocdbt`) with its path replaced by `ROOT_DATA_PATH`; anything else as is.
  Also what the indexes of stores made before `recorded_kvstore_spec`
  (which recorded the absolute path) are compared through."""
  if spec.get("driver") == "ocdbt" and isinstance(spec.get("base"), dict):
    return {**spec, "base": without_root_location(spec["base"])}
  path = spec.get("path")
  if (spec.get("driver") == "file" and isinstance(path, str)
      and path.endswith("/data/") and set(spec) == {"driver", "path"}):
    return {"driver": "file", "path": ROOT_DATA_PATH}
  return spec


def context_spec(config: ColdTierConfig) -> dict[str, Any]:
  """TensorStore context: bounded file I/O, durable writes, no chunk cache."""
  return {
      "file_io_concurrency": {"limit": config.file_io_concurrency},
      "file_io_sync": config.fsync,
      "file_io_mode": {"mode": config.file_io_mode},
      "cache_pool": {"total_bytes_limit": 0},
  }


def zarr3_spec(config: ColdTierConfig, codec: BlockCodec, num_slots: int) -> dict[str, Any]:
  """zarr3 spec of the slot array (created if absent, checked if present)."""
  byte_codecs: list[dict[str, Any]] = [
      {"name": "bytes", "configuration": {"endian": "little"}}]
  if codec.compress:
    byte_codecs.append({"name": "zstd",
                        "configuration": {"level": config.zstd_level, "checksum": False}})
  byte_codecs.append({"name": "crc32c"})
  return {
      "driver": "zarr3",
      "kvstore": array_kvstore_spec(config),
      "context": context_spec(config),
      "metadata": {
          "shape": [num_slots, chunk_elems(codec)],
          "data_type": codec.stored_dtype_name,
          "chunk_grid": {"name": "regular",
                         "configuration": {"chunk_shape": [1, chunk_elems(codec)]}},
          "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
          "fill_value": 0,
          "codecs": byte_codecs,
      },
      # A missing chunk must be an error (a miss), never a block of zeros.
      "fill_missing_data_reads": False,
  }


def open_slot_array(config: ColdTierConfig, codec: BlockCodec, num_slots: int) -> ts.TensorStore:
  """Opens (or creates) the slot array; raises ValueError on a layout mismatch."""
  spec = zarr3_spec(config, codec, num_slots)
  try:
    return ts.open(spec, open=True, create=True).result()
  except ValueError as err:
    raise ValueError(
        f"cold tier at {config.root}: cannot open its block array (kvstore "
        f"{spec['kvstore']}) as codec={codec.full_name}, "
        f"shape={[num_slots, chunk_elems(codec)]}: the kvstore cannot be "
        f"opened, or an array of another layout is there: {err}") from err


def chunk_elems(codec: BlockCodec) -> int:
  """Elements of one stored chunk: the codec's stored block, flattened."""
  return int(math.prod(codec.stored_shape))


def chunk_key(slot: int) -> bytes:
  """Key of slot `slot`'s chunk, relative to the array's kvstore path."""
  return f"c/{int(slot)}/0".encode()


def local_chunk_root(config: ColdTierConfig) -> str | None:
  """The local directory that holds the slot directories, or None.

  Only a local `file` kvstore (not under `ocdbt`, which packs chunks into its
  own files) has one directory per slot.
  """
  base = base_kvstore_spec(config)
  if config.driver != "file" or base.get("driver") != "file":
    return None
  return os.path.join(base["path"], "c")


SLOT_DIR_GROUP = 256  # slot directories made together, with one fsync of the parent


class SlotDirectories:
  """Makes the per-slot directories of a local `file` store, a group ahead of need.

  A chunk write needs its slot's directory. Making it on the write path (a
  mkdir and an fsync of the parent, under a lock) cost up to 40% of a fresh
  store's write time on the benchmark VM (docs/storage.md "v6"). Here
  directories are made an aligned group of `group` slots at a time
  (`[g * group, (g + 1) * group)`, clipped to `num_slots`), one parent fsync
  per group, on a background thread; `ensure(slots)` waits only for the
  groups of `slots` and starts the group after each one, since a fresh store
  hands slots out in order. A slot's directory stays when its chunk is
  deleted, so each is made once in the store's life (4 KiB per block). The
  parent fsync makes a new directory entry durable before a chunk in it is
  committed.
  """

  def __init__(self, chunk_root: str, num_slots: int, group: int = SLOT_DIR_GROUP):
    self.chunk_root = chunk_root
    self.num_slots = num_slots
    self.group = group
    self._groups: dict[int, cf.Future] = {}
    self._lock = threading.Lock()
    self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="cold-mkdir")

  def ensure(self, slots: Iterable[int]) -> None:
    """Returns once the directories of `slots` exist (durably); raises if one cannot be made."""
    groups = sorted({int(s) // self.group for s in slots})
    pending = [(g, self._start(g)) for g in groups]
    for g in groups:
      self._start(g + 1)
    for g, future in pending:
      try:
        future.result()
      except BaseException:
        with self._lock:  # let a later write try again
          if self._groups.get(g) is future:
            del self._groups[g]
        raise

  def prefetch(self, slot: int) -> None:
    """Starts making the group of `slot` in the background (no wait)."""
    self._start(int(slot) // self.group)

  def forget(self, slots: Iterable[int]) -> None:
    """Makes the next `ensure` of these slots check their directories again.

    For a write that failed: its directories may have been removed under
    the store (e.g. by hand), and must not stay marked as made.
    """
    with self._lock:
      for g in {int(s) // self.group for s in slots}:
        future = self._groups.get(g)
        if future is not None and future.done():
          del self._groups[g]

  def wait(self) -> None:
    """Waits for every group started so far (for tests and checks)."""
    with self._lock:
      futures = list(self._groups.values())
    cf.wait(futures)

  def close(self) -> None:
    self._executor.shutdown(wait=True)

  def _start(self, g: int) -> cf.Future | None:
    if not 0 <= g * self.group < self.num_slots:
      return None
    with self._lock:
      future = self._groups.get(g)
      if future is None:
        future = self._groups[g] = submit_or_run(self._executor, self._make_group, g)
      return future

  def _make_group(self, g: int) -> None:
    made = False
    for s in range(g * self.group, min((g + 1) * self.group, self.num_slots)):
      path = os.path.join(self.chunk_root, str(s))
      if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        made = True
    if made:
      sync_directory(self.chunk_root)
