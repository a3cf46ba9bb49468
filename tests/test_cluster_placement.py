"""The scheduler's inputs built from the engines (`engine.cluster_placement`).

The functions only read pools, hot tiers and NIC counters, so fakes with
those few calls stand in for engines here: no model, no JAX.
"""

import dataclasses
import math

import pytest

from dualpath_jax.engine.cluster_placement import (cluster_snapshot,
                                                   host_buffer_run,
                                                   prefilling_the_next_block,
                                                   turn_demand)
from dualpath_jax.scheduler import ReadPath
from dualpath_jax.scheduler.state import DECODE, PREFILL

BS = 16


class _Pool:
  """`BlockPool.lookup`/`ref_count`/`num_free` over a dict id -> refcount."""

  def __init__(self, cached: dict[bytes, int], num_free: int = 100):
    self._ids = list(cached)
    self._refs = cached
    self.num_free = num_free

  def lookup(self, block_id):
    return self._ids.index(block_id) if block_id in self._refs else None

  def ref_count(self, block):
    return self._refs[self._ids[block]]


class _HotTier:

  def __init__(self, ids):
    self._ids = set(ids)

  def leading_run(self, chain):
    n = 0
    while n < len(chain) and chain[n] in self._ids:
      n += 1
    return n


class _Nic:

  def __init__(self, rate, backlog):
    self.bytes_per_s, self._backlog = rate, backlog

  def backlog_bytes(self):
    return self._backlog


@dataclasses.dataclass
class _Req:
  prompt_tokens: list
  max_new_tokens: int


@dataclasses.dataclass
class _Turn:
  req: _Req
  chain: list | None = None
  decode: object = None
  rid: str = "t"

  @property
  def prefill_target(self):
    return len(self.req.prompt_tokens)


class _Worker:

  def __init__(self, name, role, pool, hot=None, nic=None, queued=0,
               running=(), turns=()):
    self.name, self.role, self.hot_tier = name, role, hot
    self.manager = type("M", (), {"pool": pool})()
    self.nic = nic or _Nic(1e9, 0)
    self.running = list(running)
    self._queued, self._turns = queued, list(turns)

  def queued_tokens(self):
    return self._queued

  def prefill_turns(self):
    return self._turns


CHAIN = [bytes([i]) * 4 for i in range(6)]


def test_turn_demand_runs_per_engine():
  """P0 holds 2 blocks (one unreferenced) and its hot tier the next 2; P1
  holds 1; the store holds blocks 1-4, so P1 reaches 5 and P0 reaches 5
  (resident 2, hot to 4, stored 4); block 5 is stored nowhere."""
  p0 = _Worker("P0", PREFILL, _Pool({CHAIN[0]: 0, CHAIN[1]: 2}),
               hot=_HotTier(CHAIN[2:4]))
  p1 = _Worker("P1", PREFILL, _Pool({CHAIN[0]: 1}))
  in_store = [False, True, True, True, True, False]
  turn = _Turn(_Req(list(range(6 * BS + 5)), max_new_tokens=40))
  demand, taken = turn_demand(turn, CHAIN, in_store, [p0, p1], block_size=BS,
                              block_bytes=1000)
  assert taken == {"P0": 1, "P1": 0}
  assert demand.resident_blocks == {"P0": 2, "P1": 1}
  assert demand.hot_blocks == {"P0": 4}
  assert demand.reachable_blocks == {"P0": 5, "P1": 5}
  assert demand.hit_blocks == 5
  assert demand.new_tokens == 6 * BS + 5 - 5 * BS
  assert demand.total_blocks == 7
  assert demand.decode_blocks == math.ceil((6 * BS + 5 + 40) / BS)
  assert demand.block_tokens == BS and demand.block_bytes == 1000


def test_turn_demand_stops_at_the_first_gap():
  """A block the store lacks ends the run even if later ones are stored."""
  p0 = _Worker("P0", PREFILL, _Pool({}))
  in_store = [True, False, True, True, True, True]
  turn = _Turn(_Req(list(range(7 * BS)), max_new_tokens=1))
  demand, _ = turn_demand(turn, CHAIN, in_store, [p0], block_size=BS,
                          block_bytes=1)
  assert demand.hit_blocks == 1 and demand.reachable_blocks == {"P0": 1}


