"""Tests of the token-bucket storage-NIC emulation (injected clock, no sleeping)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from dualpath_jax.scheduler import ManualClock
from dualpath_jax.transfer import DualPathConfig, StorageNic


def _nic(rate, burst, clock):
  slept = []
  nic = StorageNic("P0", rate, burst, clock=clock.now, sleep=slept.append)
  return nic, slept


@pytest.mark.parametrize("rate,burst", [(1000.0, 100), (5e6, 4096), (10.0, 1)])
def test_sustained_rate_and_fifo_backlog(rate, burst):
  clock = ManualClock()
  nic, slept = _nic(rate, burst, clock)
  sizes = [burst // 2 + 1, 3 * burst, burst, 7]
  waits = [nic.acquire(n) for n in sizes]
  # First come, first served: each wait covers everything admitted before it.
  expected, debt = [], -burst
  for n in sizes:
    debt += n
    expected.append(max(0.0, debt / rate))
  assert waits == pytest.approx(expected)
  assert slept == [w for w in waits if w > 0]
  assert nic.queued_bytes() == pytest.approx(max(0.0, debt))
  clock.advance(debt / rate / 2)
  assert nic.queued_bytes() == pytest.approx(debt / 2)
  clock.advance(debt / rate)
  assert nic.queued_bytes() == 0.0
  assert nic.total_bytes == sum(sizes)


def test_idle_time_refills_only_up_to_the_burst():
  clock = ManualClock()
  nic, _ = _nic(100.0, 50, clock)
  assert nic.acquire(50) == 0.0
  clock.advance(1000.0)  # would be 100000 bytes of tokens without the cap
  assert nic.acquire(50) == 0.0
  assert nic.acquire(100) == pytest.approx(1.0)


def test_long_run_average_matches_rate():
  clock = ManualClock()
  nic, _ = _nic(1e6, 1 << 12, clock)
  for _ in range(200):
    clock.advance(nic.acquire(25_000))
  # 5 MB at 1 MB/s, less the initial burst.
  assert clock.now() == pytest.approx((5e6 - 4096) / 1e6)


def test_unlimited_nic_never_waits_but_counts():
  nic = StorageNic("D0", math.inf, sleep=lambda s: pytest.fail("slept"))
  assert nic.acquire(1 << 40) == 0.0
  assert nic.queued_bytes() == 0.0
  assert nic.stats()["bytes"] == 1 << 40


def test_threads_share_the_budget():
  nic = StorageNic("P0", 2e6, 1000)  # real clock and sleep
  t0 = time.monotonic()
  threads = [threading.Thread(target=nic.acquire, args=(100_000,))
             for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.monotonic() - t0
  assert elapsed >= (400_000 - 1000) / 2e6 * 0.95  # 0.2 s, never faster
  assert nic.total_bytes == 400_000


@pytest.mark.parametrize("kwargs,match", [
    (dict(bytes_per_s=0), "bytes_per_s"), (dict(bytes_per_s=-1.0), "bytes_per_s"),
    (dict(bytes_per_s=1.0, burst_bytes=0), "burst_bytes")])
def test_bad_nic_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    StorageNic("X", **kwargs)
  with pytest.raises(ValueError, match="nbytes"):
    StorageNic("X", 1.0).reserve(-1)


def test_gbps_flag_is_bits():
  assert DualPathConfig(storage_nic_gbps=8).nic_bytes_per_s == 1e9
  assert DualPathConfig().nic_bytes_per_s == math.inf
  for bad in (dict(storage_nic_gbps=0), dict(policy="fastest"),
              dict(handoff="rdma"), dict(layers_in_flight=0),
              dict(host_buffer_bytes=0), dict(nic_burst_bytes=0)):
    with pytest.raises(ValueError):
      DualPathConfig(**bad)


def test_planned_bytes_count_in_the_backlog_until_acquired():
  clock = ManualClock()
  nic, _ = _nic(100.0, 10, clock)
  nic.plan(300)
  assert nic.queued_bytes() == 0.0 and nic.planned_bytes() == 300
  assert nic.backlog_bytes() == pytest.approx(300.0)
  wait = nic.acquire(110, planned=True)  # 100 bytes beyond the burst
  assert wait == pytest.approx(1.0)
  assert nic.planned_bytes() == 190
  assert nic.backlog_bytes() == pytest.approx(100.0 + 190.0)
  clock.advance(1.0)
  assert nic.backlog_bytes() == pytest.approx(190.0)
  nic.unplan(190)  # the rest was never read (a failed load)
  assert nic.backlog_bytes() == 0.0 and nic.stats()["planned_bytes"] == 0
  nic.unplan(5)  # never below zero
  assert nic.planned_bytes() == 0
  with pytest.raises(ValueError):
    nic.plan(-1)


def test_interrupt_ends_a_long_wait_at_once():
  nic = StorageNic("P0", 10.0, 1)  # real clock and the default sleep
  done = []
  t = threading.Thread(target=lambda: done.append(nic.acquire(1000)))
  t0 = time.monotonic()
  t.start()  # would wait about 100 s
  time.sleep(0.1)
  nic.interrupt()
  t.join(10)
  assert done and time.monotonic() - t0 < 5
  assert nic.acquire(1000) > 0  # later waits are computed, then skipped
