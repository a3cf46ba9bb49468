"""Engine settings are refused when they cannot work, before anything runs:
in the configs (library users), in the model runner, and by every launcher
that takes them (`launch.engine_flags`), with the reason and no traceback.

Before, `agent_eval --max_batch=0` waited forever (an engine that may batch
no sequence never admits one), `--attention=foo` and `--prefill_chunk=0`
failed inside the first jitted step with a JAX traceback, and a pool too
small for the workload failed at the turn that did not fit.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys

from import_record import (imported_jax, run_recording_imports,
                           without_import_times)
from launcher_interrupt import interrupt_after
import numpy as np
import pytest

from dualpath_jax.config import (ATTENTION_IMPLEMENTATIONS, CacheConfig,
                                 EngineConfig)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kw,msg", [
    (dict(max_batch_size=0), "max_batch_size must be an integer >= 1"),
    (dict(max_prefill_chunk=0), "max_prefill_chunk must be an integer >= 1"),
    (dict(max_context=-5), "max_context must be an integer >= 1"),
    (dict(max_batch_size=2.5), "max_batch_size must be an integer >= 1"),
    (dict(temperature=-0.1), "temperature >= 0"),
    (dict(top_p=0.0), "0 < top_p <= 1"),
    (dict(top_p=float("nan")), "0 < top_p <= 1"),
])
def test_engine_config_refuses_values_that_cannot_work(kw, msg):
  with pytest.raises(ValueError, match=msg):
    EngineConfig(**kw)


def test_engine_config_takes_numpy_integers_as_ints():
  """A NumPy integer (a sweep's value) was refused as not an integer,
  while the cache manager took it; it is stored as a Python int, so the
  config still serialises as JSON."""
  config = EngineConfig(max_batch_size=np.int64(8), max_context=np.int32(512))
  assert config.max_batch_size == 8 and type(config.max_batch_size) is int
  assert type(config.max_context) is int
  with pytest.raises(ValueError, match="max_batch_size must be an integer"):
    EngineConfig(max_batch_size=True)


def test_cache_config_refuses_unknown_dtypes():
  with pytest.raises(ValueError, match="cache dtype must be one of"):
    CacheConfig(dtype="int4")
  assert CacheConfig(dtype="bfloat16").dtype == "bfloat16"


def test_configs_know_the_kernels_implementations_without_importing_them():
  """The configs (JAX-free, so that launchers refuse early) name the
  implementations `kernels.paged_attention` registers, and refuse others
  with the message the kernels' own check gives."""
  from kernels.paged_attention import IMPLEMENTATIONS, resolve_implementation
  assert sorted(ATTENTION_IMPLEMENTATIONS) == sorted(IMPLEMENTATIONS)
  for name in (*IMPLEMENTATIONS, "auto"):
    assert EngineConfig(attention_impl=name).attention_impl == name
  with pytest.raises(ValueError) as from_config:
    EngineConfig(attention_impl="flash")
  with pytest.raises(ValueError) as from_kernels:
    resolve_implementation("flash")
  assert str(from_config.value) == str(from_kernels.value)
  assert "unknown paged-attention implementation 'flash'" in str(
      from_config.value)


def test_runner_refuses_an_unknown_attention_before_any_step():
  from dualpath_jax.model import ModelRunner, load_model
  loaded = load_model("random:tiny-test")
  with pytest.raises(ValueError, match="unknown paged-attention implementation"):
    ModelRunner(loaded.model, CacheConfig(num_blocks=8), attention_impl="flash")


def _run(module, *args):
  return run_recording_imports(["-m", module, *args], cwd=REPO, timeout=180)


LAUNCHERS = [
    ("launch.agent_eval", ["--noprogress"]),
    ("launch.bench_online", ["--noprogress", "--rates=1", "--tokenizer=bytes"]),
    ("launch.serve", ["--port=0"]),
]
# Every launcher with the checks of its own code; absl's bounds and enums
# (the same flag definitions, engine_flags.define) on one launcher each.
BAD_FLAGS = [
    (module, extra, flag, msg) for module, extra in LAUNCHERS
    for flag, msg in (
        ("--attention=flash",
         "unknown paged-attention implementation 'flash'"),
        ("--model=random:nope", "unknown preset 'nope'"),
        ("--cold_tier=README.md",
         "--cold_tier: README.md exists and is not a directory"),
    )] + [
    (*LAUNCHERS[0], "--max_batch=0",
     "flag --max_batch=0: 0 is not a positive integer"),
    (*LAUNCHERS[1], "--prefill_chunk=0",
     "flag --prefill_chunk=0: 0 is not a positive"),
    (*LAUNCHERS[2], "--dtype=int4", "flag --dtype=int4: value should be one of"),
    (*LAUNCHERS[0], "--model=/no/such.gguf", "no GGUF file at /no/such.gguf"),
    # NaN passes absl's lower_bound; inf overflowed the byte budget's int.
    (*LAUNCHERS[0], "--cold_tier_gb=inf",
     "--cold_tier_gb must be a finite number, not nan or inf"),
    (*LAUNCHERS[1], "--cold_tier_gb=nan",
     "--cold_tier_gb must be a finite number, not nan or inf"),
    (*LAUNCHERS[2], "--storage_nic_gbps=nan",
     "--storage_nic_gbps must be a number or inf, not nan"),
    (*LAUNCHERS[2], "--seed=-1", "flag --seed=-1: -1 is not a non-negative"),
    # A hot tier is allocated up front: past the host's memory, refused
    # before anything loads (bench_online checked it only when building
    # its first engine, after the weights).
    *[(*launcher, "--hot_tier_gb=100000",
       "--hot_tier_gb=100000 is more than the")
      for launcher in LAUNCHERS[:3]],
    # The prefetcher reads from the cold tier, one engine's or a cluster's.
    (*LAUNCHERS[0], "--prefetch_blocks=4",
     "--prefetch_blocks needs --cold_tier"),
    # One engine's emulated NIC paces its cold-tier reads: it used to be
    # ignored without --mesh, and without a cold tier it paces nothing.
    (*LAUNCHERS[0], "--storage_nic_gbps=1",
     "--storage_nic_gbps limits cold-tier reads: it needs --cold_tier"),
    (*LAUNCHERS[2], "--storage_nic_gbps=0",
     "--storage_nic_gbps must be > 0"),
    (*LAUNCHERS[1], "--prefetch_blocks=-1",
     "flag --prefetch_blocks=-1: -1 is not"),
    # --tp without --mesh was taken silently, "abc" and "0" too.
    (*LAUNCHERS[0], "--tp=abc", "--tp=abc sizes the engines of --mesh"),
    (*LAUNCHERS[2], "--tp=0", "--tp=0 sizes the engines of --mesh"),
    # It named the config's field (ColdTierConfig.capacity_bytes), not the
    # flag; the folder is checked, never made.
    ("launch.agent_eval", ["--noprogress",
                           "--cold_tier=/tmp/dualpath_test_never_made/ct"],
     "--cold_tier_gb=0", "--cold_tier_gb must be > 0"),
    # A job's flags without the job used to start a single-process run.
    (*LAUNCHERS[0], "--coordinator_address=localhost:1234",
     "--coordinator_address given to a single-process run: add "
     "--num_processes=N or --distributed_auto"),
    # It was judged against one process first: "process_id must be < 1".
    (*LAUNCHERS[2], "--process_id=1",
     "--process_id given to a single-process run: add "
     "--num_processes=N or --distributed_auto"),
]


@pytest.mark.parametrize("module,extra,flag,msg", BAD_FLAGS,
                         ids=[f"{m}{f}" for m, _, f, _ in BAD_FLAGS])
def test_launchers_refuse_bad_engine_flags(tmp_path, module, extra, flag, msg):
  report = tmp_path / "r.json"
  args = extra + [flag]
  if module != "launch.serve":
    args.append(f"--report={report}")
  done = _run(module, *args)
  assert done.returncode != 0
  error = without_import_times(done.stderr)
  assert msg in error, error[-2000:]
  assert "Traceback" not in error
  assert not report.exists()
  # Refused from the flags, the configs and the model's metadata alone:
  # before JAX's ~3 s import.
  assert not imported_jax(done.stderr)


@pytest.mark.parametrize("mesh", ["1P2D", "none"])
@pytest.mark.parametrize("module,extra", LAUNCHERS)
def test_prefetching_without_hot_tiers_is_refused(tmp_path, module, extra,
                                                   mesh):
  args = [*extra, f"--mesh={mesh}", f"--cold_tier={tmp_path / 'kv'}",
          "--prefetch_blocks=4"]
  if module != "launch.serve":
    args.append(f"--report={tmp_path / 'r.json'}")
  done = _run(module, *args)
  error = without_import_times(done.stderr)
  assert done.returncode != 0, error[-2000:]
  assert "--prefetch_blocks needs --hot_tier_gb" in error, error[-2000:]
  assert "Traceback" not in error
  assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("module,extra", LAUNCHERS)
def test_a_bad_cold_tier_key_file_is_refused_before_loading(tmp_path, module,
                                                            extra):
  bad = tmp_path / "bad.key"
  bad.write_text("not a key\n")
  cases = [([f"--cold_tier={tmp_path / 'kv'}",
             f"--cold_tier_key_file={tmp_path / 'absent.key'}"],
            "absent.key: cannot read it"),
           ([f"--cold_tier={tmp_path / 'kv'}", f"--cold_tier_key_file={bad}"],
            "must hold a 32-byte key as 64 hex digits")]
  if module == "launch.agent_eval":  # bench_online has a default cold tier
    cases.append(([f"--cold_tier_key_file={bad}"],
                   "--cold_tier_key_file needs --cold_tier"))
  for flags_, msg in cases:
    args = [*extra, *flags_]
    if module != "launch.serve":
      args.append(f"--report={tmp_path / 'r.json'}")
    done = _run(module, *args)
    error = without_import_times(done.stderr)
    assert done.returncode != 0, error[-2000:]
    assert msg in error, error[-2000:]
    assert "Traceback" not in error and "not a key" not in error
    assert not imported_jax(done.stderr)
  assert not (tmp_path / "r.json").exists()


def test_bench_online_refuses_a_pods_job_settings(tmp_path):
  """Its loop is single-controller like agent_eval's: a job's flags, or the
  JAX_* variables a pod launcher sets, are refused. It used to ignore both
  (no such flags; the variables unread) and run a whole benchmark in every
  process of the job."""
  done = _run("launch.bench_online", *LAUNCHERS[1][1], "--num_processes=2",
              "--coordinator_address=127.0.0.1:1234", "--process_id=1",
              f"--report={tmp_path / 'r.json'}")
  error = without_import_times(done.stderr)
  assert done.returncode != 0 and "single-controller" in error, error[-2000:]
  env = {**os.environ, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  done = subprocess.run(
      [sys.executable, "-m", "launch.bench_online", *LAUNCHERS[1][1],
       f"--report={tmp_path / 'r.json'}"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=180)
  assert done.returncode != 0 and "single-controller" in done.stderr, \
      done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "r.json").exists()


def test_num_processes_1_takes_a_jobs_flags_as_single_process(tmp_path):
  """One script for any N: `--num_processes=1` with the job's other flags
  is a single-process run said on purpose, not refused (the run goes on to
  the next check, here an unknown preset)."""
  done = _run("launch.agent_eval", "--coordinator_address=localhost:1234",
              "--process_id=0", "--num_processes=1", "--model=random:nope",
              f"--report={tmp_path / 'r.json'}")
  error = without_import_times(done.stderr)
  assert done.returncode != 0 and "unknown preset 'nope'" in error, error
  assert "single-process run" not in error


@pytest.mark.parametrize("module,extra", LAUNCHERS,
                         ids=[m for m, _ in LAUNCHERS])
def test_launchers_refuse_a_pool_smaller_than_one_sequence(tmp_path, module,
                                                           extra):
  """4 blocks of 16 tokens cannot hold one turn of the default workload (or,
  for the server, one request of --max_context tokens)."""
  args = extra + ["--num_blocks=4", "--max_context=1024"]
  if module != "launch.serve":
    args.append(f"--report={tmp_path / 'r.json'}")
  done = _run(module, *args)
  assert done.returncode != 0
  error = without_import_times(done.stderr)
  assert "--num_blocks: the pool holds 4 blocks x 16 tokens = 64 tokens" in (
      error), error[-2000:]
  assert "Traceback" not in error
  assert not imported_jax(done.stderr)


@pytest.mark.parametrize("flag,msg", [
    ("--max_context=100000", "max_context 100000 exceeds the model's context "
     "8192"),
    ("--default_temperature=-1", "default_temperature must be in [0, 2]"),
    ("--served_model_name=,", "--served_model_name: an empty name"),
    ("--served_model_name=a,,b", "--served_model_name: an empty name in "
     "'a,,b'"),
])
def test_serve_refuses_server_settings_before_loading(flag, msg):
  """Checked against the model's metadata before the load (these used to
  cost a model load first)."""
  args = ["--model=random:smollm2-135m-instruct:layers=1",
          "--tokenizer=embedded", "--port=0", "--max_context=1024",
          "--num_blocks=100000", flag]
  done = _run("launch.serve", *args)
  error = without_import_times(done.stderr)
  assert done.returncode != 0 and "Traceback" not in error
  assert f"serve: {msg}" in error, error[-2000:]
  assert not imported_jax(done.stderr)


def test_an_unset_max_context_is_the_models_where_shorter():
  """random:tiny-test's context is 1024: with --max_context's 8192 default
  every run of it was refused until the flag was given. Unset, it is the
  model's now; given, it is checked as given."""
  for flag, reach in ((None, 1024), ("--max_context=8192", 8192)):
    done = _run("launch.serve", "--model=random:tiny-test", "--port=0",
                "--num_blocks=10", *([flag] if flag else []))
    error = without_import_times(done.stderr)
    assert done.returncode != 0 and "Traceback" not in error
    assert (f"--num_blocks: the pool holds 10 blocks x 16 tokens = 160 "
            f"tokens, but one sequence may reach {reach} tokens") in error, \
        error[-2000:]
    assert not imported_jax(done.stderr)


def test_serve_refuses_a_missing_tokenizer_and_a_bad_port():
  done = _run("launch.serve", "--model=random:tiny-test",
              "--tokenizer=/no/such.gguf")
  error = without_import_times(done.stderr)
  assert done.returncode != 0 and "Traceback" not in error
  assert "serve: no GGUF file at /no/such.gguf" in error
  assert not imported_jax(done.stderr)
  for tokenizer, msg in ((None, "the model has no tokenizer"),
                         ("embedded", "the tokenizer has 49152 tokens but the "
                          "model only 256, so its ids would not fit; random "
                          "models whose vocabulary holds it: "
                          "random:llama3-8b-shape"),
                         ("bytes", "--tokenizer=bytes (agent_eval's")):
    done = _run("launch.serve", "--model=random:tiny-test",
                *([f"--tokenizer={tokenizer}"] if tokenizer else []))
    error = without_import_times(done.stderr)
    assert done.returncode != 0 and "Traceback" not in error
    assert f"serve: {msg}" in error, error[-2000:]
    assert not imported_jax(done.stderr)
  done = _run("launch.serve", "--port=70000")
  assert done.returncode != 0
  assert "not an integer in the range [0, 65535]" in done.stderr


def test_serve_refuses_an_address_it_cannot_bind_before_loading():
  """The launcher binds its address first: a port in use, or an address not
  on this machine, costs no model load (nor JAX's import)."""
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    done = _run("launch.serve", f"--port={port}")
  error = without_import_times(done.stderr)
  assert done.returncode != 0 and "Traceback" not in error
  assert (f"serve: cannot listen on 127.0.0.1:{port}: Address already in "
          "use") in error, error[-2000:]
  assert not imported_jax(done.stderr)
  done = _run("launch.serve", "--host=192.0.2.1", "--port=0")  # TEST-NET-1
  error = without_import_times(done.stderr)
  assert done.returncode != 0 and "Traceback" not in error
  assert "serve: cannot listen on 192.0.2.1:0: " in error, error[-2000:]
  assert not imported_jax(done.stderr)


def test_serve_launcher_answers_on_the_port_it_printed():
  """`python -m launch.serve --port=0` end to end, started as a script's
  background job (SIGINT ignored): it prints the port it bound before the
  load, serves on it, and Ctrl-C stops it (exit 130, no traceback). The
  only test of the launcher itself serving; the server's own tests drive
  the app in a thread."""
  answers = {}

  def ask(out: str):
    port = int(re.search(r"bound to 127\.0\.0\.1:(\d+);", out).group(1))
    assert f"serving on http://127.0.0.1:{port}/v1" in out
    # the line comes once the server accepts connections: no retry (it
    # used to be printed before uvicorn listened; a client connecting at
    # once was refused)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    answers["status"] = response.status
    answers["models"] = json.loads(response.read())

  done = interrupt_after(
      ["launch.serve", "--port=0", "--max_context=256", "--num_blocks=32"],
      "serving on http://127.0.0.1:", cwd=REPO, timeout=180,
      on_marker=ask)
  assert answers["status"] == 200
  assert [m["id"] for m in answers["models"]["data"]] == [
      "smollm2-135m-instruct"]
  assert done.returncode == 130, done.stderr[-2000:]
  assert "Shutting down" in done.stderr and "serve: stopped" in done.stderr
  assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_serve_stops_on_ctrl_c_while_loading():
  done = interrupt_after(["launch.serve", "--port=0"], "loading the model",
                         cwd=REPO, timeout=120)
  assert done.returncode == 130, done.stderr[-2000:]
  assert "serve: stopped" in done.stderr
  assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_bench_online_gives_rates_that_print_alike_their_own_run_folders():
  """Two rates equal to 6 digits (`{rate:g}`) shared one run folder, so with
  --keep_runs the second run deleted the first's store."""
  code = ("from launch.bench_online import _run_dir; "
          "a = _run_dir('root', 'dualpath', 0.1234561); "
          "b = _run_dir('root', 'dualpath', 0.1234562); "
          "print(a != b, a)")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=120, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split()[0] == "True", done.stdout
