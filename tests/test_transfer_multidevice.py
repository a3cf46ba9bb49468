"""Runs tests/multidevice/check_transfer_8dev.py on 8 CPU devices (in a
child pytest: tests/eight_cpu_devices.py says why)."""

from __future__ import annotations

from eight_cpu_devices import run_checks


def test_transfer_on_eight_cpu_devices():
  run_checks("check_transfer_8dev.py")
