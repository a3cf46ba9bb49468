"""Audit of admitting turns past a reading head
(`EngineConfig.admit_while_reading`).

As in tests/test_admit_while_reading.py, the head's cold read is held in
the store (a gate around `BlockStore.get`), so what is admitted while it
is out is deterministic.
"""

from __future__ import annotations

import pytest

from async_load_support import (BS, STORED, Gate, drain, engine_admitting,
                                prompt_tokens, start_b, store_two_sessions,
                                stored_session, submit_turn)
from dualpath_jax.model import load_model


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


@pytest.mark.parametrize("admit", [True, False])
def test_a_turn_gone_ahead_does_not_fill_the_pages_of_the_heads_read(
    tiny, tmp_path, admit):
  """A pool of 20 blocks: b holds 3; s#1's read will fill 10 and its first
  chunk after them 2 more. c (40 new tokens) needs no read, and its first
  chunk (4 blocks) fit beside the read's 10, so it went ahead; but its
  next chunks, computed while the read was out, took the pages the read
  was to fill. The read landed into 5 free blocks: s#1 could not be
  admitted, waited behind the younger c, and its read was made twice.
  A turn goes ahead only if its whole prefill fits beside the head's
  claim: here s#1 gets the pool its read needs, as in strict order."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_admitting(tiny, root, admit, num_blocks=20)
  gate = Gate(engine.cold_tier.store)
  start_b(engine)
  submit_turn(engine, "s#1", prompt)
  submit_turn(engine, "c", prompt_tokens(4, 40))
  outs = {}
  try:
    for _ in range(4):  # s#1's read is held
      for out in engine.step():
        outs[out.request.request_id] = out
  finally:
    gate.opened.set()
  head = engine._waiting[0]
  assert head.rid == "s#1"
  head.load.wait()
  # The read has landed: the head's load and first chunk fit now.
  assert engine.manager.pool.num_free >= STORED + 2
  drain(engine, outs)
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  assert engine.cold_tier.stats.async_loads == 1  # s#1's one read
  assert engine.cold_tier.stats.loaded_blocks == STORED
  assert engine.manager.pool.num_referenced == 0
  engine.close()


@pytest.mark.parametrize("admit", [True, False])
def test_a_turn_only_looked_at_is_not_a_prefix_lookup(tiny, tmp_path, admit):
  """While s#1's read is out, u#1 (it would read too) is begun and ended at
  every step to see whether it could go ahead. Each of those probes was
  counted as a prefix-cache lookup (`manager.stats`: lookups, query
  tokens; /metrics' prefix_cache_query_tokens), diluting the hit rate
  with every step the read took (the committed agent_eval run: 140
  lookups for 64 turns, hit rate 0.21 against strict order's 0.30).
  Only s#1's begin is a lookup here, as in strict order."""
  second = store_two_sessions(tiny, tmp_path / "kv")
  engine = engine_admitting(tiny, tmp_path / "kv", admit)
  gate = Gate(engine.cold_tier.store)
  start_b(engine)
  before = engine.manager.stats
  submit_turn(engine, "s#1", second["s"])
  submit_turn(engine, "u#1", second["u"])
  try:
    for _ in range(5):
      engine.step()
    assert [seq.rid for seq in engine._waiting] == ["s#1", "u#1"]
    after = engine.manager.stats
  finally:
    gate.opened.set()
  assert after["lookups"] - before["lookups"] == 1
  assert (after["query_tokens"] - before["query_tokens"] ==
          len(second["s"]))
  assert after["hit_tokens"] == before["hit_tokens"]
  drain(engine, {})
  engine.close()


def test_a_turn_admitted_past_the_head_is_one_lookup(tiny, tmp_path):
  """A turn that does go ahead (c: nothing to read) counts its lookup
  once, with its device hit, like a turn admitted in order."""
  second = store_two_sessions(tiny, tmp_path / "kv")
  engine = engine_admitting(tiny, tmp_path / "kv", True)
  gate = Gate(engine.cold_tier.store)
  start_b(engine)
  before = engine.manager.stats
  submit_turn(engine, "s#1", second["s"])
  submit_turn(engine, "c", prompt_tokens(4, 11))
  try:
    for _ in range(3):
      engine.step()
    after = engine.manager.stats
  finally:
    gate.opened.set()
  assert engine.stats.admitted_while_reading == 1
  assert after["lookups"] - before["lookups"] == 2
  assert after["query_tokens"] - before["query_tokens"] == len(second["s"]) + 11
  drain(engine, {})
  engine.close()
