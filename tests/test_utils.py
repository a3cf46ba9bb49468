"""The launchers' process-wide helpers, in process: Ctrl-C handling
(`dualpath_jax.interrupts`), the compilation cache, the listening socket."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest

from dualpath_jax import compile_cache, interrupts, utils


def test_ctrl_c_ends_a_launcher_with_one_line_and_status_130(capsys):
  def main(argv):
    assert argv == ["prog"]
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as stop:
    interrupts.ctrl_c_ends_quietly(main, "demo")(["prog"])
  assert stop.value.code == 130
  assert capsys.readouterr().err == "demo: interrupted\n"


def test_other_endings_pass_through(capsys):
  assert interrupts.ctrl_c_ends_quietly(lambda argv: 7, "demo")([]) == 7

  def refuses(argv):
    raise SystemExit("demo: bad flag")
  with pytest.raises(SystemExit, match="demo: bad flag"):
    interrupts.ctrl_c_ends_quietly(refuses, "demo")([])

  def fails(argv):
    raise ValueError("a bug")
  with pytest.raises(ValueError, match="a bug"):
    interrupts.ctrl_c_ends_quietly(fails, "demo")([])
  assert capsys.readouterr().err == ""


def test_ctrl_c_ignored_at_start_is_made_an_end():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    def main(argv):
      os.kill(os.getpid(), signal.SIGINT)  # delivered before kill returns
      return "ran on"
    with pytest.raises(SystemExit) as stop:
      interrupts.ctrl_c_ends_quietly(main, "demo")([])
    assert stop.value.code == 130
  finally:
    signal.signal(signal.SIGINT, previous)


def test_interrupts_deferred_raises_after_the_body():
  done = []
  with pytest.raises(KeyboardInterrupt):
    with interrupts.interrupts_deferred():
      os.kill(os.getpid(), signal.SIGINT)
      done.append("after the signal")
  assert done == ["after the signal"]
  with interrupts.interrupts_deferred():  # no signal: nothing raised
    done.append("quiet")
  assert done[-1] == "quiet"


def test_listen_socket_binds_a_free_port_and_refuses_a_busy_one():
  first = utils.listen_socket("127.0.0.1", 0)
  try:
    host, port = first.getsockname()
    assert host == "127.0.0.1" and port > 0
    assert first.type == socket.SOCK_STREAM
    first.listen()  # as the server does: the port is now in use
    with pytest.raises(ValueError,
                       match=f"cannot listen on 127.0.0.1:{port}"):
      utils.listen_socket("127.0.0.1", port)
    with pytest.raises(ValueError, match="cannot resolve host"):
      utils.listen_socket("no-such-host.invalid", 0)
  finally:
    first.close()


def test_the_suite_compiles_into_its_own_cache_that_fills():
  """tests/conftest.py: every test process, and the launchers it starts,
  share the run's temporary compilation cache, never the user's
  ~/.cache; a compile here lands in it."""
  import jax
  import jax.numpy as jnp
  from conftest import accelerator_visible
  if accelerator_visible():
    pytest.skip(reason="an accelerator is visible: the suite runs without "
                "the cache there (tests/conftest.py)")
  path = os.environ["DUALPATH_TEST_XLA_CACHE"]
  assert jax.config.jax_compilation_cache_dir == path
  assert os.environ["DUALPATH_JAX_CACHE"] == path
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert os.path.basename(path).startswith("dualpath-test-xla-")
  # ... and compiles fast, launchers included (`compile_tiny_programs_fast`).
  assert "--xla_backend_optimization_level=" in os.environ["XLA_FLAGS"]
  assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
  before = set(os.listdir(path))
  # A program no other test compiles (its constant is this test's own).
  jax.jit(lambda x: jnp.sin(x) * 1234.5678)(jnp.arange(7.0)).block_until_ready()
  assert set(os.listdir(path)) - before


def test_the_suite_uses_the_ir_fusion_emitters_where_xla_has_them():
  """tests/conftest.py adds XLA's flag for its LLVM IR fusion emitters
  only where this XLA knows it (jax 0.10's; an unknown flag aborts XLA,
  which the probe sees)."""
  from conftest import (_IR_FUSION_EMITTERS_FLAG, _xla_accepts,
                        accelerator_visible)
  if accelerator_visible():
    pytest.skip(reason="an accelerator is visible: the suite sets no XLA "
                "flags there (tests/conftest.py)")
  assert not _xla_accepts("--xla_no_such_flag_dualpath=true")
  assert (_IR_FUSION_EMITTERS_FLAG in os.environ["XLA_FLAGS"]) == (
      _xla_accepts(_IR_FUSION_EMITTERS_FLAG))


@pytest.fixture
def jax_cache_config_restored():
  """Puts the suite's compilation-cache settings back after the test."""
  import jax
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  yield
  for n, v in saved.items():
    jax.config.update(n, v)


