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

Clock and sleep are injected: tests drive a `ManualClock` and never sleep.
"""

from __future__ import annotations

import math
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
    sleep: called with the seconds to wait.
  """

  def __init__(self, name: str, bytes_per_s: float, burst_bytes: int = 1 << 20,
               *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep):
    if not bytes_per_s > 0:
      raise ValueError(f"{name}: bytes_per_s must be > 0, got {bytes_per_s!r}")
    if burst_bytes < 1:
      raise ValueError(f"{name}: burst_bytes must be >= 1, got {burst_bytes!r}")
    self.name = name
    self.bytes_per_s = float(bytes_per_s)
    self.burst_bytes = int(burst_bytes)
    self._clock = clock
    self._sleep = sleep
    self._lock = threading.Lock()
    self._tokens = float(burst_bytes)
    self._last = clock()
    self.total_bytes = 0
    self.total_wait_s = 0.0

  @property
  def unlimited(self) -> bool:
    return math.isinf(self.bytes_per_s)

  def _refill(self, now: float) -> None:
    elapsed = max(0.0, now - self._last)
    self._last = max(self._last, now)
    self._tokens = min(float(self.burst_bytes),
                       self._tokens + elapsed * self.bytes_per_s)

  def reserve(self, nbytes: int) -> float:
    """Takes `nbytes`; returns the seconds the caller must wait before using them."""
    if nbytes < 0:
      raise ValueError(f"{self.name}: nbytes must be >= 0, got {nbytes}")
    with self._lock:
      self.total_bytes += nbytes
      if self.unlimited:
        return 0.0
      self._refill(self._clock())
      self._tokens -= nbytes
      wait = max(0.0, -self._tokens / self.bytes_per_s)
      self.total_wait_s += wait
      return wait

  def acquire(self, nbytes: int) -> float:
    """Takes `nbytes` and sleeps until they have passed; returns the wait."""
    wait = self.reserve(nbytes)
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

  def stats(self) -> dict[str, float]:
    return {"bytes": self.total_bytes, "wait_s": self.total_wait_s,
            "queued_bytes": self.queued_bytes(),
            "bytes_per_s": self.bytes_per_s}
