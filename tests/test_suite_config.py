"""The test suite's own configuration: it also runs where pytest-xdist is
missing (scripts/gpu_check.sh overrides setup.cfg's addopts on the GPU
machine, whose pytest may lack xdist), and `-n auto` (setup.cfg) gets the
workers tests/conftest.py chooses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_runs_without_xdist():
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-o",
       "addopts=", "-p", "no:cacheprovider", "tests/test_block_hash.py"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert " passed" in done.stdout


def test_auto_workers_follow_the_cores(monkeypatch):
  import conftest  # tests/conftest.py, on sys.path under pytest
  monkeypatch.setattr(conftest.os.path, "exists", lambda _: False)
  monkeypatch.setattr(conftest.os, "sched_getaffinity", lambda _: set(range(2)))
  assert conftest.pytest_xdist_auto_num_workers(None) == 2
  monkeypatch.setattr(conftest.os, "sched_getaffinity",
                      lambda _: set(range(64)))
  assert conftest.pytest_xdist_auto_num_workers(None) == conftest.MAX_WORKERS
  # Beside a GPU or TPU: one process, so no two workers claim its memory.
  monkeypatch.setattr(conftest.os.path, "exists",
                      lambda p: p == "/dev/nvidia0")
  assert conftest.pytest_xdist_auto_num_workers(None) == 0

