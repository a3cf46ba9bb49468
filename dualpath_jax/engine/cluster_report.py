"""What a `PDCluster` reports: its counters and one-engine views of its parts.

Launchers, the server's /metrics and `workload.replay` read a cluster as they
read one `Engine`: `stats`, `manager.stats`, `manager.pool.num_blocks`,
`cold_tier.report()`. These classes give the cluster's engines, store and hot
tiers that shape, summing what adds up and keeping apart what a turn would
count twice. They hold counters and references only; they move no data.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dualpath_jax.cache.hot_tier import HotTier
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.engine.cold_tier import ColdTierStats
from dualpath_jax.engine.engine import EngineStats
from dualpath_jax.engine.prefetch import TierPrefetcher


@dataclasses.dataclass
class ClusterStats(EngineStats):
  """`EngineStats` summed over engines, plus placement, load and move counters.

  `preemptions` stays 0: pages are reserved at admission.
  """

  turns_placed: int = 0
  load_s: float = 0.0  # wall time of the cold-tier reads, summed over turns
  load_wait_s: float = 0.0  # time every engine sat idle waiting for reads
  max_loads_in_flight: int = 0
  move_s: float = 0.0
  moved_blocks: int = 0
  kept_on_decode_blocks: int = 0  # path-2 blocks written to the DE on the way
  path_blocks: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"resident": 0, "hot": 0, "path1": 0,
                               "path2": 0, "free": 0})
  nic_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  placements: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClusterColdTier:
  """What launchers read of the cluster's storage tiers: the store, the
  counters, and the prefill engines' hot tiers (the calls
  `ColdTierConnector` answers for one engine)."""

  store: object
  stats: ColdTierStats
  hot_tiers: Sequence[HotTier] = ()
  prefetcher: TierPrefetcher | None = None

  def flush(self) -> None:
    self.store.flush()

  def report(self) -> dict:
    """As `ColdTierConnector.report`; `hot_tier` sums the prefill engines'
    hot tiers (None without them), `engines` saying how many."""
    hot = None
    if self.hot_tiers:
      hot = {"engines": len(self.hot_tiers),
             "memory": self.hot_tiers[0].memory}  # one setting for all
      for tier in self.hot_tiers:
        for k, v in {**tier.stats.as_dict(), "capacity_blocks": tier.capacity,
                     "held_blocks": len(tier), "bytes": tier.nbytes}.items():
          hot[k] = hot.get(k, 0) + v
    return {**self.stats.as_dict(), "store": self.store.stats(),
            "hot_tier": hot,
            "prefetch": (None if self.prefetcher is None else
                         self.prefetcher.report())}



class ManagersView:
  """The cluster's `manager.stats` and `manager.pool.num_blocks`, read as
  one engine's (the server's /metrics and the launchers' reports).

  The prefix-cache counters (lookups, query and hit tokens, hit rate) are
  the prefill engines': a turn's prompt is looked up once there, and its
  reservation on a decode engine would count the same tokens again. Pool
  occupancy, registrations, evictions and `pool.num_blocks` are summed over
  every engine.
  """

  _PREFILL_ONLY = ("lookups", "query_tokens", "hit_tokens")

  def __init__(self, prefill: list[KVCacheManager],
               every: list[KVCacheManager]):
    self._prefill, self._every = prefill, every
    self.pool = PoolsView(sum(m.pool.num_blocks for m in every))

  @property
  def stats(self) -> dict[str, float]:
    total: dict[str, float] = {}
    for m in self._every:
      for k, v in m.stats.items():
        if k not in self._PREFILL_ONLY:
          total[k] = total.get(k, 0) + v
    for k in self._PREFILL_ONLY:
      total[k] = sum(m.stats[k] for m in self._prefill)
    total["hit_rate"] = (total["hit_tokens"] / total["query_tokens"]
                         if total["query_tokens"] else 0.0)
    return total


@dataclasses.dataclass(frozen=True)
class PoolsView:
  """`manager.pool` as launchers read it: the blocks of every engine's pool."""

  num_blocks: int  # over every engine's pool

