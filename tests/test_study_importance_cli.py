"""`python -m launch.study_importance` end to end (random weights, one
token per byte: the mechanics in seconds), and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launcher_interrupt import interrupt_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=random:tiny-test", "--tokenizer=bytes", "--turns=1",
        "--noprogress"]


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "launch.study_importance",
                         *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def test_report_table_and_plot(tmp_path):
  report, plot = tmp_path / "r.json", tmp_path / "r.png"
  proc = _run(*TINY, "--sessions=2", "--decode_steps=5", "--block_size=8",
              "--hot_fractions=0.12,1", f"--json={report}", f"--plot={plot}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "attn hit" in proc.stdout and "oracle" in proc.stdout
  assert plot.stat().st_size > 0
  r = json.loads(report.read_text())
  assert r["turns"] == 2 and len(r["turns_detail"]) == 2
  assert r["steps"] == sum(t["steps"] for t in r["turns_detail"]) > 0
  assert r["config"]["block_size"] == 8 and r["jax_version"]
  rows = {(v["policy"], v["hot_fraction"]): v for v in r["variants"]}
  assert set(rows) == {(p, f) for p in ("recent", "sink_recent", "attention",
                                        "seed_score") for f in (0.12, 1.0)}
  oracle = {o["hot_fraction"]: o["mass_hit"] for o in r["oracle"]}
  for o in r["oracle"]:  # a block-level choice is one per-head choice
    assert o["mass_hit"] <= o["per_head_mass_hit"] + 1e-9 <= 1 + 2e-9
  for (policy, fraction), v in rows.items():
    if fraction == 1.0:  # every block hot: exact attention
      assert v["mass_hit"] == pytest.approx(1.0, abs=1e-5)
      assert v["needed_hit"] == 1.0 and v["top1_agreement"] == 1.0
      assert v["kl_nats"] == pytest.approx(0.0, abs=1e-6)
    else:
      assert 0 < v["mass_hit"] <= oracle[fraction] + 1e-9, policy
      assert v["mean_hot_blocks"] < rows[(policy, 1.0)]["mean_hot_blocks"]
      assert v["kl_nats"] > 0
  p = r["prefill"]  # each turn's prefix: the system prompt
  assert p["turns"] == 2 and 0 < p["prefix_share"] <= 1 + 1e-6
  for row in p["served"]:
    assert max(row["recent"], row["sink_recent"]) <= row["oracle"] + 1e-9
    if row["hot_fraction"] == 1.0:
      assert row["oracle"] == row["recent"] == pytest.approx(1.0)
  assert all(t["prefix_tokens"] > 0 for t in r["turns_detail"])
  c = r["concentration"]
  assert 0 < c["blocks_for_50pct"] <= c["blocks_for_90pct"] <= c["blocks_for_99pct"] <= 1
  # Free-running: a row with every block hot writes the exact row's tokens;
  # the exact row writes what exact attention picks.
  assert "free-running, 2 turns" in proc.stdout
  fr = r["free_running"]
  assert fr["turns"] == 2 and fr["exact"]["identical_turns"] == 1
  assert fr["exact"]["exact_pick"] == 1 and fr["exact"]["tokens"] > 0
  for v in fr["variants"]:
    assert v["tokens"] > 0 and 0 <= v["exact_pick"] <= 1
    if v["hot_fraction"] == 1.0:
      assert v["identical_turns"] == 1, v
      assert v["nll_excess"] == pytest.approx(0.0, abs=1e-9)
  for t in r["turns_detail"]:
    texts = t["continuations"]
    assert set(texts) == {"exact"} | {f"{p}@{f:g}" for p, f in rows}
    assert texts["seed_score@1"] == texts["exact"] != ""


def test_replot_draws_a_report_again(tmp_path):
  """--replot reads a report (here one without free-running rows, as
  reports before them were) and draws it; bad reports are refused."""
  report, plot = tmp_path / "r.json", tmp_path / "again.png"
  proc = _run(*TINY, "--sessions=1", "--decode_steps=3", "--nofree_running",
              f"--json={report}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "free-running" not in proc.stdout
  assert json.loads(report.read_text())["free_running"] is None
  proc = _run(f"--replot={report}", f"--plot={plot}", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "attn hit" in proc.stdout and plot.stat().st_size > 0
  # The first reports had no "prefill": they draw without its panel.
  old = json.loads(report.read_text())
  del old["prefill"], old["free_running"]
  old_report = tmp_path / "old.json"
  old_report.write_text(json.dumps(old))
  proc = _run(f"--replot={old_report}", f"--plot={plot}", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cut = dict(old, concentration={})
  cut_report = tmp_path / "cut.json"
  cut_report.write_text(json.dumps(cut))
  not_a_report = tmp_path / "other.json"
  not_a_report.write_text('{"rows": []}')
  for args, message in (
      ([f"--replot={report}"], "--replot needs --plot"),
      ([f"--replot={not_a_report}", f"--plot={plot}"],
       "not a study_importance report"),
      ([f"--replot={cut_report}", f"--plot={plot}"],
       "not a complete study_importance report"),
      ([f"--replot={tmp_path / 'none.json'}", f"--plot={plot}"], "none.json"),
      ([f"--replot={report}", f"--plot={tmp_path / 'p.txt'}"], ".png")):
    proc = _run(*args, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--hot_fractions=0"], "--hot_fractions: give fractions in (0, 1]"),
    (["--hot_fractions=a,b"], "--hot_fractions: give fractions in (0, 1]"),
    (["--hot_fractions=0.1,0.1"], "hot fractions repeat"),
    (["--policies=lru"], "policies must be among"),
    (["--score_weights=1,2"], "--score_weights: give three numbers"),
    (["--score_weights=0,0,0"], "importance weights must be"),
    (["--needed_share=0"], "--needed_share must be in (0, 1]"),
    (["--turns=6"], "past --max_context / the model's 1024"),
    (["--trace=/nonexistent/t.jsonl"], "t.jsonl"),
])
def test_bad_input_exits_with_a_message_and_writes_nothing(tmp_path, args,
                                                           message):
  report = tmp_path / "r.json"
  proc = _run(*TINY, *args, f"--report={report}", timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not report.exists()


def test_ctrl_c_reports_the_turns_studied(tmp_path):
  report = tmp_path / "r.json"
  done = interrupt_after(
      ["launch.study_importance", *TINY[:-1], "--sessions=6",
       # Seconds a turn, five turns to go: the Ctrl-C lands in turn 2.
       "--decode_steps=100", "--hot_fractions=0.1,0.3,0.5,0.7",
       f"--report={report}"], "| 1/6", cwd=ROOT,
      stream="stderr")
  assert done.returncode == 130, done.stderr[-3000:]
  r = json.loads(report.read_text())
  assert r["complete"] is False and r["turns"] == 1
  assert "interrupted after 1 of 6 turns" in done.stderr
  assert "Traceback" not in done.stderr
