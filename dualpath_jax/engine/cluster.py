"""`PDCluster`: prefill engines (PE) and decode engines (DE) behind one engine API.

The cluster drives `P` prefill and `D` decode workers (`--mesh=1P2D`), one
shared cold tier (`storage.BlockStore`), one emulated `StorageNic` per engine
and a scheduler policy (`single_path`, `dualpath`, `oracle`). It has the
driving interface of `Engine` (`submit`, `step`, `has_work`, `close`,
`stats`, `config`, `manager.stats`, `cold_tier`), so
`workload.replay.replay_sessions` runs it unchanged.

One turn:

1. *Placement* (`_admit`): the context's full blocks are hashed; for every PE
   the scheduler learns how many leading blocks its pool holds and how many
   more the cold tier holds; it builds a `TurnDemand`, a `ClusterSnapshot`
   from live counters (NIC backlog, queued tokens, free pool blocks) and asks
   the policy for a PE, a DE and a `ReadPath` per hit block. With hot tiers
   (`hot_tier_bytes`), each PE's also reports how many blocks after its
   resident ones it holds (`TurnDemand.hot_blocks`): they load over that
   PE's host link, on no NIC, which draws the turn to it.
2. *Reserve*: the chosen PE copies the blocks its hot tier holds into fresh
   pages at once (host -> HBM in one call, as on one engine:
   `ColdTierConnector.load_prefix`; not staged layer by layer like a cold
   load), then allocates pages for the rest of the prompt; the DE begins the
   sequence (reusing blocks of it already in the DE pool) and allocates pages
   for the prompt plus every token it may generate, so a running turn never
   runs out of pages (no preemption).
3. *Load*, asynchronous: blocks the PE's pool lacks and the cold tier holds
   are read by the chosen paths into host buffers
   (`DualPathLoader.read_to_host_async`: path 1 on the PE's NIC, path 2 on
   the DE's NIC, each NIC a FIFO with its own reader), while the engines
   go on computing other turns. Many turns load at once, so every NIC of the
   cluster is busy. A block the store cannot serve ends the run: it and
   everything after it are recomputed.
4. *Prefill* on the PE, one chunk per `step()`, same chunking and shape
   buckets as `Engine`. Among the PE's queued turns, the first by arrival
   whose load is done goes next (`scheduler.choose_prefill_batch`): a turn
   still loading never blocks a ready one. The PE runs its prefill one
   layer per call (`ModelRunner.step_layerwise`), and a loaded prefix goes
   into the pool layer by layer just before its layer computes
   (`LayerStager`: path 1 from the PE's host buffer, path 2 through the
   DE's devices and the hand-off), so the copies of later layers overlap
   earlier layers' compute and only `layers_in_flight` layers are staged
   at a time.
5. *Move*: the prompt's blocks the DE lacks go PE -> DE
   (`DualPathLoader.move_blocks`); the PE puts the prompt's full blocks
   its hot tier lacks there (if it has one), and releases the sequence (its
   full blocks stay cached in its pool for the session's next turn unless
   `DualPathConfig.prefill_keeps_prefix` is False).
6. *Decode* on the DE, all its sequences in one batched call per `step()`.
7. *Finish*: the DE writes the sequence's full blocks the store lacks back
   to the cold tier (asynchronously, `put_async`) and releases them. The
   ones the turn's PE's hot tier lacks (those with generated tokens) go
   there too, from the same host copy: the session's next turn, if placed
   there, finds its whole prefix hot. (Between hosts that copy would cross
   the compute network, off any turn's critical path, not a storage NIC.)

With `DualPathConfig.prefetch_blocks` (and hot tiers), a prefetcher
(`engine.prefetch`) reads the prefixes of turns waiting to be placed and of
sessions predicted to come back soon from the cold tier into the PEs' hot
tiers, on NICs with nothing queued, and pins them there until they are
read; placement then finds them hot (step 1).

Every move is a byte copy, so the tokens equal a single `Engine`'s whichever
path delivered the prefix. Not thread-safe: one thread drives it.

This module drives the turns (steps 1-7). Beside it: `cluster_worker` (one
engine and one turn's state), `cluster_placement` (the scheduler's inputs,
read from the engines: pure, no I/O) and `cluster_report` (the counters and
the one-engine views that launchers and /metrics read).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import time
from typing import Callable, Sequence

import jax
import numpy as np

from dualpath_jax import buckets
from dualpath_jax.cache.block_hash import loadable_chain
from dualpath_jax.cache.block_pool import OutOfBlocksError
from dualpath_jax.cache.hot_tier_memory import check_memory_kind
from dualpath_jax.config import CacheConfig, EngineConfig, check_max_context
from dualpath_jax.engine import step_parts
from dualpath_jax.engine.cluster_placement import (cluster_snapshot,
                                                   host_buffer_run,
                                                   prefilling_the_next_block,
                                                   turn_demand)
from dualpath_jax.engine.cluster_report import (ClusterColdTier, ClusterStats,
                                                ManagersView)
from dualpath_jax.engine.cluster_worker import (ClusterTurn, ClusterWorker,
                                                runner_on)
from dualpath_jax.engine.cold_tier import (ColdTierConnector, ColdTierStats,
                                           count_store_error)
from dualpath_jax.engine.prefetch import TierPrefetcher, session_key
from dualpath_jax.engine.request import (TurnOutput, TurnRequest,
                                          validate_request)
from dualpath_jax.engine.step_parts import MIN_PAGE_BUCKET
from dualpath_jax.model.runner import ModelRunner
from dualpath_jax.scheduler import (ClusterSnapshot, NoCapacityError,
                                    ReadPath, TurnDemand, get_policy)
from dualpath_jax.scheduler.batching import WaitingTurn, choose_prefill_batch
from dualpath_jax.transfer import (DualPathConfig, DualPathLoader,
                                   LoadRequest, MeshConfig, StorageNic,
                                   build_cluster_mesh)
from dualpath_jax.transfer.loader import DecodeSink, LayerStager
from dualpath_jax.transfer.mesh import pair_mesh


class PDCluster:
  """Serves `TurnRequest`s on prefill + decode engines; see the module docstring.

  Args:
    loaded: a `dualpath_jax.model.LoadedModel`.
    cache: per-engine pool (`num_blocks` is each engine's pool).
    config: the `EngineConfig` every engine uses (`max_batch_size` bounds the
      turns a decode engine holds).
    store: the cold tier, a `storage.BlockStore` (shared by all engines).
    mesh: the P/D split.
    dualpath: policy, NIC bandwidth, staging bounds, hand-off method.
    hot_tier_bytes: > 0 gives every prefill engine a host-DRAM hot tier
      (`cache.HotTier`) of that many bytes; see the module docstring.
    hot_tier_memory: "pageable" or "pinned_host" (of the PE's device: each
      PE's pool must sit on one; `cache.hot_tier_memory`).
    devices: the devices to split (default `jax.devices()`).
    clock: seconds, for arrival / first-token / finish times and snapshots.
  """

  def __init__(self, loaded, cache: CacheConfig, config: EngineConfig,
               store, mesh: MeshConfig = MeshConfig(1, 1),
               dualpath: DualPathConfig = DualPathConfig(), *,
               hot_tier_bytes: int = 0,
               hot_tier_memory: str = "pageable",
               devices: Sequence[jax.Device] | None = None,
               clock: Callable[[], float] = time.perf_counter):
    check_max_context(config.max_context, loaded.config)
    check_memory_kind(hot_tier_memory)
    if store is None:
      raise ValueError("PDCluster needs a cold tier (a storage.BlockStore)")
    self.config = config
    self.vocab_size = loaded.config.vocab_size
    self.mesh_config = mesh
    self.dualpath = dualpath
    self.policy = get_policy(dualpath.policy)
    self.block_size = cache.block_size
    self.eos_ids = frozenset(loaded.config.eos_token_ids)
    self.clock = clock
    self.store = store
    self.cluster_mesh = build_cluster_mesh(mesh, devices)
    _check_cluster(self.cluster_mesh, loaded.config, cache, dualpath)
    self.nics = {
        e.name: StorageNic(e.name, dualpath.nic_bytes_per_s,
                           dualpath.nic_burst_bytes)
        for e in self.cluster_mesh.engines}
    runners: dict[tuple[int, ...], ModelRunner] = {}
    self.workers = {}
    for e in self.cluster_mesh.engines:
      key = tuple(d.id for d in e.devices)
      if key not in runners:  # engines on the same devices share the weights
        runners[key] = runner_on(e, loaded, cache, config)
      self.workers[e.name] = ClusterWorker(
          e, runners[key], loaded, cache, config, self.nics[e.name],
          hot_tier_bytes, hot_tier_memory)
    self.prefill_workers = [self.workers[e.name]
                            for e in self.cluster_mesh.prefill]
    self.decode_workers = [self.workers[e.name]
                           for e in self.cluster_mesh.decode]
    c = loaded.config
    block_shape = (c.num_layers, 2, c.num_kv_heads, cache.block_size,
                   c.head_dim)
    self.block_bytes = cache.bytes_per_block(c)
    self.loader = DualPathLoader(self.cluster_mesh, store, self.nics,
                                 dualpath, block_shape, cache.dtype)
    self.cold_tier = ClusterColdTier(
        store, ColdTierStats(),
        [pe.hot_tier for pe in self.prefill_workers if pe.hot_tier is not None])
    # Write-back at a turn's end, per (decode engine, prefill engine): to
    # the store, and into the hot tier of the PE that prefilled the turn.
    self._writers = {
        (de.name, pe.name): self._writer(store, de, pe)
        for de in self.decode_workers for pe in self.prefill_workers}
    self.stats = ClusterStats()
    self.max_pages = math.ceil(config.max_context / cache.block_size)
    self._rng = np.random.default_rng(config.seed)
    self._waiting: collections.deque[ClusterTurn] = collections.deque()
    # Ids of the waiting turns the last `_admit` held for a shared prefill.
    self._held_ids: set[str] = set()
    # Block ids whose write-back put is still in flight (`store.contains`
    # does not see them yet): the session's next turn waits for it rather
    # than recompute the prefix the previous turn just wrote.
    self._writing: dict[bytes, cf.Future] = {}
    self.prefetcher: TierPrefetcher | None = None
    if dualpath.prefetch_blocks:
      if not hot_tier_bytes:
        raise ValueError("prefetch_blocks needs hot tiers (hot_tier_bytes > "
                         "0): prefetched blocks go there")
      self.prefetcher = TierPrefetcher(
          self.loader, store, self.prefill_workers,
          [de.name for de in self.decode_workers], self.nics,
          batch_blocks=dualpath.prefetch_blocks,
          on_store_error=lambda what, err: count_store_error(
              self.cold_tier.stats, what, err))
      self.cold_tier.prefetcher = self.prefetcher

  def _writer(self, store, de: ClusterWorker,
              pe: ClusterWorker) -> ColdTierConnector:
    """The connector that writes `de`'s finished turns back, prefilled on
    `pe`: to the store and into `pe`'s hot tier. It counts into the
    cluster's cold-tier stats, so a write-back the store refuses, at once
    or later in its write pool, shows in `store_errors` (copying the
    counters after each call lost those)."""
    writer = ColdTierConnector(store, de.manager, hot=pe.hot_tier)
    writer.stats = self.cold_tier.stats
    return writer

  # ------------------------------------------------------------------ API
  @property
  def manager(self) -> "ManagersView":
    """Prefix-cache counters (the prefill engines') and pool counts (every
    engine's) read as one engine's; see `ManagersView`."""
    return ManagersView([w.manager for w in self.prefill_workers],
                         [w.manager for w in self.workers.values()])

  def validate(self, req: TurnRequest) -> None:
    """Raises ValueError if `req` can never run (see `validate_request`).
    Configuration only: any thread may call it."""
    validate_request(
        req, max_context=self.config.max_context, block_size=self.block_size,
        pool_blocks=self.prefill_workers[0].manager.pool.num_blocks,
        vocab_size=self.vocab_size)

  def submit(self, req: TurnRequest) -> None:
    """Queues a turn; raises `RequestTooLargeError` if it can never fit, and
    ValueError for a bad request or an id queued or running already."""
    self.validate(req)
    if req.request_id in self._active_ids():
      raise ValueError(f"{req.request_id}: a turn of this id is queued or "
                       "running already")
    arrival = self.clock() if req.arrival_s is None else req.arrival_s
    rng = None if req.seed is None else np.random.default_rng(req.seed)
    if self.prefetcher is not None and req.session_id:
      self.prefetcher.turn_arrived(session_key(req), arrival)
    self._waiting.append(ClusterTurn(req=req, arrival_s=arrival,
                               tokens=list(req.prompt_tokens), rng=rng))

  def _active_ids(self) -> set[str]:
    """Ids of the turns waiting, loading, prefilling or decoding."""
    ids = {turn.rid for turn in self._waiting}
    for pe in self.prefill_workers:
      ids.update(turn.rid for turn in pe.prefill_turns())
    for de in self.decode_workers:
      ids.update(turn.rid for turn in de.running)
    return ids

  def abort(self, request_id: str) -> bool:
    """Drops a waiting, loading, prefilling or decoding turn; frees its pages.

    Blocks it already computed stay cached in their engine's pool (as after
    a finished turn); nothing is written back. A load in flight runs to its
    end on its NIC (its bytes are spent) and is then discarded. Returns False
    if no such turn is queued or running (e.g. it already finished).
    """
    for turn in self._waiting:
      if turn.rid == request_id:
        self._waiting.remove(turn)
        return True
    for pe in self.prefill_workers:
      for turn in pe.prefill_turns():
        if turn.rid == request_id:
          if turn is pe.current:
            pe.current = None
          else:
            pe.queue.remove(turn)
          turn.load = None  # a finished read is never installed
          pe.manager.end(turn.rid,
                         keep_cached=self.dualpath.prefill_keeps_prefix)
          turn.decode.manager.end(turn.rid)
          return True
    for de in self.decode_workers:
      for turn in de.running:
        if turn.rid == request_id:
          de.running.remove(turn)
          de.manager.end(turn.rid)
          return True
    return False

  def metrics_snapshot(self) -> dict:
    """Per-path bytes and per-engine queues, for /metrics (per-tier hits:
    `stats.cached_tokens_by_tier`, as on one engine); with a prefetcher,
    its blocks read, used by their turn and evicted unused."""
    engines = {}
    for w in self.workers.values():
      nic = self.nics[w.name]
      engines[w.name] = {
          "role": w.role,
          "queued_turns": len(w.queue) + bool(w.current) + len(w.running),
          "queued_tokens": w.queued_tokens(),
          "nic_backlog_bytes": nic.backlog_bytes(),
          "nic_bytes": nic.total_bytes}
    blocks = self.stats.path_blocks
    snap = {
        "path_bytes": {path: blocks[path] * self.block_bytes
                       for path in ("hot", "path1", "path2", "free")},
        "engines": engines}
    if self.prefetcher is not None:
      snap["prefetch_blocks"] = self.prefetcher.counts()
    return snap

  def has_work(self) -> bool:
    return bool(self._waiting or any(w.has_work()
                                     for w in self.workers.values()))

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return sum(len(w.queue) + bool(w.current) + len(w.running)
               for w in self.workers.values())

  def step(self) -> list[TurnOutput]:
    """Places waiting turns; one prefill chunk per PE; one decode batch per DE.

    When no engine has anything ready (every placed turn still loading), it
    waits for the first load to finish (at most 50 ms) instead of spinning.
    With a prefetcher, it then starts prefetch reads on idle NICs
    (`engine.prefetch`).
    """
    if self.prefetcher is not None:
      self.prefetcher.install_done()  # before placement looks for them
    self._admit()
    if self.prefetcher is not None:
      self._prefetch()
    done: list[TurnOutput] = []
    ran = False
    for pe in self.prefill_workers:
      out = self._prefill_step(pe)
      if out is not None:
        ran = True
        done += out
    for de in self.decode_workers:
      if de.running:
        ran = True
        done += self._decode_step(de)
    if not ran:
      self._wait_for_a_load(0.05)
    return done

  def _loads_in_flight(self) -> list[cf.Future]:
    return [t.load for pe in self.prefill_workers for t in pe.queue
            if t.load is not None and not t.load.done()]

  def _wait_for_a_load(self, timeout: float) -> None:
    """Waits for a turn's load or, with none, a prefetch read (not counted
    in `load_wait_s`: no turn waits for it), or else a write-back a held
    turn waits for (`_waits_for_a_write`)."""
    pending = self._loads_in_flight()
    if pending:
      t0 = time.perf_counter()
      cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
      self.stats.load_wait_s += time.perf_counter() - t0
    elif self.prefetcher is not None and self.prefetcher.in_flight():
      cf.wait(self.prefetcher.in_flight(), timeout=timeout,
              return_when=cf.FIRST_COMPLETED)
    elif writes := {f for f in self._writing.values() if not f.done()}:
      cf.wait(writes, timeout=timeout, return_when=cf.FIRST_COMPLETED)

  def _prefetch(self) -> None:
    """One prefetcher step: the first waiting turns, then away sessions. A
    turn held for a shared prefill is skipped: it will be placed where the
    turn it waits for computes the prefix, and find it resident there."""
    turns = [t for t in self._waiting if t.rid not in self._held_ids]
    waiting = [(session_key(t.req), self._chain(t))
               for t in turns[:self.prefetcher.max_candidates]]
    self.prefetcher.step(waiting, self.clock())

  def prefetch_pending(self) -> bool:
    """Whether `step` with no turn to run may still prefetch: reads in
    flight, the last step started one, or a turn ended since. A driver
    with nothing to submit (every session away) steps instead of sleeping
    while this holds; it turns False once a step finds nothing to read."""
    return self.prefetcher is not None and self.prefetcher.pending()

  def flush(self, timeout: float | None = None) -> bool:
    """Waits for queued cold-tier writes (then the next turn can load them)."""
    return self.store.flush(timeout)

  def forget_blocks(self, ids: Sequence[bytes]) -> dict[str, int | None]:
    """As `Engine.forget_blocks`, over every engine: the prefill engines'
    hot tiers and every engine's pool cache (counts summed)."""
    ids = list(ids)
    if self.prefetcher is not None:  # its reads out must not put them back
      self.prefetcher.forget(ids)
    tiers = [pe.hot_tier for pe in self.prefill_workers
             if pe.hot_tier is not None]
    return {"hot_tier_blocks": (sum(t.discard(ids) for t in tiers)
                                if tiers else None),
            "pool_blocks": sum(w.manager.pool.forget_cached(ids)
                               for w in self.workers.values())}

  def close(self) -> None:
    """Closes the loader and the store; waits for queued write-backs.

    Loads still waiting on an emulated NIC are released at once (their
    turns are dropped anyway), so closing never sits out a NIC backlog.
    """
    for nic in self.nics.values():
      nic.interrupt()
    if self.prefetcher is not None:
      self.prefetcher.close()
    self.loader.close()
    self.store.close()

  def nic_stats(self) -> dict[str, dict[str, float]]:
    """Each engine's emulated storage NIC: bytes, wait, backlog, rate."""
    return {name: nic.stats() for name, nic in self.nics.items()}

  def warmup(self, max_context: int | None = None) -> None:
    """Compiles every shape bucket a context up to `max_context` can hit."""
    t0 = time.perf_counter()
    for kind, batch, q_len, pages in step_parts.warmup_shapes(
        self.config, self.block_size, self.max_pages, max_context):
      for w in (self.prefill_workers if kind == "prefill"
                else self.decode_workers):
        w.run(batch, q_len, pages, None)
    self.stats.warmup_s += time.perf_counter() - t0
    self._count_shapes()

  # ------------------------------------------------------------ placement
  def _snapshot(self, taken: dict[str, int] | None = None) -> ClusterSnapshot:
    """The engines' state now (`cluster_placement.cluster_snapshot`)."""
    return cluster_snapshot(
        list(self.workers.values()), self._prefilling(), now=self.clock(),
        max_batch_size=self.config.max_batch_size,
        prefill_tokens_per_s=self.dualpath.prefill_tokens_per_s, taken=taken)

  def _prefilling(self) -> list[ClusterTurn]:
    """Turns placed on a PE and not yet handed to their DE."""
    return [t for pe in self.prefill_workers for t in pe.prefill_turns()]

  def _demand(self, turn: ClusterTurn
              ) -> tuple[TurnDemand, list[bool], dict[str, int]]:
    """The turn's `TurnDemand`, which blocks of `turn.chain` the store holds,
    and the resident blocks it takes back per PE (`turn_demand`).

    The chain is hashed once per turn; the store is asked at every attempt
    (a turn waiting for pages may find more blocks stored later).
    """
    chain = self._chain(turn)
    in_store = self._store_contains(chain) if chain else []
    demand, taken = turn_demand(turn, chain, in_store, self.prefill_workers,
                                block_size=self.block_size,
                                block_bytes=self.block_bytes)
    return demand, in_store, taken

  def _chain(self, turn: ClusterTurn) -> list[bytes]:
    """The ids of the turn's loadable blocks (hashed once per turn): its
    prompt's full blocks, leaving at least one token to compute."""
    if turn.chain is None:
      turn.chain = loadable_chain(
          turn.tokens, turn.prefill_target, self.block_size,
          self.prefill_workers[0].manager.model_fingerprint, turn.req.tenant)
    return turn.chain

  def _store_contains(self, chain: list[bytes]) -> list[bool]:
    """`store.contains`; a store that raises holds nothing (the cold tier is
    a cache: the turn is recomputed), logged and counted."""
    try:
      return self.store.contains(chain)
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.cold_tier.stats, "lookup", err)
      return [False] * len(chain)

  def _admit(self) -> None:
    """Places waiting turns in order until one finds no room. A turn whose
    next block to compute a placed turn is prefilling, or a finished
    turn's write-back is still putting into the store, waits, and those
    behind it go ahead (`_waits_for_a_shared_prefill`,
    `_waits_for_a_write`)."""
    waiting: list[ClusterTurn] = []
    if self._writing:  # forget the write-backs that have landed, once a call
      self._writing = {k: f for k, f in self._writing.items() if not f.done()}
    try:
      while self._waiting:
        turn = self._waiting[0]
        demand, in_store, taken = self._demand(turn)
        if (self._waits_for_a_shared_prefill(turn, demand.hit_blocks) or
            self._waits_for_a_write(turn, demand.hit_blocks)):
          waiting.append(self._waiting.popleft())
          continue
        if not self._place(turn, demand, in_store, taken):
          return
    finally:  # in their order, ahead of the rest
      self._waiting.extendleft(reversed(waiting))
      # Not prefetched for: they will find their prefix where the turn they
      # wait for computes it (`_prefetch`).
      self._held_ids = {turn.rid for turn in waiting}

  def _waits_for_a_shared_prefill(self, turn: ClusterTurn, hits: int) -> bool:
    """Whether `turn` waits for a turn prefilling its next block on a PE
    (`cluster_placement.prefilling_the_next_block`; `share_prefill`)."""
    if not self.config.share_prefill or not prefilling_the_next_block(
        turn.chain, hits, self.prefill_workers,
        prefill_keeps_prefix=self.dualpath.prefill_keeps_prefix):
      return False
    if turn.hits_before_wait is None:
      turn.hits_before_wait = hits
    return True

  def _waits_for_a_write(self, turn: ClusterTurn, hits: int) -> bool:
    """Whether the next block `turn` would compute is one a finished
    turn's write-back is still putting into the store."""
    chain = turn.chain
    future = self._writing.get(chain[hits]) if hits < len(chain) else None
    return future is not None and not future.done()

  def _place(self, turn: ClusterTurn, demand: TurnDemand, in_store: list[bool],
             taken: dict[str, int]) -> bool:
    """Places `turn` (the head of the queue) and starts it; False when no
    engine has room for it now (it stays at the head)."""
    try:
      placement = self.policy(demand, self._snapshot(taken))
    except NoCapacityError:
      if self.num_running == 0:
        raise OutOfBlocksError(
            f"{turn.rid}: no engine can hold the turn with nothing else "
            "running") from None
      return False
    self._waiting.popleft()
    pe = self.workers[placement.prefill_engine]
    de = self.workers[placement.decode_engine]
    turn.prefill, turn.decode = pe, de
    try:
      self._start_on_prefill(turn, pe, de, in_store, placement.paths)
      self._reserve_on_decode(turn, pe, de)
    except OutOfBlocksError:
      # The placement's count was off: the turn waits, holding nothing.
      for worker in (pe, de):
        if turn.rid in worker.manager:
          worker.manager.end(turn.rid)
      turn.load = turn.load_request = None
      self._waiting.appendleft(turn)
      if self.num_running == 0:
        raise
      return False
    self._count_cached(turn, pe)
    pe.queue.append(turn)
    self.stats.turns_placed += 1
    key = f"{pe.name}->{de.name}"
    self.stats.placements[key] = self.stats.placements.get(key, 0) + 1
    return True

  def _start_on_prefill(self, turn: ClusterTurn, pe: ClusterWorker,
                        de: ClusterWorker, in_store: list[bool],
                        paths: Sequence[ReadPath]) -> None:
    """Begins the turn on the PE, reserves its pages, starts its cold reads.

    `in_store[i]`: the store holds block i of `turn.chain` (as `_demand` saw).
    """
    bs = self.block_size
    target = turn.prefill_target
    cached = pe.manager.begin(turn.rid, turn.tokens[:target], turn.req.tenant)
    if pe.hot_io is not None:  # host -> HBM now: no NIC, and faster than one
      hot_blocks = pe.hot_io.stats.hot_loaded_blocks
      pe.kv, hot_tokens, _ = pe.hot_io.load_prefix(
          pe.kv, turn.rid, turn.tokens[:target], turn.req.tenant)
      cached += hot_tokens
      turn.hot_tokens[pe.name] = turn.hot_tokens.get(pe.name, 0) + hot_tokens
      hot_blocks = pe.hot_io.stats.hot_loaded_blocks - hot_blocks
      self.cold_tier.stats.hot_loaded_blocks += hot_blocks
      if self.prefetcher is not None and hot_blocks:
        first = (cached - hot_tokens) // bs
        self.prefetcher.note_hot_read(
            pe.name, self._chain(turn)[first:first + hot_blocks])
      self.cold_tier.stats.hot_loaded_tokens += hot_tokens
    have = cached // bs
    present = in_store[have:]
    run = next((i for i, p in enumerate(present) if not p), len(present))
    run = host_buffer_run(paths[have:have + run], run,
                          self.dualpath.host_buffer_bytes // self.block_bytes)
    if not pe.manager.can_allocate(turn.rid, target - cached):
      pe.manager.end(turn.rid)
      raise OutOfBlocksError(f"{turn.rid}: {pe.name} lost the pages the "
                             "placement counted on")
    pe.manager.allocate(turn.rid, target - cached)  # the whole prompt
    turn.placed_s = self.clock()
    turn.cached_prompt_tokens = min(cached, len(turn.req.prompt_tokens))
    turn.load_plan = (cached, have, run)
    if not run:
      return
    self.cold_tier.stats.lookups += 1
    wanted = [ReadPath(p) for p in paths[have:have + run]]
    wanted += [ReadPath.PE_READ] * (run - len(wanted))
    # Blocks the placement counted resident or hot but that were not (the
    # pool or the hot tier had no room for them) are read by path 1, as are
    # any it counted another engine's only and that are stored now.
    wanted = [ReadPath.PE_READ if p in (ReadPath.RESIDENT, ReadPath.HOT,
                                        ReadPath.RECOMPUTE)
              else p for p in wanted]
    table = pe.manager.block_table(turn.rid)
    turn.load_request = LoadRequest(
        block_ids=turn.chain[have:have + run],
        dest_pages=table[have:have + run],
        paths=wanted, prefill_engine=pe.name, decode_engine=de.name)
    turn.load = self.loader.read_to_host_async(turn.load_request)
    self.stats.max_loads_in_flight = max(self.stats.max_loads_in_flight,
                                         len(self._loads_in_flight()) + 1)

  def _count_cached(self, turn: ClusterTurn, pe: ClusterWorker) -> None:
    """Counts the prompt blocks the turn found in `pe`'s pool or hot tier,
    once, at the placement that held (`path_blocks`,
    `cached_tokens_by_tier`): an attempt that failed on the DE after its
    PE's reservation had counted them, and the retry counted them again
    (its hot-loaded blocks as resident, its hot tokens twice)."""
    bs = self.block_size
    have = turn.load_plan[1]
    hot = min(turn.hot_tokens.get(pe.name, 0), turn.cached_prompt_tokens)
    self.stats.path_blocks["hot"] += hot // bs
    self.stats.path_blocks["resident"] += have - hot // bs
    self.stats.cached_tokens_by_tier["hot"] += hot
    self.stats.cached_tokens_by_tier["device"] += (turn.cached_prompt_tokens -
                                                   hot)
    if turn.hits_before_wait is not None:  # what the wait saved computing
      self.stats.shared_prefill_tokens += max(
          0, turn.cached_prompt_tokens - turn.hits_before_wait * bs)

  def _install_load(self, pe: ClusterWorker,
                    turn: ClusterTurn) -> LayerStager | None:
    """Accounts a finished load; the stager that puts it into `pe`'s pool.

    The blocks before the first miss count as computed now: the stager
    writes them into their pages inside the very next (layer-wise) prefill
    call, before any layer reads them. Blocks from the first miss on are
    recomputed by the prefill.
    """
    req, load = turn.load_request, turn.load
    turn.load = None
    try:
      stage = load.result()
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.cold_tier.stats, "read", err)  # all recomputed
      return None
    cached, have, run = turn.load_plan
    report = self.loader.report(req, stage)
    self.stats.load_s += max(report.read_s.values(), default=0.0)
    good = min(report.missing) if report.missing else run
    self.cold_tier.stats.missed_blocks += run - good
    for p in req.paths[:good]:
      key = {ReadPath.PE_READ: "path1", ReadPath.DE_READ: "path2",
             ReadPath.FREE: "free"}[ReadPath(p)]
      self.stats.path_blocks[key] += 1
    for name, nbytes in report.nic_bytes.items():
      self.stats.nic_bytes[name] = self.stats.nic_bytes.get(name, 0) + nbytes
    if not good:
      return None
    bs = self.block_size
    pe.manager.append_tokens(turn.rid, turn.tokens[cached:(have + good) * bs])
    self.cold_tier.stats.loaded_blocks += good
    self.cold_tier.stats.loaded_tokens += (have + good) * bs - cached
    before = turn.cached_prompt_tokens
    turn.cached_prompt_tokens = min((have + good) * bs,
                                    len(turn.req.prompt_tokens))
    self.stats.cached_tokens_by_tier["cold"] += (turn.cached_prompt_tokens -
                                                 before)
    return self.loader.stager(req, stage, pe.kv.shape,
                              self._decode_sink(turn, req, stage, have, good))

  def _decode_sink(self, turn: ClusterTurn, req: LoadRequest, stage,
                   have: int, good: int) -> DecodeSink | None:
    """Path-2 blocks also go into the DE pages the turn will decode from.

    They pass through the DE's devices anyway; keeping them saves moving them
    back PE -> DE after prefill (`_move_to_decode` skips them). Blocks the DE
    holds already, and blocks from the first miss on (recomputed on the PE),
    are not written.
    """
    if not stage.path2_pages.size:
      return None
    de = turn.decode
    de_table = de.manager.block_table(turn.rid)
    de_has = de.manager.num_computed(turn.rid) // self.block_size
    index_of = {int(p): i for i, p in enumerate(req.dest_pages)}
    pages, kept = [], set()
    for pe_page in stage.path2_pages:
      block = have + index_of[int(pe_page)]
      if de_has <= block < have + good:
        pages.append(de_table[block])
        kept.add(block)
      else:
        pages.append(-1)
    turn.on_decode = frozenset(kept)

    def set_pool(pool):
      de.kv = pool
    return DecodeSink(np.asarray(pages, np.int32), lambda: de.kv, set_pool)

  def _reserve_on_decode(self, turn: ClusterTurn, pe: ClusterWorker,
                         de: ClusterWorker) -> None:
    """Begins the turn on the DE and allocates pages for all it may hold."""
    target = turn.prefill_target
    computed = de.manager.begin(turn.rid, turn.tokens[:target], turn.req.tenant)
    need = target + turn.req.max_new_tokens - computed
    if not de.manager.can_allocate(turn.rid, need):
      de.manager.end(turn.rid)
      pe.manager.end(turn.rid)
      raise OutOfBlocksError(f"{turn.rid}: {de.name} lost the pages the "
                             "placement counted on")
    de.manager.allocate(turn.rid, need)

  # ------------------------------------------------------ prefill / decode
  def _page_bucket(self, worker: ClusterWorker,
                   turns: list[ClusterTurn]) -> int:
    pages = max(len(worker.manager.block_table(t.rid)) for t in turns)
    return buckets.bucket(pages, MIN_PAGE_BUCKET, self.max_pages)

  def _next_turn(self, pe: ClusterWorker) -> ClusterTurn | None:
    """The PE's next turn to prefill: the first by arrival whose load is
    done. By arrival, not placement: a turn placed late because it waited
    (for room, or for a turn prefilling its prefix: an n-sample group's
    later samples) does not queue behind turns that came after it."""
    by_id = {t.rid: t for t in pe.queue}
    waiting = [WaitingTurn(
        t.rid, t.arrival_s,
        t.prefill_target - pe.manager.num_computed(t.rid),
        math.inf if t.load is not None and not t.load.done() else -math.inf)
               for t in pe.queue]
    chosen = choose_prefill_batch(waiting, 0.0,
                                  max_batch_tokens=self.config.max_prefill_chunk,
                                  max_batch_turns=1)
    return by_id[chosen[0]] if chosen else None

  def _prefill_step(self, pe: ClusterWorker) -> list[TurnOutput] | None:
    """One prefill chunk on `pe`; None when no turn there is ready."""
    stager = None
    turn = pe.current
    if turn is None:
      turn = self._next_turn(pe) if pe.queue else None
      if turn is None:
        return None
      pe.queue.remove(turn)
      pe.current = turn
      if turn.load is not None:
        stager = self._install_load(pe, turn)
    start = pe.manager.num_computed(turn.rid)
    n = min(self.config.max_prefill_chunk, turn.prefill_target - start)
    chunk = turn.tokens[start:start + n]
    t_bucket = step_parts.q_bucket(n, self.config.max_prefill_chunk)
    t0 = time.perf_counter()
    logits = pe.run(1, t_bucket, self._page_bucket(pe, [turn]),
                    [(turn, chunk, start)], stager)
    self.stats.prefill_s += time.perf_counter() - t0
    self._count_shapes()
    pe.manager.append_tokens(turn.rid, chunk)
    self.stats.prefill_steps += 1
    self.stats.prefill_tokens += n
    if start + n < turn.prefill_target:
      return []
    pe.current = None
    self._move_to_decode(turn, pe, turn.decode)
    token = step_parts.sample_tokens([turn], logits, self.config, self._rng)[0]
    turn.first_token_s = self.clock()
    return self._accept(turn.decode, [turn], [token])

  def _move_to_decode(self, turn: ClusterTurn, pe: ClusterWorker,
                      de: ClusterWorker) -> None:
    """Copies the prompt's KV the DE lacks PE -> DE; the PE lets go of it."""
    target = turn.prefill_target
    computed = de.manager.num_computed(turn.rid)
    first = computed // self.block_size
    last = math.ceil(target / self.block_size)
    todo = [b for b in range(first, last) if b not in turn.on_decode]
    pe_table = pe.manager.block_table(turn.rid)
    de_table = de.manager.block_table(turn.rid)
    src = [pe_table[b] for b in todo]
    dst = [de_table[b] for b in todo]
    t0 = time.perf_counter()
    de.kv = self.loader.move_blocks(pe.kv, src, pe.name, de.kv, dst, de.name)
    self.stats.move_s += time.perf_counter() - t0
    self.stats.moved_blocks += len(src)
    self.stats.kept_on_decode_blocks += (last - first) - len(todo)
    de.manager.append_tokens(turn.rid, turn.tokens[computed:target])
    if pe.hot_io is not None:  # the prompt's full blocks the hot tier lacks
      pe.hot_io.write_back(pe.kv, turn.rid, turn.req.tenant, turn.req.session_id)
    pe.manager.end(turn.rid, keep_cached=self.dualpath.prefill_keeps_prefix)
    de.running.append(turn)

  def _decode_step(self, de: ClusterWorker) -> list[TurnOutput]:
    turns = list(de.running)
    b_bucket = buckets.bucket(len(turns), 1, self.config.max_batch_size)
    work = [(t, [t.tokens[-1]], de.manager.num_computed(t.rid)) for t in turns]
    t0 = time.perf_counter()
    logits = de.run(b_bucket, 1, self._page_bucket(de, turns), work)
    self.stats.decode_s += time.perf_counter() - t0
    self._count_shapes()
    for t in turns:
      de.manager.append_tokens(t.rid, [t.tokens[-1]])
    self.stats.decode_steps += 1
    self.stats.decode_tokens += len(turns)
    return self._accept(de, turns, step_parts.sample_tokens(
        turns, logits, self.config, self._rng))

  def _accept(self, de: ClusterWorker, turns: list[ClusterTurn],
              tokens: list[int]) -> list[TurnOutput]:
    """Appends each turn's new token; finishes (and writes back) those done."""
    now = self.clock()
    done = []
    for turn, tok in zip(turns, tokens):
      if turn not in de.running:  # aborted by an earlier turn's hook
        continue
      reason = step_parts.accept_token(turn, tok, self.eos_ids)
      if reason is None or turn not in de.running:  # or aborted by its hook
        continue
      de.running.remove(turn)
      if reason == "error":  # its hook raised: fail it, keep nothing new
        de.manager.end(turn.rid)
        done.append(step_parts.turn_output(turn, now, reason))
        continue
      writer = self._writers[de.name, turn.prefill.name]
      try:
        written = writer.write_back(de.kv, turn.rid, turn.req.tenant,
                                    turn.req.session_id, touch_hot=False)
        if written is not None:  # the session's next turn waits for it
          ids, future = written
          self._writing.update(dict.fromkeys(ids, future))
        if self.prefetcher is not None and turn.req.session_id:
          self.prefetcher.turn_finished(session_key(turn.req), now,
                                        de.manager.block_hashes(turn.rid),
                                        turn.prefill.name)
      finally:  # whatever the write-back did, the turn releases its blocks
        de.manager.end(turn.rid)
      done.append(step_parts.turn_output(turn, now, reason))
    return done

  def _count_shapes(self) -> None:
    self.stats.compiled_shapes = sum(len(w.shapes)
                                     for w in self.workers.values())


