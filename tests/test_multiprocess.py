"""Multi-process JAX: two CPU processes on localhost, one engine each.

`test_two_processes_hand_off_kv` starts
tests/multidevice/check_multiprocess_worker.py twice: process 0 and 1 of a
`jax.distributed` job (coordinator on a free local port, 2 CPU devices each
via XLA_FLAGS, gloo collectives; process 0 configured by launcher flags,
process 1 by JAX_* variables). P0 lives on process 0, D0 on process 1; KV
blocks cross between them by the ppermute hand-off, and a tiny model's prefix
prefilled on P0 is decoded on D0. Both workers must exit 0 and print their
success line; if one dies the other is killed at once (it would wait in a
collective), and both outputs are shown.

The other tests check `dualpath_jax.distributed`'s argument handling in
this process, without starting a job.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from dualpath_jax.distributed import DistributedConfig, initialize

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multidevice" / "check_multiprocess_worker.py"
MARKER = "MULTIPROCESS_WORKER_OK process={}"
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(port: int, log_dir: pathlib.Path
                 ) -> tuple[list[int], list[str]]:
  """Both workers' return codes (negative = killed) and output."""
  logs = [log_dir / f"worker_{i}.log" for i in range(2)]
  procs = []
  for rank in range(2):
    env = {k: v for k, v in os.environ.items() if k not in (
        "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
        "JAX_LOCAL_DEVICE_IDS")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                   " --xla_force_host_platform_device_count=2").strip(),
        PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1")
    address, args = f"127.0.0.1:{port}", []
    if rank == 0:  # the launcher flags
      args = [f"--coordinator_address={address}", "--num_processes=2",
              "--process_id=0"]
    else:  # the environment
      env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(rank))
    out = open(logs[rank], "w")  # a file: a full pipe would block the worker
    procs.append(subprocess.Popen([sys.executable, str(WORKER), *args],
                                  cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT))
    out.close()
  deadline, note = time.monotonic() + TIMEOUT_S, ""
  try:
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c for c in codes):
        break  # both done, or one failed: the other would wait forever
      if time.monotonic() > deadline:
        note = f"\n[killed: still running after {TIMEOUT_S} s]"
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in procs]
  return codes, [log.read_text(errors="replace") + note for log in logs]


def test_two_processes_hand_off_kv(tmp_path):
  for _ in range(3):  # the free port may be taken before process 0 binds it
    codes, texts = _run_workers(_free_port(), tmp_path)
    if not any(taken in texts[0] for taken in (
        "is already in use on this host",  # distributed.initialize's check
        "Failed to add port to server",  # jax 0.10.2 itself (then SIGSEGV)
        "Failed to start RPC server")):
      break
  report = "\n".join(f"===== worker {i} (exit {c}) =====\n{t[-8000:]}"
                     for i, (c, t) in enumerate(zip(codes, texts)))
  assert codes == [0, 0], report
  for rank, text in enumerate(texts):
    assert MARKER.format(rank) in text, report
  assert "cross-process hand-offs bit-exact" in texts[1], report
  assert "== D0 alone, bitwise" in texts[1], report


# ------------------------------------------------------- argument handling
def test_single_process_by_default_starts_nothing():
  config = DistributedConfig.from_env({})
  assert (config.num_processes, config.multi_process) == (1, False)
  assert initialize(config) is False


def test_reads_the_environment_and_explicit_values_win():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}
  config = DistributedConfig.from_env(env)
  assert (config.coordinator_address, config.num_processes, config.process_id,
          config.local_device_ids) == ("10.0.0.1:1234", 4, 3, (0, 1))
  assert config.multi_process
  config = DistributedConfig.from_env(env, process_id=0, num_processes=2)
  assert (config.num_processes, config.process_id) == (2, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_processes=0), "num_processes must be an int >= 1"),
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"),
     "process_id must be < num_processes"),
    (dict(num_processes=2, process_id=-1, coordinator_address="h:1"),
     "process_id must be an int >= 0"),
    (dict(num_processes=2, coordinator_address="h:1"), "needs a process_id"),
    (dict(num_processes=2, process_id=0), "needs a coordinator address"),
    (dict(num_processes=2, process_id=0, coordinator_address="host"),
     "must be host:port"),
    (dict(num_processes=2, process_id=0, coordinator_address="h:99999"),
     "must be host:port"),
    (dict(num_cpu_devices=0), "num_cpu_devices must be >= 1"),
])
def test_bad_settings_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DistributedConfig(**kwargs)


def test_bad_environment_raises():
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES must be an int"):
    DistributedConfig.from_env({"JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS"):
    DistributedConfig.from_env({"JAX_LOCAL_DEVICE_IDS": "0,x"})


def test_initialize_after_a_backend_exists_says_so():
  import jax
  jax.devices()  # this pytest process has a backend from here on
  config = DistributedConfig(f"127.0.0.1:{_free_port()}", 2, 1, timeout_s=1)
  with pytest.raises(RuntimeError, match="must run before anything creates"):
    initialize(config)


@pytest.mark.parametrize("launcher", ["agent_eval", "serve"])
def test_launchers_refuse_multi_process_before_waiting_for_peers(launcher):
  """The serving loop is single-controller: a clear error, at once, exit 1."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  t0 = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", f"launch.{launcher}",
       f"--coordinator_address=127.0.0.1:{_free_port()}",
       "--num_processes=2", "--process_id=0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "single-controller" in proc.stderr and "pod_launch" in proc.stderr
  assert time.monotonic() - t0 < 60  # never blocked on the missing peer
