"""Tests of launch.bench_storage: config parsing and a tiny paired run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launcher_interrupt import interrupt_after

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_PARSE = """
import json, sys
from launch.bench_storage import StoreSpec
out = []
for text in sys.argv[1:]:
  try:
    s = StoreSpec.parse(text)
    out.append([s.driver, s.codec, s.file_io_mode, s.overrides, s.read_into_buffer])
  except ValueError as err:
    out.append(str(err))
print(json.dumps(out))
"""


def _parse(*texts):
  """StoreSpec.parse in a subprocess: the module's absl flags clash with other
  launchers' (e.g. --json) once several are imported into one test process."""
  done = subprocess.run([sys.executable, "-c", _PARSE, *texts], cwd=REPO, check=True,
                        capture_output=True, text=True, timeout=120)
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_config_specs():
  plain, full, raw, bad_key, bad_form, writer = _parse(
      "file:raw", "ocdbt:int8+zstd:default@out=1@file_io_concurrency=8@fsync=0", "raw",
      "file:raw@bogus=1", "file", "file:raw@chunk_writer=tensorstore@sync=fsync")
  assert plain == ["file", "raw", "direct", {}, False]
  assert full == ["ocdbt", "int8+zstd", "default", {"file_io_concurrency": 8, "fsync": False},
                  True]
  assert raw[0] == "raw"
  assert "unknown key" in bad_key and "driver:codec" in bad_form
  assert writer[3] == {"chunk_writer": "tensorstore", "sync": "fsync"}


def _skip_without_o_direct(tmp_path):
  """The raw side reads with O_DIRECT: the temp file system must take it
  (tmpfs does not). Leaves the file `probe` behind."""
  try:
    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    os.close(fd)
  except OSError:
    pytest.skip(reason="no O_DIRECT on the temp file system")


def test_tiny_paired_run(tmp_path):
  """Two rounds (raw first, then store first) of the A/A check and two stores."""
  _skip_without_o_direct(tmp_path)
  out = tmp_path / "r.json"
  cmd = [sys.executable, "-m", "launch.bench_storage", "--recompute=none",
         "--configs=raw,file:raw,file:raw@out=1@file_io_concurrency=2",
         "--store_bytes=8388608", "--get_blocks=4", "--put_blocks=2", "--repeats=2",
         "--latency_samples=3", f"--dir={tmp_path}", f"--json={out}"]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
  report = json.loads(out.read_text())
  # Pairs are listed config by config; round 0 runs the raw side first, round 1 the store.
  assert [p["order"][0] for p in report["pairs"]] == ["raw", "store"] * 3
  for s in report["stores"]:
    assert s["runs"] == 2 and set(s["ratios"]) == {"write", "seq_read", "random_read"}
    r = s["ratios"]["write"]
    assert r["min"] <= r["median"] <= r["max"] and len(r["rounds"]) == 2
    assert s["cold_checked"]  # no store page resident before a read pass
  by_name = {s["config"]: s for s in report["stores"]}
  assert by_name["file:raw"]["verified_bit_exact"]
  assert {r["chunk_writer"] for r in report["store_runs"]["file:raw"]} == {"direct"}
  for run in report["store_runs"]["file:raw"]:  # the rewrite pass reused slots
    assert run["rewrite_disk_bytes_per_s"] > 0 and run["rewrite_reused_slots"] > 0
  assert "Rewrite of the full store" in report["table"]
  assert by_name["file:raw@out=1@file_io_concurrency=2"]["overrides"][
      "file_io_concurrency"] == 2
  assert "| file:raw |" in report["table"]
  assert sorted(os.listdir(tmp_path)) == ["probe", "r.json"]  # the work dir is gone


def test_ctrl_c_reports_the_finished_rounds(tmp_path):
  """Ctrl-C is an end: the report over the whole rounds finished so far
  (every config paired the same number of times), marked incomplete, and
  exit 130; the work directory is removed."""
  _skip_without_o_direct(tmp_path)
  out = tmp_path / "r.json"
  done = interrupt_after(
      ["launch.bench_storage", "--recompute=none", "--configs=file:raw",
       "--store_bytes=4194304", "--get_blocks=4", "--put_blocks=2",
       "--repeats=1000", "--latency_samples=2", "--noraw_files",
       f"--dir={tmp_path}", f"--json={out}"],
      "round 1 file:raw: store/raw", stream="stderr", cwd=REPO)  # absl's log
  assert done.returncode == 130, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["complete"] is False and report["rounds"] >= 2
  (store,) = report["stores"]
  assert store["runs"] == report["rounds"] == len(report["pairs"])
  assert f"Paired rounds: {report['rounds']};" in report["table"]
  assert f"interrupted after {report['rounds']} of 1000 rounds" in done.stderr
  assert sorted(os.listdir(tmp_path)) == ["probe", "r.json"]


def test_committed_reports_reprint_their_own_tables():
  """`storage_report.format_table` rebuilds, from a committed report's JSON,
  the very table the launcher printed and stored with it (the disk
  baselines, paired ratios, rewrites, rounds and CPU cost)."""
  from launch.storage_report import format_table
  results = os.path.join(REPO, "docs", "results")
  checked = 0
  for name in ("storage_2026-11-26_v6_qd8.json",
               "storage_2026-11-26_v7_h100_host.json"):
    with open(os.path.join(results, name)) as f:
      report = json.load(f)
    assert format_table(report) == report["table"], name
    checked += 1
  assert checked == 2