def _check_cluster(cluster_mesh, model, cache: CacheConfig,
                   dualpath: DualPathConfig) -> None:
  """ValueError for a cluster that would fail only once it serves: a tp
  that does not divide the KV heads (each device holds whole heads), a
  ppermute hand-off between engines it cannot join (shared devices, unequal
  tp), a host buffer that holds no block."""
  for e in cluster_mesh.engines:
    if model.num_kv_heads % e.tp:
      raise ValueError(
          f"{e.name}: tp={e.tp} does not divide the model's "
          f"{model.num_kv_heads} KV heads (each device holds whole heads)")
  if dualpath.handoff == "ppermute":
    for p in cluster_mesh.prefill:
      for d in cluster_mesh.decode:
        pair_mesh(p, d)  # raises for a pair it cannot join
  block_bytes = cache.bytes_per_block(model)
  if dualpath.host_buffer_bytes < block_bytes:
    raise ValueError(
        f"host_buffer_bytes={dualpath.host_buffer_bytes} holds no block of "
        f"{block_bytes} bytes")


def make_cluster(loaded, cache: CacheConfig, engine: EngineConfig, cold_tier,
                 mesh: MeshConfig, dualpath: DualPathConfig, *,
                 hot_tier_bytes: int = 0, hot_tier_memory: str = "pageable",
                 devices: Sequence[jax.Device] | None = None) -> PDCluster:
  """A `PDCluster` over a new `storage.BlockStore` (`cold_tier`: its config),
  each prefill engine with a hot tier of `hot_tier_bytes` (0: none) in
  `hot_tier_memory`."""
  from storage.block_store import BlockStore
  store = BlockStore(cold_tier, loaded.config, cache)
  try:
    return PDCluster(loaded, cache, engine, store, mesh, dualpath,
                     hot_tier_bytes=hot_tier_bytes,
                     hot_tier_memory=hot_tier_memory, devices=devices)
  except BaseException:
    store.close()
    raise