def test_snapshot_counts_turns_headed_to_a_decode_engine():
  d0 = _Worker("D0", DECODE, _Pool({}, num_free=50), nic=_Nic(2e9, 7),
               queued=3, running=["a"])
  d1 = _Worker("D1", DECODE, _Pool({}, num_free=60), queued=0)
  headed = [_Turn(_Req([0], 10), decode=d0), _Turn(_Req([0], 5), decode=d0)]
  p0 = _Worker("P0", PREFILL, _Pool({}, num_free=40), queued=9, turns=headed)
  snap = cluster_snapshot([p0, d0, d1], headed, now=1.5, max_batch_size=4,
                          prefill_tokens_per_s=1000.0, taken={"P0": 5})
  by = {e.name: e for e in snap.engines}
  assert snap.now_s == 1.5
  assert by["P0"].free_hbm_blocks == 35 and by["P0"].queued_tokens == 9
  assert by["P0"].compute_tokens_per_s == 1000.0
  assert by["D0"].queued_tokens == 3 + 15 and by["D1"].queued_tokens == 0
  assert by["D0"].free_hbm_blocks == 50  # 1 running + 2 headed < 4
  assert by["D0"].nic_bytes_per_s == 2e9 and by["D0"].nic_queued_bytes == 7
  assert by["D0"].compute_tokens_per_s == math.inf
  full = cluster_snapshot([p0, d0, d1], headed, now=0.0, max_batch_size=3,
                          prefill_tokens_per_s=1.0)
  assert {e.name: e.free_hbm_blocks for e in full.engines} == {
      "P0": 40, "D0": 0, "D1": 60}  # D0's batch is full: it takes none


def test_a_turn_waits_only_for_a_kept_prefix():
  other = _Turn(_Req([0], 1), chain=CHAIN[:4])
  keeps = _Worker("P0", PREFILL, _Pool({}), turns=[other])
  assert prefilling_the_next_block(CHAIN, 2, [keeps],
                                   prefill_keeps_prefix=True)
  # The other turn computes only blocks 0-3: block 4 is not its.
  assert not prefilling_the_next_block(CHAIN, 4, [keeps],
                                       prefill_keeps_prefix=True)
  assert not prefilling_the_next_block(CHAIN, 6, [keeps],
                                       prefill_keeps_prefix=True)
  # An engine that frees the prefix at the move keeps nothing to find ...
  assert not prefilling_the_next_block(CHAIN, 2, [keeps],
                                       prefill_keeps_prefix=False)
  # ... unless its hot tier takes the blocks.
  hot = _Worker("P0", PREFILL, _Pool({}), hot=_HotTier([]), turns=[other])
  assert prefilling_the_next_block(CHAIN, 2, [hot],
                                   prefill_keeps_prefix=False)
  forked = _Turn(_Req([0], 1), chain=CHAIN[:2] + [b"x" * 4, b"y" * 4])
  differs = _Worker("P0", PREFILL, _Pool({}), turns=[forked])
  assert not prefilling_the_next_block(CHAIN, 2, [differs],
                                       prefill_keeps_prefix=True)


@pytest.mark.parametrize("paths, run, limit, expected", [
    ([ReadPath.PE_READ] * 5, 5, 3, 3),
    ([ReadPath.DE_READ] * 2 + [ReadPath.PE_READ] * 3, 5, 3, 5),
    ([ReadPath.DE_READ] * 4 + [ReadPath.PE_READ], 5, 3, 3),
    ([ReadPath.DE_READ] * 2, 6, 3, 5),  # blocks past `paths` go by path 1
    ([1, 2, 1, 2], 4, 2, 4),  # plain ints as the policies return them
    ([], 0, 1, 0),
])
def test_host_buffer_run(paths, run, limit, expected):
  assert host_buffer_run(paths, run, limit) == expected
