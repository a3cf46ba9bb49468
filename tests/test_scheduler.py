"""Tests of the placement policies (pure Python; no JAX).

Deterministic scenarios run a tiny event loop with a `ManualClock`: each
storage NIC is a FIFO server at its bandwidth, turns arrive, a policy places
them from a snapshot of the live queues, and we read off when the last load
finishes. Property tests (hypothesis) check the policies' contracts on random
snapshots.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax.scheduler import (ClusterSnapshot, EngineState, ManualClock,
                                    NoCapacityError, ReadPath, TurnDemand,
                                    dualpath, get_policy, oracle, place_all,
                                    single_path)
from dualpath_jax.scheduler.policies import _estimate, estimated_finish

MB = 1 << 20


# ------------------------------------------------------------ tiny event loop
class _FifoNic:
  """A storage NIC as a FIFO server: bytes queue up and drain at `rate`."""

  def __init__(self, rate: float):
    self.rate = rate
    self.busy_until = 0.0
    self.bytes = 0

  def queued_bytes(self, now: float) -> float:
    return max(0.0, self.busy_until - now) * self.rate

  def admit(self, nbytes: int, now: float) -> float:
    self.busy_until = max(self.busy_until, now) + nbytes / self.rate
    self.bytes += nbytes
    return self.busy_until


def _cluster(num_prefill: int, num_decode: int, rate: float):
  nics = {f"P{i}": _FifoNic(rate) for i in range(num_prefill)}
  nics.update({f"D{i}": _FifoNic(rate) for i in range(num_decode)})
  return nics


def _snapshot(nics, now: float) -> ClusterSnapshot:
  return ClusterSnapshot(now_s=now, engines=tuple(
      EngineState(name, "prefill" if name[0] == "P" else "decode",
                  nic_bytes_per_s=nic.rate,
                  nic_queued_bytes=nic.queued_bytes(now))
      for name, nic in nics.items()))


def _run_stream(policy: str, nics, arrivals: list[float], blocks_per_turn: int,
                block_bytes: int) -> float:
  """Places each turn at its arrival; returns when the last load finished."""
  clock = ManualClock()
  finish = 0.0
  for i, t in enumerate(arrivals):
    clock.advance_to(t)
    demand = TurnDemand(f"t{i}", new_tokens=0, hit_blocks=blocks_per_turn,
                        block_bytes=block_bytes, total_blocks=blocks_per_turn)
    placement = get_policy(policy)(demand, _snapshot(nics, clock.now()))
    for name, nbytes in placement.nic_bytes(block_bytes).items():
      finish = max(finish, nics[name].admit(nbytes, clock.now()))
  return finish


def test_dualpath_1p2d_storage_bound_burst_is_3x_faster():
  rate, block, n_turns, blocks = 100 * MB, 2 * MB, 30, 12
  single = _run_stream("single_path", _cluster(1, 2, rate), [0.0] * n_turns,
                       blocks, block)
  nics = _cluster(1, 2, rate)
  dual = _run_stream("dualpath", nics, [0.0] * n_turns, blocks, block)
  total = n_turns * blocks * block
  assert single == pytest.approx(total / rate)
  assert single / dual == pytest.approx(3.0, rel=0.02)
  per_nic = [nic.bytes for nic in nics.values()]
  assert max(per_nic) - min(per_nic) <= blocks * block  # within one turn


def test_dualpath_1p2d_stream_keeps_up_where_single_path_falls_behind():
  # Loads arrive at 2x what one NIC can carry, 2/3 of what three carry.
  rate, block, blocks = 100 * MB, 1 * MB, 10
  gap = blocks * block / rate / 2
  arrivals = [i * gap for i in range(40)]
  single = _run_stream("single_path", _cluster(1, 2, rate), arrivals, blocks,
                       block)
  dual = _run_stream("dualpath", _cluster(1, 2, rate), arrivals, blocks, block)
  last = arrivals[-1]
  assert single - last > 15 * gap  # the backlog grows with every turn
  # No backlog: the last turn only waits for its own blocks, split over the
  # two NICs of its (prefill, decode) pair.
  assert dual - last <= 1.01 * blocks * block / rate / 2
  assert single / dual > 1.9


@pytest.mark.parametrize("num_prefill,num_decode", [(1, 2), (2, 4), (1, 1),
                                                    (2, 1)])
def test_dualpath_uses_every_nic_equally(num_prefill, num_decode):
  rate, block = 50 * MB, MB
  nics = _cluster(num_prefill, num_decode, rate)
  n_nics = num_prefill + num_decode
  dual = _run_stream("dualpath", nics, [0.0] * (12 * n_nics), 8, block)
  total = 12 * n_nics * 8 * block
  assert dual == pytest.approx(total / rate / n_nics, rel=0.02)
  single_nics = _cluster(num_prefill, num_decode, rate)
  single = _run_stream("single_path", single_nics, [0.0] * (12 * n_nics), 8,
                       block)
  assert single == pytest.approx(total / rate / num_prefill, rel=0.02)
  assert all(single_nics[f"D{i}"].bytes == 0 for i in range(num_decode))


def test_dualpath_prefers_idle_nic_and_pays_for_the_hop():
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", 100.0, nic_queued_bytes=1000),
      EngineState("D0", "decode", 100.0)))
  demand = TurnDemand("a", new_tokens=0, hit_blocks=4, block_bytes=100,
                      total_blocks=4)
  p = dualpath(demand, snap)
  assert p.paths == (ReadPath.DE_READ,) * 4
  assert p.load_done_s == pytest.approx(4.0)
  # A slow hop makes path 2 worse than waiting for the PE NIC.
  slow_hop = dataclasses.replace(snap, collective_bytes_per_s=1.0)
  assert dualpath(demand, slow_hop).paths == (ReadPath.PE_READ,) * 4


def test_resident_blocks_need_no_load_and_attract_the_turn():
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", 10.0), EngineState("P1", "prefill", 10.0),
      EngineState("D0", "decode", 10.0)))
  demand = TurnDemand("a", new_tokens=0, hit_blocks=5, block_bytes=10,
                      total_blocks=6, resident_blocks={"P1": 3})
  for policy in (single_path, dualpath):
    p = policy(demand, snap)
    assert p.prefill_engine == "P1"
    assert p.paths[:3] == (ReadPath.RESIDENT,) * 3
    assert ReadPath.RESIDENT not in p.paths[3:]


def test_oracle_ignores_load_costs_but_not_compute():
  snap = ClusterSnapshot(5.0, (
      EngineState("P0", "prefill", 1.0, nic_queued_bytes=1e12,
                  queued_tokens=100, compute_tokens_per_s=100.0),
      EngineState("P1", "prefill", 1e9, queued_tokens=300,
                  compute_tokens_per_s=100.0),
      EngineState("D0", "decode", 1.0, nic_queued_bytes=1e12)))
  demand = TurnDemand("a", new_tokens=50, hit_blocks=7, block_bytes=1 << 30,
                      total_blocks=9)
  p = oracle(demand, snap)
  assert p.paths == (ReadPath.FREE,) * 7
  assert p.prefill_engine == "P0"  # least compute, despite its NIC backlog
  assert p.load_done_s == 5.0
  assert p.ready_s == pytest.approx(5.0 + 1.0 + 0.5)
  assert p.nic_bytes(demand.block_bytes) == {}
  # The baseline must avoid P0's NIC backlog.
  assert single_path(demand, snap).prefill_engine == "P1"


def test_no_capacity_raises_and_place_all_leaves_turn_waiting():
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", 1.0, free_hbm_blocks=10),
      EngineState("D0", "decode", 1.0, free_hbm_blocks=100)))
  big = TurnDemand("big", new_tokens=1, hit_blocks=0, block_bytes=1,
                   total_blocks=11)
  small = TurnDemand("small", new_tokens=1, hit_blocks=0, block_bytes=1,
                     total_blocks=6)
  for name in ("single_path", "dualpath", "oracle"):
    with pytest.raises(NoCapacityError, match="big"):
      get_policy(name)(big, snap)
    placements, after = place_all(name, [small, small.__class__(
        "small2", 1, 0, 1, 6), big], snap)
    assert placements[0] is not None
    assert placements[1] is None  # 10 - 6 = 4 blocks left
    assert placements[2] is None
    assert after.engine("P0").free_hbm_blocks == 4
    assert after.engine("D0").free_hbm_blocks == 94
  decode_full = dataclasses.replace(
      snap, engines=(snap.engines[0],
                     dataclasses.replace(snap.engines[1], free_hbm_blocks=5)))
  with pytest.raises(NoCapacityError, match="decode"):
    dualpath(small, decode_full)


def test_snapshot_after_charges_bytes_tokens_and_blocks():
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", 10.0, queued_tokens=3, free_hbm_blocks=50),
      EngineState("D0", "decode", 10.0, nic_queued_bytes=7, free_hbm_blocks=60),
      EngineState("D1", "decode", 10.0)))
  demand = TurnDemand("a", new_tokens=20, hit_blocks=4, block_bytes=10,
                      total_blocks=8, decode_blocks=12, max_new_tokens=5,
                      resident_blocks={"P0": 1})
  p = dataclasses.replace(
      dualpath(demand, snap), decode_engine="D0",
      paths=(ReadPath.RESIDENT, ReadPath.PE_READ, ReadPath.DE_READ,
             ReadPath.DE_READ))
  after = snap.after(p, demand)
  assert after.engine("P0") == EngineState(
      "P0", "prefill", 10.0, nic_queued_bytes=10, queued_tokens=23,
      free_hbm_blocks=43)
  assert after.engine("D0") == EngineState(
      "D0", "decode", 10.0, nic_queued_bytes=27, queued_tokens=5,
      free_hbm_blocks=48)
  assert after.engine("D1") == snap.engine("D1")
  with pytest.raises(ValueError, match="placement is for"):
    snap.after(p, dataclasses.replace(demand, turn_id="b"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="", role="prefill", nic_bytes_per_s=1.0), "non-empty"),
    (dict(name="X", role="both", nic_bytes_per_s=1.0), "role"),
    (dict(name="X", role="prefill", nic_bytes_per_s=0.0), "nic_bytes_per_s"),
    (dict(name="X", role="prefill", nic_bytes_per_s=1.0, nic_queued_bytes=-1),
     "nic_queued_bytes"),
    (dict(name="X", role="decode", nic_bytes_per_s=math.nan), "nic_bytes"),
])
def test_engine_state_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    EngineState(**kwargs)


def test_bad_demand_snapshot_and_policy_name():
  with pytest.raises(ValueError, match="hit_blocks"):
    TurnDemand("a", new_tokens=1, hit_blocks=5, block_bytes=1, total_blocks=4)
  with pytest.raises(ValueError, match="resident"):
    TurnDemand("a", new_tokens=1, hit_blocks=2, block_bytes=1, total_blocks=4,
               resident_blocks={"P0": 3})
  with pytest.raises(ValueError, match="unique"):
    ClusterSnapshot(0.0, (EngineState("A", "prefill", 1.0),
                          EngineState("A", "decode", 1.0)))
  with pytest.raises(ValueError, match="decode engine"):
    ClusterSnapshot(0.0, (EngineState("A", "prefill", 1.0),))
  with pytest.raises(ValueError, match="unknown scheduler policy"):
    get_policy("random")


def test_manual_clock():
  clock = ManualClock(2.0)
  assert clock.advance(0.5) == 2.5
  assert clock.advance_to(4.0) == 4.0
  with pytest.raises(ValueError):
    clock.advance(-1.0)
  with pytest.raises(ValueError):
    clock.advance_to(3.0)
  assert clock.now() == 4.0


# ---------------------------------------------------------------- properties
_rates = st.sampled_from([1e3, 1e6, 5e6, 1e9, math.inf])


@st.composite
def _scenarios(draw):
  num_prefill = draw(st.integers(1, 3))
  num_decode = draw(st.integers(1, 4))
  engines = []
  for role, n, prefix in (("prefill", num_prefill, "P"),
                          ("decode", num_decode, "D")):
    for i in range(n):
      engines.append(EngineState(
          f"{prefix}{i}", role, nic_bytes_per_s=draw(_rates),
          nic_queued_bytes=draw(st.integers(0, 10**7)),
          queued_tokens=draw(st.integers(0, 5000)),
          compute_tokens_per_s=draw(st.sampled_from([1e3, 1e4, math.inf])),
          free_hbm_blocks=draw(st.integers(64, 256))))
  snap = ClusterSnapshot(draw(st.floats(0, 100)), tuple(engines),
                         collective_bytes_per_s=draw(_rates))
  hit = draw(st.integers(0, 40))
  resident = {f"P{i}": draw(st.integers(0, hit)) for i in range(num_prefill)
              if draw(st.booleans())}
  demand = TurnDemand("t", new_tokens=draw(st.integers(0, 2000)),
                      hit_blocks=hit, block_bytes=draw(st.integers(1, 10**6)),
                      total_blocks=hit + draw(st.integers(0, 20)),
                      resident_blocks=resident)
  return snap, demand


@settings(max_examples=150, deadline=None)
@given(_scenarios())
def test_policy_contracts(scenario):
  snap, demand = scenario
  s, d, o = (single_path(demand, snap), dualpath(demand, snap),
             oracle(demand, snap))
  for p in (s, d, o):
    assert len(p.paths) == demand.hit_blocks
    resident = demand.resident_on(p.prefill_engine)
    assert p.paths[:resident] == (ReadPath.RESIDENT,) * resident
    assert ReadPath.RESIDENT not in p.paths[resident:]
    assert snap.engine(p.prefill_engine).role == "prefill"
    assert snap.engine(p.decode_engine).role == "decode"
    assert p.ready_s >= p.load_done_s >= snap.now_s
  assert ReadPath.DE_READ not in s.paths and ReadPath.FREE not in s.paths
  assert ReadPath.FREE not in d.paths
  assert set(o.paths) <= {ReadPath.RESIDENT, ReadPath.FREE}
  # Shared cost model: more options never estimate worse.
  assert d.ready_s <= s.ready_s * (1 + 1e-12) + 1e-12
  assert o.ready_s <= d.ready_s * (1 + 1e-12) + 1e-12


@settings(max_examples=60, deadline=None)
@given(_scenarios(), st.integers(0, 10**9))
def test_oracle_choice_does_not_depend_on_nic_queues(scenario, extra):
  snap, demand = scenario
  loaded = dataclasses.replace(snap, engines=tuple(
      dataclasses.replace(e, nic_queued_bytes=e.nic_queued_bytes + extra,
                          nic_bytes_per_s=1.0) for e in snap.engines))
  assert oracle(demand, snap) == oracle(demand, loaded)


@settings(max_examples=60, deadline=None)
@given(_scenarios(), st.integers(1, 6))
def test_place_all_never_overcommits_hbm(scenario, copies):
  snap, demand = scenario
  demands = [dataclasses.replace(demand, turn_id=f"t{i}") for i in range(copies)]
  for name in ("single_path", "dualpath", "oracle"):
    placements, after = place_all(name, demands, snap)
    assert len(placements) == copies
    assert all(e.free_hbm_blocks >= 0 for e in after.engines)
    placed = [p for p in placements if p is not None]
    assert estimated_finish(placements) == max(
        (p.ready_s for p in placed), default=-math.inf)
    charged = sum(a.nic_queued_bytes - b.nic_queued_bytes
                  for a, b in zip(after.engines, snap.engines)
                  if math.isfinite(a.nic_queued_bytes))
    expected = sum(sum(p.nic_bytes(demand.block_bytes).values())
                   for p in placed)
    assert charged == pytest.approx(expected)


def test_a_slow_hop_is_a_bandwidth_not_a_delay():
  """Path 2's DE -> PE hop queues: with NICs of 1 GB/s and a hop of
  0.5 GB/s, the two paths together deliver 1.5 GB/s, so `dualpath` sends a
  third of the blocks by path 2 and finishes in total / 1.5 GB/s. (The hop
  used to be a per-block delay: every block was sent by path 2 as if hops
  ran in parallel, and the estimate was 3x too early.)"""
  b, n = 1_000_000, 30
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", nic_bytes_per_s=1e9),
      EngineState("D0", "decode", nic_bytes_per_s=1e9)),
      collective_bytes_per_s=0.5e9)
  demand = TurnDemand("t", new_tokens=1, hit_blocks=n, block_bytes=b,
                      total_blocks=n + 1)
  p = dualpath(demand, snap)
  assert p.count(ReadPath.DE_READ) == n // 3
  # total / 1.5 GB/s, plus the first path-2 block's NIC read (pipeline fill)
  assert p.load_done_s == pytest.approx(n * b / 1.5e9 + b / 1e9, rel=1e-9)
  after = snap.after(p, demand)
  assert after.engine("D0").hop_queued_bytes == n // 3 * b
  assert after.engine("D0").nic_queued_bytes == n // 3 * b
  # A queued hop pushes the next turn's path-2 blocks later.
  q = dualpath(dataclasses.replace(demand, turn_id="u"), after)
  assert q.count(ReadPath.DE_READ) <= n // 3
  with pytest.raises(ValueError, match="hop_queued_bytes"):
    EngineState("D1", "decode", nic_bytes_per_s=1e9, hop_queued_bytes=-1)


def test_hot_tier_blocks_load_over_the_host_link_and_attract_the_turn():
  """Blocks a prefill engine's hot tier holds (after its resident ones) come
  over its host link, on no NIC; the policies prefer the engine holding
  them when that is sooner."""
  b = 1_000_000
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", nic_bytes_per_s=1e9, hot_bytes_per_s=10e9),
      EngineState("P1", "prefill", nic_bytes_per_s=1e9, hot_bytes_per_s=10e9),
      EngineState("D0", "decode", nic_bytes_per_s=1e9)))
  demand = TurnDemand("t", new_tokens=1, hit_blocks=10, block_bytes=b,
                      total_blocks=11, resident_blocks={"P1": 2},
                      hot_blocks={"P1": 8})
  for policy in (single_path, dualpath):
    p = policy(demand, snap)
    assert p.prefill_engine == "P1"
    assert p.paths[:2] == (ReadPath.RESIDENT,) * 2
    assert p.paths[2:8] == (ReadPath.HOT,) * 6  # 8 hot, 2 of them resident
    assert ReadPath.HOT not in p.paths[8:] and len(p.paths) == 10
    assert p.nic_bytes(b) == ({"P1": 2 * b} if policy is single_path else
                              p.nic_bytes(b))
    after = snap.after(p, demand)
    assert after.engine("P1").hot_queued_bytes == 6 * b
  assert oracle(demand, snap).count(ReadPath.HOT) == 0  # loads free anyway
  with pytest.raises(ValueError, match="hot blocks"):
    TurnDemand("t", 1, 3, b, 4, hot_blocks={"P0": 4})
  with pytest.raises(ValueError, match="hot_bytes_per_s"):
    EngineState("P0", "prefill", nic_bytes_per_s=1.0, hot_bytes_per_s=0.0)


def test_a_hot_link_backlog_delays_the_hot_blocks_and_can_send_the_turn_away():
  """Hot blocks wait behind the bytes already admitted to the engine's host
  link (`hot_queued_bytes`), as NIC reads wait behind the NIC's queue: 6 hot
  blocks behind a 20 GB backlog at 10 GB/s land 2 s after the backlog
  started, later than P0 reads all 8 from storage, so the turn goes there."""
  b = 1_000_000
  demand = TurnDemand("t", new_tokens=1, hit_blocks=8, block_bytes=b,
                      total_blocks=9, hot_blocks={"P1": 6})
  idle = ClusterSnapshot(1.0, (
      EngineState("P0", "prefill", nic_bytes_per_s=1e9),
      EngineState("P1", "prefill", nic_bytes_per_s=1e9, hot_bytes_per_s=10e9),
      EngineState("D0", "decode", nic_bytes_per_s=1e9)))
  busy = dataclasses.replace(idle, engines=(
      idle.engines[0],
      dataclasses.replace(idle.engines[1], hot_queued_bytes=20e9),
      idle.engines[2]))
  for policy in (single_path, dualpath):
    assert policy(demand, idle).prefill_engine == "P1"
    p = policy(demand, busy)
    assert p.prefill_engine == "P0" and ReadPath.HOT not in p.paths
  pe, de = busy.engine("P1"), busy.engine("D0")
  paths, load_done, _ = _estimate(demand, busy, pe, de, "single_path")
  assert paths.count(ReadPath.HOT) == 6
  assert load_done == pytest.approx(1.0 + (20e9 + 6 * b) / 10e9)


def test_resident_blocks_need_no_free_hbm():
  """A prefill engine needs free HBM only for the blocks it does not hold:
  P1 holds 3 of the turn's 6 and has 3 free, so it takes the turn (P0 has
  room but would load them), and alone it is not out of capacity."""
  demand = TurnDemand("a", new_tokens=0, hit_blocks=5, block_bytes=10,
                      total_blocks=6, resident_blocks={"P1": 3})
  p1 = EngineState("P1", "prefill", 10.0, free_hbm_blocks=3)
  snap = ClusterSnapshot(0.0, (EngineState("P0", "prefill", 10.0), p1,
                               EngineState("D0", "decode", 10.0)))
  alone = ClusterSnapshot(0.0, (p1, EngineState("D0", "decode", 10.0)))
  for policy in (single_path, dualpath):
    assert policy(demand, snap).prefill_engine == "P1"
    assert policy(demand, alone).prefill_engine == "P1"
  full = dataclasses.replace(p1, free_hbm_blocks=2)
  with pytest.raises(NoCapacityError):
    dualpath(demand, ClusterSnapshot(0.0, (full, EngineState("D0", "decode", 10.0))))
