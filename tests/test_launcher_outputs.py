"""Every launcher that writes a report checks its output paths before any
work, so that a typo (a directory, an unwritable folder) costs nothing
instead of a finished run's results; and `launch.bench_model` end to end.

The launchers run in subprocesses (their absl flags clash once several are
imported into one process).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dualpath_jax import outputs

from launcher_interrupt import interrupt_after

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


# (launcher and its flags, the output flag that names a directory, what the
# output would show had the run started)
BAD_OUTPUTS = [
    (["launch.agent_eval", "--sessions=1", "--turns=1"], "--report",
     "compiling"),
    (["launch.agent_eval", "--sessions=1", "--turns=1", "--report={ok}"],
     "--plot", "compiling"),
    (["launch.bench_online", "--sessions=1", "--turns=1", "--rates=1"],
     "--report", "agents/s"),
    (["launch.bench_online", "--sessions=1", "--turns=1", "--rates=1",
      "--report={ok}"], "--plot", "agents/s"),
    (["launch.bench_model", "--model=random:tiny-test"], "--out", "prefill"),
    (["launch.bench_group_sampling", "--model=random:tiny-test"], "--json",
     "sharing"),
    (["launch.bench_group_sampling", "--model=random:tiny-test",
      "--json={ok}"], "--plot", "sharing"),
    (["launch.bench_storage", "--recompute=none", "--configs=raw",
      "--repeats=1"], "--json", "round"),
    (["launch.crash_test_storage", "--kills=1"], "--json", "kill"),
    (["launch.kernel_sass", "--dtypes=int8"], "--json", "configurations"),
]


@pytest.mark.parametrize("args,flag,started", BAD_OUTPUTS,
                         ids=[f"{a[0]}{f}" for a, f, _ in BAD_OUTPUTS])
def test_a_directory_as_output_is_refused_before_the_run(tmp_path, args,
                                                         flag, started):
  ok = tmp_path / "ok.json"
  args = [a.format(ok=ok) for a in args]
  done = _run(*args, f"{flag}={tmp_path}", timeout=120)
  assert done.returncode != 0
  assert f"{flag}: {tmp_path} is a directory" in done.stderr, done.stderr
  assert "Traceback" not in done.stderr
  assert started not in done.stdout + done.stderr  # nothing ran
  assert not ok.exists()


def test_crash_test_refuses_a_file_as_its_store_before_the_kills(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me")
  done = _run("launch.crash_test_storage", "--kills=1", f"--root={a_file}",
              timeout=120)
  assert done.returncode != 0
  assert f"crash_test_storage: --root: {a_file} exists and is not a " \
      "directory" in done.stderr, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and "kill" not in done.stdout
  assert a_file.read_text() == "keep me"


def test_bench_model_reports_tokens_per_second(tmp_path):
  out = tmp_path / "sub" / "model.json"  # its folder is made
  done = _run("launch.bench_model", "--model=random:tiny-test",
              "--prompt_tokens=40", "--decode_batches=1,3",
              "--decode_steps=2", "--reps=1", f"--json={out}")  # --out's alias
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["model"] == "tiny-test" and report["prompt_tokens"] == 40
  assert [(r["phase"], r["batch"]) for r in report["rows"]] == [
      ("prefill", 1), ("decode", 1), ("decode", 3)]
  for r in report["rows"]:
    assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"])
  # The run record every launcher's report carries.
  for key in ("backend", "jax_version", "jaxlib_version", "date",
              "git_commit", "device"):
    assert key in report, key
  assert "decode" in done.stdout
  assert set(report["startup"]) == {"describe_s", "load_weights_s"}
  assert all(s > 0 for s in report["startup"].values())
  assert "start-up: config + tokenizer" in done.stdout
  assert report["complete"] is True
  assert "  decode batch 3: " in done.stdout  # each row as it is measured


def test_bench_model_ctrl_c_reports_the_rows_measured(tmp_path):
  """Ctrl-C after the first row (16 decode batches still to compile and
  time): the report holds the rows measured, marked incomplete; exit 130."""
  out = tmp_path / "model.json"
  done = interrupt_after(
      ["launch.bench_model", "--model=random:tiny-test", "--prompt_tokens=40",
       "--decode_batches=" + ",".join(map(str, range(1, 17))),
       "--decode_steps=8", "--reps=2", f"--out={out}"],
      "prefill batch 1:", cwd=REPO, timeout=180)
  assert done.returncode == 130, (done.returncode, done.stdout[-1500:],
                                  done.stderr[-1500:])
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["complete"] is False
  phases = [(r["phase"], r["batch"]) for r in report["rows"]]
  assert phases[0] == ("prefill", 1) and len(phases) < 17, phases
  assert "interrupted: the rows measured so far" in done.stdout


def test_bench_group_sampling_prefills_a_shared_prompt_once(tmp_path):
  out, png = tmp_path / "groups.json", tmp_path / "groups.png"
  done = _run("launch.bench_group_sampling", "--model=random:tiny-test",
              "--samples=1,3", "--prompt_tokens=50", "--max_new_tokens=4",
              "--max_context=128", "--num_blocks=64", f"--json={out}",
              f"--plot={png}")
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = {(r["n"], r["share_prefill"]): r for r in report["rows"]}
  assert set(rows) == {(1, False), (3, False), (1, True), (3, True)}
  tail = 50 - (50 - 1) // 16 * 16  # what each later sample computes
  assert rows[3, False]["prefill_tokens"] == 150
  assert rows[3, True]["prefill_tokens"] == 50 + 2 * tail
  assert rows[3, True]["cached_prompt_tokens"] == [0, 50 - tail, 50 - tail]
  assert rows[3, True]["shared_prefill_tokens"] == 2 * (50 - tail)
  for r in report["rows"]:
    assert len(r["ttft_s"]) == len(r["tokens"]) == r["n"]
    assert all(len(t) == 4 for t in r["tokens"]) and r["preemptions"] == 0
  assert report["complete"] is True and png.stat().st_size > 0
  assert "n=3 sharing on" in done.stdout  # each group as it finishes


@pytest.mark.parametrize("flag,msg", [
    ("--samples=2,0", "--samples: give positive integers"),
    ("--prompt_tokens=300 --max_context=256",
     "--prompt_tokens + --max_new_tokens = 316 is past --max_context 256"),
    ("--samples=8 --prompt_tokens=200 --max_context=256 --num_blocks=64",
     "--num_blocks: 8 samples of 216 tokens need 112 blocks"),
])
def test_bench_group_sampling_refuses_bad_flags(flag, msg):
  done = _run("launch.bench_group_sampling", "--model=random:tiny-test",
              *flag.split(), timeout=120)
  assert done.returncode != 0
  assert msg in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("flag,msg", [
    ("--decode_batches=1,0", "--decode_batches: give positive integers"),
    ("--decode_batches=a", "--decode_batches: give positive integers"),
    ("--attention=flash", "--attention: unknown 'flash'"),
    ("--model=/no/such.gguf", "no GGUF file"),
    # It used to time a context past the model's and report the figures.
    ("--model=random:tiny-test --prompt_tokens=5000",
     "--prompt_tokens + --decode_steps = 5032 tokens is past the model's "
     "context of 1024"),
])
def test_bench_model_refuses_bad_flags(flag, msg):
  done = _run("launch.bench_model", *flag.split(), timeout=120)
  assert done.returncode != 0
  assert msg in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag,msg", [
    ("--configs=file:raw@io_threads=x", "io_threads must be an integer"),
    ("--recompute=fast", "--recompute: 'model', 'none' or"),
    ("--dir=/no/such/dir", "--dir: /no/such/dir is not a directory"),
    ("--model=huge", "--model: unknown preset 'huge'"),
    ("--repeats=0", "flag --repeats=0: 0 is not a positive integer"),
    ("--store_bytes=-5", "flag --store_bytes=-5"),  # it ran, and wrote
    ("--recompute=model --prefill_lengths=x", "--prefill_lengths: give"),
    # Each config used to be checked only when its turn came, after the
    # earlier configs' runs (whose results the error then lost).
    ("--configs=file:raw,fil:raw", "config 'fil:raw': driver='fil'"),
    ("--configs=file:raw,file:rawr", "codec='rawr' not in"),
    ("--configs=file:raw@sync=never", "sync='never' not in"),
    ("--dtype=int8", "cache dtype must be one of"),  # a traceback
    ("--dir=/proc", "--dir: the folder /proc is not writable"),  # a traceback
])
def test_bench_storage_refuses_bad_flags(tmp_path, flag, msg):
  done = _run("launch.bench_storage", "--recompute=none", *flag.split(),
              f"--json={tmp_path / 's.json'}", timeout=120)
  assert done.returncode != 0
  assert msg in done.stderr and "Traceback" not in done.stderr
  assert not (tmp_path / "s.json").exists()


def test_reports_write_numpy_values_as_numbers(tmp_path):
  """np.float32 is no Python float: the JSON gets its number, not a
  string (reports used to write such values as "0.5")."""
  path = tmp_path / "r.json"
  outputs.write_json({"a": np.float32(0.5), "b": np.int64(3),
                      "c": np.arange(2), "d": tmp_path}, str(path))
  assert json.loads(path.read_text()) == {"a": 0.5, "b": 3, "c": [0, 1],
                                          "d": str(tmp_path)}


def test_reports_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
  """Python's json writes Infinity and NaN (an unlimited NIC's rate, a
  ratio over nothing), which strict readers refuse (JavaScript's
  JSON.parse); every report now parses with them refused."""
  path = tmp_path / "r.json"
  outputs.write_json({"nic": math.inf, "r": [np.float32(np.nan), 1.5],
                      "n": {"x": -math.inf, "k": (np.float64(2.0),)}},
                     str(path))
  def refuse(token):
    raise ValueError(f"non-strict JSON: {token}")
  assert json.loads(path.read_text(), parse_constant=refuse) == {
      "nic": None, "r": [None, 1.5], "n": {"x": None, "k": [2.0]}}


def test_crash_test_refuses_a_store_of_another_layout_by_name(tmp_path):
  """Its writers failed on such a store, and the run ended in a traceback
  ("writer exited before the kill"); one line now, and the store and its
  index untouched."""
  from dualpath_jax.config import TINY, CacheConfig  # pylint: disable=g-import-not-at-top
  from storage import BlockStore, ColdTierConfig  # pylint: disable=g-import-not-at-top
  root = tmp_path / "store"
  with BlockStore(ColdTierConfig(root=str(root)), TINY,
                  CacheConfig(block_size=16)):
    pass
  before = (root / "index.sqlite").read_bytes()
  done = _run("launch.crash_test_storage", "--kills=1", f"--root={root}",
              timeout=120)
  assert done.returncode != 0
  assert "crash_test_storage: cold tier index in" in done.stderr
  assert "was made for layout" in done.stderr, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and "kill" not in done.stdout
  assert (root / "index.sqlite").read_bytes() == before


@pytest.mark.parametrize("flags_,msg", [
    (["--min_delay=2", "--max_delay=0.1"],
     "--min_delay (2.0) is above --max_delay (0.1)"),
    (["--max_delay=inf"], "--max_delay must be a finite number"),
    (["--codec=bogus"], "flag --codec=bogus: value should be one of"),
])
def test_crash_test_refuses_bad_flags_before_the_kills(tmp_path, flags_, msg):
  """These used to crash the writer child, or sleep(nan), mid-run."""
  done = _run("launch.crash_test_storage", "--kills=1", *flags_,
              f"--root={tmp_path / 'store'}", timeout=120)
  assert done.returncode != 0 and msg in done.stderr, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "store").exists()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None,
                    reason="llama-cpp-python is installed here: the check "
                    "of its absence has nothing to refuse")
def test_bench_llamacpp_without_the_bindings_says_how_to_get_them(tmp_path):
  done = _run("launch.bench_llamacpp", f"--json={tmp_path / 'r.json'}",
              timeout=120)
  assert done.returncode != 0 and "Traceback" not in done.stderr
  assert "pip install llama-cpp-python" in done.stderr
  assert not (tmp_path / "r.json").exists()


def test_bench_llamacpp_checks_its_output_before_the_runs(tmp_path):
  done = _run("launch.bench_llamacpp", f"--json={tmp_path}", timeout=120)
  assert done.returncode != 0 and "Traceback" not in done.stderr
  assert f"bench_llamacpp: --out: {tmp_path} is a directory" in done.stderr
