"""The host-DRAM hot tier: exact bytes back, eviction by reuse, recency and
position; and the engine loading evicted prefixes from it, alone or in front
of the cold tier, with the tokens of an engine that recomputes."""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.cache.hot_tier import HotTier
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from storage.config import ColdTierConfig

SHAPE = (2, 2, 1, 4, 3)  # [L, 2, Hkv, P, D]


def _ids(prefix: str, n: int) -> list[bytes]:
  return [f"{prefix}{i}".encode() for i in range(n)]


def _blocks(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def test_read_run_returns_the_bytes_put_and_stops_at_the_first_missing():
  tier = HotTier(8, SHAPE, np.float32)
  ids, data = _ids("a", 5), _blocks(5, 0)
  assert tier.put(ids, data) == 5
  out = np.full((6, *SHAPE), np.nan, np.float32)  # poisoned
  assert tier.read_run(ids + [b"zz"], out) == 5
  np.testing.assert_array_equal(out[:5], data)
  assert np.isnan(out[5]).all()
  assert tier.read_run([ids[0], b"zz", ids[2]], out) == 1
  assert tier.contains([ids[3], b"zz"]) == [True, False]
  assert tier.stats.hits == 6 and tier.stats.lookups == 9
  # A put of held ids copies nothing again (the bytes of an identity are fixed).
  assert tier.put(ids[:2], _blocks(2, 9)) == 0
  tier.read_run(ids[:1], out)
  np.testing.assert_array_equal(out[0], data[0])


def test_blocks_seen_once_go_first_deepest_first():
  tier = HotTier(6, SHAPE, np.float32, protected_fraction=0.5)
  a, b = _ids("a", 3), _ids("b", 3)
  tier.put(a, _blocks(3, 1))
  tier.put(b, _blocks(3, 2))
  tier.touch(a)  # chain a reused: protected (cap 3)
  tier.put(_ids("c", 2), _blocks(2, 3))  # evicts b's two deepest
  assert tier.contains(b) == [True, False, False]
  assert all(tier.contains(a))
  tier.put(_ids("d", 1), _blocks(1, 4))  # b0 now, then the c's
  assert not any(tier.contains(b))
  assert tier.stats.evictions == 3


def test_protected_segment_is_capped_and_ages_out():
  tier = HotTier(4, SHAPE, np.float32, protected_fraction=0.5)
  a = _ids("a", 4)
  tier.put(a, _blocks(4, 5))
  tier.touch(a)  # all reused; only 2 stay protected: the shallowest
  tier.put(_ids("n", 2), _blocks(2, 6))
  assert tier.contains(a) == [True, True, False, False]
  assert len(tier) == 4


def test_a_put_larger_than_the_tier_keeps_the_shallowest():
  tier = HotTier(3, SHAPE, np.float32)
  ids, data = _ids("a", 5), _blocks(5, 7)
  assert tier.put(ids, data) == 3
  assert tier.contains(ids) == [True, True, True, False, False]
  assert tier.stats.dropped == 2
  out = np.empty((5, *SHAPE), np.float32)
  assert tier.read_run(ids, out) == 3
  np.testing.assert_array_equal(out[:3], data[:3])


def test_a_chain_extended_by_its_own_turn_keeps_its_head():
  """The P/D cluster's pattern: a turn's prompt blocks are put at hand-off,
  its deeper blocks at its end. The second put must not evict the first's
  (`keep`), and `refresh` afterwards orders the whole chain deepest first
  without calling it a reuse."""
  tier = HotTier(4, SHAPE, np.float32)
  a, b = _ids("a", 4), _ids("b", 1)
  tier.put(a[:2], _blocks(2, 1))  # the prompt, at hand-off
  tier.put(b, _blocks(1, 2))  # another session's block
  tier.put(a[2:], _blocks(2, 3), keep=a[:2])  # the turn's end: evicts b0
  assert tier.contains(a) == [True] * 4 and not tier.contains(b)[0]
  tier.refresh(a)
  assert tier.stats.promotions == 0
  tier.put(_ids("c", 2), _blocks(2, 4))  # evicts a's deepest two
  assert tier.contains(a) == [True, True, False, False]
  # With the rest of its chain kept, a put that has no room drops its own
  # blocks instead of cutting the head of the chain.
  tier = HotTier(2, SHAPE, np.float32)
  tier.put(a[:2], _blocks(2, 5))
  assert tier.put(a[2:3], _blocks(1, 6), keep=a[:2]) == 0
  assert tier.contains(a[:3]) == [True, True, False]
  assert tier.stats.dropped == 1


def test_pinned_blocks_outlive_every_put_until_unpinned():
  tier = HotTier(6, SHAPE, np.float32)
  a, b, c = _ids("a", 3), _ids("b", 6), _ids("c", 2)
  tier.set_pins(a + c)  # c not held yet: pinned once it is
  tier.put(a, _blocks(3, 1))
  assert tier.room() == 3 and tier.room(keep=b[:1]) == 3
  assert tier.put(b, _blocks(6, 2)) == 3  # only the unpinned room
  assert tier.stats.dropped == 3
  assert tier.leading_run(a) == 3 and tier.leading_run(b) == 3
  assert tier.put(c, _blocks(2, 3)) == 2  # evicts b's, not a's
  assert tier.leading_run(a) == 3 and tier.leading_run(c) == 2
  assert tier.room() == 1  # a's 3 and c's 2 pinned
  out = np.zeros((3,) + SHAPE, np.float32)
  assert tier.read_run(a, out) == 3
  np.testing.assert_array_equal(out, _blocks(3, 1))
  tier.set_pins(())
  assert tier.pinned == frozenset() and tier.room() == 6
  assert tier.put(b, _blocks(6, 2)) == 5  # b0 held: now a's and c's go
  assert tier.leading_run(a) == 0


def test_pins_of_two_owners_hold_together_and_clear_apart():
  """One engine's load pins the hot run before its cold read while its
  prefetcher pins the prefixes it predicts: neither may drop the other's."""
  tier = HotTier(6, SHAPE, np.float32)
  a, b, c = _ids("a", 2), _ids("b", 2), _ids("c", 4)
  tier.put(a + b, _blocks(4, 1))
  tier.set_pins(a, owner="load")
  tier.set_pins(b, owner="prefetch")
  assert tier.pinned == frozenset(a + b) and tier.room() == 2
  assert tier.put(c, _blocks(4, 2)) == 2  # only the 2 unpinned slots
  assert tier.leading_run(a) == 2 and tier.leading_run(b) == 2
  tier.set_pins((), owner="load")  # the load landed: the prefetch pins stay
  assert tier.pinned == frozenset(b)
  assert tier.put(c[2:], _blocks(2, 3)) == 2  # a's go, b's stay
  assert tier.leading_run(a) == 0 and tier.leading_run(b) == 2
  tier.set_pins(c[:1], owner="prefetch")  # replaces that owner's pins only
  assert tier.pinned == frozenset(c[:1])
  tier.set_pins((), owner="prefetch")
  assert tier.pinned == frozenset() and tier.room() == 6


def test_generation_names_each_copy_put():
  """A block evicted (or discarded) and put again is another copy, with a
  generation no copy had before; a reuse keeps the copy."""
  tier = HotTier(2, SHAPE, np.float32)
  a = _ids("a", 3)
  assert tier.generation(a[0]) is None
  tier.put(a[:2], _blocks(2, 0))
  g0, g1 = tier.generation(a[0]), tier.generation(a[1])
  assert None not in (g0, g1) and g0 != g1
  tier.put(a[:1], _blocks(1, 1))  # held: reused, the same copy
  tier.touch(a[:1])
  assert tier.generation(a[0]) == g0
  tier.put(a[2:], _blocks(1, 2))  # evicts a1, the least valuable
  assert tier.generation(a[1]) is None
  tier.put(a[1:2], _blocks(1, 3))  # a1 again: a new copy
  assert tier.generation(a[1]) not in (None, g0, g1)
  tier.discard(a)
  assert all(tier.generation(i) is None for i in a)


def test_discard_frees_slots_for_new_blocks():
  tier = HotTier(2, SHAPE, np.float32)
  tier.put(_ids("a", 2), _blocks(2, 8))
  assert tier.discard([b"a1", b"zz"]) == 1
  tier.put([b"n"], _blocks(1, 9))
  assert tier.stats.evictions == 0 and tier.contains([b"a0", b"n"]) == [True,
                                                                         True]


def test_sizes_and_bad_input():
  tier = HotTier.for_bytes(10 * np.prod(SHAPE) * 4 + 5, SHAPE, np.float32)
  assert tier.capacity == 10 and tier.nbytes == 10 * np.prod(SHAPE) * 4
  with pytest.raises(ValueError, match="holds no block"):
    HotTier.for_bytes(10, SHAPE, np.float32)
  with pytest.raises(ValueError, match="at least one block"):
    HotTier(0, SHAPE, np.float32)
  with pytest.raises(ValueError, match="protected_fraction"):
    HotTier(2, SHAPE, np.float32, protected_fraction=1.0)
  with pytest.raises(ValueError, match="do not match"):
    tier.put([b"a"], _blocks(2, 0))
  with pytest.raises(ValueError, match="the tier holds float32"):
    tier.put([b"a"], _blocks(1, 0).astype(np.float16))
  with pytest.raises(ValueError, match="one block id twice"):
    tier.put([b"a", b"a"], _blocks(2, 0))
  with pytest.raises(ValueError, match="cannot take"):
    tier.read_run([b"a"], np.empty((1, 2), np.float32))


# ------------------------------------------------------------------ engine
BS = 4


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _engine(tiny, *, num_blocks, hot_blocks=0, root=None, memory="pageable"):
  c = tiny.config
  block_bytes = c.num_layers * 2 * c.num_kv_heads * BS * c.head_dim * 4
  return make_engine(
      tiny, CacheConfig(block_size=BS, num_blocks=num_blocks),
      EngineConfig(max_batch_size=2, max_prefill_chunk=16, max_context=128),
      cold_tier=(None if root is None else
                 ColdTierConfig(root=str(root), file_io_mode="default")),
      hot_tier_bytes=hot_blocks * block_bytes, hot_tier_memory=memory)


def _run(engine, req):
  engine.submit(req)
  outs = []
  while engine.has_work():
    outs += engine.step()
  (out,) = outs
  return out


def _prompt(seed, n):
  return np.random.default_rng(seed).integers(3, 256, size=n).tolist()


def _session_then_flood(engine, flood=3):
  """Turn 1 of a session, other prompts that evict it from the small pool,
  then turn 2: returns (turn 2's output, turn 2's prompt)."""
  first = _prompt(1, 41)
  a = _run(engine, TurnRequest("a", first, 4, stop_on_eos=False, tenant="t"))
  for k in range(flood):  # 12 blocks each through a 16-block pool
    _run(engine, TurnRequest(f"x{k}", _prompt(10 + k, 45), 2,
                             stop_on_eos=False, tenant="t"))
  if engine.cold_tier is not None:  # the cold tier writes in the background
    engine.cold_tier.flush()
  nxt = first + a.generated_tokens + _prompt(2, 7)
  return _run(engine, TurnRequest("b", nxt, 5, stop_on_eos=False,
                                  tenant="t")), nxt


@pytest.mark.parametrize("memory", ["pageable", "pinned_host"])
def test_engine_loads_an_evicted_prefix_from_the_hot_tier_exactly(tiny, memory):
  plain = _engine(tiny, num_blocks=16)
  want, prompt = _session_then_flood(plain)
  assert want.cached_prompt_tokens == 0  # the pool forgot it

  hot = _engine(tiny, num_blocks=16, hot_blocks=64, memory=memory)
  assert hot.cold_tier.hot.memory == memory
  got, _ = _session_then_flood(hot)
  stats = hot.cold_tier.stats
  assert got.generated_tokens == want.generated_tokens  # loaded == recomputed
  stored = (41 + 4 - 1) // BS * BS
  assert got.cached_prompt_tokens == stored
  assert stats.hot_loaded_tokens == stored and stats.loaded_tokens == 0
  report = hot.cold_tier.report()
  assert report["store"] is None and report["hot_tier"]["hits"] > 0
  hot.close()

  fresh = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=128),
                      EngineConfig(max_batch_size=2, max_prefill_chunk=16,
                                   max_context=128))
  alone = _run(fresh, TurnRequest("c", prompt, 5, stop_on_eos=False))
  assert alone.generated_tokens == want.generated_tokens


