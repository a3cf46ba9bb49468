"""Placement policies: (turn demand, cluster snapshot) -> `Placement`.

Every policy is a pure function of its inputs. All three share one cost model
(`_estimate`), so their choices are comparable:

* a hit block read through an engine's storage NIC finishes when that NIC's
  queue (bytes already admitted, then this turn's earlier blocks) has drained
  at the NIC's bandwidth; a path-2 block then crosses the DE -> PE hop, a
  link of its own bandwidth with its own queue (hops queue behind each
  other: a hop slower than the NIC is the path's bottleneck);
* the prefill can start when the engine's queued compute is done and finishes
  `new_tokens / compute_tokens_per_s` later, but not before its last hit block
  has arrived (loading is overlapped with compute, layer by layer);
* an engine is eligible only if it has the free HBM blocks the turn needs;
* blocks a prefill engine holds in its host-DRAM hot tier (after those
  resident in its HBM) come over its host link, on no NIC (`ReadPath.HOT`);
* hit blocks another prefill engine holds and this one cannot load (not
  stored) are computed on it (`ReadPath.RECOMPUTE`), which the estimate
  charges as prefill tokens.

Policies (selectable by name: the launchers' `--policy`, `simulate`'s and
`bench_online`'s `--policies`):

* `single_path`: the baseline. Every hit block is read through the prefill
  engine's NIC (path 1); the prefill engine minimises the estimated finish;
  the decode engine is the least loaded one.
* `dualpath`: for every (prefill, decode) pair, each hit block takes whichever
  of path 1 (PE NIC) or path 2 (DE NIC + hop) finishes it sooner, given the
  queues; the pair with the earliest estimated finish wins (ties: the less
  loaded decode engine). With equal block sizes this per-block greedy choice
  is the optimal split of the pair's load between its two NICs, so `dualpath`
  is never estimated worse than `single_path` on the same snapshot.
* `oracle`: loads cost nothing (`ReadPath.FREE`); only compute and HBM
  matter; the (prefill, decode) pair is searched as `dualpath` searches it.
  What load paths could buy at best under the same placement rule (not a
  global optimum: placement is greedy, turn by turn).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from dualpath_jax.scheduler.state import (ClusterSnapshot, EngineState,
                                          Placement, ReadPath, TurnDemand)

Policy = Callable[[TurnDemand, ClusterSnapshot], Placement]


class NoCapacityError(RuntimeError):
  """No engine has the free HBM the turn needs now; retry after some finish."""


def _estimate(demand: TurnDemand, snap: ClusterSnapshot, pe: EngineState,
              de: EngineState, mode: str) -> tuple[tuple[ReadPath, ...], float, float]:
  """Per-block paths, load-done time and prefill-done time for one pair."""
  now = snap.now_s
  resident = demand.resident_on(pe.name)
  b = demand.block_bytes
  paths = [ReadPath.RESIDENT] * resident
  to_load = demand.reachable_on(pe.name) - resident
  load_done = now
  if mode == "oracle":
    paths += [ReadPath.FREE] * to_load
  else:
    # Blocks in the prefill engine's host-DRAM hot tier come over its host
    # link (PCIe), on no NIC; the rest by path 1 or 2.
    hot = max(0, demand.hot_on(pe.name) - resident)
    if hot:
      paths += [ReadPath.HOT] * hot
      load_done = now + (pe.hot_queued_bytes + hot * b) / pe.hot_bytes_per_s
      to_load -= hot
    t_pe = now + pe.nic_drain_s()
    t_de = now + de.nic_drain_s()
    t_hop = now + de.hop_queued_bytes / snap.collective_bytes_per_s
    step_pe = b / pe.nic_bytes_per_s
    step_de = b / de.nic_bytes_per_s
    hop = b / snap.collective_bytes_per_s
    for _ in range(to_load):
      via_pe = t_pe + step_pe
      via_de = max(t_hop, t_de + step_de) + hop
      if mode == "dualpath" and via_de < via_pe:
        t_de += step_de
        t_hop = via_de
        paths.append(ReadPath.DE_READ)
        load_done = max(load_done, via_de)
      else:
        t_pe = via_pe
        paths.append(ReadPath.PE_READ)
        load_done = max(load_done, via_pe)
  # Hit blocks only another engine holds: computed here.
  paths += [ReadPath.RECOMPUTE] * (demand.hit_blocks - len(paths))
  compute_free = now + pe.compute_wait_s()
  ready = (max(load_done, compute_free) +
           demand.new_tokens_on(pe.name) / pe.compute_tokens_per_s)
  return tuple(paths), load_done, ready


def _queue_with(demand: TurnDemand, pe: EngineState) -> int:
  """Tokens queued on prefill engine `pe` once the turn is placed there:
  the tie-break when compute is not modelled (an infinite rate), so a turn
  goes where its prefix is rather than recompute it on an idler engine."""
  return pe.queued_tokens + demand.new_tokens_on(pe.name)


def _eligible_prefill(demand: TurnDemand,
                      snap: ClusterSnapshot) -> list[EngineState]:
  out = [e for e in snap.prefill_engines
         if e.free_hbm_blocks >= demand.total_blocks - demand.resident_on(e.name)]
  if not out:
    raise NoCapacityError(
        f"{demand.turn_id}: no prefill engine has "
        f"{demand.total_blocks} free HBM blocks (free: "
        f"{ {e.name: e.free_hbm_blocks for e in snap.prefill_engines} })")
  return out


def _eligible_decode(demand: TurnDemand,
                     snap: ClusterSnapshot) -> list[EngineState]:
  out = [e for e in snap.decode_engines
         if e.free_hbm_blocks >= demand.decode_blocks]
  if not out:
    raise NoCapacityError(
        f"{demand.turn_id}: no decode engine has {demand.decode_blocks} free "
        f"HBM blocks (free: "
        f"{ {e.name: e.free_hbm_blocks for e in snap.decode_engines} })")
  return out


def _least_loaded(engines: Sequence[EngineState]) -> EngineState:
  return min(engines, key=lambda e: (e.queued_tokens, e.name))


def _place_fixed_decode(demand: TurnDemand, snap: ClusterSnapshot,
                        mode: str) -> Placement:
  de = _least_loaded(_eligible_decode(demand, snap))
  best = None
  for pe in _eligible_prefill(demand, snap):
    paths, load_done, ready = _estimate(demand, snap, pe, de, mode)
    key = (ready, load_done, _queue_with(demand, pe), pe.name)
    if best is None or key < best[0]:
      best = (key, Placement(demand.turn_id, mode, pe.name, de.name, paths,
                             load_done, ready))
  return best[1]


def single_path(demand: TurnDemand, snap: ClusterSnapshot) -> Placement:
  """Baseline: every hit block through the prefill engine's NIC (path 1)."""
  return _place_fixed_decode(demand, snap, "single_path")


