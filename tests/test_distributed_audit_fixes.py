"""Misconfigured multi-process launches fail with a clear error, at once.

jax 0.10.2's `jax.distributed.initialize` kills the process with a C++
check failure (SIGABRT) when it finds no coordinator, crashes (SIGSEGV) when
process 0's port is taken, and lets a process whose `num_processes` differs
from process 0's join the job silently. `dualpath_jax.distributed.initialize`
checks these first (or right after) and raises RuntimeError; each test runs
it in a subprocess on a loopback port and wants exit 1 with the message.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One process of a job: argv = address, num_processes, process_id, timeout_s.
SCRIPT = """
import sys
from dualpath_jax import distributed
address, n, rank, timeout_s = sys.argv[1], *map(int, sys.argv[2:5])
try:
  distributed.initialize(distributed.DistributedConfig(
      address, n, rank, timeout_s=timeout_s))
except RuntimeError as e:
  sys.exit(f"error: {e}")
print("joined:", distributed.describe(), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(port: int, num_processes: int, process_id: int,
           timeout_s: int = 2) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.Popen(
      [sys.executable, "-c", SCRIPT, f"127.0.0.1:{port}", str(num_processes),
       str(process_id), str(timeout_s)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  try:
    out, err = proc.communicate(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  return proc.returncode, out + err


def test_no_coordinator_is_a_clear_error_not_an_abort():
  """Process 1 with nobody at the address: exit 1 after timeout_s."""
  code, text = _finish(_start(_free_port(), 2, 1))
  assert code == 1, text[-2000:]
  assert "no coordinator at 127.0.0.1:" in text and "process 0" in text, text
  assert "Check failure" not in text


def test_coordinator_port_in_use_is_a_clear_error_not_a_crash():
  """Process 0 whose port another program listens on: exit 1, not SIGSEGV."""
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    code, text = _finish(_start(busy.getsockname()[1], 2, 0))
  assert code == 1, text[-2000:]
  assert "is already in use on this host" in text, text


def test_process_count_unlike_process_0s_is_refused():
  """Process 1 says 3 processes, process 0 says 2: process 1 must not join
  a 2-process job as if nothing were wrong."""
  port = _free_port()
  first = _start(port, 2, 0, timeout_s=20)
  second = _start(port, 3, 1, timeout_s=20)
  code, text = _finish(second)
  _finish(first)
  assert code == 1, text[-2000:]
  assert "as process 1 of 2, not 1 of 3" in text, text
  assert "same --num_processes" in text
