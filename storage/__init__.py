"""TensorStore cold tier: KV blocks on SSD (or any TensorStore kvstore).

`BlockStore` is the entry point (see `storage.block_store` for the API),
configured by `ColdTierConfig`. Modules, one job each:

* `config`      ColdTierConfig, the one place for the tier's defaults
* `codecs`      block <-> stored chunk (raw, int8 with per-head scales)
* `encryption`  chunks sealed with AES-256-GCM under the store's key, bound
                to their block id (`key_file`)
* `layout`      the zarr3 slot array and its kvstore (file, ocdbt, gcs, s3),
                slot directories made a group ahead
* `chunk_writer` writes a local store's chunk files itself (TensorStore's
                bytes, hardware CRC32C, O_DIRECT pages, one syncfs per batch)
* `chunk_reader` reads them itself, straight into the caller's rows
                (O_DIRECT into page-aligned rows, hardware CRC32C)
* `index`       block identity -> slot in SQLite; crash-safe visibility
* `block_writer` the write path: reservation, encoding, durable chunk writes,
                commit; a put's `PutResult`
* `block_reader` the read path: lookup, verified chunk reads into the caller's
                rows, the still-current check, decoding
* `bad_chunks`  why a chunk read failed; the lost blocks counted, logged
                once and removed, unreadable ones kept
* `removals`    a block's bytes deleted, then its row freed; failed removals
                queued and retried with a backoff
* `io_pool`     bounded worker threads and futures
* `stats`       counters for metrics
* `page_cache`  drop a directory's files from the OS page cache (benchmarks)
"""

from storage.block_store import BlockStore, PutResult
from storage.config import ColdTierConfig

__all__ = ["BlockStore", "ColdTierConfig", "PutResult"]
