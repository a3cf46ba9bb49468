"""Discrete-event simulator of a P/D cluster serving agents from storage.

The real cluster (`engine.cluster.PDCluster`) runs on one machine, so its
"cluster" is a handful of engines; this simulator runs the same placement
policies (`scheduler.policies`) and the same prefill batching rule
(`scheduler.choose_prefill_batch`) over as many engines as a pod has, with
time charged by a `CostModel` instead of measured. Only the clock
(`scheduler.ManualClock`) and the cost of each action differ from the
runtime, as docs/dualpath.md promises.

What is modelled, per engine:

* **storage NIC**: a FIFO pipe of `storage_nic_gbps` (reads only: a
  write-back takes the other direction of a full-duplex NIC and is counted,
  not charged);
* **path 2's hop** DE -> PE: a FIFO pipe per decode engine of
  `collective_gb_s`, streaming blocks as they arrive from the DE's NIC;
* **the hand-off** PE -> DE after prefill: a FIFO pipe per prefill engine
  of `handoff_gb_s` carrying the turn's whole context;
* **hot tier** (optional, `hot_tier_gb`): each prefill engine keeps the
  blocks of the turns it prefilled in host DRAM (LRU, deepest blocks of a
  turn first out): the prompt's when its prefill ends, the ones with
  generated tokens when the turn ends (the runtime's decode engine puts
  them there, uncharged, as the runtime's hand-off of them is); a later
  turn placed there reads the leading run it holds over a host link of
  `hot_gb_s` instead of a NIC (`ReadPath.HOT`), and the policies know which
  engine holds what (counted again at each placement attempt, as the
  runtime does);
* **prefetcher** (optional, `prefetch_blocks`, with a hot tier): the
  runtime's (`engine.prefetch`): the prefixes of turns waiting for HBM,
  then of sessions predicted back soonest (`cache.ReturnPredictor`, which
  learns each session's gaps as the runtime's does), are pinned in their
  prefill engine's tier up to `prefetch_pin_fraction` of it and read
  there, `prefetch_blocks` per read, on NICs with nothing queued: the
  prefill engine's, else a decode engine's (then over its path-2 hop);
* **HBM**: `CostModel.pool_blocks` blocks; a placement reserves the turn's
  blocks on its PE (released when the hand-off ends) and on its DE
  (released when the turn ends), as the runtime does; a turn no engine has
  room for waits, in arrival order, until blocks are released;
* **prefill**: one batch at a time, chosen by `choose_prefill_batch` from
  the turns whose loads are done (no layer-by-layer overlap: a lower
  bound on what staging buys);
* **decode**: continuous batching up to `max_decode_batch`, one token per
  turn per step; a turn's first token comes from its prefill.

A turn arrives, is placed (`policy(demand, snapshot)`), loads its hit
blocks by the paths the policy chose, waits for its PE, prefills its new
tokens, hands its KV to its DE, decodes, ends; its session's next turn
arrives after the recorded tool wait. Every turn's timeline becomes a
`metrics.TurnRecord`, so a simulated run is summarised by the same code
as a real one (`metrics.summarize`, `workload.slo.evaluate_run`).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
from typing import Any, Callable, Sequence

from dualpath_jax.cache.prefetcher import (ReturnPredictor, blocks_to_read,
                                           pin_prefixes)
from dualpath_jax.metrics import TurnRecord
from dualpath_jax.scheduler.batching import WaitingTurn, choose_prefill_batch
from dualpath_jax.scheduler.clock import ManualClock
from dualpath_jax.scheduler.policies import NoCapacityError, get_policy
from dualpath_jax.scheduler.state import (DECODE, PREFILL, ClusterSnapshot,
                                          EngineState, Placement, ReadPath,
                                          TurnDemand)
from dualpath_jax.sim.cost_model import CostModel
from dualpath_jax.sim.workload import SimSession


def _check_rate(name: str, value: float) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      value > 0):  # also refuses NaN
    raise ValueError(f"{name} must be > 0 (inf: no limit), got {value!r}")


@dataclasses.dataclass(frozen=True)
class SimConfig:
  """The simulated cluster (bandwidths per engine, in decimal units).

  Attributes:
    num_prefill / num_decode: engines of each role.
    storage_nic_gbps: each prefill engine's storage NIC, Gbit/s (inf: no
      limit), and each decode engine's unless `decode_storage_nic_gbps`.
    decode_storage_nic_gbps: each decode engine's storage NIC (None: the
      same as a prefill engine's), e.g. for decode engines of another tp.
    collective_gb_s: each decode engine's link for path 2's hop, GB/s.
    handoff_gb_s: each prefill engine's link for the PE -> DE hand-off, GB/s.
    max_prefill_tokens / max_prefill_turns: one prefill batch's budget.
    max_decode_batch: turns one decode step serves.
    hot_tier_gb: each prefill engine's host-DRAM hot tier, GiB (0: none).
    hot_gb_s: each prefill engine's host -> HBM link for hot-tier reads, GB/s.
    prefetch_blocks: blocks per prefetch read into the hot tiers (0: no
      prefetcher; needs `hot_tier_gb`).
    prefetch_pin_fraction: the part of a hot tier the prefetcher may pin.
  """

  num_prefill: int = 1
  num_decode: int = 2
  storage_nic_gbps: float = 100.0
  collective_gb_s: float = 50.0
  handoff_gb_s: float = 50.0
  max_prefill_tokens: int = 16384
  max_prefill_turns: int = 16
  max_decode_batch: int = 256
  decode_storage_nic_gbps: float | None = None
  hot_tier_gb: float = 0.0
  hot_gb_s: float = 50.0
  prefetch_blocks: int = 0
  prefetch_pin_fraction: float = 0.5

  def __post_init__(self):
    for name in ("num_prefill", "num_decode", "max_prefill_tokens",
                 "max_prefill_turns", "max_decode_batch"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name in ("storage_nic_gbps", "collective_gb_s", "handoff_gb_s"):
      _check_rate(name, getattr(self, name))
    if self.decode_storage_nic_gbps is not None:
      _check_rate("decode_storage_nic_gbps", self.decode_storage_nic_gbps)
    _check_rate("hot_gb_s", self.hot_gb_s)
    if (isinstance(self.hot_tier_gb, bool) or
        not isinstance(self.hot_tier_gb, (int, float)) or
        not 0 <= self.hot_tier_gb < math.inf):
      raise ValueError(f"hot_tier_gb must be a finite number >= 0, got "
                       f"{self.hot_tier_gb!r}")
    if (isinstance(self.prefetch_blocks, bool) or
        not isinstance(self.prefetch_blocks, int) or self.prefetch_blocks < 0):
      raise ValueError("prefetch_blocks must be an int >= 0, got "
                       f"{self.prefetch_blocks!r}")
    if self.prefetch_blocks and not self.hot_tier_gb:
      raise ValueError("prefetch_blocks needs hot_tier_gb > 0 (prefetched "
                       "blocks go to the hot tiers)")
    if not 0 <= self.prefetch_pin_fraction < 1:
      raise ValueError("prefetch_pin_fraction must be in [0, 1), got "
                       f"{self.prefetch_pin_fraction!r}")

  def nic_bytes_per_s(self, role: str) -> float:
    """Bytes/s of one storage NIC of an engine of `role`."""
    gbps = self.storage_nic_gbps
    if role == DECODE and self.decode_storage_nic_gbps is not None:
      gbps = self.decode_storage_nic_gbps
    return gbps * 1e9 / 8


class _Pipe:
  """A FIFO link: transfers run one after another at `bytes_per_s`."""

  def __init__(self, bytes_per_s: float):
    self.rate = bytes_per_s
    self.busy_until = -math.inf
    self.bytes = 0
    self.busy_s = 0.0
    self.spans: list[tuple[float, float, int]] = []  # (begin, end, bytes)

  def queued_bytes(self, now: float) -> float:
    """Bytes admitted and not yet through (0 for an unlimited pipe)."""
    if math.isinf(self.rate) or self.busy_until <= now:
      return 0.0
    return (self.busy_until - now) * self.rate

  def send(self, nbytes: int, start: float, last_ready: float | None = None,
           unit: int = 0) -> float:
    """Admits `nbytes` available from `start`; returns when the last byte is through.

    With `last_ready`, the bytes arrive as a stream that ends at
    `last_ready` (in pieces of `unit` bytes), so the transfer cannot end
    before the last piece has arrived and crossed.
    """
    if nbytes <= 0:
      return start
    seconds = nbytes / self.rate
    begin = max(start, self.busy_until)
    end = begin + seconds
    if last_ready is not None:
      end = max(end, last_ready + unit / self.rate)
    self.busy_until = end
    self.bytes += nbytes
    self.busy_s += seconds
    if seconds > 0:
      self.spans.append((end - seconds, end, nbytes))
    return end


@dataclasses.dataclass
class _Turn:
  """One turn in flight (mutable bookkeeping the records are built from)."""

  session: SimSession
  index: int
  arrival_s: float
  context: int
  hit_tokens: int
  demand: TurnDemand
  placement: Placement | None = None
  placed_s: float = math.nan
  load_done_s: float = math.nan
  prefill_start_s: float = math.nan
  first_token_s: float = math.nan
  handoff_done_s: float = math.nan
  finish_s: float = math.nan
  generated: int = 0
  waited_for_hbm: bool = False

  @property
  def turn_id(self) -> str:
    return self.demand.turn_id

  @property
  def output_tokens(self) -> int:
    return self.session.turns[self.index].output_tokens

  @property
  def new_tokens(self) -> int:
    return self.context - self.hit_tokens


class _Engine:
  """One engine's pipes, HBM and queues."""

  def __init__(self, name: str, role: str, config: SimConfig, blocks: int,
               hot_blocks: int = 0):
    self.name = name
    self.role = role
    # Prefill engines: host-DRAM hot tier, (session, block index) -> None,
    # least recently used first; and its host -> HBM link.
    self.hot: collections.OrderedDict = collections.OrderedDict()
    self.hot_capacity = hot_blocks
    self.hot_link = _Pipe(config.hot_gb_s * 1e9)
    self.hot_hits = 0
    self.pins: frozenset = frozenset()  # keys no put evicts (prefetcher)
    self.fetching: set = set()  # keys a prefetch read brings
    self.prefetched: set = set()  # keys put by the prefetcher, unread
    self.nic = _Pipe(config.nic_bytes_per_s(role))
    self.link = _Pipe((config.handoff_gb_s if role == PREFILL
                       else config.collective_gb_s) * 1e9)
    self.capacity = blocks
    self.used = 0
    self.peak_used = 0
    self.queued_tokens = 0
    self.busy = False
    self.busy_s = 0.0
    self.wake_at = math.inf
    self.waiting: list[_Turn] = []  # PE: placed, not prefilled
    self.joining: list[_Turn] = []  # DE: handed off, not yet decoding
    self.active: list[_Turn] = []  # DE: decoding

  def reserve(self, blocks: int) -> None:
    self.used += blocks
    if self.used > self.capacity:
      raise AssertionError(f"{self.name}: {self.used} blocks used of "
                           f"{self.capacity}: the placement over-committed")
    self.peak_used = max(self.peak_used, self.used)

  def release(self, blocks: int) -> None:
    self.used -= blocks
    assert self.used >= 0, (self.name, self.used)


