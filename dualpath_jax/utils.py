"""Small process-wide helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import numbers
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np

from dualpath_jax import outputs

PAGE_BYTES = 4096  # O_DIRECT's alignment of offsets, lengths and addresses


def is_integer(value: object) -> bool:
  """A Python or NumPy integer, not a bool (which Python counts as an int):
  the one test every count and id taken from a caller or a file needs."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# fsync of a directory that its file system cannot do (some network and
# FUSE file systems): its entries are left to the file system's ordering.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP,
                                 errno.EOPNOTSUPP})


def page_aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """A C-contiguous array of `shape` whose first byte starts a page (an
  anonymous mapping, zero-filled on first touch). Host buffers the cold
  tier reads into (`transfer.source.StagingRows`) are made so: rows of
  whole pages then take O_DIRECT reads (`storage.chunk_reader`) without a
  bounce copy."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buf = mmap.mmap(-1, max(-(-nbytes // PAGE_BYTES) * PAGE_BYTES, PAGE_BYTES))
  return np.frombuffer(buf, np.uint8, nbytes).view(dtype).reshape(shape)


def sync_directory(directory: str | os.PathLike) -> None:
  """fsyncs `directory`, making its entries (files made, renamed in or
  out, removed) durable: a rename is atomic but not durable until then.

  A file system that cannot fsync a directory (EINVAL, ENOTSUP) is let be;
  any other error, opening the directory included, is raised: a chunk, a
  key or a checkpoint whose durability is unknown must not look written.
  The one directory fsync of the project (the cold tier's chunks and
  layout, its key files, model checkpoints)."""
  fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in _NO_DIRECTORY_FSYNC:
      raise
  finally:
    os.close(fd)


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


def make_ctrl_c_an_end() -> bool:
  """Makes SIGINT raise KeyboardInterrupt in this process even where it was
  started with SIGINT ignored; returns whether it was ignored.

  Every launcher calls it (`ctrl_c_ends_quietly`); those that report what
  finished on Ctrl-C (agent_eval, bench_online, bench_storage,
  bench_kernels, bench_tiling, bench_model, serve, convert) rely on it, and
  so does `scripts/gpu_check.sh`, which stops a step at its time limit with
  `timeout -s INT`. A shell without job control starts its background jobs
  (`cmd &` in a script) with SIGINT ignored, and Python then keeps ignoring
  it: such a launcher ran on past the SIGINT and was killed later with no
  report. Call from the main thread.
  """
  handler = signal.getsignal(signal.SIGINT)
  ignored = handler is signal.SIG_IGN
  if ignored or handler is signal.default_int_handler:
    signal.signal(signal.SIGINT, _raise_interrupt)
  return ignored


_SIGINTS: list[int] = []  # SIGINTs come (`make_ctrl_c_an_end`); no lock


def _raise_interrupt(signum, frame) -> None:
  """Python's SIGINT handler, which also records that the signal came."""
  del frame
  _SIGINTS.append(signum)
  raise KeyboardInterrupt


def raise_if_interrupted() -> None:
  """KeyboardInterrupt if a SIGINT came that no code saw. Python drops an
  exception raised while it runs a garbage-collection callback (JAX
  registers one) with "Exception ignored in ...": a Ctrl-C landing there
  was lost, and the launcher ran to its end (a CI run saw bench_model
  finish every row and exit 0). Launchers call it between units of work;
  `ctrl_c_ends_quietly` once more when `main` returns."""
  if _SIGINTS:
    raise KeyboardInterrupt


def ctrl_c_ends_quietly(main: Callable[[list[str]], Any],
                        name: str) -> Callable[[list[str]], Any]:
  """A launcher's `main`, for `absl.app.run`, that Ctrl-C ends with one line
  (`NAME: interrupted`) and exit status 130, wherever it comes: during a
  model's load or a compile as well as in the windows where a launcher
  reports what it finished (those report first, then exit 130 themselves).
  Python's own ending is a KeyboardInterrupt traceback. SIGINT is made to
  raise even where the process was started with it ignored
  (`make_ctrl_c_an_end`). An output file the OS refused at the end
  (`outputs.OutputWriteError`: a full disk) ends it with one line and exit
  status 1."""
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> Any:
    previous = signal.getsignal(signal.SIGINT)
    previous_hook = sys.unraisablehook
    _SIGINTS.clear()
    make_ctrl_c_an_end()

    def quiet_interrupts(unraisable) -> None:
      # A Ctrl-C that lands in a `__del__` or a GC callback is dropped by
      # Python, which printed "Exception ignored in ..." and a traceback
      # (a CI run of `simulate` saw one from tqdm's `__del__`). It is
      # recorded (`_SIGINTS`), and `raise_if_interrupted` ends the run.
      if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and
              _SIGINTS):
        previous_hook(unraisable)

    sys.unraisablehook = quiet_interrupts
    try:
      result = main(argv)
      raise_if_interrupted()  # one that was dropped: still an end
      return result
    except KeyboardInterrupt:
      print(f"{name}: interrupted", file=sys.stderr, flush=True)
      sys.exit(130)
    except outputs.OutputWriteError as e:  # a full disk at the report
      print(f"{name}: {e.strerror}", file=sys.stderr, flush=True)
      sys.exit(1)
    finally:
      signal.signal(signal.SIGINT, previous)
      sys.unraisablehook = previous_hook
  return wrapped


@contextlib.contextmanager
def interrupts_deferred(notice: str | None = None):
  """Holds SIGINT back while the body runs, then raises KeyboardInterrupt
  if one came (printing `notice` to stderr when it comes): for work that
  must not stop halfway, such as a checkpoint's save and rename into place.
  Only the main thread may install signal handlers; elsewhere (where SIGINT
  is not delivered to Python code anyway) it does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []

  def hold(signum, frame):
    del frame
    if notice and not received:
      print(notice, file=sys.stderr, flush=True)
    received.append(signum)
  previous = signal.signal(signal.SIGINT, hold)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


def listen_socket(host: str, port: int) -> socket.socket:
  """A TCP socket bound to (host, port) (0: a free port) for a server to
  listen on, bound first so that a launcher can refuse a busy address
  before any slow start and tell the port it got.

  Raises:
    ValueError: the host does not resolve, or the address cannot be bound
      (a port in use, an address not on this machine).
  """
  try:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
  except socket.gaierror as e:
    raise ValueError(f"cannot resolve host {host!r}: {e.strerror}") from None
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
  return sock
