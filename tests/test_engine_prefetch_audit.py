"""Audit of one engine's prefetcher (`engine.engine_prefetch`): cases
tests/test_engine_prefetch.py does not reach, each of which went wrong.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from async_load_support import (BS, STORED, drain, engine_on, prompt_tokens,
                                stored_session)
from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model

HOT_BYTES = 1 << 21  # as test_engine_prefetch.py: far more than 2 x STORED


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _away_session_lost(tiny, root):
  """An engine with a prefetcher whose session s (tenant t) is away, its
  blocks gone from the hot tier and the pool but on disk; returns (engine,
  the ids of those blocks)."""
  engine = engine_on(tiny, root, hot_tier_bytes=HOT_BYTES, prefetch_blocks=4)
  prompt = prompt_tokens(1, 37)
  engine.submit(TurnRequest("s#0", prompt, 4, stop_on_eos=False, tenant="t",
                            session_id="s"))
  out = drain(engine, {})["s#0"]
  engine.cold_tier.flush()
  context = prompt + out.generated_tokens
  ids = hash_chain(context[:STORED * BS], BS, engine.manager.model_fingerprint,
                   "t")
  # Lost as to eviction (not `forget_blocks`, a deletion: the prefetcher
  # would stop following the session).
  assert engine.cold_tier.hot.discard(ids) == STORED
  assert engine.manager.pool.forget_cached(ids) == STORED
  return engine, ids


def test_a_deleted_sessions_blocks_read_in_flight_do_not_come_back(
    tiny, tmp_path):
  """DELETE /v1/sessions removes the session from the store, then
  `forget_blocks` drops it from the memory tiers between two steps. A
  prefetch read of its blocks that was out then used to land in the hot
  tier at the next step: the deleted session's KV was back in memory,
  served to the tenant's next turn that names the same tokens."""
  engine, ids = _away_session_lost(tiny, tmp_path / "kv")
  engine.step()  # the away session: a read of its first blocks
  reads = engine.prefetcher.in_flight()
  assert reads
  cf.wait(reads)  # read: the bytes are in the prefetcher's hands
  store = engine.cold_tier.store
  assert set(store.session_block_ids("t", "s")) >= set(ids)
  store.delete_session("t", "s")
  engine.forget_blocks(ids)
  for _ in range(5):
    engine.step()
    cf.wait(engine.prefetcher.in_flight())
  hot = engine.cold_tier.hot
  assert not any(hot.contains(ids)), hot.contains(ids)
  engine.close()


def test_a_loads_put_keeps_the_hot_run_it_extends(tiny, tmp_path):
  """A load puts its cold blocks into the hot tier after the hot run it
  read there. With the prefetcher pinning an away session's prefix, that
  hot run was all the put could evict: it cut a hole in the chain it
  extends (the next turn reads only the blocks before the hole; those
  after it take room for nothing), where a tier with no pins evicted the
  away session's blocks instead. Kept, the put stores what fits after it."""
  root = tmp_path / "kv"
  second = stored_session(tiny, root)  # s's first turn, in the cold tier
  probe = engine_on(tiny, tmp_path / "probe")
  block_bytes = probe.cold_tier.block_bytes
  probe.close()
  engine = engine_on(tiny, root, hot_tier_bytes=16 * block_bytes,
                     prefetch_blocks=4)
  hot = engine.cold_tier.hot
  assert hot.capacity == 16
  engine.submit(TurnRequest("a#0", prompt_tokens(7, 37), 4,
                            stop_on_eos=False, tenant="t", session_id="a"))
  drain(engine, {})
  engine.step()  # a is away: its prefix is pinned (8 of its 10 blocks)
  assert len(hot.pinned) == 8 and len(hot) == STORED
  ids = hash_chain(second[:STORED * BS], BS, engine.manager.model_fingerprint,
                   "t")
  hot.put(ids[:6], np.stack(engine.cold_tier.store.get(ids[:6])))
  assert len(hot) == hot.capacity  # s's first 6 blocks hot, 4 cold
  engine.submit(TurnRequest("s#1", second, 4, stop_on_eos=False, tenant="t"))
  outs = drain(engine, {})
  assert outs["s#1"].cached_prompt_tokens == STORED * BS
  held = sum(hot.contains(ids))
  assert hot.leading_run(ids) == held, (hot.leading_run(ids), held)  # no hole
  assert held >= 6
  engine.close()
