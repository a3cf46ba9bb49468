"""Ctrl-C as a clean end of a launcher: one line, exit status 130, its report.

Every launcher's `main` is wrapped by `ctrl_c_ends_quietly`; long loops
call `raise_if_interrupted` where a KeyboardInterrupt Python dropped (in a
finalizer, a C extension) would otherwise be lost, and `interrupts_deferred`
holds a Ctrl-C across what must not be cut halfway (an import that
initialises an extension, a checkpoint's rename).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from typing import Any, Callable

from dualpath_jax import outputs

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
