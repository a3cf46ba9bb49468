"""KV cache bookkeeping: block identities, the block pool, per-sequence tables.

Pure Python and numpy, no JAX and no I/O, except the two modules that move
bytes (they import JAX; importing this package does not import them):

  pool_io           whole blocks between the device pool and host arrays
  hot_tier_memory   where the hot tier's bytes live (numpy or a JAX
                    `pinned_host` buffer) and how blocks cross to the pool

The rest:

  block_hash        identities of full blocks as a hash chain over tokens,
                    model fingerprint and tenant salt
  block_pool        refcounted pool blocks, cached identities, LRU eviction
  kv_cache_manager  block tables of running sequences and prefix reuse
  hot_tier          whole blocks in host DRAM by identity, evicted by reuse,
                    recency and position in their chain (and never pinned ones)
  prefetcher        when each agent session comes back (`ReturnPredictor`),
                    so which blocks a prefetcher reads first
  token_importance  the seed articles' importance score per block (recency,
                    attention, position) and the hot set it picks
  importance_study  how much of decode's attention that hot set serves, and
                    what reading only it does to the next token
                    (`launch.study_importance`; the serving path does not
                    use it: attention here is exact)
"""

from __future__ import annotations

from dualpath_jax.cache.block_hash import (DIGEST_SIZE, BlockHash, hash_block,
                                           hash_chain, loadable_chain,
                                           token_array)
from dualpath_jax.cache.block_pool import (BlockPool, BlockPoolStats,
                                           OutOfBlocksError)
from dualpath_jax.cache.hot_tier import HotTier, HotTierStats
from dualpath_jax.cache.kv_cache_manager import (KVCacheManager,
                                                 RequestTooLargeError)
from dualpath_jax.cache.prefetcher import AwaySession, ReturnPredictor

__all__ = [
    "AwaySession",
    "BlockHash",
    "BlockPool",
    "BlockPoolStats",
    "DIGEST_SIZE",
    "HotTier",
    "HotTierStats",
    "KVCacheManager",
    "OutOfBlocksError",
    "RequestTooLargeError",
    "ReturnPredictor",
    "hash_block",
    "hash_chain",
    "loadable_chain",
    "token_array",
]
