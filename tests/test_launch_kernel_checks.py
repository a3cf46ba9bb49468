"""The kernel benchmark launchers and scripts refuse bad input up front, with
a clear message and no traceback, and leave what earlier runs wrote alone.

The launchers run in subprocesses (their absl flags clash once several are
imported into one process); each is refused before any kernel runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=180, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        **kwargs)


def test_zero_reps_is_refused():
  done = _run("-m", "launch.bench_kernels", "--reps=0", "--only=calib",
              "--plot=")
  assert done.returncode != 0
  assert "--reps" in done.stderr and "Traceback" not in done.stderr
  assert "calib " not in done.stdout  # nothing ran


def test_bad_output_paths_are_refused_before_any_section(tmp_path):
  # --out a directory: refused before the first section.
  done = _run("-m", "launch.bench_kernels", "--only=calib",
              f"--out={tmp_path}")
  assert done.returncode != 0
  assert "is a directory" in done.stderr and "Traceback" not in done.stderr
  assert "calib " not in done.stdout
  # A good --out with an existing report but a --plot that cannot be
  # written: refused up front, the report left as it was.
  report = tmp_path / "report.json"
  old = b'{"rows": [], "note": "an earlier run"}\n'
  report.write_bytes(old)
  (tmp_path / "plot.png").mkdir()
  done = _run("-m", "launch.bench_kernels", "--only=calib",
              f"--out={report}", f"--plot={tmp_path / 'plot.png'}")
  assert done.returncode != 0
  assert "--plot" in done.stderr and "Traceback" not in done.stderr
  assert "calib " not in done.stdout
  assert report.read_bytes() == old


def test_profile_kernels_refuses_a_malformed_shape(tmp_path):
  done = _run("-m", "launch.profile_kernels", "--kernel=triton_decode",
              "--shape=1,32,7,128,16,64,bfloat16")
  assert done.returncode != 0 and "Traceback" not in done.stderr
  assert "triton_decode cannot run" in done.stderr
  assert "heads (32) must be a multiple of kv_heads (7)" in done.stderr
  done = _run("-m", "launch.profile_kernels",
              f"--summarize={tmp_path / 'missing.csv'}")
  assert done.returncode != 0 and "Traceback" not in done.stderr
  assert "cannot read" in done.stderr


def test_gpu_profile_checks_every_case_before_running(tmp_path):
  done = subprocess.run(
      ["bash", "scripts/gpu_profile.sh"], cwd=REPO, capture_output=True,
      text=True, timeout=60,
      env=dict(os.environ, PYTHON=sys.executable, NCU="/bin/false",
               OUT=str(tmp_path / "p"),
               CASES="triton_decode:1,8,2,64,16,64,float32\n"
                     "triton_decode:1,32,7,128,16,64,bfloat16 nocolon"))
  assert done.returncode == 2, done.stdout + done.stderr
  assert "multiple of kv_heads" in done.stderr
  assert "'nocolon': not KERNEL:SHAPE" in done.stderr
  assert "== 1" not in done.stdout  # no case ran, not even the good one


def _script_copy(tmp_path):
  """A tree holding only a copy of scripts/gpu_check.sh: it runs there
  without installing anything from the repo's .whl/."""
  tree = tmp_path / "tree"
  (tree / "scripts").mkdir(parents=True)
  shutil.copy(os.path.join(REPO, "scripts", "gpu_check.sh"),
              tree / "scripts")
  return tree


def test_gpu_check_summarizes_only_this_runs_sections(tmp_path):
  """Run with every section off on an OUT that holds an earlier run's
  summaries: those are not printed as this run's. Then with a relative
  OUT from another directory: the outputs land under that directory. A copy
  of the script runs (in a tree of its own, so that nothing is installed
  from the repo's .whl/)."""
  if shutil.which("realpath") is None:
    pytest.skip(reason="no realpath")
  tree = _script_copy(tmp_path)
  work = tmp_path / "work"
  out = work / "out"
  out.mkdir(parents=True)
  (out / "bench.txt").write_text("targets\n  MISS STALE_TARGET\n")
  (out / "tests.txt").write_text("FAILED STALE_TEST\n1 failed\n")
  (out / "tests_gather.txt").write_text("STALE_GATHER\n")
  env = dict(os.environ, PYTHON=sys.executable, BENCH="0", TESTS="0",
             TILING="0", PROFILE="0", STORAGE="0")
  for where in (str(out), "out"):
    done = subprocess.run(["bash", str(tree / "scripts" / "gpu_check.sh")],
                          cwd=work, capture_output=True, text=True,
                          timeout=120, env=dict(env, OUT=where))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "STALE" not in done.stdout, where
    assert (out / "env.txt").exists(), where
    assert not (tree / "out").exists(), where
    (out / "env.txt").unlink()