def _place_any_pair(demand: TurnDemand, snap: ClusterSnapshot,
                    mode: str) -> Placement:
  best = None
  decode = _eligible_decode(demand, snap)
  for pe in _eligible_prefill(demand, snap):
    for de in decode:
      paths, load_done, ready = _estimate(demand, snap, pe, de, mode)
      key = (ready, load_done, de.queued_tokens, _queue_with(demand, pe),
             pe.name, de.name)
      if best is None or key < best[0]:
        best = (key, Placement(demand.turn_id, mode, pe.name, de.name,
                               paths, load_done, ready))
  return best[1]


def oracle(demand: TurnDemand, snap: ClusterSnapshot) -> Placement:
  """Loads cost nothing; compute and HBM still count; pairs as `dualpath`."""
  return _place_any_pair(demand, snap, "oracle")


def dualpath(demand: TurnDemand, snap: ClusterSnapshot) -> Placement:
  """Adaptive: per block, the NIC (PE's or DE's) that delivers it first."""
  return _place_any_pair(demand, snap, "dualpath")


POLICIES: dict[str, Policy] = {
    "single_path": single_path,
    "dualpath": dualpath,
    "oracle": oracle,
}


def get_policy(name: str) -> Policy:
  """The policy called `name` (a key of `POLICIES`)."""
  try:
    return POLICIES[name]
  except KeyError:
    raise ValueError(
        f"unknown scheduler policy {name!r}; choose one of {sorted(POLICIES)}"
    ) from None


def place_all(policy: Policy | str, demands: Sequence[TurnDemand],
              snap: ClusterSnapshot
              ) -> tuple[list[Placement | None], ClusterSnapshot]:
  """Places turns in order, charging each placement before the next.

  Returns one entry per demand (None where no engine had the HBM: the turn
  waits) and the snapshot with every placement charged.
  """
  fn = get_policy(policy) if isinstance(policy, str) else policy
  out: list[Placement | None] = []
  for demand in demands:
    try:
      placement = fn(demand, snap)
    except NoCapacityError:
      out.append(None)
      continue
    snap = snap.after(placement, demand)
    out.append(placement)
  return out, snap


def estimated_finish(placements: Sequence[Placement | None]) -> float:
  """Latest `ready_s` of the placed turns (-inf if none was placed)."""
  return max((p.ready_s for p in placements if p is not None),
             default=-math.inf)
