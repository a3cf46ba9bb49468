"""Tests of launch.bench_tiling: a tiny interpret-mode sweep end to end, a
wrong tiling reported as wrong (never timed), bad flags refused.

Each runs the launcher in a subprocess: its absl flags clash with other
launchers' once several are imported into one test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_smoke_sweep_writes_checked_rows(tmp_path):
  out = tmp_path / "tiling.json"
  done = _run("-m", "launch.bench_tiling", "--kernels=triton_prefill",
              "--reps=1", "--inner=1", "--warmup_s=0", f"--json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["complete"] and report["preset"] == "smoke"
  rows = report["rows"]
  assert len(rows) >= 2 and rows[0]["default"]
  assert not any(r["default"] for r in rows[1:])
  tilings = [json.dumps(r["tiling"], sort_keys=True) for r in rows]
  assert len(set(tilings)) == len(tilings)  # no tiling timed twice
  for r in rows:
    assert "error" not in r, r
    assert 0 <= r["rel_err"] <= report["max_rel_err"]
    assert r["time_us"] > 0
  (best,) = report["best"]
  assert best["configs"] == len(rows)
  assert best["best_us"] == min(r["time_us"] for r in rows)
  assert "best tiling per shape" in done.stdout


def test_sweep_on_transposed_v_pages_checks_against_the_pool_as_made(
    tmp_path):
  """`--kernels=triton_decode_vt`: the Triton decode's grid on the int8
  pool with its V pages transposed; its default (the only tiling a zero
  budget times) matches the reference of the pool as made."""
  out = tmp_path / "tiling.json"
  done = _run("-m", "launch.bench_tiling", "--kernels=triton_decode_vt",
              "--budget_s=0", f"--json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  default, skipped = rows
  assert default["kernel"] == "triton_decode_vt" and default["default"]
  assert default["shape"]["dtype"] == "int8"
  assert 0 <= default["rel_err"] <= 2e-2 and default["time_us"] > 0
  assert skipped["skipped"] == "time budget spent"


_WRONG = """
import sys
from absl import flags
from launch import bench_tiling
from launch import kernel_cases
from kernels import tuning
flags.FLAGS(["x", "--reps=1", "--inner=1", "--warmup_s=0"])
import jax.numpy as jnp
import time
shape = bench_tiling.PRESETS["smoke"]["triton_prefill"][0]
problem = kernel_cases.prefill_problem(shape, 1)
right = kernel_cases.kernel_fn
def wrong(kernel, tiling, interpret):
  fn = right(kernel, tiling, interpret)
  if tiling.block_q == 16:  # this tiling computes something else
    return lambda *a: fn(*a) * 1.5
  return fn
bench_tiling.kernel_fn = wrong
grid = [tuning.PrefillTiling(block_q=64, pages_per_chunk=2),
        tuning.PrefillTiling(block_q=16, pages_per_chunk=2)]
rows = []
bench_tiling.sweep_shape("triton_prefill", shape, grid, problem, rows, True,
                         time.monotonic() + 600, lambda: None)
good, bad = rows
assert "time_us" in good and "error" not in good, good
assert "time_us" not in bad and bad["error"].startswith("AssertionError: wrong"), bad
best = bench_tiling.best_per_shape(rows)
assert len(best) == 1 and best[0]["best_tiling"]["block_q"] == 64, best
rows = []
bench_tiling.sweep_shape("triton_prefill", shape, grid, problem, rows, True,
                         time.monotonic() - 1, lambda: None)
default, skipped = rows  # past the deadline: the default tiling only
assert default["default"] and "time_us" in default, default
assert skipped == dict(kernel="triton_prefill", shape=default["shape"],
                       skipped="time budget spent"), skipped
print("ok")
"""


def test_wrong_tiling_is_reported_not_timed_and_budget_stops():
  done = _run("-c", _WRONG)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")


def test_unknown_kernel_is_refused():
  done = _run("-m", "launch.bench_tiling", "--kernels=flash", timeout=120)
  assert done.returncode != 0
  assert "unknown ['flash']" in done.stderr


_SPREAD = """
import dataclasses
from launch import bench_tiling
cfg = bench_tiling.PRESETS["gpu"]
shape = cfg["mosaic_decode"][0]  # 1 x 32k, 16-token pages
grid = list(bench_tiling.mosaic_decode_grid(shape, cfg))
steps = [t.pages_per_chunk * shape.page // t.page_parts for t in grid]
assert len(set(map(repr, grid))) == len(grid)
# The default (one warpgroup, 2 slots, 33 splits: one wave of two programs
# an SM; its 4-head groups copied unpadded), its twin with the queries
# padded before the launch, its twin with a copying warpgroup on the deep
# ring, that ring with one warpgroup, the default reading its page ids first.
default, padded, copying, deep = grid[:4]
assert not default.pad_query
assert padded == dataclasses.replace(default, pad_query=True)
assert not default.copy_warpgroup and default.num_stages == 2
assert steps[0] == 64 and default.num_splits == 33, default
assert copying.copy_warpgroup and copying.num_stages > 2
assert deep == dataclasses.replace(copying, copy_warpgroup=False)
assert grid[4] == dataclasses.replace(default, ids_first=True)
# Then the first tilings take each step size that fits the shared memory
# (256-token steps do not at head_dim 128): a short budget still tries
# every one.
sizes = set(steps)
assert sizes == {64, 128}, steps
assert set(steps[5:5 + len(sizes)]) == sizes, steps
print("ok")
"""


def test_sweep_tries_every_step_size_first():
  done = _run("-c", _SPREAD, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")


_TRITON_DECODE = """
import dataclasses
from launch import bench_tiling
from launch.kernel_cases import default_tiling
cfg = bench_tiling.PRESETS["gpu"]
for shape in cfg["triton_decode"]:
  grid = list(bench_tiling.triton_decode_grid(shape, cfg))
  default = default_tiling("triton_decode", shape)
  # An int8 pool's tilings (the preset's shapes are int8) each come with
  # their twin with int8 queries.
  assert shape.dtype == "int8"
  assert not any(t.int8_query for t in grid[::2])
  assert grid[1::2] == [dataclasses.replace(t, int8_query=True)
                        for t in grid[::2]]
  grid = grid[::2]
  # int8 pools run unpipelined by default, 16-bit ones pipelined.
  assert default.num_stages == (1 if shape.dtype == "int8" else 2), default
  assert len(set(map(repr, grid))) == len(grid)
  # The default, its twin with the other pipelining, its twins on a half
  # and a quarter of its step, then the other step sizes in turn.
  assert grid[:2] == [default, dataclasses.replace(
      default, num_stages=3 - default.num_stages)]
  steps = [t.pages_per_chunk * shape.page // t.page_parts for t in grid]
  assert steps[2:4] == [steps[0] // 2, steps[0] // 4], steps
  assert all(dataclasses.replace(t, pages_per_chunk=1, page_parts=1)
             == dataclasses.replace(default, pages_per_chunk=1, page_parts=1)
             for t in grid[2:4]), grid[2:4]
  assert set(steps[4:7]) == {64, 128, 256}, steps
  assert {t.num_stages for t in grid} == {1, 2, 3}
# A 16-bit pool has no int8 queries to try.
bf16 = dataclasses.replace(cfg["triton_decode"][0], dtype="bfloat16")
assert not any(t.int8_query
               for t in bench_tiling.triton_decode_grid(bf16, cfg))
print("ok")
"""


def test_triton_decode_sweep_times_the_pipelining_twin_second():
  done = _run("-c", _TRITON_DECODE, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")
