"""One engine's prefetcher (`engine.engine_prefetch`): while the reader has
no turn's read to make, it reads the prefixes of queued turns and of away
sessions from the cold tier into the hot tier.

Each test compares the tokens with an engine that has no prefetcher (the
prefetcher moves bytes, never changes them) and checks where the prefix
came from: the hot tier, with no cold read at admission, where the
prefetcher had read it before.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from async_load_support import (BS, STORED, Gate, drain, engine_on,
                                prompt_tokens, stored_session)
from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model

HOT_BYTES = 1 << 21  # the tiny model's tier: far more than 2 x STORED blocks


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _prefetching(tiny, root, **kw):
  engine = engine_on(tiny, root, hot_tier_bytes=HOT_BYTES, prefetch_blocks=4,
                     **kw)
  # Pins (and so reads) reach half the tier: it must take the whole prefix.
  assert engine.cold_tier.hot.capacity >= 2 * STORED
  return engine


def _step_and_land(engine, outs: dict) -> None:
  """One step, then waits for the prefetch reads it started (so the next
  step installs them: the test does not race the reader)."""
  for out in engine.step():
    outs[out.request.request_id] = out
  cf.wait(engine.prefetcher.in_flight())


def _reference(tiny, root, prompt, other, **kw):
  """Both turns on an engine with no prefetcher, over a store filled as the
  tested one's was."""
  stored_session(tiny, root)
  engine = engine_on(tiny, root, **kw)
  engine.submit(TurnRequest("b", other, 12, stop_on_eos=False, tenant="t"))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  outs = drain(engine, {})
  engine.close()
  return outs


def test_a_queued_turns_prefix_is_read_hot_while_the_batch_is_full(tiny,
                                                                    tmp_path):
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  other = prompt_tokens(3, 9)
  want = _reference(tiny, tmp_path / "ref", prompt, other, max_batch=1)
  assert want["s#1"].cached_prompt_tokens == STORED * BS

  engine = _prefetching(tiny, root, max_batch=1)
  gate = Gate(engine.cold_tier.store)
  gate.opened.set()
  outs = {}
  engine.submit(TurnRequest("b", other, 12, stop_on_eos=False, tenant="t"))
  engine.step()  # b runs: the one batch slot is taken
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  chain = hash_chain(prompt[:STORED * BS], BS,
                     engine.manager.model_fingerprint, "t")
  hot = engine.cold_tier.hot
  steps = 0
  while hot.leading_run(chain) < STORED:  # 3 reads of at most 4 blocks
    _step_and_land(engine, outs)
    steps += 1
    assert steps <= 4 and "b" not in outs, (steps, hot.leading_run(chain))
  assert engine.num_waiting == 1  # s#1 still waits for b's slot
  assert all(t.startswith("cold-tier-load") for t in gate.threads)
  drain(engine, outs)
  for rid in ("b", "s#1"):
    assert outs[rid].generated_tokens == want[rid].generated_tokens, rid
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  # Its load was a host copy: no cold read at admission.
  assert engine.stats.cached_tokens_by_tier["hot"] == STORED * BS
  assert engine.stats.cached_tokens_by_tier["cold"] == 0
  stats = engine.cold_tier.stats
  assert stats.loaded_blocks == 0 and stats.async_loads == 0
  report = engine.cold_tier.report()["prefetch"]
  assert report["read_blocks"] == STORED and report["reads"] == 3
  assert report["used_blocks"] == STORED
  assert report["evicted_unused_blocks"] == 0
  assert engine.metrics_snapshot()["prefetch_blocks"] == {
      "read": STORED, "used": STORED, "evicted_unused": 0}
  engine.close()


def test_an_away_sessions_lost_blocks_are_read_back_before_it_returns(
    tiny, tmp_path):
  """The session's blocks leave the pool and the hot tier while it is away
  (here dropped by hand; in a run, evicted for other sessions' turns; not
  `forget_blocks`, a deletion the prefetcher stops following): an idle engine
  reads them back from the cold tier (`prefetch_pending` keeps a driver
  stepping it), and the next turn finds them hot."""
  prompt = prompt_tokens(1, 37)
  ref = engine_on(tiny, tmp_path / "ref")
  engine = _prefetching(tiny, tmp_path / "kv")
  outs = {}
  for e, o in ((ref, {}), (engine, outs)):
    e.submit(TurnRequest("s#0", prompt, 4, stop_on_eos=False, tenant="t",
                         session_id="s"))
    drain(e, o)
  second = prompt + outs["s#0"].generated_tokens + prompt_tokens(2, 5)
  engine.cold_tier.flush()  # the write-back is on disk
  ids = hash_chain(second[:STORED * BS], BS, engine.manager.model_fingerprint,
                   "t")
  assert engine.cold_tier.hot.discard(ids) == STORED
  assert engine.manager.pool.forget_cached(ids) == STORED
  assert engine.prefetch_pending()  # the turn's end: the session is away
  steps = 0
  while engine.prefetch_pending():
    assert not engine.step()
    steps += 1
    assert steps <= 20
  assert engine.cold_tier.hot.leading_run(ids) == STORED
  for e, o in ((ref, {}), (engine, outs)):
    e.submit(TurnRequest("s#1", second, 4, stop_on_eos=False, tenant="t",
                         session_id="s"))
    o.update(drain(e, {}))
    if e is ref:
      want = o["s#1"]
  assert outs["s#1"].generated_tokens == want.generated_tokens
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  assert engine.cold_tier.stats.loaded_blocks == 0
  assert engine.cold_tier.report()["prefetch"]["used_blocks"] == STORED
  ref.close()
  engine.close()


