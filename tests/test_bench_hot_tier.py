"""launch.bench_hot_tier end to end on CPU (tiny blocks): every figure
measured and positive, the loaded bytes checked inside the launcher, the
table, JSON and PNG written; bad flags refused before anything runs.

The launcher runs in a subprocess: its absl flags would clash with other
launchers' in one test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "launch.bench_hot_tier", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def test_every_memory_and_operation_is_timed_against_the_plain_copies(
    tmp_path):
  out, png = tmp_path / "r.json", tmp_path / "r.png"
  done = _run("--shape=tiny", "--blocks=12", "--repeats=2", f"--json={out}",
              f"--plot={png}", "--memories=pageable,pinned_host")
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["complete"] and report["blocks"] == 12
  assert report["bytes"] == 12 * report["block_bytes"] == 12 * (
      2 * 2 * 2 * 16 * 16 * 2)  # tiny: 2 layers, 2 KV heads, dim 16, bf16
  assert set(report["ceilings_s"]) == {"pinned_to_device",
                                       "pageable_to_device",
                                       "device_to_pinned"}
  assert set(report["tiers"]) == {"pageable", "pinned_host"}
  for ops in report["tiers"].values():
    assert set(ops) == {"load", "write_back", "put_host"}
    assert all(s > 0 for s in ops.values())
  pinned = report["ceilings_s"]["pinned_to_device"]
  assert report["of_pinned_to_device"]["pinned_host"]["load"] == (
      pinned / report["tiers"]["pinned_host"]["load"])
  assert "pinned_host load" in done.stdout
  assert "of pinned->device" in done.stdout
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert report["jax_version"] and report["device"]


def test_bad_flags_are_refused_before_anything_runs(tmp_path):
  done = _run("--memories=pageable,hbm")
  assert done.returncode != 0
  assert "--memories: choose from pageable,pinned_host" in done.stderr
  done = _run(f"--plot={tmp_path / 'p.jpg'}")
  assert done.returncode != 0 and ".png" in done.stderr
  done = _run("--blocks=0")
  assert done.returncode != 0 and "blocks" in done.stderr
  assert not list(tmp_path.iterdir())


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the default on an accelerator is both memories")
def test_cpu_times_a_pinned_tier_only_when_asked():
  """On CPU a pinned tier copies the whole pool or tier per call: the
  default leaves it out."""
  from launch import bench_hot_tier
  assert bench_hot_tier.default_memories() == ["pageable"]
  assert bench_hot_tier.memories(None) is None
  assert bench_hot_tier.memories(["pinned_host", "pinned_host"]) == [
      "pinned_host"]
