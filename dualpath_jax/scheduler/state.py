"""Frozen snapshots the policies read: engines, the cluster, a turn's demand.

A snapshot is a value: the runtime builds one from live counters (bytes queued
on each storage NIC, tokens queued for compute, free HBM blocks), the simulator
builds one from its model of the same things. Policies never mutate it; placing
several turns from one snapshot threads it through `ClusterSnapshot.after`,
which charges a placement's bytes and tokens to the engines it uses.

Units: bytes, seconds, tokens, blocks. A bandwidth of `math.inf` means "free".
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from typing import Mapping

PREFILL = "prefill"
DECODE = "decode"
ROLES = (PREFILL, DECODE)


class ReadPath(enum.IntEnum):
  """How one hit block reaches the prefill engine's HBM."""

  RESIDENT = 0  # already in the prefill engine's HBM: nothing to move
  PE_READ = 1  # path 1: cold tier -> PE host buffer -> PE HBM
  DE_READ = 2  # path 2: cold tier -> DE host -> DE HBM -> collective -> PE HBM
  FREE = 3  # oracle: delivered at no cost (an upper bound, not a real path)
  HOT = 4  # in the prefill engine's host-DRAM hot tier: host -> HBM, no NIC
  # Another prefill engine holds it, this one can neither hold nor load it
  # (not stored): computed here, nothing moved.
  RECOMPUTE = 5


def _check_real(owner: str, name: str, value: float) -> None:
  """A real number (numpy scalars included), not a bool, not NaN."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
  if math.isnan(value):
    raise ValueError(f"{owner}: {name} must not be NaN")


def _check_non_negative(owner: str, **values: float) -> None:
  """Amounts (bytes, tokens, blocks): finite numbers >= 0.

  An infinite backlog means nothing, and over an infinite bandwidth it would
  cost inf / inf = NaN seconds, which every comparison of the policies
  treats as "not later": the engine would look idle.
  """
  for name, value in values.items():
    _check_real(owner, name, value)
    if value < 0 or not (isinstance(value, numbers.Integral) or
                         math.isfinite(value)):
      raise ValueError(f"{owner}: {name} must be a finite number >= 0, "
                       f"got {value!r}")


def _check_positive(owner: str, **values: float) -> None:
  """Rates: numbers > 0 (`math.inf`: no limit)."""
  for name, value in values.items():
    _check_real(owner, name, value)
    if value <= 0:
      raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")


def _check_count(owner: str, **values: int) -> None:
  """Counts (tokens, blocks, bytes of a turn): ints >= 0 (numpy ints too).

  A float count (e.g. blocks from a true division) would otherwise fail
  late, inside a policy, as a TypeError of `range`.
  """
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(f"{owner}: {name} must be an int, got {value!r}")
    if value < 0:
      raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class EngineState:
  """What the scheduler knows of one engine at one instant.

  Attributes:
    name: unique engine name, e.g. "P0", "D1".
    role: "prefill" or "decode".
    nic_bytes_per_s: bandwidth of the engine's storage NIC (math.inf: no limit).
    nic_queued_bytes: bytes admitted to that NIC and not yet transferred.
    queued_tokens: compute waiting on the engine: prompt tokens to prefill
      (prefill engines) or tokens left to generate (decode engines).
    compute_tokens_per_s: prefill throughput used to turn tokens into seconds.
    free_hbm_blocks: KV pool blocks the engine can still give a new turn.
    hop_queued_bytes: (decode engines) path-2 bytes admitted to its DE -> PE
      hop link and not yet across.
    hot_bytes_per_s: (prefill engines) host -> HBM bandwidth of reads from
      its hot tier.
    hot_queued_bytes: hot-tier bytes admitted to that link, not yet across.
  """

  name: str
  role: str
  nic_bytes_per_s: float
  nic_queued_bytes: float = 0.0
  queued_tokens: int = 0
  compute_tokens_per_s: float = math.inf
  free_hbm_blocks: int = 1 << 30
  hop_queued_bytes: float = 0.0
  hot_bytes_per_s: float = math.inf
  hot_queued_bytes: float = 0.0

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"engine name must be a non-empty str, got {self.name!r}")
    if self.role not in ROLES:
      raise ValueError(f"{self.name}: role {self.role!r} not in {ROLES}")
    _check_positive(self.name, nic_bytes_per_s=self.nic_bytes_per_s,
                    compute_tokens_per_s=self.compute_tokens_per_s,
                    hot_bytes_per_s=self.hot_bytes_per_s)
    _check_non_negative(self.name, nic_queued_bytes=self.nic_queued_bytes,
                        queued_tokens=self.queued_tokens,
                        free_hbm_blocks=self.free_hbm_blocks,
                        hop_queued_bytes=self.hop_queued_bytes,
                        hot_queued_bytes=self.hot_queued_bytes)

  def nic_drain_s(self) -> float:
    """Seconds until the NIC's queue is empty."""
    return self.nic_queued_bytes / self.nic_bytes_per_s

  def compute_wait_s(self) -> float:
    """Seconds until the queued compute is done."""
    return self.queued_tokens / self.compute_tokens_per_s


