"""launch.bench_kernels end to end on CPU (the smoke preset, interpret mode):
every section runs, every kernel row of ours matches the reference, the JSON
holds the rows, the ceilings and the target checks.

Runs the launcher in a subprocess: its absl flags clash with other
launchers' once several are imported into one test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_end_to_end(tmp_path):
  out = tmp_path / "kernels.json"
  done = subprocess.run(
      [sys.executable, "-m", "launch.bench_kernels", "--reps=1", "--inner=1",
       "--warmup_s=0", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["complete"] and report["preset"] == "smoke"
  kinds = {r["kind"] for r in report["rows"]}
  assert kinds == {"calib", "decode", "prefill", "copy", "overlap"}
  for r in report["rows"]:
    if r["kind"] == "calib" and r["impl"] == "torch copy_":
      continue  # torch is not a dependency; the row says why it is missing
    assert "error" not in r, r
    assert r["time_us"] > 0
    if "(ours)" in r["impl"] and r["kind"] in ("decode", "prefill"):
      assert r["rel_err"] < 2e-2, r
  assert report["ceilings"]["copy_gbps"] > 0
  overlap, = [r for r in report["rows"] if r["kind"] == "overlap"]
  assert overlap["gather_us"] > 0 and overlap["attention_us"] > 0
  assert any(t["target"].startswith("block gather") for t in report["targets"])
  assert "targets" in done.stdout
