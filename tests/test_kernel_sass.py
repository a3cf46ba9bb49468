"""Tests of the static SASS report: the analysis on a stored excerpt of real
disassembly and on hand-worked occupancy cases, the launcher's refusals,
and (where the `triton` package is installed) the report end to end.

The launcher runs in a subprocess: its absl flags clash with other
launchers' once several are imported into one test process (its figures
come from `launch.sass_report`, which defines none).
"""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys

import pytest

from launch import sass_report
from launch import sass_analysis
from launch.kernel_cases import DecodeShape, PrefillShape, default_tiling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(REPO, "tests", "data", "sass_loop_excerpt.txt")


def _excerpt() -> str:
  with open(EXCERPT, encoding="utf-8") as f:
    return f.read()


def test_loops_of_a_real_disassembly():
  instructions, labels = sass_analysis.parse(_excerpt())
  assert len(instructions) == 32
  assert [i.opcode for i in instructions[:6]] == [
      "R2UR", "LDGSTS", "LDGDEPBAR", "LDGSTS", "LDGDEPBAR", "BRA"]
  assert labels == {".L_x_1": 8, ".L_x_0": 18, ".L_x_2": 21, ".L_x_3": 30,
                    ".L_x_4": 32}
  found = sass_analysis.loops(_excerpt())
  # The K/V loop, and the trap loop every kernel ends with.
  assert [(lp.label, len(lp.instructions)) for lp in found] == [
      (".L_x_1", 9), (".L_x_3", 1)]
  main = sass_analysis.main_loop(_excerpt())
  assert main.label == ".L_x_1"
  assert main.instructions[0].address == 0x1c50
  assert main.instructions[-1].text.startswith("/*8620*/")
  assert main.mix() == {"PRMT": 4, "DEPBAR": 1, "BAR": 1, "IMAD": 1,
                        "UIADD3": 1, "BRA": 1}


def test_a_kernel_without_a_loop_is_an_error():
  no_loop = "\n".join(line for line in _excerpt().splitlines()
                      if "BRA `(.L_x_1)" not in line
                      and "BRA `(.L_x_3)" not in line)
  assert sass_analysis.loops(no_loop) == []
  with pytest.raises(ValueError, match="no loop"):
    sass_analysis.main_loop(no_loop)


def test_resources_from_cuobjdump():
  used = sass_analysis.resources(
      "Resource usage:\n Function paged_decode:\n  REG:255 STACK:1688 "
      "SHARED:1024 LOCAL:16 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0")
  assert used == sass_analysis.Resources(255, 1024, 1688, 16)
  assert used.spilled == 1704
  with pytest.raises(ValueError, match="REG"):
    sass_analysis.resources("Function paged_decode: STACK:0")


@pytest.mark.parametrize("regs,shared_kb,warps,programs,limited_by", [
    (254, 57, 4, 2, "registers"),  # 256 a thread: 8 warps of 64k registers
    (160, 21, 4, 3, "registers"),  # 5,120 a warp: 12 warps
    (32, 100, 4, 2, "shared memory"),  # 228 KB // (100 + 1) KB
    (16, 0, 1, 32, "programs"),
    (16, 0, 8, 8, "warps"),  # 64 warps an SM
    (64, 240, 4, 0, "shared memory"),  # does not fit at all
])
def test_occupancy_worked_by_hand(regs, shared_kb, warps, programs,
                                  limited_by):
  occ = sass_analysis.occupancy(regs, shared_kb * 1024, warps)
  assert (occ.programs, occ.warps, occ.limited_by) == (
      programs, programs * warps, limited_by)


def test_occupancy_refuses_nonsense():
  with pytest.raises(ValueError):
    sass_analysis.occupancy(0, 0, 4)
  with pytest.raises(ValueError):
    sass_analysis.occupancy(32, -1, 4)


def test_issue_ceiling():
  # 132 SMs x 4 schedulers x 1.98 GHz = 1.04544e12 warp-instructions/s;
  # at 1,024 per KB: 1.0209e9 KB/s, 1.04544 TB/s; at 211.3 (the int8
  # default's loop): 5.07 TB/s.
  assert sass_analysis.issue_ceiling_tbps(1024) == pytest.approx(1.04544)
  assert sass_analysis.issue_ceiling_tbps(211.3) == pytest.approx(5.066,
                                                                 abs=1e-3)


