"""Pallas interpret-mode callbacks called with numpy arguments, not jax Arrays.

Pallas' Mosaic GPU and Mosaic TPU interpret modes run a kernel on CPU by
simulating its memories, copies and barriers in Python, through
`io_callback`s: several per simulated load, store or barrier. JAX's
`io_callback` implementation puts every argument of every call on the CPU
device (`jax.device_put`) before calling back, and the simulator reads them
straight back out as Python ints and numpy arrays. On the 2-core CPU those
conversions were a third of a Mosaic GPU interpret run:
tests/test_kernels_mosaic_gpu.py::test_decode_matches_reference took 62 s,
42 s with this (2026-11-29, jax 0.10.2); the Mosaic TPU interpret tests
gain ~8%.

`install()` wraps `jax._src.callback.io_callback_impl` (looked up by name
on every call) so that callbacks defined in JAX's own interpreter modules
(`_INTERPRETER_MODULES`) get their arguments as numpy arrays (copies:
XLA's argument buffers are only lent for the call). Every other
`io_callback`, a user's included, goes through JAX's implementation
unchanged, jax Arrays and all. Compiled kernels never reach it: it only
ever matters in interpret mode, and changes no value the simulator
computes (the interpret tests compare against the reference).

Up to jax 0.10 only: from 0.11 the simulator insists on jax Arrays (its
`shared_memory._to_int` takes an int or a jax.Array and refuses numpy), so
there `install()` changes nothing and returns False.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

_INTERPRETER_MODULES = ("jax._src.pallas.mosaic_gpu.interpret",
                        "jax._src.pallas.mosaic.interpret")

# The first jax whose simulator refuses numpy arguments (see above).
_FIRST_JAX_REFUSING_NUMPY = (0, 11)

_LOCK = threading.Lock()
_installed = False


def _defined_in_interpreter(callback) -> bool:
  """Whether an `io_callback`'s function (under any `functools.partial`)
  is one of JAX's Pallas interpreter's own."""
  fn = getattr(callback, "callback_func", None)
  while isinstance(fn, functools.partial):
    fn = fn.func
  module = getattr(fn, "__module__", None) or ""
  return module.startswith(_INTERPRETER_MODULES)


def install() -> bool:
  """Wraps this process's `io_callback_impl` (idempotent, thread-safe).
  Returns whether the wrapper is in place (False on jax >= 0.11, or where
  JAX has no `io_callback_impl`: then nothing changes)."""
  global _installed
  with _LOCK:
    if _installed:
      return True
    import jax  # pylint: disable=g-import-not-at-top
    if tuple(jax.__version_info__[:2]) >= _FIRST_JAX_REFUSING_NUMPY:
      return False
    try:
      from jax._src import callback as callback_lib  # pylint: disable=g-import-not-at-top
      from jax._src import config  # pylint: disable=g-import-not-at-top
      from jax._src import tree_util  # pylint: disable=g-import-not-at-top
      from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    except ImportError:
      return False
    jax_impl = getattr(callback_lib, "io_callback_impl", None)
    if not callable(jax_impl):
      return False

    @functools.wraps(jax_impl)
    def io_callback_impl(*args, result_avals, callback, sharding, ordered):
      if not _defined_in_interpreter(callback):
        return jax_impl(*args, result_avals=result_avals, callback=callback,
                        sharding=sharding, ordered=ordered)
      cpu_device, *_ = xla_bridge.local_devices(backend="cpu")
      with config.default_device(cpu_device):
        return tree_util.tree_map(
            np.asarray, callback(*(np.array(a) for a in args)))

    callback_lib.io_callback_impl = io_callback_impl
    _installed = True
    return True


def tpu_interpret_arg(interpret: bool):
  """`pallas_call`'s `interpret=` for a Mosaic TPU kernel's `interpret`
  flag: TPU interpret mode (`pltpu.InterpretParams()`) with `install()`
  done, or False."""
  if not interpret:
    return False
  install()
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.InterpretParams()
