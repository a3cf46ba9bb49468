"""Clocks the scheduler and its callers read time from (injected, never global).

The runtime passes a `WallClock`; the simulator and the tests pass a
`ManualClock` that only moves when told to, so every decision is reproducible.
"""

from __future__ import annotations

import math
import time
from typing import Protocol


class Clock(Protocol):
  """Anything with a monotonic `now()` in seconds."""

  def now(self) -> float:
    ...


class WallClock:
  """`time.monotonic`, for the real runtime."""

  def now(self) -> float:
    return time.monotonic()


class ManualClock:
  """A clock that moves only by `advance` / `advance_to` (simulator, tests)."""

  def __init__(self, start_s: float = 0.0):
    self._now = _finite("start_s", start_s)

  def now(self) -> float:
    return self._now

  def advance(self, seconds: float) -> float:
    """Moves forward by `seconds` (>= 0); returns the new time."""
    seconds = _finite("seconds", seconds)
    if seconds < 0:
      raise ValueError(f"cannot move a clock backwards ({seconds} s)")
    self._now += seconds
    return self._now

  def advance_to(self, t_s: float) -> float:
    """Moves to `t_s`, which must not be in the past; returns it."""
    t_s = _finite("t_s", t_s)
    if t_s < self._now:
      raise ValueError(f"cannot move a clock backwards ({self._now} -> {t_s})")
    self._now = t_s
    return self._now


def _finite(name: str, value: float) -> float:
  """`value` as a float; raises unless it is finite (a NaN passes every
  "not backwards" check and then stays: every later time would be NaN)."""
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}")
  return value
