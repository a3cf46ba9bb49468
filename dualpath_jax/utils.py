"""Small process-wide helpers shared by the launchers."""

from __future__ import annotations

import os
import signal


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


def make_ctrl_c_an_end() -> bool:
  """Makes SIGINT raise KeyboardInterrupt in this process even where it was
  started with SIGINT ignored; returns whether it was ignored.

  The launchers that report what finished on Ctrl-C (agent_eval,
  bench_online, bench_storage, bench_kernels, bench_tiling) rely on it, and
  so does `scripts/gpu_check.sh`, which stops a step at its time limit with
  `timeout -s INT`. A shell without job control starts its background jobs
  (`cmd &` in a script) with SIGINT ignored, and Python then keeps ignoring
  it: such a launcher ran on past the SIGINT and was killed later with no
  report. Call from the main thread.
  """
  ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  if ignored:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  return ignored