@dataclasses.dataclass(frozen=True)
class TurnDemand:
  """What one turn needs, known before it is placed.

  Attributes:
    turn_id: unique id of the turn.
    new_tokens: tokens the prefill must compute (the prefix misses).
    hit_blocks: leading context blocks that exist in the storage hierarchy
      and are loaded instead of recomputed.
    block_bytes: bytes of one block (all layers, K and V).
    total_blocks: KV blocks the turn occupies on its prefill engine.
    decode_blocks: KV blocks it occupies on its decode engine (context plus
      generated tokens); defaults to `total_blocks`.
    max_new_tokens: tokens the decode engine will generate.
    resident_blocks: per prefill engine name, how many leading hit blocks are
      already in that engine's HBM (they need no load there).
    hot_blocks: per prefill engine name, how many leading hit blocks that
      engine's host-DRAM hot tier holds (counted from the first block, so
      resident ones included): those after the resident ones load over its
      host link instead of a NIC.
    reachable_blocks: per prefill engine name, how many leading hit blocks
      that engine can get (resident, hot, or stored after those); the rest
      are held by another engine only and would be computed there
      (`ReadPath.RECOMPUTE`, `block_tokens` each). An engine not named
      reaches every hit block.
    block_tokens: tokens of one block (needed when an engine reaches fewer
      than `hit_blocks`).
  """

  turn_id: str
  new_tokens: int
  hit_blocks: int
  block_bytes: int
  total_blocks: int
  decode_blocks: int | None = None
  max_new_tokens: int = 1
  resident_blocks: Mapping[str, int] = dataclasses.field(default_factory=dict)
  hot_blocks: Mapping[str, int] = dataclasses.field(default_factory=dict)
  reachable_blocks: Mapping[str, int] = dataclasses.field(default_factory=dict)
  block_tokens: int = 0

  def __post_init__(self):
    _check_count(self.turn_id, new_tokens=self.new_tokens,
                 hit_blocks=self.hit_blocks, block_bytes=self.block_bytes,
                 total_blocks=self.total_blocks,
                 max_new_tokens=self.max_new_tokens)
    if self.hit_blocks > self.total_blocks:
      raise ValueError(f"{self.turn_id}: hit_blocks {self.hit_blocks} > "
                       f"total_blocks {self.total_blocks}")
    if self.decode_blocks is None:
      object.__setattr__(self, "decode_blocks", self.total_blocks)
    _check_count(self.turn_id, decode_blocks=self.decode_blocks)
    for engine, n in self.resident_blocks.items():
      _check_count(f"{self.turn_id}@{engine}", resident_blocks=n)
      if n > self.hit_blocks:
        raise ValueError(f"{self.turn_id}: {n} resident blocks on {engine} "
                         f"but only {self.hit_blocks} hit blocks")

    for engine, n in self.hot_blocks.items():
      _check_count(f"{self.turn_id}@{engine}", hot_blocks=n)
      if n > self.hit_blocks:
        raise ValueError(f"{self.turn_id}: {n} hot blocks on {engine} "
                         f"but only {self.hit_blocks} hit blocks")
    _check_count(self.turn_id, block_tokens=self.block_tokens)
    for engine, n in self.reachable_blocks.items():
      _check_count(f"{self.turn_id}@{engine}", reachable_blocks=n)
      if not self.resident_on(engine) <= n <= self.hit_blocks:
        raise ValueError(f"{self.turn_id}: {n} reachable blocks on {engine}, "
                         f"outside [its {self.resident_on(engine)} resident, "
                         f"{self.hit_blocks} hit blocks]")
      if n < self.hit_blocks and not self.block_tokens:
        raise ValueError(f"{self.turn_id}: an engine reaching fewer than the "
                         "hit blocks needs block_tokens")
      if self.hot_on(engine) > n:  # it reaches its hot blocks
        raise ValueError(f"{self.turn_id}: {self.hot_on(engine)} hot blocks "
                         f"on {engine} but it reaches only {n}")

  def resident_on(self, engine: str) -> int:
    return int(self.resident_blocks.get(engine, 0))

  def hot_on(self, engine: str) -> int:
    return int(self.hot_blocks.get(engine, 0))

  def reachable_on(self, engine: str) -> int:
    return int(self.reachable_blocks.get(engine, self.hit_blocks))

  def new_tokens_on(self, engine: str) -> int:
    """Tokens the prefill computes on `engine`: the misses, and the hit
    blocks it cannot reach."""
    return self.new_tokens + (self.hit_blocks - self.reachable_on(engine)
                              ) * self.block_tokens


