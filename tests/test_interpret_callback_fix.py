"""kernels.interpret_callback_fix: JAX's Pallas interpreter's own
`io_callback`s get numpy arguments (jax < 0.11); every other `io_callback`
still gets jax Arrays, and on jax >= 0.11 every one does."""

from __future__ import annotations

import functools

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np

from kernels import interpret_callback_fix


def _call_back(fn, x):
  """`fn(x)` through a jitted `io_callback` (the path interpret mode
  takes), returning x + 1 as fn does."""
  return jax.jit(lambda x: io_callback(
      fn, jax.ShapeDtypeStruct(x.shape, x.dtype), x))(x)


def test_only_the_interpreters_callbacks_take_numpy(np_rng):
  fixed = interpret_callback_fix.install()
  assert fixed == (jax.__version_info__[:2] < (0, 11))
  assert interpret_callback_fix.install() == fixed  # idempotent
  seen = {}

  def record(name, x):
    seen[name] = type(x)
    return np.asarray(x) + 1

  def simulator_step(x):  # as if defined in the Mosaic GPU interpreter
    return record("interpreter", x)
  simulator_step.__module__ = "jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks"

  def tpu_step(tag, x):  # the TPU interpreter's, under a partial
    return record(tag, x)
  tpu_step.__module__ = "jax._src.pallas.mosaic.interpret.interpret_pallas_call"

  def users(x):  # anyone else's, this test's module
    return record("user", x)

  x = jnp.asarray(np_rng.standard_normal((3, 5)), jnp.float32)
  for name, fn in (("interpreter", simulator_step),
                   ("tpu", functools.partial(tpu_step, "tpu")),
                   ("user", users)):
    np.testing.assert_array_equal(_call_back(fn, x), np.asarray(x) + 1)
  for name in ("interpreter", "tpu"):
    if fixed:
      assert seen[name] is np.ndarray, name
    else:
      assert issubclass(seen[name], jax.Array), name
  assert issubclass(seen["user"], jax.Array)
