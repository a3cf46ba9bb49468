"""Wires a loaded model, a KV pool and its bookkeeping into an `Engine`."""

from __future__ import annotations

import math

from dualpath_jax.cache.block_pool import BlockPool
from dualpath_jax.cache.hot_tier_memory import check_memory_kind
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.config import CacheConfig, EngineConfig, check_max_context
from dualpath_jax.engine.engine import Engine
from dualpath_jax.model.runner import ModelRunner


def model_fingerprint(loaded) -> str:
  """Identity of the weights and architecture; part of every block hash."""
  return f"{loaded.config.fingerprint()}:{loaded.weights_id}"


def make_hot_tier(capacity_bytes: int, model_config, cache: CacheConfig,
                  memory: str = "pageable", device=None):
  """A `cache.HotTier` of as many whole blocks of `model_config`'s KV
  (`cache`'s block size and dtype) as `capacity_bytes` holds, in `memory`
  ("pageable" or "pinned_host" of `device`; `cache.hot_tier_memory`)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dualpath_jax.cache.hot_tier import HotTier  # pylint: disable=g-import-not-at-top
  c = model_config
  dtype = (np.dtype(ml_dtypes.bfloat16) if cache.dtype == "bfloat16"
           else np.dtype(cache.dtype))
  return HotTier.for_bytes(
      capacity_bytes,
      (c.num_layers, 2, c.num_kv_heads, cache.block_size, c.head_dim), dtype,
      memory=memory, device=device)


def make_engine(loaded, cache: CacheConfig, engine: EngineConfig,
                cold_tier=None, hot_tier_bytes: int = 0,
                hot_tier_memory: str = "pageable",
                storage_nic_gbps: float = math.inf,
                prefetch_blocks: int = 0) -> Engine:
  """An engine serving `loaded` (a `dualpath_jax.model.LoadedModel`).

  `cold_tier` (a `storage.ColdTierConfig`) backs the pool with a TensorStore
  block store: evicted or earlier-process blocks load from it, finished
  turns' full blocks are written to it. Close it with `engine.close()`.
  `hot_tier_bytes` > 0 adds a host-DRAM hot tier of that size
  (`cache.HotTier`) in front of it, or alone, its bytes in
  `hot_tier_memory`: "pageable" (numpy) or "pinned_host" (moved to and from
  the pool by `kernels.block_copy`; `cache.hot_tier_memory`).
  `storage_nic_gbps`: an emulated storage link (`transfer.StorageNic`) in
  front of the cold tier's reads, Gb/s (inf: none), as each engine of the
  P/D cluster has.
  `prefetch_blocks` > 0 (needs both tiers): blocks per read of a
  prefetcher that reads the prefixes of queued turns and of sessions
  predicted back soon from the cold tier into the hot tier while the
  reader idles (`engine.engine_prefetch`).
  """
  check_max_context(engine.max_context, loaded.config)
  check_memory_kind(hot_tier_memory)
  if not (isinstance(storage_nic_gbps, (int, float))
          and not isinstance(storage_nic_gbps, bool) and storage_nic_gbps > 0):
    raise ValueError(f"storage_nic_gbps must be > 0 (inf: no limit), got "
                     f"{storage_nic_gbps!r}")
  if (isinstance(prefetch_blocks, bool) or not isinstance(prefetch_blocks, int)
      or prefetch_blocks < 0):
    raise ValueError(f"prefetch_blocks must be an int >= 0, got "
                     f"{prefetch_blocks!r}")
  if prefetch_blocks and (cold_tier is None or not hot_tier_bytes):
    raise ValueError("prefetch_blocks needs a cold tier (where blocks are "
                     "read from) and a hot tier (where they go)")
  runner = ModelRunner(loaded.model, cache, attention_impl=engine.attention_impl)
  manager = KVCacheManager(
      BlockPool(cache.num_blocks), cache.block_size, model_fingerprint(loaded),
      max_blocks_per_seq=math.ceil(engine.max_context / cache.block_size))
  connector = None
  if cold_tier is not None or hot_tier_bytes:
    from dualpath_jax.engine.cold_tier import ColdTierConnector
    hot = (make_hot_tier(hot_tier_bytes, loaded.config, cache,
                         memory=hot_tier_memory) if hot_tier_bytes else None)
    store = None
    if cold_tier is not None:
      from storage.block_store import BlockStore
      store = BlockStore(cold_tier, loaded.config, cache)
    nic = None
    if store is not None and storage_nic_gbps < math.inf:
      from dualpath_jax.transfer.nic import StorageNic
      nic = StorageNic("engine", storage_nic_gbps * 1e9 / 8)
    connector = ColdTierConnector(store, manager, hot=hot, nic=nic)
  prefetcher = None
  if prefetch_blocks:
    from dualpath_jax.engine.engine_prefetch import EnginePrefetcher
    prefetcher = EnginePrefetcher(connector, manager,
                                  batch_blocks=prefetch_blocks)
  return Engine(runner, manager, engine, eos_ids=loaded.config.eos_token_ids,
                block_size=cache.block_size, cold_tier=connector,
                prefetcher=prefetcher)
