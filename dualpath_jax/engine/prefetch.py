"""The prefetcher: cold tier -> an engine's hot tier, on idle storage NICs.

A turn whose prefix is in neither a prefill engine's (PE) pool nor its hot
tier reads it from the cold tier after it is placed, through a storage NIC,
and its prefill waits for those reads. The prefetcher reads such blocks
into the PE's hot tier before: then placement finds them hot
(`ReadPath.HOT`, over the host link) and no NIC stands between the turn and
its prefill. The P/D cluster runs one over its prefill engines; one engine
doing both prefill and decode runs one over itself, as the only PE, its
connector's reader standing in for the NIC (`engine.engine_prefetch`). It
reads for, in this order:

1. turns that arrived and wait for room to be placed (`waiting`), first come
   first;
2. sessions between turns, soonest predicted return first
   (`cache.prefetcher.ReturnPredictor`).

For each, the blocks after what the PE's hot tier holds (and the blocks a
running turn holds in its pool: ones cached there unreferenced may be
evicted before the turn is placed), as many leading ones as the cold tier
holds, `batch_blocks` per read. The PE is the one the session's last turn
ran on (its blocks went to that tier), else the one already holding most
of the prefix.

What it reads must still be there when the turn comes: every step it pins
(`HotTier.set_pins`) the prefixes of the turns and sessions in that order,
up to `pin_fraction` of each tier, so other turns' puts do not evict them,
and it reads only pinned blocks. A turn placed, or a session gone from the
prediction, loses its pins.

It only uses what would go idle:

* **NICs.** A read goes to a NIC with no backlog and no prefetch of its own
  in flight: the PE's (path 1), else a decode engine's (path 2: on one
  machine the block lands in the PE's host memory directly; between hosts
  it would cross the compute network, as the DE's write-back does). Each
  NIC's reader is a FIFO, so a turn's load queues behind at most one
  prefetch read of `batch_blocks` blocks.
* **Hot-tier room.** A read is sized to the room the tier has without
  evicting blocks of any turn or session ahead of it in the order above,
  and its put keeps those blocks (`HotTier.put(keep=)`); it may evict what
  no one is predicted to read, or sessions predicted later.

Reads run on the NICs' reader threads; the blocks go into the hot tier on
the thread that drives the cluster (`step`), as every hot-tier call does.

Counted (`report()`): reads and blocks per path and NIC bytes, blocks put,
blocks a turn then read from the tier (`used_blocks`, the prediction's
hits), and those still unread or evicted unread (its misses).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
from typing import Callable, Hashable, Sequence

from dualpath_jax.cache.prefetcher import (ReturnPredictor, blocks_to_read,
                                           pin_prefixes)

_log = logging.getLogger(__name__)

PIN_OWNER = "prefetch"  # whose pins in a hot tier (`HotTier.set_pins`)


def session_key(req) -> tuple[str, str]:
  """How the prefetcher knows a `TurnRequest`'s session: (tenant, session
  id). Session ids are the clients', per tenant: by id alone, one tenant's
  session arriving took another's of the same id off the away list."""
  return (req.tenant, req.session_id)


@dataclasses.dataclass
class PrefetchStats:
  """Counters of one prefetcher (blocks unless named otherwise)."""

  reads: int = 0  # prefetch reads issued
  read_blocks: int = 0  # blocks they asked for
  path1_blocks: int = 0  # read on the PE's own NIC
  path2_blocks: int = 0  # read on a decode engine's NIC
  missed_blocks: int = 0  # asked for, not served by the store
  read_errors: int = 0  # reads that raised (the blocks are just not there)
  put_blocks: int = 0  # copied into a hot tier
  not_put_blocks: int = 0  # read but not put (no room left, or held by then)
  used_blocks: int = 0  # put, then read by a turn's placement
  evicted_unused_blocks: int = 0  # put, then evicted before any turn read it
  nic_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Candidate:
  """Blocks someone is expected to read: a waiting turn or an away session."""

  chain: tuple[bytes, ...]
  engine: str | None  # the PE its blocks live on, if known


@dataclasses.dataclass
class _Read:
  """One prefetch read in flight."""

  future: cf.Future
  ids: list[bytes]
  pe: str
  nic: str
  keep: frozenset[bytes]  # blocks its put must not evict
  # Its blocks dropped from the memory tiers while it was out (`forget`):
  # not put, nor anything after them.
  forgotten: set[bytes] = dataclasses.field(default_factory=set)


