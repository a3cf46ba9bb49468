"""Audit of one engine's asynchronous cold loads (`async_cold_loads`).

Each case holds the reader's `BlockStore.get` behind a gate, as
tests/test_engine_async_loads.py does, so what the engine does while the
read is out is deterministic.
"""

from __future__ import annotations

import threading

import pytest

from async_load_support import (Gate, drain, engine_on, prompt_tokens,
                                stored_session)
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


@pytest.mark.parametrize("async_loads", [False, True])
def test_a_reading_turn_does_not_hold_the_pool_from_a_running_one(
    tiny, tmp_path, async_loads):
  """The turn whose read is out holds the pool blocks of its device hit.
  When the running turn needs them, that turn gives them back (its read is
  dropped, made again later), as an admitted turn would be preempted:
  the engine must not fail with OutOfBlocksError, which it did."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root, num_blocks=18, async_loads=async_loads)
  # Two blocks of the session's prefix cached in the pool: its next turn's
  # device hit, which it holds from its `begin`.
  drain(engine, {} if engine.submit(TurnRequest(
      "p", prompt[:9], 1, stop_on_eos=False, tenant="t")) else {})
  gate = Gate(engine.cold_tier.store)
  if not async_loads:  # the engine's own thread reads: never held
    gate.opened.set()
  outs = {}
  # r needs the whole pool at its end: 30 + 40 tokens, 18 blocks.
  engine.submit(TurnRequest("r", prompt_tokens(3, 30), 40, stop_on_eos=False,
                            tenant="t", seed=1))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False,
                            tenant="t", seed=2))
  try:
    for _ in range(60):  # the read is held while r runs to its end
      for out in engine.step():
        outs[out.request.request_id] = out
      if "r" in outs:
        break
  finally:
    gate.opened.set()  # a failure must not leave the reader waiting
  assert "r" in outs and len(outs["r"].generated_tokens) == 40
  drain(engine, outs)
  assert len(outs["s#1"].generated_tokens) == 4
  if async_loads:  # p's read, s#1's dropped one, and s#1's made again
    assert engine.cold_tier.stats.async_loads == 3
  assert engine.manager.pool.num_referenced == 0
  engine.close()


def test_a_dropped_read_still_out_does_not_stall_the_running_turns(
    tiny, tmp_path):
  """A turn aborted while its read is out leaves that read to finish in
  the background. The next returning turn's read goes after it on the one
  reader thread; the engine must go on decoding its running turns
  meanwhile, not wait for the dropped read (a hung disk and a client that
  gives up on it would freeze every turn). Here the store lets the reads
  go only when the running turn has decoded a token after the abort: an
  engine that waits instead times the read out (counted a store error)."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root)
  gate = Gate(engine.cold_tier.store, timeout_s=3)
  aborted = threading.Event()

  def on_token(_token):
    if aborted.is_set():
      gate.opened.set()  # b decoded after the abort: let the reads go

  outs = {}
  engine.submit(TurnRequest("b", prompt_tokens(3, 9), 12, stop_on_eos=False,
                            tenant="t", on_token=on_token))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  engine.step()  # s#1's read is out, held
  assert engine.cold_tier.stats.async_loads == 1
  assert engine.abort("s#1")
  aborted.set()
  engine.submit(TurnRequest("again", prompt, 4, stop_on_eos=False,
                            tenant="t"))
  try:
    drain(engine, outs)
  finally:
    gate.opened.set()
  assert gate.timed_out == 0 and engine.cold_tier.stats.store_errors == 0
  assert engine.cold_tier.stats.async_loads == 2
  assert outs["again"].cached_prompt_tokens == 40  # 10 blocks, from cold
  assert engine.manager.pool.num_referenced == 0
  engine.close()


def test_the_store_error_of_a_dropped_read_is_counted(tiny, tmp_path):
  """A read whose turn was aborted finishes on the reader thread; if the
  store raised there, the error was lost: never logged nor counted in
  `store_errors` (a failing disk hidden by clients that gave up on it).
  It is counted on the engine's thread, by the next load or at close."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root)
  gate = Gate(engine.cold_tier.store)
  outs = {}
  engine.submit(TurnRequest("b", prompt_tokens(3, 9), 6, stop_on_eos=False,
                            tenant="t"))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  engine.step()  # s#1's read is out, held
  assert engine.abort("s#1")
  gate.fail = OSError(5, "Input/output error")
  gate.opened.set()
  drain(engine, outs)
  engine.close()  # waits for the read
  stats = engine.cold_tier.stats
  assert stats.async_loads == 1 and stats.store_errors == 1
  assert stats.read_s > 0 and engine.manager.pool.num_referenced == 0


def test_a_dropped_read_still_queued_is_withdrawn(tiny, tmp_path):
  """A load dropped while its read still waits on the reader (behind an
  earlier dropped read) used to be read anyway, taking the storage link
  from the loads after it. It is withdrawn: the store sees one read."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root)
  gate = Gate(engine.cold_tier.store)
  outs = {}
  engine.submit(TurnRequest("b", prompt_tokens(3, 9), 12, stop_on_eos=False,
                            tenant="t"))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  engine.step()  # s#1's read is out, held in the store
  assert engine.abort("s#1")  # it keeps reading: dropped
  engine.submit(TurnRequest("again", prompt, 4, stop_on_eos=False,
                            tenant="t"))
  engine.step()  # again's read is queued behind it
  stats = engine.cold_tier.stats
  assert stats.async_loads == 2
  assert engine.abort("again")
  assert stats.withdrawn_reads == 1
  gate.opened.set()
  drain(engine, outs)
  engine.close()
  assert len(gate.threads) == 1  # only s#1's read reached the store
  assert stats.store_errors == 0 and engine.manager.pool.num_referenced == 0
  assert set(outs) == {"b"}
