"""One engine reads a returning turn's prefix from the cold tier on a reader
thread while it serves its other turns (`EngineConfig.async_cold_loads`).

Each test holds the read in the store until it lets it go (a gate around
`BlockStore.get`), so what the engine does meanwhile is deterministic: the
turns already running keep decoding, the reading turn keeps its place,
and once the read lands it generates exactly the tokens of an engine that
read synchronously. Also: an abort or a store error while the read is out,
a turn pushed back ahead of the reading one, and the emulated storage NIC
(`storage_nic_gbps`) in front of one engine's reads.
"""

from __future__ import annotations

import threading

import pytest

from async_load_support import (BS, STORED, Gate, drain, engine_on,
                                prompt_tokens, stored_session)
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _reference(tiny, root, prompt, other):
  """Both turns on an engine reading synchronously from a store of its own
  (`root`: a fresh directory), which turn 1 fills first as it did the
  tested engine's (their write-backs would change each other's hits)."""
  stored_session(tiny, root)
  engine = engine_on(tiny, root, async_loads=False)
  engine.submit(TurnRequest("b", other, 12, stop_on_eos=False, tenant="t"))
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  outs = drain(engine, {})
  engine.close()
  return outs


def test_running_turns_decode_while_a_returning_prefix_is_read(tiny, tmp_path):
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  other = prompt_tokens(3, 9)
  want = _reference(tiny, tmp_path / "ref", prompt, other)
  assert want["s#1"].cached_prompt_tokens == STORED * BS

  engine = engine_on(tiny, root)
  gate = Gate(engine.cold_tier.store)
  outs = {}
  engine.submit(TurnRequest("b", other, 12, stop_on_eos=False, tenant="t"))
  engine.step()  # b prefilled: it decodes from now on
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  decoded = engine.stats.decode_tokens
  for _ in range(4):  # the read is held: b goes on, s#1 keeps its place
    for out in engine.step():
      outs[out.request.request_id] = out
  assert engine.stats.decode_tokens == decoded + 4
  assert engine.num_waiting == 1 and "s#1" not in outs
  assert gate.threads and all(t.startswith("cold-tier-load")
                              for t in gate.threads)
  gate.opened.set()
  drain(engine, outs)
  for rid in ("b", "s#1"):
    assert outs[rid].generated_tokens == want[rid].generated_tokens, rid
  assert outs["s#1"].cached_prompt_tokens == want["s#1"].cached_prompt_tokens
  stats = engine.cold_tier.stats
  assert stats.async_loads == 1 and stats.loaded_blocks == STORED
  assert stats.read_s > 0 and engine.stats.cached_tokens_by_tier["cold"] == (
      want["s#1"].cached_prompt_tokens)
  engine.close()


def test_with_nothing_else_to_run_the_engine_waits_for_the_read(tiny, tmp_path):
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root)
  gate = Gate(engine.cold_tier.store)
  engine.submit(TurnRequest("s#1", prompt, 3, stop_on_eos=False, tenant="t"))
  threading.Timer(0.3, gate.opened.set).start()
  outs = drain(engine, {})
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  assert engine.stats.load_wait_s >= 0.2  # it waited, it did not spin
  engine.close()


def test_synchronous_loads_read_on_the_engine_thread(tiny, tmp_path):
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root, async_loads=False)
  gate = Gate(engine.cold_tier.store)
  gate.opened.set()
  outs = drain(engine, {} if engine.submit(TurnRequest(
      "s#1", prompt, 3, stop_on_eos=False, tenant="t")) else {})
  assert gate.threads == [threading.current_thread().name]
  assert engine.cold_tier.stats.async_loads == 0
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  assert engine.stats.load_wait_s == engine.cold_tier.stats.read_s > 0
  engine.close()


