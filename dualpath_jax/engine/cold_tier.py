"""The engine's side of the storage tiers: load missing prefix blocks, write back.

Two tiers may back the device pool, each optional: a hot tier in host DRAM
(`cache.HotTier`) and a cold tier on disk (`storage.BlockStore`).

At admission, after the pool's own prefix hit, `load_prefix` looks up the
next blocks of the context: the leading run the hot tier holds, then the
run after it that the cold tier holds and verifies. The cold blocks are
read into one reused host buffer; then fresh pages are allocated, the hot
run is copied into them straight from the hot tier's memory (a pinned
tier: `kernels.block_copy`'s gather) and the cold blocks after it in one
write, and they are marked computed, so prefill starts after them. A block
that is missing, torn or corrupt ends the run: it and everything after it
are recomputed (the store counts and logs the bad block). Blocks read from
the cold tier are put in the hot tier too, from the same host buffer.

When a turn finishes, `write_back` copies the sequence's full blocks that
either tier lacks: the hot tier takes its copies at once (the ones it has
count as reused; a pinned tier straight from the pool, a pageable one from
the host copy made for the cold tier, or its own), the cold tier's go to
its write pool (`put_async`): the engine does not wait for the disk.

The engine reads asynchronously (`EngineConfig.async_cold_loads`, the
default): `start_load` plans the load and starts the cold read on the
connector's reader thread (through an emulated `StorageNic`, if one is
given), the engine goes on serving its other turns, and
`load_prefix(pending=)` puts the blocks into the pool once they have
landed. The hot run in front of the read is pinned in the hot tier
meanwhile. Without it, `load_prefix` reads on the engine's thread and every
turn waits. (The P/D cluster's transfer layer goes further: its loads
overlap the turn's own prefill, layer by layer.) While that read is out,
`plan_hot_load` tells the engine which turns behind it need no cold read
(`EngineConfig.admit_while_reading`), and the prefetcher
(`engine_prefetch.py`) reads through `read_blocks_async` on the same
reader whenever no turn's read is queued there (`reader_busy`).

The cold tier is a cache: when the store fails (its disk is full, its
index cannot be read), a load is a miss and a write-back is skipped, with
the error logged and counted (`store_errors`); the engine serves on.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import time

import jax
import numpy as np

from dualpath_jax.cache.block_hash import loadable_chain
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.cache import pool_io
from dualpath_jax.transfer.nic import StorageNic
from dualpath_jax.transfer.source import StagingRows

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ColdTierStats:
  lookups: int = 0
  loaded_blocks: int = 0  # from the cold tier
  loaded_tokens: int = 0
  hot_loaded_blocks: int = 0  # from the hot tier
  hot_loaded_tokens: int = 0
  missed_blocks: int = 0  # listed by contains() but unreadable
  written_blocks: int = 0
  write_requests: int = 0
  async_loads: int = 0  # cold reads started while the engine served others
  withdrawn_reads: int = 0  # of them, dropped while still queued: not made
  read_s: float = 0.0  # seconds the cold reads took (NIC wait included)
  store_errors: int = 0  # store calls that raised: loads missed, writes skipped

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def count_store_error(stats: ColdTierStats, what: str,
                      err: BaseException) -> None:
  """Logs and counts (`stats.store_errors`) a store call that raised and
  was served without (a miss, a skipped write-back): the engine's and the
  P/D cluster's."""
  stats.store_errors += 1
  _log.error("cold tier %s failed, served without it: %s: %s", what,
             type(err).__name__, err)


@dataclasses.dataclass(frozen=True)
class _LoadPlan:
  """What one load reads: after the pool's `have` full blocks (`computed`
  tokens), the hot tier's run, then the cold tier's."""

  computed: int
  have: int
  hot_ids: list[bytes]
  cold_ids: list[bytes]


@dataclasses.dataclass(frozen=True)
class _ReadResult:
  got: int  # leading blocks read and verified
  error: BaseException | None  # what the store raised
  seconds: float


