"""The thread that steps the engine, and the narrow handle it steps.

The HTTP server never touches the engine. It talks to an `EngineLoop`, which
owns one `EngineHandle` and is the only thread that calls it (but for
`delete_session` and `session_block_ids`, which go to the cold tier's
thread-safe store):

    HTTP handlers --submit/abort--> command queue --> loop thread
                                                       | handle.step()
    per-request callbacks <--on_token / on_finish------+

`EngineHandle` is all the server needs from an engine: validate, submit,
abort, step, has_work, a clock, a metrics snapshot, close,
delete_session, session_block_ids and forget_blocks.
`LocalEngineHandle` adapts today's single-device `Engine`; a prefill/decode
mesh engine only has to implement the same few methods.

Callbacks run in the loop thread; they must be quick and must not call back
into the loop synchronously (they hand their events to the HTTP event loop).
After every step the loop publishes a fresh `snapshot` (plain numbers) that
/metrics reads without locking.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import queue
import threading
from typing import Any, Callable, Protocol

from absl import logging

from dualpath_jax.engine.request import TurnOutput, TurnRequest

class ShuttingDown(RuntimeError):
  """The error of turns still in flight when the loop stops."""


FinishCallback = Callable[[TurnOutput], None]
ErrorCallback = Callable[[BaseException], None]


class EngineHandle(Protocol):
  """What the server drives. Only the loop thread calls these, except
  `validate`, `clock` and the limits, which read configuration only."""

  max_context: int

  def validate(self, req: TurnRequest) -> None: ...
  def submit(self, req: TurnRequest) -> None: ...
  def abort(self, request_id: str) -> bool: ...
  def step(self) -> list[TurnOutput]: ...
  def has_work(self) -> bool: ...
  def clock(self) -> float: ...
  def snapshot(self) -> dict[str, Any]: ...
  def close(self) -> None: ...
  def delete_session(self, tenant: str, session: str) -> int | None: ...
  def session_block_ids(self, tenant: str,
                        session: str) -> list[bytes] | None: ...
  def forget_blocks(self, ids: list[bytes]) -> dict[str, int | None]: ...


class LocalEngineHandle:
  """`EngineHandle` over an `Engine` or a `PDCluster` in this process."""

  def __init__(self, engine):
    self.engine = engine
    self.max_context = engine.config.max_context

  def validate(self, req: TurnRequest) -> None:
    self.engine.validate(req)

  def submit(self, req: TurnRequest) -> None:
    self.engine.submit(req)

  def abort(self, request_id: str) -> bool:
    return self.engine.abort(request_id)

  def step(self) -> list[TurnOutput]:
    return self.engine.step()

  def has_work(self) -> bool:
    return self.engine.has_work()

  def prefetch_pending(self) -> bool:
    """Whether a step with no turn would still prefetch (a P/D cluster's
    `prefetch_pending`); False for an engine without a prefetcher."""
    pending = getattr(self.engine, "prefetch_pending", None)
    return pending is not None and pending()

  def clock(self) -> float:
    return self.engine.clock()

  def delete_session(self, tenant: str, session: str) -> int | None:
    """Removes the session's cold-tier blocks; how many (None: no cold
    tier). The store is thread-safe: any thread may call it."""
    store = getattr(getattr(self.engine, "cold_tier", None), "store", None)
    return None if store is None else store.delete_session(tenant, session)

  def session_block_ids(self, tenant: str,
                        session: str) -> list[bytes] | None:
    """The ids of the blocks the session put in the cold tier (None: no
    cold tier). Thread-safe, as `delete_session`."""
    store = getattr(getattr(self.engine, "cold_tier", None), "store", None)
    return None if store is None else store.session_block_ids(tenant, session)

  def forget_blocks(self, ids: list[bytes]) -> dict[str, int | None]:
    """Drops `ids` from the engine's hot tier(s) and pool cache (loop
    thread only: they are the engine's)."""
    return self.engine.forget_blocks(ids)

  def close(self) -> None:
    """Flushes what the engine still writes (e.g. cold-tier write-backs)."""
    close = getattr(self.engine, "close", None)
    if close is not None:
      close()

  def snapshot(self) -> dict[str, Any]:
    """Numbers for /metrics; see `prometheus.EngineCollector` for the keys.

    Hits by tier come from `stats.cached_tokens_by_tier`, which one engine
    and a prefill/decode cluster both keep. A cluster adds its own
    (`PDCluster.metrics_snapshot`): bytes by load path, and each engine's
    queue and storage-NIC backlog.
    """
    cache = self.engine.manager.stats
    pool = self.engine.manager.pool
    snap = {
        "num_waiting": self.engine.num_waiting,
        "num_running": self.engine.num_running,
        "kv_blocks_total": pool.num_blocks,
        "kv_blocks_referenced": cache["blocks_referenced"],
        "kv_blocks_cached": cache["blocks_cached"],
        "prefix_cache_query_tokens": cache["query_tokens"],
        "path_bytes": {},
        "engines": {},
        "evicted_blocks": cache["evictions"],
        "engine": self.engine.stats.as_dict(),
    }
    # Each turn counted once, at its admission, by the tier that held it.
    cold = getattr(self.engine, "cold_tier", None)
    by_tier = self.engine.stats.cached_tokens_by_tier
    hits = snap["prefix_cache_hit_tokens"] = {"device": by_tier["device"]}
    if _has_hot_tier(cold):
      hits["hot"] = by_tier["hot"]
    if getattr(cold, "store", None) is not None:
      hits["cold"] = by_tier["cold"]
    extra = getattr(self.engine, "metrics_snapshot", None)
    if extra is not None:
      snap.update(extra())
    return snap


