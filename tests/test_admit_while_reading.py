"""While the turn heading one engine's queue waits for its cold read, the
turns behind it that need no cold read take the free batch slots
(`EngineConfig.admit_while_reading`); those that would read stay behind it.

The read is held in the store (a gate around `BlockStore.get`), so what is
admitted meanwhile is deterministic; every turn's tokens are compared with
an engine that keeps strict arrival order.
"""

from __future__ import annotations

import pytest

from dualpath_jax.cache.block_hash import hash_chain
from async_load_support import (BS, STORED, Gate, drain, engine_admitting,
                                engine_on, prompt_tokens, start_b,
                                store_two_sessions, stored_session,
                                submit_turn)
from dualpath_jax.model import load_model


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _submit_all(engine, second):
  """b runs first; then s#1 (heads the queue, reads), u#1 (would read
  too) and c (a new prompt: nothing to read)."""
  start_b(engine)
  for rid, prompt in (("s#1", second["s"]), ("u#1", second["u"]),
                      ("c", prompt_tokens(4, 11))):
    submit_turn(engine, rid, prompt)


@pytest.mark.parametrize("admit", [True, False])
def test_a_turn_with_nothing_to_read_takes_a_free_slot_while_the_head_reads(
    tiny, tmp_path, admit):
  ref_second = store_two_sessions(tiny, tmp_path / "ref")
  ref = engine_admitting(tiny, tmp_path / "ref", admit=False)
  _submit_all(ref, ref_second)
  want = drain(ref, {})
  ref.close()

  second = store_two_sessions(tiny, tmp_path / "kv")
  assert second == ref_second
  engine = engine_admitting(tiny, tmp_path / "kv", admit=admit)
  gate = Gate(engine.cold_tier.store)
  outs = {}
  _submit_all(engine, second)
  for _ in range(3):  # s#1's read is held
    for out in engine.step():
      outs[out.request.request_id] = out
  waiting = [seq.rid for seq in engine._waiting]
  admitted = {seq.rid for seq in engine._prefilling + engine._decoding}
  admitted |= set(outs)  # c's 4 tokens may be done by now
  if admit:
    assert waiting == ["s#1", "u#1"] and admitted == {"b", "c"}
    assert engine.stats.admitted_while_reading == 1
  else:
    assert waiting == ["s#1", "u#1", "c"] and admitted == {"b"}
    assert engine.stats.admitted_while_reading == 0
  # u#1 would read: it is not begun (holds no blocks) while it waits.
  assert "u#1" not in engine.manager
  gate.opened.set()
  drain(engine, outs)
  for rid in ("b", "s#1", "u#1", "c"):
    assert outs[rid].generated_tokens == want[rid].generated_tokens, rid
    assert (outs[rid].cached_prompt_tokens ==
            want[rid].cached_prompt_tokens), rid
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  assert engine.stats.cached_tokens_by_tier["cold"] == 2 * STORED * BS
  engine.close()


def test_a_hot_prefix_is_admitted_past_the_reading_head(tiny, tmp_path):
  """u#1's prefix is in the hot tier (its turn 1 ran on this engine and was
  evicted from the pool): a host copy, not a read, so it goes ahead."""
  second = store_two_sessions(tiny, tmp_path / "kv")
  engine = engine_on(tiny, tmp_path / "kv", max_batch=4,
                     hot_tier_bytes=1 << 21)
  hot = engine.cold_tier.hot
  # Put u's blocks in the hot tier by running its turn 1 here again, then
  # drop them from the pool.
  submit_turn(engine, "u#0", second["u"][:37])
  drain(engine, {})
  chain = hash_chain(second["u"][:STORED * BS], BS,
                     engine.manager.model_fingerprint, "t")
  assert hot.leading_run(chain) == STORED
  assert engine.manager.pool.forget_cached(chain) == STORED
  gate = Gate(engine.cold_tier.store)
  start_b(engine)
  submit_turn(engine, "s#1", second["s"])
  submit_turn(engine, "u#1", second["u"])
  engine.step()
  assert [seq.rid for seq in engine._waiting] == ["s#1"]
  assert engine.stats.admitted_while_reading == 1
  gate.opened.set()
  outs = drain(engine, {})
  assert outs["u#1"].cached_prompt_tokens == STORED * BS
  assert engine.stats.cached_tokens_by_tier["hot"] == STORED * BS
  engine.close()


def test_a_turn_does_not_take_the_pages_the_heads_read_will_fill(tiny,
                                                                 tmp_path):
  """A pool of 16 blocks: b holds 3, s#1's read will fill 10. c needs none
  read, but its first chunk (4 blocks) does not fit beside those 10, so it
  stays behind the head, not begun, and nothing past it is tried."""
  second = store_two_sessions(tiny, tmp_path / "kv")
  engine = engine_on(tiny, tmp_path / "kv", max_batch=4, num_blocks=16)
  gate = Gate(engine.cold_tier.store)
  start_b(engine)
  submit_turn(engine, "s#1", second["s"])
  submit_turn(engine, "c", prompt_tokens(4, 16))
  submit_turn(engine, "d", prompt_tokens(6, 3))  # it would fit: not tried
  engine.step()
  assert [seq.rid for seq in engine._waiting] == ["s#1", "c", "d"]
  assert "c" not in engine.manager
  assert engine.stats.admitted_while_reading == 0
  gate.opened.set()
  outs = drain(engine, {})
  assert set(outs) == {"b", "s#1", "c", "d"}
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  engine.close()


def test_the_heads_claim_includes_its_first_chunk_after_the_load(tiny,
                                                                   tmp_path):
  """A pool of 20 blocks: b holds 3 or 4; s#1's read will fill 10 and its
  first chunk after them (46 - 40 tokens) 2 more, so 12 are claimed. c
  needs none read and 6 blocks: beside the read's 10 alone it would fit,
  beside the whole claim it does not, so it stays behind the head."""
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  engine = engine_on(tiny, root, max_batch=4, num_blocks=20)
  gate = Gate(engine.cold_tier.store)
  start_b(engine)
  submit_turn(engine, "s#1", prompt)
  submit_turn(engine, "c", prompt_tokens(4, 24))
  try:
    engine.step()
    assert [seq.rid for seq in engine._waiting] == ["s#1", "c"]
    assert engine.stats.admitted_while_reading == 0
    assert engine._head_claim() == STORED + 2
    assert 16 <= engine.manager.pool.num_free < 6 + STORED + 2
  finally:
    gate.opened.set()
  outs = drain(engine, {})
  assert set(outs) == {"b", "s#1", "c"}
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  engine.close()


def test_the_setting_is_a_bool():
  from dualpath_jax.config import EngineConfig
  with pytest.raises(ValueError, match="admit_while_reading must be a bool"):
    EngineConfig(admit_while_reading=1)
