"""`--help` lists the flags a launcher shares with others (they were only
under `--helpfull`): the knobs a user looks for first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("launcher,wanted", [
    ("launch.agent_eval", ["--sessions", "--turns", "--mesh", "--cold_tier",
                           "--max_context", "--num_blocks", "--dtype",
                           "--temperature", "--report"]),
    ("launch.serve", ["--port", "--mesh", "--cold_tier", "--max_context",
                      "--max_request_mb"]),
])
def test_help_lists_the_shared_flags(launcher, wanted):
  done = subprocess.run([sys.executable, "-m", launcher, "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  listed = {line.split(":")[0].strip().replace("--[no]", "--")
            for line in done.stdout.splitlines() if line.startswith("  --")}
  assert not set(wanted) - listed, (sorted(set(wanted) - listed),
                                    done.stdout[-3000:])
  assert "--logtostderr" not in listed  # absl's own stay under --helpfull