def test_a_deleted_sessions_blocks_are_neither_pinned_nor_read(tiny,
                                                               tmp_path):
  """An away session deleted (`forget_blocks` of its blocks, after the
  store dropped them): the prefetcher stops pinning its chain and reads
  nothing for it; `prefetch_pending` turns False."""
  engine = _prefetching(tiny, tmp_path / "kv")
  prompt = prompt_tokens(1, 37)
  engine.submit(TurnRequest("s#0", prompt, 4, stop_on_eos=False, tenant="t",
                            session_id="s"))
  out = drain(engine, {})["s#0"]
  engine.cold_tier.flush()
  ids = hash_chain((prompt + out.generated_tokens)[:STORED * BS], BS,
                   engine.manager.model_fingerprint, "t")
  engine.step()  # no turn: the away session's chain is pinned
  hot = engine.cold_tier.hot
  assert set(ids) <= hot.pinned
  engine.cold_tier.store.delete_session("t", "s")
  engine.forget_blocks(ids)
  steps = 0
  while engine.prefetch_pending():
    engine.step()
    steps += 1
    assert steps <= 20
  assert not hot.pinned & set(ids)
  assert engine.cold_tier.report()["prefetch"]["reads"] == 0
  engine.close()


def test_a_failed_prefetch_read_is_counted_and_the_turn_reads_itself(
    tiny, tmp_path):
  root = tmp_path / "kv"
  prompt = stored_session(tiny, root)
  other = prompt_tokens(3, 9)
  want = _reference(tiny, tmp_path / "ref", prompt, other, max_batch=1)
  engine = _prefetching(tiny, root, max_batch=1)
  gate = Gate(engine.cold_tier.store)
  gate.fail = OSError("disk gone")
  gate.opened.set()
  outs = {}
  engine.submit(TurnRequest("b", other, 12, stop_on_eos=False, tenant="t"))
  engine.step()
  engine.submit(TurnRequest("s#1", prompt, 4, stop_on_eos=False, tenant="t"))
  _step_and_land(engine, outs)  # a read, which raises
  _step_and_land(engine, outs)  # counted; that block is not asked for again
  report = engine.cold_tier.report()["prefetch"]
  assert report["read_errors"] == 1 and report["reads"] == 1
  assert engine.cold_tier.stats.store_errors == 1
  gate.fail = None  # the disk is back: the turn's own load reads it
  drain(engine, outs)
  for rid in ("b", "s#1"):
    assert outs[rid].generated_tokens == want[rid].generated_tokens, rid
  assert engine.stats.cached_tokens_by_tier["cold"] == STORED * BS
  engine.close()


def test_the_load_pins_and_the_prefetch_pins_do_not_undo_each_other(
    tiny, tmp_path):
  """A turn's load pins the hot run in front of its cold read; clearing
  those pins when it lands used to clear every pin (the prefetcher's)."""
  engine = _prefetching(tiny, tmp_path / "kv")
  hot = engine.cold_tier.hot
  engine.prefetcher.prefetcher.predictor.finished(
      ("t", "s"), engine.clock(), [b"x" * 16, b"y" * 16], "engine")
  engine.step()  # no turn: the prefetcher pins the away session's chain
  assert hot.pinned == {b"x" * 16, b"y" * 16}
  hot.set_pins([b"z" * 16], owner="load")
  hot.set_pins((), owner="load")
  assert hot.pinned == {b"x" * 16, b"y" * 16}
  engine.close()
  assert hot.pinned == frozenset()


@pytest.mark.parametrize("kw,msg", [
    (dict(prefetch_blocks=4), "needs a cold tier .* and a hot tier"),
    (dict(prefetch_blocks=-1), "prefetch_blocks must be an int >= 0"),
    (dict(prefetch_blocks=True), "prefetch_blocks must be an int >= 0"),
])
def test_make_engine_refuses_a_prefetcher_it_cannot_run(tiny, tmp_path, kw,
                                                         msg):
  with pytest.raises(ValueError, match=msg):
    engine_on(tiny, tmp_path / "kv", **kw)  # a cold tier, no hot tier