def test_step_bytes_flops_and_the_grid():
  shape = DecodeShape(64, 32, 8, 128, 16, 4096, "int8")
  default = default_tiling("triton_decode", shape)
  # 128 tokens of int8 K and V at head_dim 128, and 8 pages' two scales.
  assert sass_report.step_kv_bytes(shape, default) == 128 * 128 * 2 + 64
  # The 4 query heads of a group padded to 16 rows, two matmuls.
  assert sass_report.step_flops("triton_decode", shape, default) == (
      4 * 16 * 128 * 128)
  bf16 = DecodeShape(64, 32, 8, 128, 64, 4096, "bfloat16")
  t = default_tiling("triton_decode", bf16)
  assert sass_report.step_kv_bytes(bf16, t) == 128 * 128 * 2 * 2
  grid = sass_report.tilings("triton_decode", shape, dict(
      step_tokens=[64, 128], warps=[4], stages=[1, 2]))
  assert grid[0] == default and len(set(grid)) == len(grid) == 8
  # Each tiling of the int8 pool, then its twin with int8 queries.
  assert grid[1::2] == [dataclasses.replace(t, int8_query=True)
                        for t in grid[::2]]
  assert {(t.pages_per_chunk, t.num_stages) for t in grid[::2]} == {
      (4, 1), (4, 2), (8, 1), (8, 2)}
  assert {t.num_splits for t in grid} == {default.num_splits}
  assert not any(t.int8_query for t in sass_report.tilings(
      "triton_decode", bf16, dict(step_tokens=[64], warps=[4], stages=[1])))
  prefill = PrefillShape(1, 32, 8, 128, 16, 16384, 512, "bfloat16")
  pt = default_tiling("triton_prefill", prefill)
  assert sass_report.step_flops("triton_prefill", prefill, pt) == (
      4 * pt.block_q * 64 * 128)
  grid = sass_report.tilings("triton_prefill", prefill, dict(
      step_tokens=[32, 64], warps=[8], stages=[3], block_q=[64, 128]))
  assert grid[0] == pt and len(set(grid)) == len(grid) == 4
  assert {(t.block_q, t.pages_per_chunk) for t in grid} == {
      (64, 2), (64, 4), (128, 2), (128, 4)}


def test_loop_figures_of_the_excerpt():
  """A loop's figures, by hand: 9 instructions x 4 warps over 4
  schedulers is 9 issue clocks; the int8 default's step (128 keys, 16
  rows, d 128) is 1 Mi FLOPs, 256 tensor clocks at 4,096 a clock; and
  36 warp-instructions per 32,832 bytes."""
  shape = DecodeShape(64, 32, 8, 128, 16, 4096, "int8")
  tiling = default_tiling("triton_decode", shape)
  loop = sass_analysis.matmul_loops(_excerpt() + (
      "\n.L_x_9:\n        /*9000*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;"
      "\n        /*9010*/  BRA `(.L_x_9) ;\n"))
  assert [lp.label for lp in loop] == [".L_x_9"]  # the one with a matmul
  row = sass_report.loop_row(sass_analysis.main_loop(_excerpt()),
                             "triton_decode", shape, tiling, top_ops=2)
  assert row["instructions"] == 9 and row["tensor_ops"] == {}
  assert row["issue_clocks_per_step"] == 9.0
  assert row["tensor_clocks_per_step"] == 256.0
  assert row["issue_per_tensor"] == round(9 / 256, 2)
  assert row["warp_instructions_per_kb"] == round(36 / (32832 / 1024), 1)
  assert row["mix"] == {"PRMT": 4, "DEPBAR": 1}


def _run(*args, env=None, timeout=180):
  return subprocess.run([sys.executable, "-m", "launch.kernel_sass", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)


@pytest.mark.parametrize("flag,message", [
    ("--shape=64,32,8,128,16", "--shape: the shape takes 6 fields"),
    ("--kernel=triton_prefill --shape=1,32,8,128,16,4096", "takes 7 fields"),
    ("--block_q=64", "only the prefill kernel"),
    ("--kernel=triton_prefill --block_q=48",
     "--block_q: give positive integers (powers of 2)"),
    ("--shape=64,32,8,96,16,4096", "head_dim a power of 2"),
    ("--shape=64,30,8,128,16,4096", "multiple of kv_heads"),
    ("--step_tokens=48", "powers of 2"),
    ("--step_tokens=8", "at least 16"),
    ("--warps=0", "--warps: give positive integers"),
    ("--stages=x", "--stages: give positive integers, e.g. 1,8; got 'x'"),
    ("--dtypes=int4", "--dtypes: 'int4'"),
    ("--dtypes=", "--dtypes: give at least one of"),  # an IndexError
    ("--shape=1,32,8,128,16,4294967296", "past the kernels' int32 token"),
    ("--kernel=triton_prefill --v_transposed", "only the decode kernel reads"),
])
def test_bad_flags_are_refused_in_one_line(flag, message, tmp_path):
  done = _run(*flag.split(), f"--json={tmp_path / 'r.json'}")
  assert done.returncode == 1, done.stderr[-2000:]
  assert message in done.stderr and "Traceback" not in done.stderr
  assert not (tmp_path / "r.json").exists()


def test_without_triton_it_says_so(tmp_path):
  """A `triton` that fails to import (shadowing any installed one)."""
  fake = tmp_path / "fake" / "triton"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('not here')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path / "fake"), REPO]))
  done = _run(f"--json={tmp_path / 'r.json'}", env=env)
  assert done.returncode == 1
  assert "needs the `triton` package" in done.stderr
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "r.json").exists()