@pytest.mark.parametrize("memory", ["pageable", "pinned_host"])
def test_hot_tier_in_front_of_the_cold_tier(tiny, tmp_path, memory):
  engine = _engine(tiny, num_blocks=16, hot_blocks=20, root=tmp_path,
                   memory=memory)
  got, _ = _session_then_flood(engine, flood=1)
  stats = engine.cold_tier.stats
  # The pool kept the session's shallowest blocks, the hot tier (20 blocks
  # after 22 were put) the next ones, the cold tier has all: each serves the
  # part of the run the tier before it lacks.
  pool_hit = engine.manager.stats["hit_tokens"] // BS
  assert pool_hit > 0 and stats.hot_loaded_blocks > 0 and stats.loaded_blocks > 0
  assert pool_hit + stats.hot_loaded_blocks + stats.loaded_blocks == (
      41 + 4 - 1) // BS
  assert got.cached_prompt_tokens == (41 + 4 - 1) // BS * BS
  engine.close()
  plain = _engine(tiny, num_blocks=16)
  want, _ = _session_then_flood(plain, flood=1)
  assert got.generated_tokens == want.generated_tokens


def test_tenants_do_not_share_hot_blocks(tiny):
  engine = _engine(tiny, num_blocks=16, hot_blocks=64)
  prompt = _prompt(3, 30)
  _run(engine, TurnRequest("a", prompt, 2, tenant="t1"))
  for k in range(2):
    _run(engine, TurnRequest(f"x{k}", _prompt(20 + k, 45), 2, tenant="t1"))
  out = _run(engine, TurnRequest("b", prompt + [5, 6], 2, tenant="t2"))
  assert out.cached_prompt_tokens == 0
  assert engine.cold_tier.stats.hot_loaded_blocks == 0