def test_gpu_check_passes_the_sweeps_kernels(tmp_path):
  """TILING_KERNELS reaches the sweep's --kernels: an unknown kernel is
  refused by the sweep, and the run says it failed. A copy of the script
  runs, as above; the launcher comes from this checkout (PYTHONPATH)."""
  if shutil.which("realpath") is None:
    pytest.skip(reason="no realpath")
  tree = _script_copy(tmp_path)
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO, BENCH="0",
             TESTS="0", TILING="1", TILING_BUDGET="5",
             TILING_KERNELS="flash", PROFILE="0", STORAGE="0",
             OUT=str(tmp_path / "out"))
  done = subprocess.run(["bash", str(tree / "scripts" / "gpu_check.sh")],
                        cwd=tmp_path, capture_output=True, text=True,
                        timeout=180, env=env)
  assert done.returncode != 0, done.stdout + done.stderr
  assert "unknown ['flash']" in (tmp_path / "out" / "tiling.txt").read_text()


def test_plot_labels_small_contexts_and_dtypes():
  from launch import kernel_plot
  dec = dict(batch=2, heads=9, kv_heads=3, head_dim=64, page=16, ctx=96,
             dtype="float32")
  pre = dict(batch=1, heads=4, kv_heads=2, head_dim=64, page=16, prefix=48,
             new=16, dtype="float32")
  assert kernel_plot.shape_labels("decode", [dec]) == [
      "2x96 9/3h d64 p16 f32"]
  assert kernel_plot.shape_labels(
      "prefill", [pre, dict(pre, dtype="bfloat16"),
                  dict(pre, prefix=32256, new=512)]) == [
                      "1x(48+16) p16 f32", "1x(48+16) p16 bf16",
                      "1x(31.5k+512) p16"]
  # A panel with rows but no ceiling (no cuDNN row off a GPU): all None.
  rows = [dict(kind="prefill", impl="a (ours)", shape=pre, time_us=1.0,
               tflops=1.0)]
  _, values = kernel_plot.panel_values(dict(rows=rows), "prefill")
  assert values == {"a (ours)": [None]}


def test_json_is_replaced_only_when_complete(tmp_path):
  from dualpath_jax import outputs
  path = tmp_path / "r.json"
  path.write_text('{"old": true}')
  with pytest.raises(TypeError):  # a tuple key: not JSON, whatever default=
    outputs.write_json({("bad", "key"): 1}, str(path))
  assert json.loads(path.read_text()) == {"old": True}
  assert os.listdir(tmp_path) == ["r.json"]  # no temporary left behind
  outputs.write_json({"new": 1}, str(path))
  assert json.loads(path.read_text()) == {"new": 1}


def test_gpu_profile_stops_its_running_case_when_interrupted(tmp_path):
  """SIGTERM (gpu_check.sh's timeout) or Ctrl-C during a case stops that
  case's ncu run at once, not at CASE_TIMEOUT, and exits 130. A stand-in ncu
  records its pid and sleeps."""
  import signal
  import time
  pid_file = tmp_path / "ncu.pid"
  fake_ncu = tmp_path / "ncu"
  fake_ncu.write_text(f"#!/bin/bash\necho $$ > {pid_file}\nexec sleep 120\n")
  fake_ncu.chmod(0o755)
  proc = subprocess.Popen(
      ["bash", "scripts/gpu_profile.sh"], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=dict(os.environ, PYTHON=sys.executable, NCU=str(fake_ncu),
               OUT=str(tmp_path / "p"), CASE_TIMEOUT="300",
               CASES="triton_decode:1,8,2,64,16,64,float32"))
  try:
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()):
      assert proc.poll() is None and time.monotonic() < deadline, (
          proc.communicate())
      time.sleep(0.2)
    ncu_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, out
  assert "interrupted" in out
  time.sleep(0.5)
  with pytest.raises(ProcessLookupError):  # the stand-in ncu is gone
    os.kill(ncu_pid, 0)