class TierPrefetcher:
  """Prefetches cold-tier blocks into prefill engines' hot tiers.

  Args:
    loader: what reads: `read_blocks_async(ids, nic)`, a future of (blocks
      `[n, *block_shape]`, how many of them were read and verified), and
      `block_bytes` (the cluster's `DualPathLoader`; one engine's reader).
    store: the cold tier (`contains`).
    prefill_workers: the PEs (`.name`, `.hot_tier`, `.manager.pool`,
      `.queued_tokens()`), each with a hot tier.
    decode_names: the decode engines, whose NICs reads may use.
    nics: every engine's `StorageNic`, by name.
    batch_blocks: blocks per read.
    max_candidates: turns and sessions looked at per `step`.
    pin_fraction: at most this part of a hot tier is pinned for them.
    predictor: the `ReturnPredictor` (default: a new one).
    on_store_error: called with (what, error) when the store raises.
  """

  def __init__(self, loader, store, prefill_workers: Sequence,
               decode_names: Sequence[str], nics, *, batch_blocks: int = 4,
               max_candidates: int = 8, pin_fraction: float = 0.5,
               predictor: ReturnPredictor | None = None,
               on_store_error: Callable[[str, BaseException], None]
               | None = None):
    if batch_blocks < 1 or max_candidates < 1:
      raise ValueError("batch_blocks and max_candidates must be >= 1")
    if not 0 <= pin_fraction < 1:
      raise ValueError(f"pin_fraction must be in [0, 1), got {pin_fraction!r}")
    missing = [pe.name for pe in prefill_workers if pe.hot_tier is None]
    if missing:
      raise ValueError(f"prefetching needs a hot tier on every prefill "
                       f"engine; {missing} have none")
    self.loader = loader
    self.store = store
    self.pes = {pe.name: pe for pe in prefill_workers}
    self.decode_names = list(decode_names)
    self.nics = nics
    self.batch_blocks = batch_blocks
    self.max_candidates = max_candidates
    self.pin_fraction = pin_fraction
    self.predictor = predictor or ReturnPredictor()
    self.on_store_error = on_store_error
    self.stats = PrefetchStats()
    self._reads: list[_Read] = []
    # Put, not yet used: (PE, id) -> the tier's copy (`HotTier.generation`).
    # By PE too: one block can be prefetched into two PEs' tiers (a
    # session's turns ran on both), each copy used or evicted on its own.
    # By copy: a prefetched block evicted unread and put again by a turn
    # is not the prefetcher's when a turn reads it.
    self._prefetched: dict[tuple[str, bytes], int] = {}
    # Blocks a read failed on: not asked for again (every step would retry
    # them, and a driver stepping while all sessions are away would spin)
    # until a turn ends, which may have written them anew.
    self._unreadable: set[bytes] = set()
    self._pins: dict[str, list[bytes]] = {}  # what `_pin` set, by PE
    # Whether a step may find work (`pending`): the last one started a
    # read, or a turn ended since (its blocks went to a hot tier, maybe
    # evicting others; its session is now away).
    self._may_work = False

  # ------------------------------------------------------------ events
  # `session_id`: any hashable naming one session (the cluster passes
  # `session_key`, tenant and id).
  def turn_arrived(self, session_id: Hashable, now: float) -> None:
    self.predictor.arrived(session_id, now)

  def turn_finished(self, session_id: Hashable, now: float,
                    chain: Sequence[bytes], pe: str) -> None:
    self.predictor.finished(session_id, now, chain, pe)
    self._unreadable.clear()
    self._may_work = True

  def note_hot_read(self, pe: str, ids: Sequence[bytes]) -> None:
    """A placement on `pe` read `ids` from its hot tier."""
    for block_id in ids:
      copy = self._prefetched.pop((pe, block_id), None)
      if copy is None:  # not prefetched there (or by an engine not ours)
        continue
      if self.pes[pe].hot_tier.generation(block_id) == copy:
        self.stats.used_blocks += 1
      else:  # evicted unread; what the turn read was put by another
        self.stats.evicted_unused_blocks += 1

  def forget(self, ids: Sequence[bytes]) -> None:
    """`ids` left the memory tiers on purpose (a deleted session's,
    `forget_blocks`): a read of them still out puts neither them nor the
    blocks after them when it lands (it would bring a deleted session's
    KV back into memory), and the away sessions' chains end before them
    (`ReturnPredictor.forget`): no pins, lookups or reads for blocks that
    are gone."""
    ids = set(ids)
    for read in self._reads:
      read.forgotten.update(ids.intersection(read.ids))
    self.predictor.forget(ids)
    for name, pins in self._pins.items():  # now: no step may come soon
      if ids.intersection(pins):
        self._pins[name] = [i for i in pins if i not in ids]
        self.pes[name].hot_tier.set_pins(self._pins[name], owner=PIN_OWNER)

  # ------------------------------------------------------------ driving
  def in_flight(self) -> list[cf.Future]:
    return [r.future for r in self._reads]

  def pending(self) -> bool:
    """Whether a step may still read: reads in flight, the last step
    started one, or a turn ended since. A driver with nothing to submit
    (every session away) steps its engine instead of sleeping while this
    holds; it turns False once a step finds nothing to read."""
    return bool(self._reads or self._may_work)

  def step(self, waiting: Sequence[tuple[Hashable, Sequence[bytes]]],
           now: float) -> None:
    """Puts finished reads into their hot tiers, pins, issues new reads.

    `waiting`: (session id, chain) of each turn waiting to be placed, first
    come first.
    """
    reads = self.stats.reads
    self._step(waiting, now)
    self._may_work = self.stats.reads > reads

  def _step(self, waiting, now: float) -> None:
    self.install_done()
    candidates = [_Candidate(tuple(chain), self.predictor.last_engine(session))
                  for session, chain in waiting[:self.max_candidates]
                  if chain]
    for a in self.predictor.away(now):
      if len(candidates) >= self.max_candidates:
        break
      if a.chain and a.engine in self.pes:
        candidates.append(_Candidate(a.chain, a.engine))
    targets = [(cand, *self._target(cand)) for cand in candidates]
    self._pin(targets)
    idle = [name for name in [*self.pes, *self.decode_names]
            if self._nic_idle(name)]
    keep: set[bytes] = set()  # the blocks of everyone ahead, and its own
    for cand, pe, _, start in targets:
      keep.update(cand.chain)
      while idle and self._issue(cand, pe, start, keep, idle):
        pass  # one read per idle NIC while it lacks blocks
      if not idle:
        return

  def _pin(self, targets) -> None:
    """Pins each PE's candidates' chains, in order, up to its budget. A
    chain's head that running turns hold in the pool is not pinned: the
    tier need not keep it, and a long prefix shared by every session (a
    system prompt) would take the budget from the blocks only the tier
    can keep."""
    for pe in self.pes.values():
      self._pins[pe.name] = pin_prefixes(
          [cand.chain[in_pool:] for cand, target, in_pool, _ in targets
           if target is pe],
          int(self.pin_fraction * pe.hot_tier.capacity))
      pe.hot_tier.set_pins(self._pins[pe.name], owner=PIN_OWNER)

  def _nic_idle(self, name: str) -> bool:
    return (self.nics[name].backlog_bytes() == 0 and
            all(r.nic != name for r in self._reads))

  def _target(self, cand: _Candidate):
    """The PE to prefetch `cand` into; how many leading blocks of its chain
    running turns hold in that PE's pool; and how many the pool and then
    the hot tier hold (what the turn will have when it comes)."""
    best = None
    for pe in self.pes.values():
      in_pool = self._pool_run(pe, cand.chain)
      held = in_pool + pe.hot_tier.leading_run(cand.chain[in_pool:])
      key = (pe.name == cand.engine, held, -pe.queued_tokens())
      if best is None or key > best[0]:
        best = (key, pe, in_pool, held)
    return best[1:]

  @staticmethod
  def _pool_run(pe, chain: Sequence[bytes]) -> int:
    """Leading blocks of `chain` in `pe`'s pool referenced by a running
    turn (unreferenced ones may be evicted before the turn comes)."""
    pool, r = pe.manager.pool, 0
    while r < len(chain):
      block = pool.lookup(chain[r])
      if block is None or pool.ref_count(block) == 0:
        break
      r += 1
    return r

  def _issue(self, cand: _Candidate, pe, start: int, keep: set[bytes],
             idle: list[str]) -> bool:
    """Starts one read for `cand` into `pe`'s tier (which holds its first
    `start` blocks) if it lacks blocks the store holds and the tier has
    room; takes the NIC it uses off `idle`."""
    pending = {i for r in self._reads if r.pe == pe.name for i in r.ids}
    pinned, tier = pe.hot_tier.pinned, pe.hot_tier
    want = blocks_to_read(
        cand.chain, start,
        pinned=lambda i: i in pinned and i not in self._unreadable,
        have=lambda i: i in pending or i in tier, limit=self.batch_blocks)
    if not want:
      return False
    try:
      present = self.store.contains(want)
    except Exception as err:  # pylint: disable=broad-except
      self._store_error("lookup", err)
      # As after a failed read: not looked up again until a turn ends (the
      # cluster steps at its decode rate; each step logged one per candidate).
      self._unreadable.add(want[0])
      return False
    n = next((i for i, p in enumerate(present) if not p), len(want))
    n = min(n, pe.hot_tier.room(keep) - len(pending))
    if n <= 0:
      return False
    nic = pe.name if pe.name in idle else next(
        (d for d in idle if d in self.decode_names), None)
    if nic is None:
      return False
    idle.remove(nic)
    ids = want[:n]
    try:
      future = self.loader.read_blocks_async(ids, nic)
    except Exception as err:  # pylint: disable=broad-except
      self._store_error("read", err)
      return False
    self._reads.append(_Read(future, ids, pe.name, nic, frozenset(keep)))
    self.stats.reads += 1
    self.stats.read_blocks += n
    if nic == pe.name:
      self.stats.path1_blocks += n
    else:
      self.stats.path2_blocks += n
    nbytes = n * self.loader.block_bytes
    self.stats.nic_bytes[nic] = self.stats.nic_bytes.get(nic, 0) + nbytes
    return True

  def install_done(self) -> None:
    """Puts the blocks of finished reads into their hot tiers. The cluster
    calls it before it places turns, so a read that finished lands before
    the turn it was for looks for it."""
    still = []
    for read in self._reads:
      if not read.future.done():
        still.append(read)
        continue
      try:
        blocks, good = read.future.result()
      except Exception as err:  # pylint: disable=broad-except
        self.stats.read_errors += 1
        self._store_error("read", err)
        self._unreadable.add(read.ids[0])
        continue
      self.stats.missed_blocks += len(read.ids) - good
      if good < len(read.ids):  # listed, not served (torn, corrupt, gone)
        self._unreadable.add(read.ids[good])
      tier = self.pes[read.pe].hot_tier
      ids = read.ids[:good]
      if read.forgotten:  # forgotten while out: cut the chain there
        ids = ids[:next((k for k, i in enumerate(ids)
                         if i in read.forgotten), len(ids))]
      new = [k for k, i in enumerate(ids) if i not in tier]
      put = tier.put([ids[k] for k in new], blocks[new],
                     keep=read.keep) if new else 0
      self.stats.put_blocks += put
      self.stats.not_put_blocks += good - put
      for k in new[:put]:  # a put keeps its shallowest new blocks
        if (read.pe, ids[k]) in self._prefetched:  # evicted unread since
          self.stats.evicted_unused_blocks += 1
        self._prefetched[(read.pe, ids[k])] = tier.generation(ids[k])
    self._reads = still
    if len(self._prefetched) > 2 * sum(pe.hot_tier.capacity
                                       for pe in self.pes.values()):
      self._forget_evicted()

  def _forget_evicted(self) -> None:
    """Counts prefetched blocks evicted unread and stops tracking them."""
    for (pe, block_id), copy in list(self._prefetched.items()):
      if self.pes[pe].hot_tier.generation(block_id) != copy:
        del self._prefetched[(pe, block_id)]
        self.stats.evicted_unused_blocks += 1

  def _store_error(self, what: str, err: BaseException) -> None:
    if self.on_store_error is not None:
      self.on_store_error(f"prefetch {what}", err)
    else:
      _log.error("prefetch %s failed: %s: %s", what, type(err).__name__, err)

  def close(self) -> None:
    """Drops the reads in flight (their NIC readers finish them) and the
    pins."""
    self._reads = []
    self._pins = {}
    for pe in self.pes.values():
      pe.hot_tier.set_pins((), owner=PIN_OWNER)

  def counts(self) -> dict[str, int]:
    """Blocks read, used by their turn and evicted unused, as of now (for
    /metrics: evictions are otherwise counted only when the tracking set
    grows large, or at `report`)."""
    self._forget_evicted()
    return {"read": self.stats.read_blocks, "used": self.stats.used_blocks,
            "evicted_unused": self.stats.evicted_unused_blocks}

  def report(self) -> dict:
    """The counters, plus blocks put and not yet read by a turn:
    `unused_held_blocks` (still in their tier) and `evicted_unused_blocks`."""
    self._forget_evicted()
    return {**self.stats.as_dict(),
            "unused_held_blocks": len(self._prefetched),
            "expired_sessions": self.predictor.expired,
            "batch_blocks": self.batch_blocks}
