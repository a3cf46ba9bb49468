"""Small process-wide helpers shared by the launchers."""

from __future__ import annotations

import os


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (reruns skip XLA compiles).

  The directory is `$DUALPATH_JAX_CACHE` or `~/.cache/dualpath_jax/xla`.
  """
  import jax
  path = path or os.environ.get("DUALPATH_JAX_CACHE") or os.path.expanduser(
      "~/.cache/dualpath_jax/xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
