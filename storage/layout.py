"""On-disk layout: one zarr3 array of block slots, opened through TensorStore.

The block bytes live in a single zarr3 array `[num_slots, *stored_shape]` whose
chunk shape is `[1, *stored_shape]`: one chunk per slot, holding every layer of
one KV block, so one read fetches one block. The codec chain of each chunk is
`bytes (little endian) -> [zstd] -> crc32c`; TensorStore verifies the CRC32C
on every read and a mismatch fails that read (the store turns it into a miss).
Chunk keys use the zarr3 "default" encoding with "/" separators, so slot `s`
of a 6-d array is the key `c/s/0/0/0/0/0` (one file per block with `file`).

Base kvstores (any TensorStore kvstore works):

* local `file` (default): `<root>/data/`; writes go to a temporary file that
  is fsynced and renamed, so a chunk is either the old or the new one.
* `ocdbt` on top of any base: chunks are packed into large append-only data
  files under a B-tree; a commit is an atomic manifest swap.
* a shared file system (`{"driver": "file", "path": "/mnt/nfs/kv/"}`), or
  object storage (`{"driver": "gcs", "bucket": "...", "path": "kv/"}`,
  `{"driver": "s3", "bucket": "...", "path": "kv/"}`) via
  `ColdTierConfig.kvstore`.
"""

from __future__ import annotations

import os
from typing import Any

import tensorstore as ts

from storage.codecs import BlockCodec
from storage.config import ColdTierConfig


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
          "shape": [num_slots, *codec.stored_shape],
          "data_type": codec.stored_dtype_name,
          "chunk_grid": {"name": "regular",
                         "configuration": {"chunk_shape": [1, *codec.stored_shape]}},
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
        f"cold tier at {config.root} has another layout than codec={codec.full_name}, "
        f"shape={[num_slots, *codec.stored_shape]}: {err}") from err


def chunk_key(slot: int, stored_rank: int) -> bytes:
  """Key of slot `slot`'s chunk, relative to the array's kvstore path."""
  return ("c/" + "/".join([str(int(slot))] + ["0"] * stored_rank)).encode()