def _has_hot_tier(cold) -> bool:
  """Whether `cold` (an engine's `cold_tier`) has a hot tier: one engine's
  connector names it `hot`, a P/D cluster's `ClusterColdTier` lists its
  prefill engines' in `hot_tiers` (without this, /metrics left out a
  cluster's hot hits)."""
  return (getattr(cold, "hot", None) is not None or
          bool(getattr(cold, "hot_tiers", ())))


@dataclasses.dataclass
class _Pending:
  on_finish: FinishCallback
  on_error: ErrorCallback


class EngineLoop:
  """Runs `handle.step()` in a background thread; see the module docstring."""

  def __init__(self, handle: EngineHandle, *, idle_wait_s: float = 0.05):
    self.handle = handle
    self._idle_wait_s = idle_wait_s
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._pending: dict[str, _Pending] = {}
    self._stop = threading.Event()
    self._stop_lock = threading.Lock()
    self._closed = False
    self._thread = threading.Thread(target=self._run, name="engine-loop",
                                    daemon=True)
    self.snapshot: dict[str, Any] = handle.snapshot()
    self.aborted = 0  # turns removed from the engine before they finished
    self.error: BaseException | None = None  # set if a step ever failed

  # ------------------------------------------------------ any thread
  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout_s: float = 10.0) -> None:
    """Stops the thread (after the step it is in), then closes the handle;
    turns in flight get a `ShuttingDown` error callback. Any thread may call
    it, more than once: the first signal of a shutdown does, so that
    clients are answered at once instead of after their generations."""
    self._stop.set()
    self._commands.put(("wake",))
    with self._stop_lock:
      if self._thread.is_alive():
        self._thread.join(timeout_s)
      if not self._thread.is_alive() and not self._closed:
        self._closed = True
        self.handle.close()

  @property
  def running(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def submit(self, req: TurnRequest, on_finish: FinishCallback,
             on_error: ErrorCallback) -> None:
    """Queues `req`; exactly one of the callbacks runs later (loop thread).

    The request's own `on_token` hook, if any, runs for every token before.
    """
    if not self.running:
      raise RuntimeError("the engine loop is not running")
    self._commands.put(("submit", req, _Pending(on_finish, on_error)))

  def abort(self, request_id: str) -> None:
    """Asks the loop to drop `request_id`; no callback runs for it after."""
    self._commands.put(("abort", request_id))

  def forget_blocks(self, ids: list[bytes]) -> cf.Future:
    """Asks the loop to drop `ids` from the engine's memory tiers
    (`forget_blocks` of the handle) between two steps; the future gets its
    counts, or its error."""
    future: cf.Future = cf.Future()
    if not self.running:
      future.set_exception(RuntimeError("the engine loop is not running"))
      return future
    self._commands.put(("forget", list(ids), future))
    return future

  # ------------------------------------------------------ loop thread
  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        self._drain(block=not self._has_work())
        if self._stop.is_set():
          break
        if self._has_work():
          self._step()
    finally:
      error = ShuttingDown("the server is shutting down")
      self._fail_pending(error)
      while True:  # submissions that never reached the engine
        try:
          cmd = self._commands.get_nowait()
        except queue.Empty:
          break
        if cmd[0] == "submit":
          _call(cmd[2].on_error, error)
        elif cmd[0] == "forget":
          cmd[2].set_exception(error)

  def _has_work(self) -> bool:
    """Turns to run, or prefetch reads going while every session is away
    (stepped then too, so the reads land before the sessions return)."""
    if self.handle.has_work():
      return True
    pending = getattr(self.handle, "prefetch_pending", None)
    return pending is not None and pending()

  def _drain(self, block: bool) -> None:
    try:
      cmd = self._commands.get(timeout=self._idle_wait_s) if block \
          else self._commands.get_nowait()
    except queue.Empty:
      return
    while True:
      self._apply(cmd)
      try:
        cmd = self._commands.get_nowait()
      except queue.Empty:
        break
    self.snapshot = self.handle.snapshot()

  def _apply(self, cmd: tuple) -> None:
    if cmd[0] == "submit":
      _, req, pending = cmd
      try:
        self.handle.submit(req)
      except Exception as e:  # pylint: disable=broad-except
        _call(pending.on_error, e)
        return
      self._pending[req.request_id] = pending
    elif cmd[0] == "abort":
      rid = cmd[1]
      if self._pending.pop(rid, None) is not None:
        self.handle.abort(rid)
        self.aborted += 1
    elif cmd[0] == "forget":
      _, ids, future = cmd
      try:
        future.set_result(self.handle.forget_blocks(ids))
      except Exception as e:  # pylint: disable=broad-except
        future.set_exception(e)

  def _step(self) -> None:
    try:
      outputs = self.handle.step()
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("engine step failed; failing %d requests",
                        len(self._pending))
      self.error = e
      for rid in list(self._pending):
        try:
          self.handle.abort(rid)
        except Exception:  # pylint: disable=broad-except
          logging.exception("abort of %s after a failed step failed", rid)
      self._fail_pending(e)
      return
    for out in outputs:
      pending = self._pending.pop(out.request.request_id, None)
      if pending is None:
        continue
      if out.error is not None:  # its own `on_token` hook raised
        _call(pending.on_error, out.error)
      else:
        _call(pending.on_finish, out)
    self.snapshot = self.handle.snapshot()

  def _fail_pending(self, error: BaseException) -> None:
    pending, self._pending = self._pending, {}
    for p in pending.values():
      _call(p.on_error, error)


def _call(callback: Callable, arg: Any) -> None:
  try:
    callback(arg)
  except Exception:  # pylint: disable=broad-except
    logging.exception("request callback failed")
