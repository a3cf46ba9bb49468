"""Runs tests/multidevice/check_cluster_8dev.py on 8 CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 only takes effect before
JAX creates its CPU backend, so the checks run in a child `python -m pytest`
with the flag in its environment; its output is shown when it fails.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "multidevice" / "check_cluster_8dev.py"


def test_cluster_on_eight_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       str(CHECKS)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert "5 passed" in out and "skipped" not in out, out[-3000:]
