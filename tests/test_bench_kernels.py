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

import pytest

from launcher_interrupt import interrupt_after

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_end_to_end(tmp_path):
  out = tmp_path / "kernels.json"
  done = subprocess.run(
      [sys.executable, "-m", "launch.bench_kernels", "--reps=1", "--inner=1",
       "--warmup_s=0", f"--json={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["complete"] and report["preset"] == "smoke"
  # Where and when it ran (metrics.run_environment) and how it was started.
  assert report["backend"] == "cpu" and report["interpret"] is True
  assert report["jax_version"] and report["date"][:2] == "20"
  assert "git_commit" in report
  assert report["command"].startswith("python -m launch.bench_kernels ")
  kinds = {r["kind"] for r in report["rows"]}
  assert kinds == {"calib", "decode", "prefill", "copy", "overlap"}
  # Every section's wall time, in the order they ran (the block copy before
  # attention), and every row's: what a GPU lease is planned from.
  assert list(report["section_s"]) == ["calib", "copy", "decode", "prefill",
                                       "overlap", "gather_kernel"]
  assert all(t > 0 for t in report["section_s"].values())
  assert "section decode: " in done.stdout
  walls = [r["wall_s"] for r in report["rows"]]
  assert all(w >= 0 for w in walls)
  assert max(walls) > 0.1  # a kernel's interpret-mode compile at least
  assert sum(walls) <= sum(report["section_s"].values()) + 0.1
  # The warp-specialized decode on the bf16 shape only (the preset says so).
  ws = {r["shape"]["dtype"] for r in report["rows"]
        if r["impl"] == "pallas_mosaic_gpu_ws (ours)" and r["kind"] == "decode"}
  assert ws == {"bfloat16"}
  # The Mosaic decode with its queries padded before the launch, beside the
  # default where the default copies them unpadded (calls of < 256 MiB): the
  # 8 / 2 heads shape only (9 / 3 and 4 / 2 heads are padded either way).
  padded = [(r["shape"]["heads"], r["shape"]["kv_heads"])
            for r in report["rows"]
            if r["impl"] == "pallas_mosaic_gpu, padded q (ours)"]
  assert padded == [(8, 2)]
  # And with its splits merged by one reduction, on every shape the Mosaic
  # kernel runs (not the float32 one).
  one_reduce = [(r["shape"]["heads"], r["shape"]["kv_heads"])
                for r in report["rows"]
                if r["impl"] == "pallas_mosaic_gpu, one-reduce merge (ours)"]
  assert one_reduce == [(4, 2), (8, 2)], one_reduce
  # The Triton decode with int8 queries, with V pages stored transposed,
  # and with both, on the int8 shape only.
  for impl in ("int8 query", "V transposed", "int8 query + V transposed"):
    dtypes = [r["shape"]["dtype"] for r in report["rows"]
              if r["impl"] == f"pallas_triton, {impl} (ours)"]
    assert dtypes == ["int8"], (impl, dtypes)
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
  assert any(t["shape"].startswith("[gather runs of 2]")
             for t in report["targets"])
  assert any(t["shape"].startswith("[gather: per-block transfers]")
             for t in report["targets"])
  # The one-kernel gather (its own section, last) moved the right pages.
  kernel_row, = [r for r in report["rows"]
                 if r["impl"] == "gather: one kernel (ours)"]
  assert kernel_row["rel_err"] == 0 and kernel_row["hlo_ops"]
  assert any(t["shape"].startswith("[gather: one kernel]")
             for t in report["targets"])
  assert (tmp_path / "kernels_gather_kernel_hlo.txt").read_text().startswith(
      "HloModule")
  # The compiled gather beside the JSON: per-block and in one run.
  hlo = (tmp_path / "kernels_gather_hlo.txt").read_text()
  assert hlo.count("\nENTRY ") == 2 and "run_length=4" in hlo
  assert "gather HLO" in done.stdout
  png = tmp_path / "kernels.png"  # beside the JSON
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "targets" in done.stdout


def test_ctrl_c_writes_the_rows_so_far_and_their_plot(tmp_path):
  """The PNG is drawn at the end only; Ctrl-C (how scripts/gpu_check.sh
  stops a step at its timeout) is an end: the JSON of the finished
  sections, marked incomplete, and its PNG; exit 130."""
  out = tmp_path / "k.json"

  def no_png_yet(stdout: str):
    del stdout
    assert not (tmp_path / "k.png").exists()  # not drawn per section

  done = interrupt_after(["launch.bench_kernels", f"--out={out}"],
                         "section calib:", cwd=REPO, timeout=300,
                         on_marker=no_png_yet)
  assert done.returncode == 130, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["interrupted"] and not report["complete"]
  assert "calib" in report["section_s"]
  assert {r["kind"] for r in report["rows"]} >= {"calib"}
  assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "interrupted: wrote the rows so far" in done.stderr


def test_short_calls_get_more_calls_per_repetition():
  """timeit's repetitions last MIN_REP_S: an 80 us call is repeated 63
  times, a 1 s call keeps the asked-for count, unknown stays as asked."""
  from launch import kernel_cases
  assert kernel_cases.calls_per_rep(5, 80e-6, 0.005) == 63
  assert kernel_cases.calls_per_rep(5, 1.0, 0.005) == 5
  assert kernel_cases.calls_per_rep(5, None) == 5
  assert kernel_cases.calls_per_rep(5, 1e-9) == kernel_cases.MAX_INNER


def test_timeit_fills_a_repetition_with_short_calls():
  """With a warm-up, a call that takes ~no time is timed over many calls per
  repetition; without one (CPU smoke runs), exactly `inner`."""
  from launch import kernel_cases
  counts = []
  kernel_cases.timeit(lambda: counts.append(1), reps=2, inner=3,
                      wait=lambda _: None, warmup_s=0)
  assert len(counts) == 1 + 2 * 3
  counts.clear()
  kernel_cases.timeit(lambda: counts.append(1), reps=2, inner=3,
                      wait=lambda _: None, warmup_s=0, compiled=True)
  assert len(counts) == 2 * 3  # the caller's check call compiled it
  counts.clear()
  kernel_cases.timeit(lambda: counts.append(1), reps=2, inner=3,
                      wait=lambda _: None, warmup_s=0.01, min_rep_s=0.1)
  warm = len(counts) - 2 * kernel_cases.MAX_INNER
  assert warm > 1  # the warm-up's calls, then MAX_INNER per repetition


def _row(kind, impl, shape, **values):
  return dict(kind=kind, impl=impl, shape=shape, time_us=1.0, **values)


def test_plot_values_are_percent_of_each_ceiling():
  """Decode against the report's copy bandwidth, prefill against cuDNN's
  row of the same shape, gathers against the plain transfer; missing rows
  give None, not a bar."""
  from launch import kernel_plot
  dec = dict(batch=1, heads=32, kv_heads=8, head_dim=128, page=16,
             ctx=32768, dtype="bfloat16")
  pre = dict(batch=1, heads=32, kv_heads=8, head_dim=128, page=16,
             prefix=16384, new=512, dtype="bfloat16")
  cp = dict(layers=8, blocks=256, pool_blocks=4096, host_slots=2048,
            kv_heads=8, page=16, head_dim=128, dtype="bfloat16")
  report = dict(ceilings=dict(copy_gbps=3000.0), rows=[
      _row("decode", "a (ours)", dec, gbps=1500.0),
      _row("decode", "b", dec, gbps=2400.0),
      _row("decode", "a (ours)", dict(dec, batch=4), gbps=300.0),
      _row("prefill", "a (ours)", pre, tflops=100.0),
      _row("prefill", "cudnn dense (full ctx)", pre, tflops=400.0),
      _row("copy", "gather host->device (ours)", cp, gbps=27.5),
      _row("copy", "plain pinned->device", cp, gbps=55.0),
      dict(kind="decode", impl="c", shape=dec, error="boom")])
  labels, values = kernel_plot.panel_values(report, "decode")
  assert labels == ["1x32k 32/8h d128 p16 bf16", "4x32k 32/8h d128 p16 bf16"]
  assert values == {"a (ours)": [50.0, 10.0], "b": [80.0, None]}
  assert kernel_plot.panel_values(report, "prefill")[1] == {"a (ours)": [25.0]}
  assert kernel_plot.panel_values(report, "copy")[1] == {
      "gather host->device (ours)": [50.0]}


@pytest.mark.parametrize("second", ["r.json", "other.json"])
def test_plot_cli_never_writes_over_a_report(tmp_path, second):
  """`kernel_plot r.json r.json` (or another report as the second argument)
  used to write the PNG over it."""
  src = tmp_path / "r.json"
  src.write_text(json.dumps({"kind": "bench_kernels", "rows": []}))
  other = tmp_path / "other.json"
  other.write_text('{"keep": 1}')
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  done = subprocess.run(
      [sys.executable, "-m", "launch.kernel_plot", str(src),
       str(tmp_path / second)],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stderr
  assert "does not end in .png" in done.stderr
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_bench_kernels_refuses_a_plot_over_its_report(tmp_path):
  out = tmp_path / "x.png"
  done = subprocess.run(
      [sys.executable, "-m", "launch.bench_kernels", f"--out={out}",
       "--only=calib"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert "--out and --plot are the same file" in done.stderr
  assert list(tmp_path.iterdir()) == []


def test_plot_cli_refuses_a_file_that_is_no_report(tmp_path):
  bad = tmp_path / "x.json"
  bad.write_text('{"rows": 3}')
  done = subprocess.run([sys.executable, "-m", "launch.kernel_plot", str(bad)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and "not a launch.bench_kernels report" in (
      done.stderr)
  assert not (tmp_path / "x.png").exists()
