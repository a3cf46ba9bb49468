"""An emulated storage NIC: a token-bucket limit on one engine's cold-tier reads.

EMULATION. Real DualPath engines read the cold tier through their own storage
NICs. On one machine all reads share one disk and one bus, so each engine's
reads pass through a `StorageNic` that admits bytes at `bytes_per_s`. With
NICs slower than the disk, the machine behaves like a cluster whose storage
NICs are the bottleneck (the regime DualPath targets). The limit delays the
caller; it moves no data and says nothing about real network behaviour.

The bucket holds up to `burst_bytes` tokens and refills at `bytes_per_s`. A
request takes its bytes at once, even beyond the tokens present (the balance
goes negative), and waits until the balance is back to zero. So requests are
served first come, first served, a request larger than the bucket never
hangs, and `queued_bytes()` (the negative balance) is exactly the backlog the
scheduler reads into `EngineState.nic_queued_bytes`.

Bytes a caller has committed to read but not yet requested (a load whose
later batches wait behind its earlier ones) are *planned*: `plan(n)` counts
them, `acquire(n, planned=True)` turns them into a request, and
`backlog_bytes()` (queued + planned) is what a scheduler placing more work
must see, or it would pile every turn onto the NIC that merely looks idle.

Clock and sleep are injected: tests drive a `ManualClock` and never sleep.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from typing import Callable


class StorageNic:
  """Token bucket; thread-safe.

  Args:
    name: engine name, for messages and metrics.
    bytes_per_s: sustained rate (`math.inf`: no limit, never waits).
    burst_bytes: bucket depth.
    clock: seconds, monotonic.
    sleep: called with the seconds to wait (default: an interruptible wait,
      see `interrupt`).
  """

  def __init__(self, name: str, bytes_per_s: float, burst_bytes: int = 1 << 20,
               *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] | None = None):
    if not bytes_per_s > 0:
      raise ValueError(f"{name}: bytes_per_s must be > 0, got {bytes_per_s!r}")
    if not 1 <= burst_bytes < math.inf:  # NaN, inf: int() would fail unclearly
      raise ValueError(f"{name}: burst_bytes must be a finite number >= 1, "
                       f"got {burst_bytes!r}")
    self.name = name
    self.bytes_per_s = float(bytes_per_s)
    self.burst_bytes = int(burst_bytes)
    self._clock = clock
    self._interrupted = threading.Event()
    self._sleep = sleep if sleep is not None else self._interrupted.wait
    self._lock = threading.Lock()
    self._tokens = float(burst_bytes)
    self._last = clock()
    self.total_bytes = 0
    self.total_wait_s = 0.0
    self._planned = 0

  @property
  def unlimited(self) -> bool:
    return math.isinf(self.bytes_per_s)

  def _refill(self, now: float) -> None:
    elapsed = max(0.0, now - self._last)
    self._last = max(self._last, now)
    self._tokens = min(float(self.burst_bytes),
                       self._tokens + elapsed * self.bytes_per_s)

  def reserve(self, nbytes: int, planned: bool = False) -> float:
    """Takes `nbytes`; returns the seconds the caller must wait before using them.

    `planned`: the bytes leave the plan in the same step (see `plan`).
    """
    self._check_nbytes(nbytes)
    with self._lock:
      if planned:
        self._planned = max(0, self._planned - nbytes)
      self.total_bytes += nbytes
      if self.unlimited:
        return 0.0
      self._refill(self._clock())
      self._tokens -= nbytes
      wait = max(0.0, -self._tokens / self.bytes_per_s)
      self.total_wait_s += wait
      return wait

  def _check_nbytes(self, nbytes: int) -> None:
    """Raises unless `nbytes` is an int >= 0: a NaN would wipe the plan and
    make `total_bytes` NaN for good, an inf would leave the bucket at -inf
    (every later request waiting forever), a negative `unplan` would add."""
    if (isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral)
        or nbytes < 0):
      raise ValueError(f"{self.name}: nbytes must be an int >= 0, "
                       f"got {nbytes!r}")

  def plan(self, nbytes: int) -> None:
    """Counts `nbytes` a caller will `acquire(..., planned=True)` later."""
    self._check_nbytes(nbytes)
    with self._lock:
      self._planned += nbytes

  def unplan(self, nbytes: int) -> None:
    """Withdraws planned bytes that will not be read (a failed load)."""
    self._check_nbytes(nbytes)
    with self._lock:
      self._planned = max(0, self._planned - nbytes)

  def acquire(self, nbytes: int, planned: bool = False) -> float:
    """Takes `nbytes` and sleeps until they have passed; returns the wait.

    `planned`: the bytes were announced with `plan` and leave the plan now.
    """
    wait = self.reserve(nbytes, planned)
    if wait > 0:
      self._sleep(wait)
    return wait

  def queued_bytes(self) -> float:
    """Bytes admitted and not yet passed (the backlog, >= 0)."""
    if self.unlimited:
      return 0.0
    with self._lock:
      self._refill(self._clock())
      return max(0.0, -self._tokens)

  def interrupt(self) -> None:
    """Ends every current and future wait at once (shutting down).

    Reads still waiting on the emulated NIC then go ahead unthrottled, so a
    process can stop without sitting out a slow NIC's backlog.
    """
    self._interrupted.set()

  def planned_bytes(self) -> int:
    """Bytes announced with `plan` and not yet acquired."""
    with self._lock:
      return self._planned

  def backlog_bytes(self) -> float:
    """Queued plus planned bytes: what a new request would wait behind."""
    return self.queued_bytes() + self.planned_bytes()

  def stats(self) -> dict[str, float]:
    return {"bytes": self.total_bytes, "wait_s": self.total_wait_s,
            "queued_bytes": self.queued_bytes(),
            "planned_bytes": self.planned_bytes(),
            "bytes_per_s": self.bytes_per_s}
