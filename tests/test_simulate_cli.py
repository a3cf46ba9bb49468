"""`python -m launch.simulate` end to end: offline and online reports, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launcher_interrupt import interrupt_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "dualpath_jax", "workload", "data",
                      "sample_trace.jsonl")
SMALL = ["--sessions=12", "--turns=6", "--noprogress"]


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "launch.simulate", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def test_offline_report_table_and_plot(tmp_path):
  report, plot = tmp_path / "r.json", tmp_path / "r.png"
  proc = _run(*SMALL, "--mesh=1P4D", "--gpu=h200", f"--report={report}",
              f"--plot={plot}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(report.read_text())  # strict JSON: no Infinity
  assert r["complete"] is True and r["mode"] == "offline"
  assert [run["policy"] for run in r["runs"]] == ["single_path", "dualpath",
                                                  "oracle"]
  assert r["workload"]["sessions"] == 12 and r["workload"]["turns"] == 72
  for run in r["runs"]:
    assert run["summary"]["turns"] == 72 and len(run["turns"]) == 72
    assert set(run["engines"]) == {"P0", "D0", "D1", "D2", "D3"}
  single, dual, oracle = r["runs"]
  assert single["paths"]["DE_READ"] == 0 and dual["paths"]["DE_READ"] > 0
  assert oracle["paths"]["FREE"] == single["paths"]["PE_READ"]
  speedup = r["speedup_over_single_path"]
  assert speedup["single_path"] == 1.0
  assert speedup["dualpath"] == pytest.approx(
      single["summary"]["job_completion_s"] /
      dual["summary"]["job_completion_s"])
  assert r["cost_model"]["prefill"]["gpu"]["name"] == "h200-sxm"
  assert all(run["slo"] is None for run in r["runs"])  # no rate offline
  # Recorded without starting a JAX backend (it would take a GPU's memory).
  assert r["device"] is None and r["jax_version"]
  assert "dualpath: job completion" in proc.stdout
  assert "JCT s" in proc.stdout and "PE NIC" in proc.stdout
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_sweep_judges_the_slo(tmp_path):
  report, plot = tmp_path / "r.json", tmp_path / "r.png"
  proc = _run(*SMALL, "--rates=0.05,0.5", "--policies=single_path,dualpath",
              "--slo_ttft_s=5", "--noreport_turns", f"--report={report}",
              f"--plot={plot}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(report.read_text())
  assert r["mode"] == "online"
  assert [(run["policy"], run["rate"]) for run in r["runs"]] == [
      ("single_path", 0.05), ("dualpath", 0.05), ("single_path", 0.5),
      ("dualpath", 0.5)]
  assert all("turns" not in run for run in r["runs"])
  assert set(r["agents_per_s_within_slo"]) == {"single_path", "dualpath"}
  for run in r["runs"]:
    assert run["slo"]["offered_rate"] == run["rate"]
    assert run["series"] and 0 <= max(
        v["util"] for row in run["series"] for v in row["nics"].values()) <= 1
  assert "agents/s sustained within SLO" in proc.stdout
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bandwidths_are_per_gpu(tmp_path):
  report = tmp_path / "r.json"
  proc = _run(*SMALL, "--mesh=1P1D", "--tp=2,4", "--storage_nic_gbps=50",
              "--collective_gb_s=10", "--handoff_gb_s=20", "--hot_tier_gb=3",
              "--hot_gb_s=25", "--policies=dualpath", f"--report={report}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cluster = json.loads(report.read_text())["cluster"]
  assert cluster["storage_nic_gbps"] == 100  # 2 prefill GPUs
  assert cluster["decode_storage_nic_gbps"] == 200  # 4 decode GPUs
  assert cluster["collective_gb_s"] == 40 and cluster["handoff_gb_s"] == 40
  assert cluster["hot_tier_gb"] == 6 and cluster["hot_gb_s"] == 50
  (run,) = json.loads(report.read_text())["runs"]
  assert run["hot_share"] > 0 and run["engines"]["P0"]["hot_read_blocks"] > 0


@pytest.mark.parametrize("tokenizer", ["bytes", "embedded"])
def test_trace_counts_tokens(tmp_path, tokenizer):
  report = tmp_path / "r.json"
  proc = _run(f"--trace={SAMPLE}", f"--trace_tokenizer={tokenizer}",
              "--policies=dualpath", "--noprogress", f"--report={report}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = json.loads(report.read_text())["workload"]
  assert w["trace"] == SAMPLE and w["sessions_counted_by_tokenizer"] >= 1
  assert 0 < w["hit_tokens"] < w["context_tokens"]


@pytest.mark.parametrize("args,msg", [
    (["--policies=fastest"], "unknown ['fastest']"),
    (["--policies=dualpath,dualpath"], "lists an entry twice"),
    (["--model=gpt-5"], "not a preset"),
    (["--gpu=b200"], "unknown GPU 'b200'"),
    (["--mesh=2X"], "--mesh must look like 1P2D"),
    (["--tp=3"], "does not divide"),
    (["--rates=fast"], "comma list of numbers"),
    (["--rates=0"], "finite agents/s > 0"),
    (["--rates=0.1,,0.2"], "--rates has an empty entry"),  # was taken
    (["--storage_nic_gbps=nan"], "not nan"),
    (["--max_context=1000"], "smaller than session 0"),
    (["--max_context=200000"], "past the context of llama3-8b-shape"),
    (["--trace=/nonexistent/t.jsonl"], "t.jsonl"),
    ([f"--trace={SAMPLE}", "--max_context=300"], "past 300"),
    ([f"--trace={SAMPLE}", "--max_context=1000000"],
     "past the context of llama3-8b-shape"),
    (["extra"], "unexpected arguments"),
])
def test_bad_input_exits_nonzero_with_reason(tmp_path, args, msg):
  report = tmp_path / "r.json"
  proc = _run(*SMALL, *args, f"--report={report}", timeout=120)
  assert proc.returncode != 0
  assert msg in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not report.exists()


def test_ctrl_c_reports_the_finished_runs(tmp_path):
  report = tmp_path / "r.json"
  done = interrupt_after(
      # ~3 s a run on 2 cores: the Ctrl-C lands in the second of three.
      ["launch.simulate", "--sessions=100", "--turns=24", "--noprogress",
       f"--report={report}"], "single_path: ", cwd=ROOT)
  assert done.returncode == 130, done.stderr[-3000:]
  r = json.loads(report.read_text())
  assert r["complete"] is False
  assert [run["policy"] for run in r["runs"]] == ["single_path"]
  assert "interrupted after 1 of 3 runs" in done.stderr
  assert "Traceback" not in done.stderr
