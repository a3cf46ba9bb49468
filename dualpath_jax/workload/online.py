"""Open-loop online replay: agents arrive at a rate, whatever the engine does.

An online service does not choose when agents arrive. Here session `i`
("agent") starts at an arrival time drawn from a Poisson process of the
offered rate (seeded) or spaced evenly, independent of completions; within a
session each turn still waits for its previous turn (plus the recorded tool
wait when `honor_gaps`), as a real agent does. The loop itself is
`replay.replay_sessions` with per-session start offsets, so offline and
online replay share one implementation.

While it runs, a `SeriesSampler` records the engine's counters every step
(or every `sample_every_s`): waiting and running turns, blocks loaded per
path, and per engine storage-NIC bytes, backlog and the rate at which bytes
passed the NIC (cumulative counters turned into rates between samples).
Nothing here does I/O beyond driving the engine; `launch.bench_online` runs
it per policy and rate and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from dualpath_jax.metrics import TurnRecord
from dualpath_jax.workload.replay import replay_sessions
from dualpath_jax.workload.trace import AgentSession

ARRIVALS = ("poisson", "uniform")


def arrival_offsets(n: int, rate: float, process: str = "poisson",
                    seed: int = 0) -> list[float]:
  """Start times (s) of `n` sessions offered at `rate` agents/s; the first at 0.

  "poisson": exponential gaps from a generator seeded with `seed`, scaled
  so that their mean is exactly `1/rate` (the last session starts at
  `(n - 1) / rate`, as with "uniform"): a Poisson process conditioned on
  its count, so the run is offered the rate it is labelled with. Unscaled,
  32 sessions' draws arrived at 0.76-1.14x the label, and a sweep's
  headline overstated its rate by as much. The same seed gives the same
  times at every rate, scaled. "uniform": one session every `1/rate` s.
  """
  if process not in ARRIVALS:
    raise ValueError(f"arrival process must be one of {ARRIVALS}, got {process!r}")
  if not (rate > 0 and math.isfinite(rate)):
    raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
  if n < 1:
    return []
  if process == "uniform":
    gaps = np.full(n - 1, 1.0 / rate)
  else:
    draws = np.random.default_rng(seed).exponential(1.0, size=n - 1)
    gaps = draws * ((n - 1) / rate / draws.sum())
  return [0.0] + np.cumsum(gaps).tolist()


class SeriesSampler:
  """Samples an engine's counters over time (the `on_tick` of the replay).

  Works on a `PDCluster` (NICs and paths) and on a single `Engine` (queue
  lengths and cold-tier loads only): every counter it cannot find is left
  out. A NIC's `passed_bytes` are the bytes admitted minus its backlog, so
  `util` (passed bytes per second over the NIC's rate, between two samples)
  stays within [0, 1] give or take the bucket's burst.
  """

  def __init__(self, engine, every_s: float = 0.0):
    self.engine = engine
    self.every_s = every_s
    self.rows: list[dict[str, Any]] = []
    self._prev_passed: dict[str, float] = {}

  def __call__(self, t: float) -> None:
    if self.rows and t - self.rows[-1]["t"] < self.every_s:
      return
    self.rows.append(self.sample(t))

  def sample(self, t: float) -> dict[str, Any]:
    e = self.engine
    row: dict[str, Any] = {"t": t,
                           "waiting": getattr(e, "num_waiting", None),
                           "running": getattr(e, "num_running", None)}
    paths = getattr(e.stats, "path_blocks", None)
    if paths is not None:
      row["path_blocks"] = dict(paths)
    cold = getattr(e, "cold_tier", None)
    if cold is not None and hasattr(cold, "stats"):
      row["cold_loaded_blocks"] = getattr(cold.stats, "loaded_blocks", None)
    if hasattr(e, "nic_stats"):
      dt = t - self.rows[-1]["t"] if self.rows else 0.0
      nics = {}
      for name, s in e.nic_stats().items():
        passed = s["bytes"] - s.get("queued_bytes", 0.0)
        rate = ((passed - self._prev_passed.get(name, 0.0)) / dt
                if dt > 0 else 0.0)
        self._prev_passed[name] = passed
        cap = s.get("bytes_per_s", math.inf)
        nics[name] = {
            "bytes": s["bytes"], "passed_bytes": passed,
            "queued_bytes": s.get("queued_bytes", 0.0),
            "planned_bytes": s.get("planned_bytes", 0),
            "passed_bytes_per_s": rate,
            "util": rate / cap if math.isfinite(cap) else None}
      row["nics"] = nics
    return row


@dataclasses.dataclass
class OnlineResult:
  """One open-loop run: per-turn records, the time series, what was offered."""

  records: list[TurnRecord]
  series: list[dict[str, Any]]
  wall_s: float
  truncated_sessions: dict[str, str]
  offered_rate: float
  arrivals: dict[str, float]  # session_id -> start offset (s)


def run_online(engine, tokenizer, sessions: Sequence[AgentSession], *,
               rate: float, arrival: str = "poisson", seed: int = 0,
               reply_mode: str = "generate", max_new_tokens: int = 32,
               honor_gaps: bool = True, sample_every_s: float = 0.0,
               on_turn: Callable[[TurnRecord], None] | None = None,
               clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep) -> OnlineResult:
  """Drives `engine` with `sessions` arriving open-loop at `rate` agents/s.

  Sessions arrive in the order given. Returns when every turn finished (or
  its session ended early: context too long, see `replay_sessions`).
  """
  starts = arrival_offsets(len(sessions), rate, arrival, seed)
  sampler = SeriesSampler(engine, sample_every_s)
  sampler(0.0)
  result = replay_sessions(engine, tokenizer, sessions, reply_mode=reply_mode,
                           max_new_tokens=max_new_tokens,
                           honor_gaps=honor_gaps, on_turn=on_turn,
                           start_s=starts, on_tick=sampler, clock=clock,
                           sleep=sleep)
  if sampler.rows[-1]["t"] < result.wall_s:
    sampler.rows.append(sampler.sample(result.wall_s))  # the final counters
  return OnlineResult(
      records=result.records, series=sampler.rows, wall_s=result.wall_s,
      truncated_sessions=result.truncated_sessions, offered_rate=rate,
      arrivals={s.session_id: t for s, t in zip(sessions, starts)})