def test_extending_a_chain_never_cuts_a_hole_in_it():
  """The next turn's write-back (the chain's 8 held blocks plus 4 new
  deeper ones) evicted two of its own shallow blocks and kept deeper ones
  that were then useless: the reuse demoted the chain's deepest held blocks
  to the front of probation, and the put evicted them."""
  tier = HotTier(10, SHAPE, np.float32, protected_fraction=0.5)
  chain = _ids("h", 12)
  assert tier.put(chain[:8], _blocks(8, 1)) == 8
  assert tier.put(chain, _blocks(12, 2)) == 2  # room for 2 more
  assert tier.stats.dropped == 2
  assert tier.leading_run(chain) == 10  # no hole
  # The chain's deepest blocks are the next to go, not its shallow ones.
  tier.put([b"other"], _blocks(1, 3))
  assert tier.leading_run(chain) == 9


def test_a_put_never_evicts_its_own_new_blocks():
  tier = HotTier(4, SHAPE, np.float32, protected_fraction=0.5)
  tier.put(_ids("a", 2), _blocks(2, 4))
  tier.touch(_ids("a", 2))
  got = tier.put(_ids("b", 4), _blocks(4, 5))
  assert got == tier.stats.puts - 2  # what it says it stored is held
  assert tier.contains(_ids("b", 4)) == [True] * got + [False] * (4 - got)


