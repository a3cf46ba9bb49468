"""Runs a launcher with `-X importtime`, to check what it imported before
it refused its input: a refusal from the flags, the configs or a model's
metadata should come before JAX's ~3 s import."""

from __future__ import annotations

import re
import subprocess
import sys


def run_recording_imports(args: list[str], **kwargs
                          ) -> subprocess.CompletedProcess:
  """`python -X importtime ARGS` (text, output captured); `kwargs` go to
  `subprocess.run`."""
  return subprocess.run([sys.executable, "-X", "importtime", *args],
                        capture_output=True, text=True, **kwargs)


def imported_jax(stderr: str) -> bool:
  """Whether a `-X importtime` run's stderr records JAX's import."""
  return re.search(r"^import time:.*\|\s+jax$", stderr, re.M) is not None


def without_import_times(stderr: str) -> str:
  """A run's stderr less `-X importtime`'s lines: what a user would see."""
  return "\n".join(line for line in stderr.splitlines()
                   if not line.startswith("import time:"))