@dataclasses.dataclass(frozen=True)
class Placement:
  """A policy's answer for one turn.

  Attributes:
    turn_id: the turn placed.
    policy: name of the policy that decided.
    prefill_engine / decode_engine: engine names.
    paths: one `ReadPath` per hit block, in block order.
    load_done_s: estimated time the last hit block is on the prefill engine.
    ready_s: estimated time the prefill finishes (first token).
  """

  turn_id: str
  policy: str
  prefill_engine: str
  decode_engine: str
  paths: tuple[ReadPath, ...]
  load_done_s: float
  ready_s: float

  def count(self, path: ReadPath) -> int:
    return sum(p == path for p in self.paths)

  def nic_bytes(self, block_bytes: int) -> dict[str, int]:
    """Bytes this placement puts on each engine's storage NIC."""
    out = {}
    n1, n2 = self.count(ReadPath.PE_READ), self.count(ReadPath.DE_READ)
    if n1:
      out[self.prefill_engine] = n1 * block_bytes
    if n2:
      out[self.decode_engine] = out.get(self.decode_engine, 0) + n2 * block_bytes
    return out


@dataclasses.dataclass(frozen=True)
class ClusterSnapshot:
  """All engines at one instant, plus the cost of the path-2 collective hop.

  Attributes:
    now_s: the time the snapshot was taken (from the injected clock).
    engines: every prefill and decode engine; names are unique.
    collective_bytes_per_s: bandwidth of the DE -> PE hop of path 2.
  """

  now_s: float
  engines: tuple[EngineState, ...]
  collective_bytes_per_s: float = math.inf

  def __post_init__(self):
    object.__setattr__(self, "engines", tuple(self.engines))
    names = [e.name for e in self.engines]
    if len(set(names)) != len(names):
      raise ValueError(f"engine names must be unique, got {names}")
    if not any(e.role == PREFILL for e in self.engines):
      raise ValueError("a cluster needs at least one prefill engine")
    if not any(e.role == DECODE for e in self.engines):
      raise ValueError("a cluster needs at least one decode engine")
    _check_positive("cluster", collective_bytes_per_s=self.collective_bytes_per_s)
    _check_real("cluster", "now_s", self.now_s)
    if not math.isfinite(self.now_s):  # every estimate would be inf or NaN
      raise ValueError(f"cluster: now_s must be finite, got {self.now_s!r}")

  @property
  def prefill_engines(self) -> tuple[EngineState, ...]:
    return tuple(e for e in self.engines if e.role == PREFILL)

  @property
  def decode_engines(self) -> tuple[EngineState, ...]:
    return tuple(e for e in self.engines if e.role == DECODE)

  def engine(self, name: str) -> EngineState:
    for e in self.engines:
      if e.name == name:
        return e
    raise ValueError(f"no engine named {name!r}")

  def after(self, placement: Placement, demand: TurnDemand) -> "ClusterSnapshot":
    """The snapshot once `placement` is admitted: its bytes, tokens, blocks charged."""
    if placement.turn_id != demand.turn_id:
      raise ValueError(f"placement is for {placement.turn_id}, "
                       f"demand for {demand.turn_id}")
    self._check_placement(placement, demand)
    nic = placement.nic_bytes(demand.block_bytes)
    pe_blocks = demand.total_blocks - demand.resident_on(placement.prefill_engine)
    engines = []
    for e in self.engines:
      changes = {}
      if e.name in nic:
        changes["nic_queued_bytes"] = e.nic_queued_bytes + nic[e.name]
      if e.name == placement.prefill_engine and math.isfinite(
          e.hot_bytes_per_s):
        hot = placement.count(ReadPath.HOT) * demand.block_bytes
        if hot:
          changes["hot_queued_bytes"] = e.hot_queued_bytes + hot
      if e.name == placement.decode_engine and math.isfinite(
          self.collective_bytes_per_s):
        hop = placement.count(ReadPath.DE_READ) * demand.block_bytes
        if hop:
          changes["hop_queued_bytes"] = e.hop_queued_bytes + hop
      if e.name == placement.prefill_engine:
        changes["queued_tokens"] = e.queued_tokens + demand.new_tokens_on(
            e.name)
        changes["free_hbm_blocks"] = max(0, e.free_hbm_blocks - pe_blocks)
      if e.name == placement.decode_engine:
        changes["queued_tokens"] = e.queued_tokens + demand.max_new_tokens
        changes["free_hbm_blocks"] = max(
            0, e.free_hbm_blocks - demand.decode_blocks)
      engines.append(dataclasses.replace(e, **changes) if changes else e)
    return dataclasses.replace(self, engines=tuple(engines))

  def _check_placement(self, placement: Placement, demand: TurnDemand) -> None:
    """Raises unless `placement` names this cluster's engines in their roles
    and has a path per hit block (else `after` would charge nothing to an
    engine it does not know, and the next turn would see it idle)."""
    for name, role in ((placement.prefill_engine, PREFILL),
                       (placement.decode_engine, DECODE)):
      if self.engine(name).role != role:
        raise ValueError(f"{placement.turn_id}: {name} is not a {role} engine")
    if len(placement.paths) != demand.hit_blocks:
      raise ValueError(f"{placement.turn_id}: {len(placement.paths)} paths "
                       f"for {demand.hit_blocks} hit blocks")
