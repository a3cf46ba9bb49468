"""Runs tests/multidevice/check_cluster_8dev.py on 8 CPU devices (in a
child pytest: tests/eight_cpu_devices.py says why)."""

from __future__ import annotations

from eight_cpu_devices import run_checks


def test_cluster_on_eight_cpu_devices():
  out = run_checks("check_cluster_8dev.py")
  assert "10 passed" in out, out[-3000:]