@dataclasses.dataclass
class SimResult:
  """What one simulated run produced."""

  policy: str
  records: list[TurnRecord]
  turns: list[dict[str, Any]]
  engines: dict[str, dict[str, Any]]
  paths: dict[str, int]
  makespan_s: float
  hbm_waits: int
  written_bytes: int
  nic_spans: dict[str, list[tuple[float, float, int]]]
  prefetch: dict[str, int] | None = None  # the prefetcher's block counts


class Simulator:
  """Runs `sessions` on a simulated cluster under one placement policy.

  `cost` prices the prefill engines and, unless `decode_cost` is given
  (e.g. another tp), the decode engines; both must share the block shape.
  `start_s[i]` is when session `i`'s first turn may arrive (0 for all:
  the offline batch; `workload.online.arrival_offsets` for an open-loop
  stream). `on_turn_done(record)` is called as each turn ends (progress).
  """

  def __init__(self, cost: CostModel, config: SimConfig, policy: str,
               sessions: Sequence[SimSession],
               start_s: Sequence[float] | None = None,
               on_turn_done: Callable[[TurnRecord], None] | None = None,
               decode_cost: CostModel | None = None):
    self.cost = cost
    self.decode_cost = cost if decode_cost is None else decode_cost
    if (self.decode_cost.block_bytes != cost.block_bytes or
        self.decode_cost.block_size != cost.block_size):
      raise ValueError("prefill and decode engines must store the same "
                       "blocks (model, block_size, kv_bytes)")
    self.config = config
    self.policy_name = policy
    self.policy = get_policy(policy)
    self.sessions = list(sessions)
    if not self.sessions:
      raise ValueError("no sessions to simulate")
    ids = [s.session_id for s in self.sessions]
    if len(set(ids)) != len(ids):
      raise ValueError("session ids must be unique")
    self.start_s = [0.0] * len(self.sessions) if start_s is None else [
        float(t) for t in start_s]
    if len(self.start_s) != len(self.sessions):
      raise ValueError(f"{len(self.start_s)} start times for "
                       f"{len(self.sessions)} sessions")
    if any(not (math.isfinite(t) and t >= 0) for t in self.start_s):
      raise ValueError("start times must be finite and >= 0")
    self.on_turn_done = on_turn_done
    self._check_fits()
    self.clock = ManualClock()
    hot = int(config.hot_tier_gb * 2**30 // cost.block_bytes)
    self.prefill = [_Engine(f"P{i}", PREFILL, config, cost.pool_blocks, hot)
                    for i in range(config.num_prefill)]
    self.decode = [_Engine(f"D{i}", DECODE, config,
                           self.decode_cost.pool_blocks)
                   for i in range(config.num_decode)]
    self.engines = {e.name: e for e in self.prefill + self.decode}
    self._events: list[tuple[float, int, Callable, tuple]] = []
    self._seq = itertools.count()
    self._pending: list[_Turn] = []  # arrived, no engine had the HBM
    self._hbm_waits = 0
    self._written_bytes = 0
    self._records: list[TurnRecord] = []
    self._turns: list[dict[str, Any]] = []
    self._paths = {p.name: 0 for p in ReadPath}
    # The oracle's loads are free: a prefetcher would only spend NIC time.
    self._predictor = (ReturnPredictor() if config.prefetch_blocks and
                       policy != "oracle" else None)
    self._prefetch = {"read_blocks": 0, "path1_blocks": 0, "path2_blocks": 0,
                      "used_blocks": 0, "evicted_unused_blocks": 0}
    self._prefetch_wake = -math.inf  # when the prefetcher runs again

  # ------------------------------------------------------------ helpers
  def _blocks(self, tokens: int) -> int:
    return -(-tokens // self.cost.block_size)

  def _check_fits(self) -> None:
    """Refuses a turn no engine could ever hold (it would wait forever)."""
    pool = min(self.cost.pool_blocks, self.decode_cost.pool_blocks)
    for s in self.sessions:
      for i, t in enumerate(s.turns):
        need = self._blocks(s.context_tokens(i) + t.output_tokens)
        if need > pool:
          raise ValueError(
              f"session {s.session_id!r} turn {i} needs {need} KV blocks "
              f"({s.context_tokens(i) + t.output_tokens} tokens) but an "
              f"engine holds {pool}: raise tp, or shorten the sessions "
              "(max_context)")

  def _at(self, t: float, fn: Callable, *args) -> None:
    heapq.heappush(self._events, (t, next(self._seq), fn, args))

  @property
  def now(self) -> float:
    return self.clock.now()

  def _snapshot(self) -> ClusterSnapshot:
    now = self.now
    pe_rate = self.cost.prefill_tokens_per_s()
    engines = [EngineState(
        e.name, e.role, e.nic.rate, e.nic.queued_bytes(now), e.queued_tokens,
        pe_rate if e.role == PREFILL else math.inf, e.capacity - e.used,
        hop_queued_bytes=(e.link.queued_bytes(now) if e.role == DECODE
                          else 0.0),
        hot_bytes_per_s=e.hot_link.rate,
        hot_queued_bytes=e.hot_link.queued_bytes(now))
               for e in self.engines.values()]
    return ClusterSnapshot(now, tuple(engines),
                           self.config.collective_gb_s * 1e9)

  # ------------------------------------------------------------ the run
  def run(self) -> SimResult:
    for s, start in zip(self.sessions, self.start_s):
      # A session starts with its first turn: a trace's wait before it is
      # not a tool's (the runtime's replay ignores it too).
      self._at(start, self._arrive, s, 0)
    while self._events:
      t, _, fn, args = heapq.heappop(self._events)
      self.clock.advance_to(t)
      fn(*args)
    expected = sum(len(s.turns) for s in self.sessions)
    if len(self._records) != expected or self._pending:
      raise AssertionError(f"{len(self._records)} of {expected} turns ended, "
                           f"{len(self._pending)} still waiting for HBM")
    for e in self.engines.values():
      assert e.used == 0 and not e.waiting and not e.active, e.name
    starts = min(r.arrival_s for r in self._records)
    makespan = max(r.finish_s for r in self._records) - starts
    prefetch = None
    if self._predictor is not None:
      prefetch = {**self._prefetch, "unused_held_blocks": sum(
          len(e.prefetched) for e in self.prefill)}
    return SimResult(self.policy_name, self._records, self._turns,
                     self._engine_stats(makespan), dict(self._paths),
                     makespan, self._hbm_waits, self._written_bytes,
                     {e.name: e.nic.spans for e in self.engines.values()},
                     prefetch)

  def _arrive(self, session: SimSession, index: int) -> None:
    bs = self.cost.block_size
    context = session.context_tokens(index)
    hit = session.hit_tokens(index, bs)
    turn_id = f"{session.session_id}/{index}"
    out = session.turns[index].output_tokens
    demand = TurnDemand(
        turn_id, new_tokens=context - hit, hit_blocks=hit // bs,
        block_bytes=self.cost.block_bytes, total_blocks=self._blocks(context),
        decode_blocks=self._blocks(context + out), max_new_tokens=out)
    turn = _Turn(session, index, self.now, context, hit, demand)
    if self._predictor is not None:
      self._predictor.arrived(session.session_id, self.now)
    self._pending.append(turn)
    self._place_pending()
    self._run_prefetcher()

  def _hot_blocks(self, turn: _Turn) -> dict[str, int]:
    """Per prefill engine, the leading hit blocks its hot tier holds now."""
    hot = {}
    for pe in self.prefill:
      n = 0
      while n < turn.demand.hit_blocks and (turn.session.session_id, n) in pe.hot:
        n += 1
      if n:
        hot[pe.name] = n
    return hot

  def _place_pending(self) -> None:
    """Places waiting turns in arrival order; stops at the first that does
    not fit (no turn overtakes an older one, so none starves)."""
    while self._pending:
      turn = self._pending[0]
      if self.config.hot_tier_gb:  # the tiers change while a turn waits
        turn.demand = dataclasses.replace(turn.demand,
                                          hot_blocks=self._hot_blocks(turn))
      try:
        placement = self.policy(turn.demand, self._snapshot())
      except NoCapacityError:
        turn.waited_for_hbm = True
        return
      self._pending.pop(0)
      self._hbm_waits += turn.waited_for_hbm
      self._start(turn, placement)

  def _start(self, turn: _Turn, placement: Placement) -> None:
    now = self.now
    turn.placement = placement
    turn.placed_s = now
    pe = self.engines[placement.prefill_engine]
    de = self.engines[placement.decode_engine]
    pe.reserve(turn.demand.total_blocks)
    de.reserve(turn.demand.decode_blocks)
    b = turn.demand.block_bytes
    counts = {p: placement.count(p) for p in ReadPath}
    for p, n in counts.items():
      self._paths[p.name] += n
    done = now
    n_hot = counts[ReadPath.HOT]
    if n_hot:
      done = max(done, pe.hot_link.send(n_hot * b, now))
      pe.hot_hits += n_hot
      self._touch_hot(pe, turn.session.session_id, range(n_hot))
      used = {(turn.session.session_id, k) for k in range(n_hot)}
      self._prefetch["used_blocks"] += len(pe.prefetched & used)
      pe.prefetched -= used
    if counts[ReadPath.PE_READ]:
      done = max(done, pe.nic.send(counts[ReadPath.PE_READ] * b, now))
    n2 = counts[ReadPath.DE_READ]
    if n2:
      first = now + max(0.0, de.nic.busy_until - now) + b / de.nic.rate
      last = de.nic.send(n2 * b, now)
      done = max(done, de.link.send(n2 * b, min(first, last), last, b))
    turn.load_done_s = done
    pe.queued_tokens += turn.new_tokens
    de.queued_tokens += turn.output_tokens
    pe.waiting.append(turn)
    self._try_prefill(pe)

  # ------------------------------------------------------------ prefill
  def _try_prefill(self, pe: _Engine) -> None:
    if pe.busy or not pe.waiting:
      return
    now = self.now
    waiting = [WaitingTurn(t.turn_id, t.placed_s, t.new_tokens, t.load_done_s)
               for t in pe.waiting]
    chosen = choose_prefill_batch(
        waiting, now, max_batch_tokens=self.config.max_prefill_tokens,
        max_batch_turns=self.config.max_prefill_turns)
    if not chosen:  # every turn still loading: wake when the first is in
      wake = min(t.load_done_s for t in pe.waiting)
      if wake < pe.wake_at:
        pe.wake_at = wake
        self._at(wake, self._wake, pe)
      return
    by_id = {t.turn_id: t for t in pe.waiting}
    batch = [by_id[i] for i in chosen]
    pe.waiting = [t for t in pe.waiting if t.turn_id not in set(chosen)]
    seconds = self._prefill_seconds(batch)
    for t in batch:
      t.prefill_start_s = now
    pe.busy = True
    pe.busy_s += seconds
    self._at(now + seconds, self._prefill_done, pe, batch)

  def _wake(self, pe: _Engine) -> None:
    pe.wake_at = math.inf
    self._try_prefill(pe)

  def _prefill_seconds(self, batch: list[_Turn]) -> float:
    """One forward for the batch; a lone turn over the token budget is
    chunked, one forward per chunk, each attending to the chunks before."""
    limit = self.config.max_prefill_tokens
    if len(batch) == 1 and batch[0].new_tokens > limit:
      t = batch[0]
      seconds, done = 0.0, 0
      while done < t.new_tokens:
        n = min(limit, t.new_tokens - done)
        seconds += self.cost.prefill_s([(n, t.hit_tokens + done)])
        done += n
      return seconds
    return self.cost.prefill_s([(t.new_tokens, t.hit_tokens) for t in batch])

  def _prefill_done(self, pe: _Engine, batch: list[_Turn]) -> None:
    now = self.now
    pe.busy = False
    for t in batch:
      t.first_token_s = now
      t.generated = 1
      pe.queued_tokens -= t.new_tokens
      if pe.hot_capacity:  # its full blocks are in the pool: keep a copy
        self._touch_hot(pe, t.session.session_id,
                        range(t.context // self.cost.block_size))
      nbytes = t.demand.total_blocks * t.demand.block_bytes
      self._at(pe.link.send(nbytes, now), self._handoff_done, pe, t)
    self._try_prefill(pe)

  def _touch_hot(self, pe: _Engine, session_id: str, blocks: range) -> None:
    """Puts (or refreshes) a session's blocks in `pe`'s hot tier, deepest
    first, so that the shallow ones are the most recent; evicts the least
    recently used past the capacity."""
    if not pe.hot_capacity:
      return
    for k in reversed(blocks):
      key = (session_id, k)
      if key in pe.hot:
        pe.hot.move_to_end(key)
      else:
        pe.hot[key] = None
    self._evict_hot(pe)

  def _evict_hot(self, pe: _Engine) -> None:
    """Evicts the least recently used unpinned blocks past the capacity
    (pinned ones met on the way are made recent: they stay anyway)."""
    moved = 0
    while len(pe.hot) > pe.hot_capacity:
      key = next(iter(pe.hot))
      if key in pe.pins and moved < len(pe.hot):  # else: all pinned
        pe.hot.move_to_end(key)
        moved += 1
        continue
      pe.hot.popitem(last=False)
      if key in pe.prefetched:
        pe.prefetched.discard(key)
        self._prefetch["evicted_unused_blocks"] += 1

  def _handoff_done(self, pe: _Engine, turn: _Turn) -> None:
    turn.handoff_done_s = self.now
    pe.release(turn.demand.total_blocks)
    de = self.engines[turn.placement.decode_engine]
    de.queued_tokens -= 1  # the first token came from the prefill
    if turn.generated >= turn.output_tokens:
      self._finish(de, turn)
    else:
      de.joining.append(turn)
      self._try_decode(de)
    self._place_pending()

  # ------------------------------------------------------------ decode
  def _try_decode(self, de: _Engine) -> None:
    if de.busy:
      return
    room = self.config.max_decode_batch - len(de.active)
    if room > 0 and de.joining:
      de.active += de.joining[:room]
      de.joining = de.joining[room:]
    if not de.active:
      return
    seconds = self.decode_cost.decode_step_s(
        [t.context + t.generated for t in de.active])
    de.busy = True
    de.busy_s += seconds
    self._at(self.now + seconds, self._step_done, de)

  def _step_done(self, de: _Engine) -> None:
    de.busy = False
    still = []
    for t in de.active:
      t.generated += 1
      de.queued_tokens -= 1
      if t.generated >= t.output_tokens:
        self._finish(de, t)
      else:
        still.append(t)
    released = len(still) < len(de.active)
    de.active = still
    self._try_decode(de)
    if released:  # only freed blocks can let a waiting turn in
      self._place_pending()

  def _finish(self, de: _Engine, turn: _Turn) -> None:
    now = self.now
    turn.finish_s = now
    de.release(turn.demand.decode_blocks)
    session, index = turn.session, turn.index
    bs = self.cost.block_size
    stored = (turn.context + turn.output_tokens - 1) // bs
    self._written_bytes += (stored - turn.hit_tokens // bs) * self.cost.block_bytes
    # The runtime's decode engine puts the blocks with generated tokens into
    # the hot tier of the turn's prefill engine, and the chain is recent.
    pe = self.engines[turn.placement.prefill_engine]
    self._touch_hot(pe, session.session_id, range(stored))
    if self._predictor is not None and index + 1 < len(session.turns):
      self._predictor.finished(
          session.session_id, now,
          [(session.session_id, k) for k in range(stored)], pe.name)
    record = TurnRecord(session.session_id, index, turn.context,
                        turn.hit_tokens, turn.output_tokens, turn.arrival_s,
                        turn.first_token_s, now, "length")
    self._records.append(record)
    p = turn.placement
    self._turns.append({
        "session_id": session.session_id, "turn_index": index,
        "prefill_engine": p.prefill_engine, "decode_engine": p.decode_engine,
        "context_tokens": turn.context, "hit_tokens": turn.hit_tokens,
        "output_tokens": turn.output_tokens,
        "pe_read_blocks": p.count(ReadPath.PE_READ),
        "hot_read_blocks": p.count(ReadPath.HOT),
        "de_read_blocks": p.count(ReadPath.DE_READ),
        "arrival_s": turn.arrival_s, "placed_s": turn.placed_s,
        "load_done_s": turn.load_done_s,
        "prefill_start_s": turn.prefill_start_s,
        "first_token_s": turn.first_token_s,
        "handoff_done_s": turn.handoff_done_s, "finish_s": now,
        "estimated_first_token_s": p.ready_s,
    })
    if self.on_turn_done is not None:
      self.on_turn_done(record)
    if index + 1 < len(session.turns):
      nxt = session.turns[index + 1]
      self._at(now + nxt.gap_s, self._arrive, session, index + 1)
    self._run_prefetcher()

  # ------------------------------------------------------------ prefetch
  def _run_prefetcher(self) -> None:
    """The runtime prefetcher's step (`engine.prefetch`): pins the
    candidates' prefixes, then one read per NIC with nothing queued."""
    if self._predictor is None:
      return
    now = self.now
    cands = [(t.session.session_id,
              [(t.session.session_id, k) for k in range(t.demand.hit_blocks)])
             for t in self._pending[:8]]
    for a in self._predictor.away(now):
      if len(cands) >= 8:
        break
      cands.append((a.session_id, list(a.chain)))
    targets = []
    for session_id, chain in cands:
      last = self._predictor.last_engine(session_id)
      pe = next((e for e in self.prefill if e.name == last), None)
      if pe is None:
        pe = max(self.prefill, key=lambda e: sum(k in e.hot for k in chain))
      targets.append((pe, chain))
    for pe in self.prefill:
      pe.pins = frozenset(pin_prefixes(
          [chain for target, chain in targets if target is pe],
          int(self.config.prefetch_pin_fraction * pe.hot_capacity)))
    b, n_max = self.cost.block_bytes, self.config.prefetch_blocks
    for pe, chain in targets:
      while True:
        want = blocks_to_read(
            chain, 0, pinned=pe.pins.__contains__,
            have=lambda k, pe=pe: k in pe.hot or k in pe.fetching,
            limit=n_max)
        if not want:
          break
        nic = next((e for e in [pe] + self.decode
                    if e.nic.queued_bytes(now) == 0), None)
        if nic is None:
          self._retry_prefetch_at(min(e.nic.busy_until
                                      for e in [pe] + self.decode))
          return
        if nic is pe:
          done = pe.nic.send(len(want) * b, now)
          self._prefetch["path1_blocks"] += len(want)
        else:  # then over the decode engine's path-2 hop
          last = nic.nic.send(len(want) * b, now)
          done = nic.link.send(len(want) * b, now, last, b)
          self._prefetch["path2_blocks"] += len(want)
        self._prefetch["read_blocks"] += len(want)
        pe.fetching.update(want)
        self._at(done, self._prefetch_done, pe, want)

  def _retry_prefetch_at(self, t: float) -> None:
    """Runs the prefetcher again when the first busy NIC frees (one such
    event pending at a time, the earliest)."""
    if self._prefetch_wake <= self.now or t < self._prefetch_wake:
      self._prefetch_wake = t
      self._at(t, self._run_prefetcher)

  def _prefetch_done(self, pe: _Engine, keys: list) -> None:
    """A prefetch read landed: its blocks join the tier (pinned ones stay)."""
    pe.fetching.difference_update(keys)
    for key in keys:
      if key not in pe.hot:
        pe.hot[key] = None
        pe.prefetched.add(key)
    self._evict_hot(pe)
    self._run_prefetcher()

  # ------------------------------------------------------------ report
  def _engine_stats(self, makespan: float) -> dict[str, dict[str, Any]]:
    def share(seconds: float) -> float | None:
      return seconds / makespan if makespan > 0 else None

    out = {}
    for e in self.engines.values():
      out[e.name] = {
          "role": e.role,
          "nic_bytes": e.nic.bytes,
          "nic_utilization": (None if math.isinf(e.nic.rate)
                              else share(e.nic.busy_s)),
          "link_bytes": e.link.bytes,
          "link_utilization": (None if math.isinf(e.link.rate)
                               else share(e.link.busy_s)),
          "compute_busy": share(e.busy_s),
          "hot_tier_blocks": e.hot_capacity if e.role == PREFILL else None,
          "hot_read_blocks": e.hot_hits if e.role == PREFILL else None,
          "peak_hbm_blocks": e.peak_used,
          "hbm_blocks": e.capacity,
      }
    return out


def simulate(cost: CostModel, config: SimConfig, policy: str,
             sessions: Sequence[SimSession],
             start_s: Sequence[float] | None = None,
             on_turn_done: Callable[[TurnRecord], None] | None = None,
             decode_cost: CostModel | None = None) -> SimResult:
  """Runs one simulation (see `Simulator`)."""
  return Simulator(cost, config, policy, sessions, start_s, on_turn_done,
                   decode_cost).run()
