"""Runs a tests/multidevice/check_*.py file on 8 forced CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 only takes effect before
JAX creates its CPU backend, and a pytest process of the main suite already
has one with a single device. So the 8-device checks run in a child
`python -m pytest` with the flag in its environment, in one process (`-n 0`:
the suite's own workers already keep every core busy, and more workers would
only add JAX start-ups); its output is shown when it fails.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_checks(name: str, *, timeout_s: float = 300) -> str:
  """Runs tests/multidevice/`name` in a child pytest on 8 CPU devices;
  fails the calling test, with the child's output, unless every check
  passed and none skipped. Returns the child's output."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n",
       "0", str(ROOT / "tests" / "multidevice" / name)], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=timeout_s, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert " passed" in out and "skipped" not in out, out[-3000:]
  return out
