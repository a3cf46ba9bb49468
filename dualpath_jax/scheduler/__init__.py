"""Placement and batching policies: pure Python, no JAX, no I/O, injected clock.

The real runtime and the simulator call the same code; only the clock and the
cost of each action differ.

  clock      the `Clock` protocol, a wall clock and a manual clock for tests
  state      frozen snapshots of the cluster (`EngineState`, `ClusterSnapshot`)
             and of a turn's demand (`TurnDemand`); `Placement`, `ReadPath`
  policies   `single_path`, `dualpath`, `oracle`: (turn, snapshot) -> Placement
  batching   which waiting turns join an engine's next prefill batch
"""

from __future__ import annotations

from dualpath_jax.scheduler.batching import WaitingTurn, choose_prefill_batch
from dualpath_jax.scheduler.clock import Clock, ManualClock, WallClock
from dualpath_jax.scheduler.policies import (POLICIES, NoCapacityError,
                                             dualpath, get_policy, oracle,
                                             place_all, single_path)
from dualpath_jax.scheduler.state import (ClusterSnapshot, EngineState,
                                          Placement, ReadPath, TurnDemand)

__all__ = [
    "Clock",
    "ClusterSnapshot",
    "EngineState",
    "ManualClock",
    "NoCapacityError",
    "POLICIES",
    "Placement",
    "ReadPath",
    "TurnDemand",
    "WaitingTurn",
    "WallClock",
    "choose_prefill_batch",
    "dualpath",
    "get_policy",
    "oracle",
    "place_all",
    "single_path",
]
