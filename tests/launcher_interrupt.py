"""Runs a launcher and presses Ctrl-C once it has printed a given line.

The long-running launchers (`agent_eval`, `bench_online`, `bench_storage`,
`bench_kernels`) treat Ctrl-C as an end: they report what finished and exit
130. Their tests start one, wait for the line that says a unit of work is
done, send SIGINT and check the report. A launcher that never prints the
line is killed after a timeout, so it fails its test instead of hanging it.

The launcher starts with SIGINT ignored, as a shell without job control
starts its background jobs (`cmd &` in a script, and so a test run started
that way): a launcher must make Ctrl-C an end by itself
(`dualpath_jax.interrupts.make_ctrl_c_an_end`), whoever started it.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable


@dataclasses.dataclass
class Interrupted:
  """What the interrupted launcher did: exit status and all it printed."""

  returncode: int
  stdout: str
  stderr: str


def interrupt_after(args: list[str], marker: str, *, cwd: str,
                    stream: str = "stdout", timeout: float = 240,
                    on_marker: Callable[[str], None] | None = None
                    ) -> Interrupted:
  """Runs `python -m <args>` in `cwd`, sends SIGINT as soon as its output
  on `stream` ("stdout" or "stderr") contains `marker` (after calling
  `on_marker(output)` with that stream's output so far, for checks of that
  moment), and waits for the end.

  The output is read as it comes, not line by line: a progress bar ends its
  lines with a carriage return only when it next redraws. Fails
  (AssertionError with the output) if the launcher ends without printing
  `marker`, or has not printed it within `timeout` seconds.
  """
  # `python -m args` with SIGINT ignored (exec keeps the disposition).
  start_ignoring_sigint = (
      "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
      "os.execv(sys.executable, [sys.executable, '-m', *sys.argv[1:]])")
  proc = subprocess.Popen([sys.executable, "-c", start_ignoring_sigint, *args],
                          cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  got = {proc.stdout: b"", proc.stderr: b""}  # both drained: no full pipe
  watched = getattr(proc, stream)
  deadline = time.monotonic() + timeout
  try:
    while marker.encode() not in got[watched]:
      open_pipes = [f for f in got if not f.closed]
      if not open_pipes or time.monotonic() > deadline:
        break
      for f in select.select(open_pipes, [], [], 1.0)[0]:
        chunk = os.read(f.fileno(), 65536)
        if chunk:
          got[f] += chunk
        else:
          f.close()
    seen = marker.encode() in got[watched]
    if seen:
      if on_marker is not None:
        on_marker(got[watched].decode(errors="replace"))
      proc.send_signal(signal.SIGINT)
    else:  # ended, or still running past the deadline
      proc.kill()
    try:
      rest_out, rest_err = proc.communicate(
          timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # SIGINT did not end it: exit -9
      proc.kill()
      rest_out, rest_err = proc.communicate()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out = (got[proc.stdout] + (rest_out or b"")).decode(errors="replace")
  err = (got[proc.stderr] + (rest_err or b"")).decode(errors="replace")
  assert seen, (f"{args[0]} did not print {marker!r} (exit "
                f"{proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
  return Interrupted(proc.returncode, out, err)
