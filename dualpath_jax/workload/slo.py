"""TTFT SLO evaluation of open-loop runs: attainment, keeping up, agents/s.

Pure functions of the turn records (no engine, no I/O), so the criterion is
tested on hand-made records.

One run at an offered rate passes when

* the `percentile`-th TTFT is within `ttft_s` (and, with `tpot_s`, the
  `percentile`-th TPOT within it), and
* the engine keeps up: agents complete about as fast as they arrived. With a
  finite set of agents, "as fast" compares spans: the *arrival rate* is
  `(n - 1) / (last start - first start)`, the *achieved rate* is
  `(n - 1) / (last agent's end - first agent's end)`. An engine that keeps
  up ends agents spaced like their arrivals (achieved ~ arrival rate); an
  overloaded one ends them at its own, lower, service rate while the queue
  grows. The run keeps up when achieved >= `keep_up` x arrival rate. Comparing
  against the realised arrival rate rather than the nominal one removes the
  Poisson sampling noise of a short run. With one agent it trivially keeps up.

The *sustained rate* of a policy is the highest tested rate that passed with
every lower tested rate passing too (a fluke pass above a failure does not
count). *Goodput*: in agents/s, the achieved rate times the fraction of
agents all of whose turns met the TTFT (and TPOT) SLO; in turns/s, the turns
that met it per second of the run's span (first arrival to last end).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from dualpath_jax.metrics import PERCENTILES, TurnRecord, percentiles


@dataclasses.dataclass(frozen=True)
class SloSpec:
  """The service-level objective one run is judged by."""

  ttft_s: float
  percentile: int = 90
  tpot_s: float | None = None
  keep_up: float = 0.9

  def __post_init__(self):
    if not self.ttft_s > 0:
      raise ValueError(f"SLO ttft_s must be > 0, got {self.ttft_s!r}")
    if not (isinstance(self.percentile, int)
            and not isinstance(self.percentile, bool)  # True would key "pTrue"
            and 1 <= self.percentile <= 100):
      raise ValueError(
          f"SLO percentile must be an int in [1, 100], got {self.percentile!r}")
    if self.tpot_s is not None and not self.tpot_s > 0:
      raise ValueError(f"SLO tpot_s must be > 0, got {self.tpot_s!r}")
    if not 0 < self.keep_up <= 1:
      raise ValueError(f"keep_up must be in (0, 1], got {self.keep_up!r}")


def _rate(n: int, span: float) -> float | None:
  if n < 2:
    return None
  return (n - 1) / span if span > 0 else math.inf


def _meets(r: TurnRecord, slo: SloSpec) -> bool:
  if r.ttft_s > slo.ttft_s:
    return False
  tpot = r.tpot_s
  return slo.tpot_s is None or tpot is None or tpot <= slo.tpot_s


def evaluate_run(records: Sequence[TurnRecord], arrivals: Mapping[str, float],
                 offered_rate: float, slo: SloSpec) -> dict[str, Any]:
  """The SLO numbers of one run (see the module docstring).

  `arrivals` maps each session to its start offset, on the records' clock;
  sessions without records (ended before their first turn) are left out.
  """
  ps = sorted(set(PERCENTILES) | {slo.percentile})
  key = f"p{slo.percentile}"
  ttft = percentiles([r.ttft_s for r in records], ps)
  tpot = percentiles([r.tpot_s for r in records], ps)
  ends: dict[str, float] = {}
  good: dict[str, bool] = {}
  for r in records:
    ends[r.session_id] = max(ends.get(r.session_id, -math.inf), r.finish_s)
    good[r.session_id] = good.get(r.session_id, True) and _meets(r, slo)
  starts = sorted(arrivals[s] for s in ends)
  finishes = sorted(ends.values())
  n = len(ends)
  arrived = _rate(n, starts[-1] - starts[0]) if n else None
  achieved = _rate(n, finishes[-1] - finishes[0]) if n else None
  if n == 0:
    keeps_up = False
  elif arrived is None:  # one agent
    keeps_up = True
  elif math.isinf(arrived):  # all at once: only an instant finish keeps up
    keeps_up = math.isinf(achieved)
  else:
    keeps_up = achieved >= slo.keep_up * arrived
  span = finishes[-1] - starts[0] if n else 0.0
  met_turns = sum(_meets(r, slo) for r in records)
  ttft_ok = ttft[key] is not None and ttft[key] <= slo.ttft_s
  tpot_ok = slo.tpot_s is None or tpot[key] is None or tpot[key] <= slo.tpot_s
  return {
      "offered_rate": offered_rate,
      "arrival_rate": arrived,
      "achieved_rate": achieved,
      "keeps_up": bool(keeps_up),
      "sessions": n,
      "turns": len(records),
      "span_s": span,
      "ttft_s": ttft,
      "tpot_s": tpot,
      "attainment": met_turns / len(records) if records else None,
      "goodput_turns_s": met_turns / span if span > 0 else None,
      # Agents finish no faster than they arrive, over a run: a finish span
      # shorter than the start span (the last ones quick) is not capacity.
      "goodput_agents_s": (None if achieved is None else
                           min(achieved, arrived) * sum(good.values()) / n
                           if any(good.values()) else 0.0),
      "slo_ttft_ok": ttft_ok,
      "slo_tpot_ok": tpot_ok,
      "passed": bool(ttft_ok and tpot_ok and keeps_up),
  }


def sustained_rate(runs: Sequence[Mapping[str, Any]]) -> float | None:
  """Highest offered rate that passed with every lower one passing; None if none.

  `runs`: `evaluate_run` results of one policy (any order).
  """
  best = None
  for run in sorted(runs, key=lambda r: r["offered_rate"]):
    if not run["passed"]:
      break
    best = run["offered_rate"]
  return best
