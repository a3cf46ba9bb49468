"""Bounded asynchronous I/O: worker threads, a byte budget, and future helpers.

The block store runs every batch of reads or writes on an `IoPool`: a fixed
number of worker threads (the concurrency bound; TensorStore adds its own bound
on concurrent file operations underneath) and an optional budget of bytes in
flight, so write-back can never queue unbounded memory. Results are
`concurrent.futures.Future`s that the transfer layer can wait on while compute
runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, Sequence


class IoPool:
  """A thread pool with a limit on the bytes its queued tasks may hold."""

  def __init__(self, num_threads: int, max_bytes: int, name: str):
    if num_threads <= 0 or max_bytes <= 0:
      raise ValueError("IoPool needs positive num_threads and max_bytes")
    self._executor = cf.ThreadPoolExecutor(num_threads, thread_name_prefix=name)
    self._max_bytes = max_bytes
    self._bytes = 0
    self._lock = threading.Lock()
    self._idle = threading.Condition(self._lock)
    self._tasks = 0

  @property
  def bytes_in_flight(self) -> int:
    with self._lock:
      return self._bytes

  def try_submit(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> cf.Future | None:
    """Runs `fn(*args)` on a worker, or returns None if `nbytes` exceed the budget.

    A single task larger than the whole budget is admitted when nothing else
    is in flight, so a big put is never refused forever.
    """
    with self._lock:
      if self._bytes and self._bytes + nbytes > self._max_bytes:
        return None
      self._bytes += nbytes
      self._tasks += 1
    try:
      future = self._executor.submit(fn, *args)
    except BaseException:
      self._done(nbytes)
      raise
    future.add_done_callback(lambda _: self._done(nbytes))
    return future

  def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
    """Runs `fn(*args)` on a worker (no byte accounting)."""
    future = self.try_submit(0, fn, *args)
    assert future is not None
    return future

  def _done(self, nbytes: int) -> None:
    with self._lock:
      self._bytes -= nbytes
      self._tasks -= 1
      if not self._tasks:
        self._idle.notify_all()

  def wait_idle(self, timeout: float | None = None) -> bool:
    """Blocks until no task is queued or running; False on timeout."""
    with self._lock:
      return self._idle.wait_for(lambda: self._tasks == 0, timeout)

  def shutdown(self) -> None:
    self._executor.shutdown(wait=True)


def gather(futures: Sequence[cf.Future], combine: Callable[[list[Any]], Any]) -> cf.Future:
  """A future of `combine([f.result() for f in futures])`; fails if any fails."""
  out: cf.Future = cf.Future()
  remaining = [len(futures)]
  lock = threading.Lock()

  def on_done(_: cf.Future) -> None:
    with lock:
      remaining[0] -= 1
      if remaining[0]:
        return
    try:
      out.set_result(combine([f.result() for f in futures]))
    except BaseException as err:  # pylint: disable=broad-except
      out.set_exception(err)

  if not futures:
    out.set_result(combine([]))
  for f in futures:
    f.add_done_callback(on_done)
  return out


def completed(value: Any) -> cf.Future:
  """An already finished future holding `value`."""
  future: cf.Future = cf.Future()
  future.set_result(value)
  return future


def submit_or_run(executor: cf.Executor, fn: Callable[..., Any], *args: Any) -> cf.Future:
  """`executor.submit(fn, *args)`; once the executor takes no more work, runs it here.

  A store's pools stop taking work when the interpreter exits; write-back
  queued by a program that exits without `close()` then still completes,
  in the calling thread, instead of failing.
  """
  try:
    return executor.submit(fn, *args)
  except RuntimeError:  # shut down
    future: cf.Future = cf.Future()
    try:
      future.set_result(fn(*args))
    except BaseException as err:  # pylint: disable=broad-except
      future.set_exception(err)
    return future
