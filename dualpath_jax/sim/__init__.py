"""Cluster-scale discrete-event simulator that drives the real scheduler.

  cost_model  `CostModel`: seconds of a prefill, a decode step, bytes of a
              block, HBM blocks of an engine, from the model's shape and a
              `GpuSpec` (H100 / H200 presets)
  workload    `SimSession` / `SimTurn`: agents as token counts; seeded
              long-context sessions, or a trace's
  simulator   `simulate`: the placement policies and prefill batching of
              `dualpath_jax.scheduler` on a `SimConfig` cluster (FIFO
              storage NICs, path-2 hops, hand-offs, HBM, continuous decode)
  report      run dicts, tables and plots (`launch.simulate`)

No JAX, no I/O: a simulated run of thousands of turns takes about a second.
"""

from __future__ import annotations

from dualpath_jax.sim.cost_model import GPUS, CostModel, GpuSpec, get_gpu
from dualpath_jax.sim.simulator import SimConfig, SimResult, Simulator, simulate
from dualpath_jax.sim.workload import (SimSession, SimTurn, sessions_from_trace,
                                       synthetic_sessions)

__all__ = [
    "CostModel",
    "GPUS",
    "GpuSpec",
    "SimConfig",
    "SimResult",
    "SimSession",
    "SimTurn",
    "Simulator",
    "get_gpu",
    "sessions_from_trace",
    "simulate",
    "synthetic_sessions",
]