@dataclasses.dataclass(frozen=True)
class PendingLoad:
  """A load `start_load` planned for one turn, and the cold read it
  started; `done()` says whether `load_prefix(..., pending=)` can take it
  without waiting."""

  seq_id: str
  plan: _LoadPlan | None  # None: nothing to load
  future: cf.Future | None  # the cold read; None: none to make
  staging: np.ndarray | None = None  # [n, *block_shape] where it reads

  def done(self) -> bool:
    return self.future is None or self.future.done()

  def blocks(self) -> int:
    """Pool blocks the load plans to fill (hot run and cold read)."""
    plan = self.plan
    return 0 if plan is None else len(plan.hot_ids) + len(plan.cold_ids)

  def wait(self) -> None:
    if self.future is not None:
      cf.wait([self.future])


class ColdTierConnector:
  """Moves whole blocks between the engine's pool and its storage tiers.

  `store`: a `storage.BlockStore` (the cold tier) or None; `hot`: a
  `cache.HotTier` or None; at least one of them. `nic`: a `StorageNic`
  every cold read passes through (an emulated storage link), or None.
  """

  def __init__(self, store, manager: KVCacheManager, hot=None, *,
               nic: StorageNic | None = None):
    if store is None and hot is None:
      raise ValueError("a tier connector needs a cold tier, a hot tier or "
                       "both")
    self.store = store
    self.hot = hot
    self.manager = manager
    self.stats = ColdTierStats()
    if store is not None and hot is not None and (
        tuple(store.block_shape) != hot.block_shape or
        store.codec.dtype != hot.dtype):
      raise ValueError(f"the hot tier holds {hot.block_shape} {hot.dtype} "
                       f"blocks, the cold tier {tuple(store.block_shape)} "
                       f"{store.codec.dtype}")
    tier = hot if store is None else store
    # Reads land in one reused host buffer (`get(out=)`).
    self._staging = StagingRows(
        tier.block_shape, hot.dtype if store is None else store.codec.dtype)
    self.nic = nic
    self._block_bytes = (math.prod(tier.block_shape) *
                         self._staging.dtype.itemsize)
    self._executor: cf.ThreadPoolExecutor | None = None  # `start_load`'s
    self._in_flight: cf.Future | None = None  # its read, until used
    self._dropped: list[cf.Future] = []  # reads of `cancel`-ed loads
    # The engine's prefetcher (`engine.engine_prefetch`), told which blocks
    # a load read from the hot tier; None without one.
    self.prefetcher = None

  @property
  def block_bytes(self) -> int:
    """Bytes of one block as the tiers hold it."""
    return self._block_bytes

  def reader_busy(self) -> bool:
    """Whether a turn's cold read (or a dropped one) is queued or running
    on the reader thread: a prefetch read issued now would wait for it."""
    return any(f is not None and not f.done()
               for f in (self._in_flight, *self._dropped))

  def read_blocks_async(self, ids: list[bytes]) -> cf.Future:
    """Reads `ids` (consecutive blocks of one chain) from the cold tier on
    the reader thread, through the NIC, behind the turn reads queued there,
    into a new host array: for the prefetcher, whose blocks go to the hot
    tier later. The future's result is (blocks `[n, *block_shape]`, how
    many leading blocks were read and verified); it raises what the store
    raised."""
    if self.store is None:
      raise ValueError("prefetch reads need a cold tier")
    out = np.empty((len(ids), *self.store.block_shape), self._staging.dtype)

    def read():
      result = self._read_cold(ids, out)
      if result.error is not None:
        raise result.error
      return out, result.got
    return self._reader().submit(read)

  def start_load(self, seq_id: str, tokens: list[int], tenant: str
                 ) -> PendingLoad:
    """Plans the load of `seq_id` (`begin`-ed with `tokens`) and starts
    reading its cold blocks, if any, on the connector's reader thread. The
    engine serves its other turns meanwhile and passes the result to
    `load_prefix(..., pending=)`. The hot run in front of those blocks is
    pinned in the hot tier until then, so that the write-backs of turns
    finishing meanwhile do not evict it."""
    plan = self._plan(seq_id, tokens, tenant)
    if plan is None or not plan.cold_ids:
      return PendingLoad(seq_id, plan, None)  # nothing to wait for
    # No wait for a dropped read still out (`cancel`): the one reader
    # thread makes this read after it, so the engine serves on meanwhile,
    # and they never write the staging buffer at once.
    staging = self._staging.rows(len(plan.cold_ids))
    if self.hot is not None:
      self.hot.set_pins(plan.hot_ids, owner="load")
    future = self._reader().submit(self._read_cold, plan.cold_ids, staging)
    self._in_flight = future
    self.stats.async_loads += 1
    return PendingLoad(seq_id, plan, future, staging)

  def plan_hot_load(self, seq_id: str, tokens: list[int], tenant: str
                    ) -> PendingLoad | None:
    """The load of `seq_id` (`begin`-ed with `tokens`) if it needs no cold
    read: the hot tier's run after the pool hit (or nothing), ready for
    `load_prefix(..., pending=)` at once; None if it would read the cold
    tier. Starts nothing and pins nothing: the engine admits such a turn
    while another's cold read is out."""
    plan = self._plan(seq_id, tokens, tenant)
    if plan is not None and plan.cold_ids:
      return None
    return PendingLoad(seq_id, plan, None)

  def cancel(self, pending: PendingLoad) -> None:
    """Drops a started load (its turn was aborted or pushed back). A read
    still queued on the reader (behind a prefetch read or a dropped one) is
    withdrawn, so it takes no NIC time; one already reading finishes in
    the background, and the reader makes the next one after it."""
    if pending.future is not None:
      if pending.future.cancel():
        self.stats.withdrawn_reads += 1
      else:
        self._dropped.append(pending.future)
      if self.hot is not None:
        self.hot.set_pins((), owner="load")

  def _count_dropped(self) -> None:
    """Counts the reads of dropped loads that have ended: their seconds and
    what the store raised, which no load takes otherwise (the engine's
    thread: the reader touches no counter)."""
    still = []
    for future in self._dropped:
      if not future.done():
        still.append(future)
        continue
      read = future.result()
      self.stats.read_s += read.seconds
      if read.error is not None:
        count_store_error(self.stats, "read", read.error)
    self._dropped = still

  def load_prefix(self,
                  pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
                  seq_id: str, tokens: list[int],
                  tenant: str, *, pending: PendingLoad | None = None
                  ) -> tuple[jax.Array, int, int]:
    """Loads the blocks after the pool hit.

    Returns (pool, tokens loaded from the hot tier, tokens loaded from the
    cold tier). `seq_id` must have been `begin`-ed with `tokens`. Loads at
    most what leaves one token to compute, and only as many blocks as the
    pool can give now. (If the turn then cannot be admitted, the loaded
    blocks stay cached in the pool for its next attempt.) `pending`: the
    `start_load` of this turn, whose read it waits for and uses; without
    one, the cold blocks are read here.
    """
    self._count_dropped()
    if pending is not None:
      if pending.seq_id != seq_id:
        raise ValueError(f"a load started for {pending.seq_id} cannot "
                         f"complete {seq_id}")
      plan = pending.plan
      if plan is None:
        return pool, 0, 0
      staging = pending.staging
      if pending.future is None:
        read = _ReadResult(0, None, 0.0)
      else:
        read = pending.future.result()
        self._in_flight = None
        if self.hot is not None:
          self.hot.set_pins((), owner="load")
    else:
      plan = self._plan(seq_id, tokens, tenant)
      if plan is None:
        return pool, 0, 0
      self._wait_for_reader()  # an aborted turn's read may still write
      staging = self._staging.rows(max(len(plan.cold_ids), 1))
      read = (self._read_cold(plan.cold_ids, staging) if plan.cold_ids
              else _ReadResult(0, None, 0.0))
    got = read.got
    self.stats.read_s += read.seconds
    if read.error is not None:
      count_store_error(self.stats, "read", read.error)
    else:
      self.stats.missed_blocks += len(plan.cold_ids) - got
    bs = self.manager.block_size
    computed, have = plan.computed, plan.have
    # The hot run as it stands now: pinned since the plan, unless the tier
    # had to drop a pin for a put (then the cold blocks after a hole in
    # the chain are of no use).
    hot_run = (0 if self.hot is None else
               self.hot.leading_run(plan.hot_ids))
    good = hot_run + (got if hot_run == len(plan.hot_ids) else 0)
    while good and not self.manager.can_allocate(seq_id, good * bs):
      good -= 1
    if good == 0:
      return pool, 0, 0
    hot_run = min(hot_run, good)
    got = good - hot_run
    self.manager.allocate(seq_id, good * bs)
    pages = self.manager.block_table(seq_id)[have:have + good]
    if hot_run:  # straight from the tier's memory into the pool
      pool, _ = self.hot.read_run_to_pool(plan.hot_ids[:hot_run], pool, pages)
      if self.prefetcher is not None:
        self.prefetcher.note_hot_read(plan.hot_ids[:hot_run])
    if got:  # `staging`: the rows the cold read went into
      pool = pool_io.write_blocks(pool, pages[hot_run:], staging[:got])
      if self.hot is not None:  # keeping the run it extends: no hole
        self.hot.put(plan.cold_ids[:got], staging[:got],
                     keep=plan.hot_ids[:hot_run])
    self.manager.append_tokens(seq_id, tokens[computed:(have + good) * bs])
    loaded = (have + good) * bs - computed
    # The first loaded block may be partly computed already (a pool hit
    # that ends inside it): those tokens are not counted as loaded.
    hot_tokens = hot_run * bs - (computed - have * bs) if hot_run else 0
    self.stats.hot_loaded_blocks += hot_run
    self.stats.hot_loaded_tokens += hot_tokens
    self.stats.loaded_blocks += got
    self.stats.loaded_tokens += loaded - hot_tokens
    return pool, hot_tokens, loaded - hot_tokens

  def _plan(self, seq_id: str, tokens: list[int], tenant: str
            ) -> _LoadPlan | None:
    """What a load would read now: the hot tier's leading run after the
    pool hit, then the cold tier's, as many blocks as the pool could give;
    None when there is nothing to load."""
    bs = self.manager.block_size
    computed = self.manager.num_computed(seq_id)
    cap = (len(tokens) - 1) // bs
    have = computed // bs
    if cap <= have:
      return None
    self.stats.lookups += 1
    chain = loadable_chain(tokens, len(tokens), bs,
                           self.manager.model_fingerprint, tenant)
    wanted = chain[have:]
    hot_run = 0 if self.hot is None else self.hot.leading_run(wanted)
    cold_run = self._cold_run(wanted[hot_run:])
    run = hot_run + cold_run
    while run and not self.manager.can_allocate(seq_id, run * bs):
      run -= 1
    if run == 0:
      return None
    hot_run = min(hot_run, run)
    return _LoadPlan(computed, have, list(wanted[:hot_run]),
                     list(wanted[hot_run:run]))

  def _reader(self) -> cf.ThreadPoolExecutor:
    if self._executor is None:
      self._executor = cf.ThreadPoolExecutor(
          1, thread_name_prefix="cold-tier-load")
    return self._executor

  def _wait_for_reader(self) -> None:
    if self._in_flight is not None:
      cf.wait([self._in_flight])
      self._in_flight = None

  def _cold_run(self, wanted: list) -> int:
    """How many of `wanted`, from the first, the cold tier lists."""
    if self.store is None or not wanted:
      return 0
    try:
      present = self.store.contains(wanted)
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.stats, "lookup", err)
      return 0
    return next((i for i, p in enumerate(present) if not p), len(wanted))

  def _read_cold(self, ids: list, out) -> _ReadResult:
    """Reads `ids` from the cold tier into `out` (through the storage NIC,
    if any): the verified run, the error the store raised, the seconds.
    Touches no counter: it may run on the reader thread."""
    t0 = time.perf_counter()
    try:
      if self.nic is not None:
        self.nic.acquire(len(ids) * self._block_bytes)
      blocks = self.store.get(ids, out=out)
    except Exception as err:  # pylint: disable=broad-except
      return _ReadResult(0, err, time.perf_counter() - t0)
    good = next((i for i, b in enumerate(blocks) if b is None), len(ids))
    return _ReadResult(good, None, time.perf_counter() - t0)

  def write_back(self,
                 pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                 seq_id: str, tenant: str,
                 session: str, *, touch_hot: bool = True
                 ) -> tuple[list[bytes], cf.Future] | None:
    """Copies the sequence's full blocks that a tier lacks into it (the cold
    tier's writes are queued). Returns the ids queued for the cold tier and
    their put's future (None when none were): until it is done, the store's
    `contains` does not see them, and a caller may wait for it rather than
    compute them again (the P/D cluster does).

    `touch_hot`: the blocks the hot tier holds count as reused (a turn that
    read them). False where the same turn put them there already (the P/D
    cluster's decode engine, after the prefill engine's hand-off put): they
    are only made recent again, after the new blocks (`HotTier.refresh`).
    """
    hashes = self.manager.block_hashes(seq_id)
    if not hashes:
      return
    table = self.manager.block_table(seq_id)
    cold_lacks = [False] * len(hashes)
    if self.store is not None:
      try:
        cold_lacks = [not p for p in self.store.contains(hashes)]
      except Exception as err:  # pylint: disable=broad-except
        count_store_error(self.stats, "lookup", err)
    hot_lacks = [False] * len(hashes)
    if self.hot is not None:
      hot_lacks = [not p for p in self.hot.contains(hashes)]
      if touch_hot:
        self.hot.touch(hashes)  # this turn used the ones it holds
    todo = [i for i in range(len(hashes)) if cold_lacks[i] or hot_lacks[i]]
    cold = [k for k, i in enumerate(todo) if cold_lacks[i]]
    # One host copy: of the blocks either tier lacks, or, where the hot
    # tier is pinned (it takes its blocks from the pool, device -> pinned
    # host in place), of the cold tier's only.
    pinned = self.hot is not None and self.hot.memory == "pinned_host"
    copied = cold if pinned else range(len(todo))
    blocks = (pool_io.read_blocks(pool, [table[todo[k]] for k in copied])
              if copied else None)
    if self.hot is not None:
      rows = [k for k, i in enumerate(todo) if hot_lacks[i]]
      if rows:  # never evicting the chain's own blocks: no holes in it
        self.hot.put_from_pool([hashes[todo[k]] for k in rows], pool,
                               [table[todo[k]] for k in rows], keep=hashes,
                               host_blocks=None if pinned else blocks[rows])
      if not touch_hot:
        self.hot.refresh(hashes)
    if not cold:
      return
    if not pinned and len(cold) < len(todo):
      blocks = blocks[cold]
    try:  # a closed store or a shut-down pool raises here, not later
      future = self.store.put_async([hashes[todo[k]] for k in cold], blocks,
                                    tenant=tenant, session=session)
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.stats, "write", err)
      return
    future.add_done_callback(self._check_put)
    self.stats.write_requests += 1
    self.stats.written_blocks += len(cold)
    return [hashes[todo[k]] for k in cold], future

  def _check_put(self, future: cf.Future) -> None:
    """A write-back's put that raised is logged and counted, not lost."""
    if not future.cancelled() and future.exception() is not None:
      count_store_error(self.stats, "write", future.exception())

  def flush(self) -> None:
    """Waits for the cold tier's queued writes (no-op without one)."""
    if self.store is not None:
      self.store.flush()

  def close(self) -> None:
    """Waits for a started read and queued writes, and closes the cold
    tier, if any."""
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None
      self._count_dropped()
    if self.store is not None:
      self.store.close()

  def report(self) -> dict:
    """The counters, the cold store's own (`store`) and the hot tier's
    (`hot_tier`), for reports; None for a tier not configured. With a
    prefetcher, its counters (`prefetch`)."""
    hot = None
    if self.hot is not None:
      hot = {**self.hot.stats.as_dict(), "capacity_blocks": self.hot.capacity,
             "held_blocks": len(self.hot), "bytes": self.hot.nbytes,
             "memory": self.hot.memory}
    report = {**self.stats.as_dict(),
              "store": None if self.store is None else self.store.stats(),
              "hot_tier": hot}
    if self.prefetcher is not None:
      report["prefetch"] = self.prefetcher.report()
    return report
