"""JAX's persistent compilation cache, turned on the same way by every launcher.

A rerun of a launcher (and the test suite's many processes) loads its XLA
executables from disk instead of compiling them again: on the 2-core CPU
default job that is seconds of start-up per run.
"""

from __future__ import annotations

import os

from dualpath_jax.interrupts import interrupts_deferred

_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def _min_compile_time_from_env(default: float = 0.5) -> float:
  """JAX's `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, else `default`."""
  raw = os.environ.get(_MIN_COMPILE_TIME_ENV, "").strip()
  if not raw:
    return default
  try:
    return float(raw)
  except ValueError:
    raise ValueError(f"${_MIN_COMPILE_TIME_ENV}={raw!r} is not a number of "
                     "seconds") from None


def enable_compilation_cache(path: str | None = None, *,
                             min_compile_time_s: float | None = None) -> str:
  """Turns on JAX's persistent compilation cache (reruns skip XLA compiles).

  The directory is `path`, else `$DUALPATH_JAX_CACHE`, else
  `~/.cache/dualpath_jax/xla`. Compiles shorter than `min_compile_time_s`
  are not stored; by default JAX's own
  `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` where set, else 0.5 s (the
  test suite sets 0 for itself and the launchers it starts: its programs
  are small and compiled again by other processes). Returns the directory.
  ValueError if the variable is not a number. A Ctrl-C
  during JAX's import waits for its end (then raises): one landing inside
  an extension module's initialisation crashed the process (SIGSEGV, seen
  once in a clean-clone suite run).
  """
  with interrupts_deferred():
    import jax  # pylint: disable=g-import-not-at-top
  path = path or os.environ.get("DUALPATH_JAX_CACHE") or os.path.expanduser(
      "~/.cache/dualpath_jax/xla")
  os.makedirs(path, exist_ok=True)
  if min_compile_time_s is None:
    min_compile_time_s = _min_compile_time_from_env()
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    min_compile_time_s)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
