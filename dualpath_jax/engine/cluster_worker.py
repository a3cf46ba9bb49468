"""One engine of a `PDCluster` and one turn's state as the cluster tracks it.

A `ClusterWorker` is a prefill (PE) or decode (DE) engine: its sub-mesh, a
`ModelRunner` with the weights on that sub-mesh, its KV pool and cache
manager, its emulated storage NIC and, on a PE, a host-DRAM hot tier. It
holds its turns (a PE's queue and current prefill, a DE's running batch)
and runs one padded model call; what to run, and when, is the cluster's
(`engine.cluster`). A `ClusterTurn` is a turn's progress from placement
through its load, prefill, move and decode.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from dualpath_jax.cache.block_pool import BlockPool
from dualpath_jax.cache.hot_tier import HotTier
from dualpath_jax.cache.hot_tier_memory import pool_device
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine import step_parts
from dualpath_jax.engine.cold_tier import ColdTierConnector
from dualpath_jax.engine.factory import make_hot_tier, model_fingerprint
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model.runner import ModelRunner
from dualpath_jax.scheduler.state import PREFILL
from dualpath_jax.transfer import LoadRequest, StorageNic
from dualpath_jax.transfer.loader import LayerStager
from dualpath_jax.transfer.mesh import EngineMesh


@dataclasses.dataclass
class ClusterTurn:
  """Cluster-side state of one turn."""

  req: TurnRequest
  arrival_s: float
  tokens: list[int]  # prompt + generated so far
  rng: np.random.Generator | None
  generated: list[int] = dataclasses.field(default_factory=list)
  prefill: "ClusterWorker | None" = None
  decode: "ClusterWorker | None" = None
  cached_prompt_tokens: int = 0
  first_token_s: float | None = None
  load: "cf.Future | None" = None  # the cold-tier reads in flight
  load_request: LoadRequest | None = None
  load_plan: tuple[int, int, int] = (0, 0, 0)  # cached, resident, loadable blocks
  on_decode: frozenset[int] = frozenset()  # prompt blocks path 2 left on the DE
  chain: list[bytes] | None = None  # ids of its loadable blocks (set once)
  placed_s: float = 0.0
  # Prompt tokens each PE's hot tier loaded, over its placement attempts (a
  # load of an attempt that fails stays in that PE's pool: a retry there
  # finds it resident, and the hot tier keeps the credit, as on one engine;
  # a retry on another PE does not).
  hot_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
  hook_error: BaseException | None = None  # what its `on_token` raised
  logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob
  # Blocks of its chain found cached when it first waited for a turn that
  # was prefilling its prefix (`PDCluster._waits_for_a_shared_prefill`).
  hits_before_wait: int | None = None

  @property
  def rid(self) -> str:
    return self.req.request_id

  @property
  def prefill_target(self) -> int:
    return len(self.req.prompt_tokens)



class ClusterWorker:
  """One engine: its sub-mesh, model copy, KV pool, cache manager and NIC."""

  def __init__(self, mesh: EngineMesh, runner: ModelRunner, loaded,
               cache: CacheConfig, engine: EngineConfig, nic: StorageNic,
               hot_tier_bytes: int = 0, hot_tier_memory: str = "pageable"):
    self.mesh = mesh
    self.name = mesh.name
    self.role = mesh.role
    self.nic = nic
    self.runner = runner
    self.manager = KVCacheManager(
        BlockPool(cache.num_blocks), cache.block_size, model_fingerprint(loaded),
        max_blocks_per_seq=math.ceil(engine.max_context / cache.block_size))
    self.kv = jax.device_put(self.runner.new_kv_cache(),
                             mesh.kv_pool_sharding())
    # A prefill engine's host-DRAM hot tier, moved to and from its pool by
    # the single engine's connector (no cold tier behind it: the cluster
    # reads the store through its load paths).
    self.hot_tier: HotTier | None = None
    self.hot_io: ColdTierConnector | None = None  # moves its blocks
    if hot_tier_bytes and self.role == PREFILL:
      device = pool_device(self.kv)
      if hot_tier_memory == "pinned_host" and device is None:
        raise ValueError(
            f"{self.name}: a pinned_host hot tier moves blocks into a pool on "
            f"one device; this prefill engine's pool spans "
            f"{len(self.kv.sharding.device_set)} (tensor parallel): use "
            f"hot_tier_memory='pageable'")
      self.hot_tier = make_hot_tier(hot_tier_bytes, loaded.config, cache,
                                    memory=hot_tier_memory, device=device)
      self.hot_io = ColdTierConnector(None, self.manager, hot=self.hot_tier)
    # PE: its placed turns; DE: none.
    self.queue: collections.deque[ClusterTurn] = collections.deque()
    self.current: ClusterTurn | None = None  # PE: the turn being prefilled
    self.running: list[ClusterTurn] = []  # DE: decoding
    self.shapes: set[tuple[int, int, int]] = set()

  def prefill_turns(self) -> list[ClusterTurn]:
    """A PE's turns not yet handed to a DE: the queue and the current one."""
    return list(self.queue) + ([self.current] if self.current else [])

  def queued_tokens(self) -> int:
    if self.role == PREFILL:
      return sum(t.prefill_target - self.manager.num_computed(t.rid)
                 for t in self.prefill_turns())
    return sum(t.req.max_new_tokens - len(t.generated) for t in self.running)

  def run(self, batch: int, q_len: int, pages: int,
          work: list[tuple[ClusterTurn, list[int], int]] | None,
          stager: LayerStager | None = None) -> jax.Array:
    """Pads `work` (turn, new tokens, start) into one model call; its
    logits, computed, on the device (`step_parts.sample_tokens` moves to
    the host what it needs).

    A prefill engine runs layer by layer (`step_layerwise`), `stager`
    putting a loaded prefix into the pool just ahead of each layer; it does
    so for every chunk, loaded or not, so that a turn's logits never depend
    on whether its prefix was loaded or resident.
    """
    arrays = step_parts.pack_step(
        self.manager, batch, q_len, pages,
        None if work is None else [(t.rid, new, start) for t, new, start in work])
    self.shapes.add((batch, q_len, pages))
    if self.role == PREFILL:
      logits, self.kv = self.runner.step_layerwise(self.kv, *arrays,
                                                   before_layer=stager)
    else:
      logits, self.kv = self.runner.step(self.kv, *arrays)
    return logits.block_until_ready()  # the callers time the step

  def has_work(self) -> bool:
    return bool(self.queue or self.current or self.running)


def runner_on(mesh: EngineMesh, loaded, cache: CacheConfig,
               engine: EngineConfig) -> ModelRunner:
  """A `ModelRunner` whose weights are replicated on `mesh`'s devices."""
  graphdef, state = nnx.split(loaded.model)
  state = jax.device_put(state, mesh.sharding())
  return ModelRunner(nnx.merge(graphdef, state), cache,
                     attention_impl=engine.attention_impl)

