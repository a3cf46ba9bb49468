"""Mosaic GPU interpret mode without a recompile per simulated thread (jax < 0.11).

Mosaic GPU's CPU interpret mode runs each program's warpgroups as Python
threads (`jax._src.pallas.mosaic.interpret.thread_map`), and each thread
jit-compiles the warpgroup's jaxpr before it runs it. Up to jax 0.10 the
function handed to `jax.jit` was defined inside `thread_map._run_jaxpr`, a
new function object per call, so no call ever hit JAX's lowering or
compilation caches: a decode kernel with 18 programs of 3 warpgroups
compiled the same jaxpr 54 times, and compiling took ~80% of an interpret
run on a 2-core CPU (one test case: 55 s, 11 s with this fix).

JAX fixed it upstream in 0.11.0 (commit aa5a46a, "[Mosaic GPU] Improve
cache hits in Pallas interpret mode") by moving that function to module
level. `install()` does the same on older JAX: it replaces
`thread_map._run_jaxpr` with the upstream version, which traces, lowers,
compiles and runs exactly as before, only through a module-level function,
so the caches hit. It changes nothing where the fix is already present
(`thread_map._run` exists) or where the module is missing, and it only ever
matters in interpret mode: compiled GPU kernels never reach `thread_map`.
On jax 0.11.2 (run with `scripts/test_jax_next.sh`) `thread_map._run` is
there, `install()` leaves `thread_map` untouched, and the compile-once test
passes on upstream's fix alone.
"""

from __future__ import annotations

import threading

import jax

_LOCK = threading.Lock()
_installed = False


def _run(jaxpr, consts, *args):
  """One simulated thread: evaluate its jaxpr (module-level, so `jax.jit`
  of it is cached across calls; `jaxpr` is a static argument)."""
  jax.core.eval_jaxpr(jaxpr, consts, *args)


def _run_jaxpr(jaxpr, consts, *args):
  """Upstream's `thread_map._run_jaxpr` from jax 0.11.0 on."""
  traced = jax.jit(_run, static_argnums=(0,)).trace(jaxpr, consts, *args)
  traced.lower().compile()(consts, *args)


def install() -> bool:
  """Backports the fix into this process's JAX if it needs it (idempotent,
  thread-safe). Returns whether `thread_map` now runs the cached version
  (True where upstream's fix was already there)."""
  global _installed
  with _LOCK:
    if _installed:
      return True
    try:
      from jax._src.pallas.mosaic.interpret import thread_map  # pylint: disable=g-import-not-at-top
    except ImportError:
      return False
    if not hasattr(thread_map, "_run"):  # jax < 0.11: the per-call function
      if not callable(getattr(thread_map, "_run_jaxpr", None)):
        return False  # some other layout: leave it alone
      thread_map._run_jaxpr = _run_jaxpr  # pylint: disable=protected-access
    _installed = True
    return True