def test_cached_tokens_by_tier_count_each_turn_once(tiny):
  """A turn that waits while a long one runs was loaded and counted at
  every admission attempt (and its loaded blocks again as pool hits at the
  next); the engine's per-tier counts now add up to the turns' own."""
  engine = _engine(tiny, num_blocks=16, hot_blocks=64)
  outs = []
  first = _prompt(1, 41)
  outs.append(_run(engine, TurnRequest("s1", first, 4, stop_on_eos=False,
                                       tenant="t")))
  for k in range(3):
    outs.append(_run(engine, TurnRequest(f"x{k}", _prompt(10 + k, 45), 2,
                                         stop_on_eos=False, tenant="t")))
  engine.submit(TurnRequest("long", _prompt(50, 20), 30, stop_on_eos=False,
                            tenant="u"))
  engine.step()
  nxt = first + outs[0].generated_tokens + _prompt(2, 7)
  engine.submit(TurnRequest("s2", nxt, 4, stop_on_eos=False, tenant="t"))
  while engine.has_work():
    outs += engine.step()
  by_tier = engine.stats.cached_tokens_by_tier
  assert sum(by_tier.values()) == sum(o.cached_prompt_tokens for o in outs)
  assert by_tier["hot"] > 0 and by_tier["cold"] == 0


def test_a_store_that_refuses_a_write_back_is_a_skipped_write(tiny, tmp_path):
  engine = _engine(tiny, num_blocks=64, root=tmp_path)
  store = engine.cold_tier.store

  def refuse(*_args, **_kwargs):
    raise RuntimeError("cannot schedule new futures after shutdown")
  store.put_async = refuse
  out = _run(engine, TurnRequest("b", _prompt(4, 30), 3, stop_on_eos=False))
  assert len(out.generated_tokens) == 3
  assert engine.cold_tier.stats.store_errors == 1
  assert engine.manager.pool.num_referenced == 0
  assert not engine.manager.active_sequences
  del store.put_async
  engine.close()
