"""Placement of a turn whose prefix one prefill engine holds and no other can
load (`TurnDemand.reachable_blocks`, `ReadPath.RECOMPUTE`): the n samples of
one prompt, whose first sample prefilled it on one engine and whose blocks
are not stored. Pure Python; no JAX."""

from __future__ import annotations

import math

import pytest

from dualpath_jax.scheduler import (ClusterSnapshot, EngineState, ReadPath,
                                    TurnDemand, get_policy)

BS = 16
MB = 1 << 20


def _snapshot(queued: dict[str, int], rate: float = math.inf
              ) -> ClusterSnapshot:
  engines = [EngineState(name, "prefill", nic_bytes_per_s=1e9,
                         queued_tokens=q, compute_tokens_per_s=rate)
             for name, q in queued.items()]
  engines.append(EngineState("D0", "decode", nic_bytes_per_s=1e9))
  return ClusterSnapshot(now_s=0.0, engines=tuple(engines))


def _held_by_p0(reach_p1: int = 0) -> TurnDemand:
  """9 hit blocks resident on P0 only; P1 reaches `reach_p1` of them."""
  return TurnDemand("s2", new_tokens=2, hit_blocks=9, block_bytes=MB,
                    total_blocks=10, resident_blocks={"P0": 9, "P1": 0},
                    reachable_blocks={"P0": 9, "P1": reach_p1},
                    block_tokens=BS)


@pytest.mark.parametrize("policy", ["single_path", "dualpath", "oracle"])
@pytest.mark.parametrize("rate", [math.inf, 1000.0])
def test_a_turn_goes_where_its_prefix_is(policy, rate):
  """P0 holds the prefix and has a short queue; P1 is idle but would
  compute the 9 blocks: with a finite rate the estimate says so, with an
  infinite one the queue-with-the-turn tie-break does (2 + 2 < 0 + 146)."""
  placement = get_policy(policy)(_held_by_p0(), _snapshot({"P0": 2, "P1": 0},
                                                          rate))
  assert placement.prefill_engine == "P0"
  assert placement.paths == (ReadPath.RESIDENT,) * 9


def test_an_engine_that_cannot_reach_the_blocks_recomputes_them():
  demand = _held_by_p0(reach_p1=0)
  snap = _snapshot({"P1": 0}, rate=1000.0)  # only P1 can take the turn
  placement = get_policy("dualpath")(demand, snap)
  assert placement.prefill_engine == "P1"
  assert placement.paths == (ReadPath.RECOMPUTE,) * 9
  assert placement.nic_bytes(MB) == {}  # nothing is read
  assert demand.new_tokens_on("P1") == 2 + 9 * BS
  assert placement.ready_s == pytest.approx((2 + 9 * BS) / 1000.0)
  after = snap.after(placement, demand)
  assert after.engine("P1").queued_tokens == 2 + 9 * BS


def test_blocks_it_can_load_are_read_and_the_rest_recomputed():
  demand = _held_by_p0(reach_p1=4)  # e.g. the store holds the first 4
  snap = _snapshot({"P1": 0}, rate=1000.0)
  placement = get_policy("single_path")(demand, snap)
  assert placement.paths == (ReadPath.PE_READ,) * 4 + (ReadPath.RECOMPUTE,) * 5
  assert placement.nic_bytes(MB) == {"P1": 4 * MB}
  assert demand.new_tokens_on("P1") == 2 + 5 * BS
  assert demand.new_tokens_on("P0") == 2 == demand.new_tokens_on("P9")


@pytest.mark.parametrize("kw,match", [
    ({"reachable_blocks": {"P0": 10}}, "outside"),
    ({"reachable_blocks": {"P0": 2}, "resident_blocks": {"P0": 3}}, "outside"),
    ({"reachable_blocks": {"P0": 2}}, "needs block_tokens"),
    ({"reachable_blocks": {"P0": -1}, "block_tokens": BS}, "reachable_blocks"),
    ({"block_tokens": -1}, "block_tokens"),
])
def test_bad_reachable_counts_are_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    TurnDemand("t", new_tokens=1, hit_blocks=9, block_bytes=MB,
               total_blocks=10, **kw)
