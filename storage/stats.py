"""Counters of one block store, for the metrics report.

Thread-safe integer and float counters; `snapshot()` returns a plain dict that
`dualpath_jax.metrics` (or a launcher) can merge into its JSON report.
"""

from __future__ import annotations

import threading

COUNTERS = (
    "put_calls", "put_blocks", "written_blocks", "written_bytes", "present_blocks",
    "in_flight_blocks", "deferred_blocks", "dropped_blocks", "no_space_blocks",
    "failed_writes", "evicted_blocks",
    "get_calls", "get_blocks", "hit_blocks", "read_bytes",
    "miss_absent", "miss_missing", "miss_corrupt", "miss_raced",
    # a read that failed without proving the block bad (an OS or kvstore
    # error): a miss, the block kept (`bad_chunks.read_failure`)
    "miss_unreadable",
    "deleted_blocks", "recovered_blocks",
)
TIMERS = ("write_seconds", "read_seconds")


class StoreStats:
  """Monotonic counters; `add` is atomic, `snapshot` is a consistent copy."""

  def __init__(self):
    self._lock = threading.Lock()
    self._values: dict[str, float] = {name: 0 for name in COUNTERS + TIMERS}

  def add(self, **deltas: float) -> None:
    with self._lock:
      for name, delta in deltas.items():
        if name not in self._values:
          raise ValueError(f"unknown store counter {name!r}")
        self._values[name] += delta

  def snapshot(self) -> dict[str, float]:
    """Counters plus derived hit rate and bandwidths (bytes per second)."""
    with self._lock:
      out = dict(self._values)
    misses = (out["miss_absent"] + out["miss_missing"] + out["miss_corrupt"] +
              out["miss_raced"] + out["miss_unreadable"])
    out["misses"] = misses
    out["hit_rate"] = out["hit_blocks"] / out["get_blocks"] if out["get_blocks"] else 0.0
    out["write_bytes_per_s"] = (out["written_bytes"] / out["write_seconds"]
                                if out["write_seconds"] else 0.0)
    out["read_bytes_per_s"] = (out["read_bytes"] / out["read_seconds"]
                               if out["read_seconds"] else 0.0)
    return out