def test_report_end_to_end(tmp_path):
  pytest.importorskip("triton", reason="the SASS report needs the `triton` "
                      "package (pip install -e '.[sass]'); the analysis "
                      "itself is tested above on stored output")
  out = tmp_path / "r.json"
  done = _run("--dtypes=bfloat16,int8", "--step_tokens=128", "--warps=4",
              "--stages=1", f"--json={out}", timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = {(r["shape"]["dtype"], r["tiling"]["num_stages"],
           r["tiling"]["int8_query"]): r for r in report["rows"]}
  # bf16: the default (2 stages) and the grid's 1 stage; int8: the default
  # (128 tokens, 4 warps, 1 stage: the grid's only tiling) and its twin
  # with int8 queries.
  assert list(rows) == [("bfloat16", 2, False), ("bfloat16", 1, False),
                        ("int8", 1, False), ("int8", 1, True)]
  assert [r["default"] for r in report["rows"]] == [True, False, True, False]
  for r in report["rows"]:
    assert 1 <= r["registers"] <= 255 and r["programs_per_sm"] >= 1
    (loop,) = r["loops"]  # one loop over K/V steps
    assert loop["tensor_ops"].get("HMMA", 0) > 0  # 16-row dots: mma.sync
    assert loop["instructions"] > 100
  # Widening int8 in registers costs instructions: more per step than
  # bf16's, for half the bytes; int8 queries leave K unwidened, and their
  # int8 matmul takes half the HMMAs of the same contraction in bf16.
  loop = {key: r["loops"][0] for key, r in rows.items()}
  assert (loop["int8", 1, False]["instructions"]
          > loop["bfloat16", 1, False]["instructions"])
  assert "HADD2" in loop["int8", 1, False]["mix"]
  assert (loop["int8", 1, True]["instructions"]
          < loop["int8", 1, False]["instructions"])
  assert (loop["int8", 1, True]["tensor_ops"]["HMMA"]
          < loop["int8", 1, False]["tensor_ops"]["HMMA"])
  assert report["triton_version"] and report["environment"]["jax_version"]


def test_transposed_v_report_end_to_end(tmp_path):
  """`--v_transposed`: the int8 decode of a pool whose V pages are stored
  transposed issues fewer instructions a step than the same tiling on the
  pool as stored (V widens without a shuffle), with and without int8
  queries."""
  pytest.importorskip("triton", reason="the SASS report needs the `triton` "
                      "package (pip install -e '.[sass]'); the analysis "
                      "itself is tested above on stored output")
  loops = {}
  for transposed in (False, True):
    out = tmp_path / f"r{transposed}.json"
    done = _run("--dtypes=int8", "--step_tokens=128", "--warps=4",
                "--stages=1", f"--json={out}",
                *(["--v_transposed"] if transposed else []), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("int8+vt " in done.stdout) == transposed
    for r in json.loads(out.read_text())["rows"]:
      assert r["v_transposed"] == transposed
      loops[transposed, r["tiling"]["int8_query"]] = r["loops"][0]
  for q8 in (False, True):
    assert loops[True, q8]["instructions"] < loops[False, q8]["instructions"]
    assert loops[True, q8]["mix"].get("PRMT", 0) < loops[False, q8]["mix"][
        "PRMT"]


def test_prefill_report_end_to_end(tmp_path):
  pytest.importorskip("triton", reason="the SASS report needs the `triton` "
                      "package (pip install -e '.[sass]'); the analysis "
                      "itself is tested above on stored output")
  out = tmp_path / "r.json"
  done = _run("--kernel=triton_prefill", "--dtypes=bfloat16",
              "--step_tokens=64", "--warps=8", "--stages=3", "--block_q=128",
              f"--json={out}", timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (row,) = json.loads(out.read_text())["rows"]  # the grid is the default
  assert row["default"] and row["kernel"] == "triton_prefill"
  # The unmasked prefix loop, then the causal one; 128-row tiles run on
  # Hopper's warpgroup matmuls.
  prefix, causal = row["loops"]
  assert prefix["tensor_ops"].get("HGMMA", 0) > 0
  assert causal["instructions"] > prefix["instructions"]
  assert 0 < prefix["issue_per_tensor"] < causal["issue_per_tensor"]