@pytest.mark.parametrize("what", ["abort", "store_error"])
def test_an_abort_or_a_failed_read_while_it_is_out(tiny, tmp_path, what):
  """Abort: the turn is gone, its blocks released, and the next turn's
  load (which reuses the reader's buffer) waits for the dropped read and
  loads exactly. Store error: a miss, counted; the turn recomputes."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  other = prompt_tokens(3, 9)
  want = _reference(tiny, tmp_path / "ref", prompt, other)
  engine = engine_on(tiny, root)
  gate = Gate(engine.cold_tier.store)
  outs = {}
  engine.submit(TurnRequest("b", other, 12, stop_on_eos=False, tenant="t"))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  engine.step()
  assert engine.cold_tier.stats.async_loads == 1
  if what == "abort":
    assert engine.abort("s#1")
    assert "s#1" not in engine.manager and engine.num_waiting == 0
    engine.submit(TurnRequest("again", prompt, 4, stop_on_eos=False,
                              tenant="t"))
    threading.Timer(0.2, gate.opened.set).start()
    drain(engine, outs)
    assert "s#1" not in outs
    assert outs["again"].generated_tokens == want["s#1"].generated_tokens
    assert outs["again"].cached_prompt_tokens == (
        want["s#1"].cached_prompt_tokens)
  else:
    gate.fail = OSError(28, "No space left on device")
    gate.opened.set()
    drain(engine, outs)
    assert outs["s#1"].generated_tokens == want["s#1"].generated_tokens
    assert outs["s#1"].cached_prompt_tokens == 0
    assert engine.cold_tier.stats.store_errors == 1
  assert outs["b"].generated_tokens == want["b"].generated_tokens
  assert engine.manager.pool.num_referenced == 0
  engine.close()


def test_a_turn_pushed_back_ahead_of_the_reading_one(tiny, tmp_path):
  """The pool is so small that a decoding turn preempts a younger one,
  which goes back to the head of the queue, ahead of the turn whose read
  is out: that read is dropped and made again when the turn heads the
  queue again; every turn ends with the reference's tokens."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)  # 10 blocks stored
  a, c = prompt_tokens(4, 30), prompt_tokens(5, 30)
  engine = engine_on(tiny, root, num_blocks=22)
  gate = Gate(engine.cold_tier.store)
  outs = {}
  engine.submit(TurnRequest("a", a, 20, stop_on_eos=False, tenant="t"))
  engine.step()
  engine.submit(TurnRequest("c", c, 20, stop_on_eos=False, tenant="t"))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  for _ in range(40):  # until a's and c's growth preempts c
    for out in engine.step():
      outs[out.request.request_id] = out
    if engine.stats.preemptions:
      break
  assert engine.stats.preemptions >= 1
  assert engine._waiting[0].rid == "c" and engine._waiting[1].load is None
  gate.opened.set()
  drain(engine, outs)
  plain = engine_on(tiny, tmp_path / "plain", num_blocks=128)
  for rid, p, n in (("a", a, 20), ("c", c, 20), ("s#1", prompt, 4)):
    plain.submit(TurnRequest(rid, p, n, stop_on_eos=False, tenant="t"))
  want = drain(plain, {})
  plain.close()
  for rid in ("a", "c", "s#1"):
    assert outs[rid].generated_tokens == want[rid].generated_tokens, rid
  assert engine.cold_tier.stats.async_loads >= 2  # started again
  assert engine.manager.pool.num_referenced == 0
  engine.close()


def test_an_emulated_storage_nic_paces_one_engines_reads(tiny, tmp_path):
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  # A rate and a bucket of one byte that make the read wait measurably:
  # 10 blocks of a few KiB at 100 kb/s.
  engine = engine_on(tiny, root, storage_nic_gbps=1e-4)
  nic = engine.cold_tier.nic
  nic.burst_bytes = 1
  nic._tokens = 1.0  # pylint: disable=protected-access
  outs = drain(engine, {} if engine.submit(TurnRequest(
      "s#1", prompt, 3, stop_on_eos=False, tenant="t")) else {})
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  assert nic.total_bytes == STORED * engine.cold_tier._block_bytes
  assert nic.total_wait_s > 0 and engine.cold_tier.stats.read_s >= (
      nic.total_wait_s * 0.9)
  engine.close()
  with pytest.raises(ValueError, match="storage_nic_gbps must be > 0"):
    engine_on(tiny, root, storage_nic_gbps=0)