@pytest.mark.parametrize("env,want", [(None, 0.5), ("0", 0.0), (" 2.5 ", 2.5)])
def test_cache_threshold_follows_jax_own_variable(
    tmp_path, monkeypatch, jax_cache_config_restored, env, want):
  """Launchers store compiles of at least JAX's
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS where set (the suite's 0 for
  the launchers it starts), else 0.5 s; an explicit argument wins."""
  import jax
  if env is None:
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                       raising=False)
  else:
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", env)
  assert compile_cache.enable_compilation_cache(str(tmp_path)) == str(tmp_path)
  assert jax.config.jax_compilation_cache_dir == str(tmp_path)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == want
  compile_cache.enable_compilation_cache(str(tmp_path), min_compile_time_s=7.0)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0


def test_a_cache_threshold_that_is_not_a_number_is_refused(
    tmp_path, monkeypatch, jax_cache_config_restored):
  import jax
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "soon")
  before = jax.config.jax_compilation_cache_dir
  with pytest.raises(ValueError, match="'soon' is not a number"):
    compile_cache.enable_compilation_cache(str(tmp_path / "c"))
  assert jax.config.jax_compilation_cache_dir == before  # nothing changed


# The drop is what the test makes happen: pytest reports it as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_python_dropped_still_ends_the_launcher(capsys):
  """Python drops an exception raised in a garbage-collection callback
  ("Exception ignored in ..."): a Ctrl-C landing in JAX's let bench_model
  run on to its end and exit 0. The handler records the signal, and
  `raise_if_interrupted` (between units of work, and after `main`) ends
  the run with 130 all the same."""
  import gc  # pylint: disable=g-import-not-at-top
  steps = []

  def drop_a_sigint(phase, info):
    del info
    if phase == "start" and not steps:
      steps.append("dropped")
      os.kill(os.getpid(), signal.SIGINT)  # raised here, and dropped

  def main(argv):
    del argv
    gc.callbacks.append(drop_a_sigint)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(drop_a_sigint)
    steps.append("ran on")
    interrupts.raise_if_interrupted()
    steps.append("never")

  with pytest.raises(SystemExit) as stop:
    interrupts.ctrl_c_ends_quietly(main, "demo")([])
  assert stop.value.code == 130 and steps == ["dropped", "ran on"]
  assert capsys.readouterr().err.endswith("demo: interrupted\n")
  # the wrapper put its handler back; a new run starts uninterrupted
  assert interrupts.ctrl_c_ends_quietly(lambda argv: 7, "demo")([]) == 7


def test_a_ctrl_c_dropped_in_a_finalizer_prints_no_traceback():
  """Python drops a KeyboardInterrupt raised in a `__del__` and printed
  "Exception ignored in ..." with a traceback (seen from tqdm's `__del__`
  in a Ctrl-C'd `simulate`); the run still ends with its one line. In a
  subprocess: pytest replaces the hook that prints it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  code = """
import os, signal, sys
from dualpath_jax import interrupts

class Finalized:
  def __del__(self):
    os.kill(os.getpid(), signal.SIGINT)  # raised here, and dropped

def main(argv):
  obj = Finalized()
  del obj
  print("ran on", flush=True)
  interrupts.raise_if_interrupted()

hook = sys.unraisablehook
try:
  interrupts.ctrl_c_ends_quietly(main, "demo")([])
finally:
  print("hook put back:", sys.unraisablehook is hook, flush=True)
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=60,
                        cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))))
  assert done.returncode == 130, done.stderr
  assert done.stdout == "ran on\nhook put back: True\n"
  assert done.stderr == "demo: interrupted\n"
