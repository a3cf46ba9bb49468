"""The multi-turn engine on a tiny random model.

Every engine output is checked against greedy generation by full
recomputation (each step re-runs the whole context into fresh pages, no
prefix reuse, no batching), so continuous batching, chunked prefill, prefix
hits and preemption must not change a single token.
"""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.cache.kv_cache_manager import RequestTooLargeError
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from dualpath_jax.model.runner import ModelRunner

BS = 4  # small blocks: many page boundaries


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _engine(tiny, num_blocks=256, **kw):
  cfg = dict(max_batch_size=4, max_prefill_chunk=16, max_context=256)
  cfg.update(kw)
  return make_engine(tiny, CacheConfig(block_size=BS, num_blocks=num_blocks),
                     EngineConfig(**cfg))


REF_LEN = 64  # one padded shape for every reference call: one compile


def reference_logits(runner, context) -> np.ndarray:  # [vocab] float32
  """The next-token logits after `context`, recomputed from scratch (a
  fresh cache, the whole context in one call): no reuse, no batching."""
  L = len(context)
  assert L <= REF_LEN
  padded = np.zeros((1, REF_LEN), np.int32)
  padded[0, :L] = context
  slots = np.full((1, REF_LEN), -1, np.int32)
  slots[0, :L] = np.arange(L)
  logits, _ = runner.step(
      runner.new_kv_cache(), padded,
      np.arange(REF_LEN // BS, dtype=np.int32)[None],
      np.array([L], np.int32), np.array([L], np.int32), slots)
  return np.asarray(logits)[0]


def _reference_greedy(runner, prompt, n):
  """Greedy tokens by recomputing the whole context every step."""
  toks = list(prompt)
  for _ in range(n):
    toks.append(int(np.argmax(reference_logits(runner, toks))))
  return toks[len(prompt):]


@pytest.fixture(scope="module")
def ref_runner(tiny):
  return ModelRunner(tiny.model, CacheConfig(block_size=BS, num_blocks=REF_LEN // BS))


def _run_all(engine, reqs):
  for r in reqs:
    engine.submit(r)
  outs = {}
  while engine.has_work():
    for o in engine.step():
      outs[o.request.request_id] = o
  return outs


def _prompts(seed, n, lo=3, hi=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 256, size=int(rng.integers(lo, hi))).tolist()
          for _ in range(n)]


def test_batched_outputs_equal_full_recompute(tiny, ref_runner):
  engine = _engine(tiny)
  prompts = _prompts(1, 6)  # more sequences than max_batch_size=4
  reqs = [TurnRequest(f"r{i}", p, max_new_tokens=7, stop_on_eos=False)
          for i, p in enumerate(prompts)]
  outs = _run_all(engine, reqs)
  for i, p in enumerate(prompts):
    assert outs[f"r{i}"].generated_tokens == _reference_greedy(ref_runner, p, 7)
    assert outs[f"r{i}"].finish_reason == "length"
  assert engine.stats.decode_steps < 6 * 7  # decodes were batched
  assert engine.manager.pool.num_free == engine.manager.pool.num_blocks


def test_second_turn_hits_first_turns_blocks(tiny, ref_runner):
  engine = _engine(tiny)
  p1 = _prompts(2, 1, 30, 31)[0]
  (o1,) = _run_all(engine, [TurnRequest("t0", p1, 6, stop_on_eos=False,
                                        session_id="s")]).values()
  assert o1.cached_prompt_tokens == 0
  p2 = p1 + o1.generated_tokens + [5, 6, 7, 8, 9]
  (o2,) = _run_all(engine, [TurnRequest("t1", p2, 5, stop_on_eos=False,
                                        session_id="s")]).values()
  # Turn 1 computed KV for its prompt and all but its last generated token.
  computed = len(p1) + len(o1.generated_tokens) - 1
  assert o2.cached_prompt_tokens == (computed // BS) * BS
  assert o2.generated_tokens == _reference_greedy(ref_runner, p2, 5)


@pytest.mark.parametrize("attention_impl", ["xla", "xla_chunked"])
def test_non_finite_pages_of_other_sequences_never_reach_a_turn(
    tiny, ref_runner, attention_impl):
  """Keys and values that are not finite (a sequence whose activations
  overflowed) stay with their sequence. The pool starts as NaN junk (pages
  freed by such sequences), and a running turn holding page 0 has NaN in
  every page; other turns, batched beside it, still give full recompute's
  tokens. Without `write_kv` zeroing the pages it starts, the junk past a
  turn's last token reached it; with tables padded by page 0, the running
  turn's pages did (both implementations read entries past the context).
  tests/test_cluster.py covers pages allocated ahead, on the decode side."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  engine = _engine(tiny, attention_impl=attention_impl)
  engine._kv = jnp.full_like(engine._kv, jnp.nan)  # pylint: disable=protected-access
  engine.submit(TurnRequest("hog", _prompts(6, 1, 9, 10)[0], 60,
                            stop_on_eos=False))
  engine.step()
  hog_pages = engine.manager.block_table("hog")
  assert 0 in hog_pages
  engine._kv = engine._kv.at[:, np.asarray(hog_pages)].set(jnp.nan)  # pylint: disable=protected-access
  prompts = _prompts(7, 3, 5, 30)
  for i, p in enumerate(prompts):
    engine.submit(TurnRequest(f"v{i}", p, 6, stop_on_eos=False))
  outs = {}
  while len(outs) < len(prompts):
    outs |= {o.request.request_id: o for o in engine.step()}
  assert "hog" not in outs and engine.abort("hog")
  for i, p in enumerate(prompts):
    assert outs[f"v{i}"].generated_tokens == _reference_greedy(ref_runner, p, 6)


def test_packed_tables_repeat_the_last_context_page():
  """`pack_step`: a row's table names the pages its context fills, then
  repeats the last of them: never page 0, nor pages allocated ahead of the
  tokens (the P/D cluster's decode side allocates a turn's pages up front).
  Padding rows have no context and write nowhere."""
  from dualpath_jax.cache.block_pool import BlockPool  # pylint: disable=g-import-not-at-top
  from dualpath_jax.cache.kv_cache_manager import KVCacheManager  # pylint: disable=g-import-not-at-top
  from dualpath_jax.engine import step_parts  # pylint: disable=g-import-not-at-top
  manager = KVCacheManager(BlockPool(64), BS, "m", max_blocks_per_seq=16)
  manager.begin("other", [7] * 5)
  manager.allocate("other", 5)  # pages 0 and 1
  manager.begin("s", list(range(3, 13)))
  manager.allocate("s", 10 + 20)  # 10 tokens now, 20 more allocated ahead
  table = manager.block_table("s")
  assert len(table) == 8 and 0 not in table
  tokens, tables, kv_lens, q_lens, slots = step_parts.pack_step(
      manager, 3, 16, 12, [("s", list(range(3, 10)), 0), ("s", [10], 9)])
  assert tables[0].tolist() == table[:2] + [table[1]] * 10  # 7 tokens
  assert tables[1].tolist() == table[:3] + [table[2]] * 9  # 10 tokens
  assert kv_lens.tolist() == [7, 10, 0] and q_lens.tolist() == [7, 1, 0]
  assert (slots[2] == -1).all() and (slots[1, 1:] == -1).all()
  assert slots[1, 0] == table[2] * BS + 1 and tokens[1, 0] == 10


def test_tenants_share_only_their_own_prefixes(tiny):
  engine = _engine(tiny)
  system = _prompts(3, 1, 24, 25)[0]
  a = TurnRequest("a", system + [11, 12, 13], 2, tenant="x")
  _run_all(engine, [a])
  same = TurnRequest("b", system + [21, 22], 2, tenant="x")
  other = TurnRequest("c", system + [21, 22], 2, tenant="y")
  outs = _run_all(engine, [same])
  outs |= _run_all(engine, [other])
  assert outs["b"].cached_prompt_tokens == (len(system) // BS) * BS
  assert outs["c"].cached_prompt_tokens == 0


def test_preemption_under_a_small_pool_keeps_outputs(tiny, ref_runner):
  # 4 sequences of ~20 prompt + 12 new tokens need ~32 blocks; give 14.
  engine = _engine(tiny, num_blocks=14, max_context=64)
  prompts = _prompts(4, 4, 18, 22)
  reqs = [TurnRequest(f"p{i}", p, 12, stop_on_eos=False)
          for i, p in enumerate(prompts)]
  outs = _run_all(engine, reqs)
  assert engine.stats.preemptions > 0
  for i, p in enumerate(prompts):
    assert outs[f"p{i}"].generated_tokens == _reference_greedy(ref_runner, p, 12)


def test_eos_stops_a_turn(tiny, ref_runner):
  engine = _engine(tiny)
  p = _prompts(5, 1)[0]
  want = _reference_greedy(ref_runner, p, 6)
  engine.eos_ids = frozenset({want[2]})  # make the third token an "EOS"
  (o,) = _run_all(engine, [TurnRequest("e", p, 6)]).values()
  cut = want.index(want[2]) + 1
  assert o.generated_tokens == want[:cut] and o.finish_reason == "eos"


@pytest.mark.parametrize("kw,msg", [
    # Past the vocabulary (256): embedded as NaN, whose K/V stayed in the
    # pool and turned every later request's output to token 0.
    (dict(prompt_tokens=[5, 6, 256 + 10]), "token id 266 is outside"),
    (dict(prompt_tokens=[5, -1, 7]), "token id -1 is outside"),
    # These used to pass submit and then fail every step at the queue's head.
    (dict(prompt_tokens="hello"), "not text"),
    (dict(prompt_tokens=[5.0, 6.0]), "integer token ids"),
    (dict(tenant=None), "tenant must be a str"),
    # block ids hash the tenant as UTF-8: this one failed the whole step
    (dict(tenant="\ud800"), "tenant is not valid Unicode"),
    (dict(session_id="s\udfff"), "session_id is not valid Unicode"),
    (dict(request_id=["x"]), "request_id must be a str"),
    # NaN / inf temperature leaked the turn's blocks when sampling raised.
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a number >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(seed=-3), "seed must be an integer >= 0"),
])
def test_bad_requests_are_refused_at_submit_and_others_still_run(
    tiny, ref_runner, kw, msg):
  engine = _engine(tiny, num_blocks=64)
  free = engine.manager.pool.num_free
  req = dict(request_id="bad", prompt_tokens=[5, 6, 7], max_new_tokens=3)
  req.update(kw)
  with pytest.raises(ValueError, match=msg):
    engine.submit(TurnRequest(**req))
  assert not engine.has_work()
  good = [9, 10, 11, 12, 13]
  outs = _run_all(engine, [TurnRequest("good", good, 4, stop_on_eos=False)])
  assert outs["good"].generated_tokens == _reference_greedy(ref_runner, good, 4)
  assert engine.manager.pool.num_free == free


def test_a_second_turn_of_a_queued_id_is_refused(tiny):
  engine = _engine(tiny)
  engine.submit(TurnRequest("r", [5, 6, 7], 3))
  with pytest.raises(ValueError, match="queued or running already"):
    engine.submit(TurnRequest("r", [9, 9, 9], 3))
  outs = _run_all(engine, [])
  assert list(outs) == ["r"] and len(outs["r"].generated_tokens) <= 3
  engine.submit(TurnRequest("r", [9, 9, 9], 3))  # finished: the id is free
  assert engine.has_work()


def test_requests_that_cannot_fit_fail_clearly(tiny):
  engine = _engine(tiny, max_context=64)
  with pytest.raises(RequestTooLargeError, match="max_context"):
    engine.submit(TurnRequest("big", list(range(3, 63)), 8))
  small_pool = _engine(tiny, num_blocks=4, max_context=64)
  with pytest.raises(RequestTooLargeError, match="pool"):
    small_pool.submit(TurnRequest("big", list(range(3, 30)), 8))
  with pytest.raises(ValueError):
    engine.submit(TurnRequest("empty", [], 8))


@pytest.mark.parametrize("prompt_len", [38, 36])
def test_samples_of_one_prompt_prefill_it_once(tiny, ref_runner, prompt_len):
  """Turns admitted together with one prompt (n samples): the first
  computes it, the others pick up its full blocks before their first
  chunk and compute only the last, partial block. A prompt of whole blocks
  (36 = 9 x 4): the last block is computed again, its last token's logits
  are the first sample's."""
  engine = _engine(tiny)
  prompt = _prompts(21, 1, prompt_len, prompt_len + 1)[0]
  outs = _run_all(engine, [TurnRequest(f"s{i}", prompt, 5, stop_on_eos=False)
                           for i in range(3)])
  expected = _reference_greedy(ref_runner, prompt, 5)
  assert [outs[f"s{i}"].generated_tokens for i in range(3)] == [expected] * 3
  shared = (len(prompt) - 1) // BS * BS
  assert [outs[f"s{i}"].cached_prompt_tokens for i in range(3)] == [
      0, shared, shared]
  assert engine.stats.prefill_tokens == len(prompt) + 2 * (len(prompt) - shared)
  assert engine.stats.shared_prefill_tokens == 2 * shared
  assert engine.stats.cached_tokens_by_tier["device"] == 2 * shared
  assert engine.manager.pool.num_referenced == 0


def test_prefill_sharing_can_be_turned_off(tiny, ref_runner):
  engine = _engine(tiny, share_prefill=False)
  prompt = _prompts(22, 1, 30, 31)[0]
  outs = _run_all(engine, [TurnRequest(f"s{i}", prompt, 3, stop_on_eos=False)
                           for i in range(2)])
  assert [o.cached_prompt_tokens for o in outs.values()] == [0, 0]
  assert engine.stats.prefill_tokens == 2 * len(prompt)
  assert engine.stats.shared_prefill_tokens == 0
  expected = _reference_greedy(ref_runner, prompt, 3)
  assert [o.generated_tokens for o in outs.values()] == [expected] * 2
  with pytest.raises(ValueError, match="share_prefill"):
    EngineConfig(share_prefill=1)
