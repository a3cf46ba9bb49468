"""One turn's bad input or failing client callback fails that turn only.

Each case was a reproduced defect: the turn kept its pool blocks for good,
other turns of its batch got wrong tokens, or every later step raised. The
check is always the same: other turns' tokens equal the same prompt served
alone, and the pool is whole again afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.cache.block_pool import BlockPool
from dualpath_jax.cache.kv_cache_manager import (KVCacheManager,
                                                 RequestTooLargeError)
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.engine import Engine
from dualpath_jax.engine.factory import make_engine, model_fingerprint
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.engine.sampling import sample
from dualpath_jax.model import load_model
from dualpath_jax.model.runner import ModelRunner

BS = 4


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _engine(tiny, num_blocks=64, **kw):
  cfg = dict(max_batch_size=4, max_prefill_chunk=16, max_context=64)
  cfg.update(kw)
  return make_engine(tiny, CacheConfig(block_size=BS, num_blocks=num_blocks),
                     EngineConfig(**cfg))


def _drain(engine, max_steps=500):
  outs = {}
  for _ in range(max_steps):
    if not engine.has_work():
      return outs
    for out in engine.step():
      outs[out.request.request_id] = out
  raise AssertionError("the engine did not finish")


def _prompts(seed, n, lo=5, hi=20):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 256, size=int(rng.integers(lo, hi))).tolist()
          for _ in range(n)]


def _alone(tiny, prompt, n):
  e = _engine(tiny)
  e.submit(TurnRequest("solo", prompt, n, stop_on_eos=False))
  return _drain(e)["solo"].generated_tokens


def _pool_whole(engine):
  pool = engine.manager.pool
  return (pool.num_referenced == 0 and pool.num_free == pool.num_blocks
          and not engine.manager.active_sequences)


def test_a_tiny_temperature_samples_like_greedy_not_nan():
  logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
  rng = np.random.default_rng(1)
  np.testing.assert_array_equal(sample(logits, rng, temperature=1e-320),
                                np.argmax(logits, axis=-1))


def test_rows_that_are_not_finite_are_sampled_from_their_limit():
  """+inf tokens share the probability, NaN has none, and a row with none
  left gives greedy's token: NumPy's draw raised, failing the whole step."""
  rng = np.random.default_rng()
  logits = rng.normal(size=(4, 40)).astype(np.float32)
  logits[0, [3, 17]] = np.inf
  logits[1, :] = np.nan
  logits[2, ::2] = np.nan
  logits[3, :] = -np.inf
  draws = np.stack([sample(logits, rng, temperature=0.8, top_p=0.95)
                    for _ in range(200)])
  assert set(draws[:, 0]) == {3, 17}
  assert set(draws[:, 1]) == {0}  # greedy's: np.argmax's first NaN
  assert all(t % 2 == 1 for t in draws[:, 2])  # never a NaN token
  assert set(draws[:, 3]) == {0}


def test_tiny_temperature_turn_and_its_neighbour_finish(tiny):
  pa, pb = _prompts(1, 2)
  e = _engine(tiny)
  e.submit(TurnRequest("a", pa, 6, stop_on_eos=False, temperature=1e-320))
  e.submit(TurnRequest("b", pb, 6, stop_on_eos=False))
  outs = _drain(e)
  assert outs["a"].generated_tokens == _alone(tiny, pa, 6)  # greedy
  assert outs["b"].generated_tokens == _alone(tiny, pb, 6)
  assert _pool_whole(e)


def test_a_raising_hook_fails_its_turn_only(tiny):
  pa, pb = _prompts(3, 2)
  e = _engine(tiny)
  seen = []

  def flaky(token):
    seen.append(token)
    if len(seen) == 3:
      raise RuntimeError("client callback failed")
  e.submit(TurnRequest("a", pa, 8, stop_on_eos=False, on_token=flaky))
  e.submit(TurnRequest("b", pb, 8, stop_on_eos=False))
  outs = _drain(e)
  assert outs["a"].finish_reason == "error"
  assert isinstance(outs["a"].error, RuntimeError)
  assert len(outs["a"].generated_tokens) == 3
  assert outs["b"].finish_reason == "length" and outs["b"].error is None
  assert outs["b"].generated_tokens == _alone(tiny, pb, 8)
  assert _pool_whole(e)


def test_abort_from_inside_a_hook_sticks(tiny):
  pa, pb = _prompts(4, 2)
  e = _engine(tiny)
  calls = []

  def hook(token):
    calls.append(token)
    if len(calls) == 3:
      assert e.abort("a")
  e.submit(TurnRequest("a", pa, 8, stop_on_eos=False, on_token=hook))
  e.submit(TurnRequest("b", pb, 8, stop_on_eos=False))
  outs = _drain(e)
  assert "a" not in outs and len(calls) == 3
  assert outs["b"].generated_tokens == _alone(tiny, pb, 8)
  assert _pool_whole(e)


def test_abort_from_the_first_token_hook_frees_the_turn(tiny):
  (pa,) = _prompts(5, 1)
  e = _engine(tiny)
  e.submit(TurnRequest("a", pa, 8, stop_on_eos=False,
                       on_token=lambda t: e.abort("a") and None))
  assert _drain(e) == {} and _pool_whole(e)
  # The id is free again: a resubmission runs.
  e.submit(TurnRequest("a", pa, 2, stop_on_eos=False))
  assert len(_drain(e)["a"].generated_tokens) == 2


def test_an_older_turn_is_not_preempted_for_a_younger_one(tiny):
  e = _engine(tiny, num_blocks=16, max_prefill_chunk=8)
  old, new = _prompts(11, 2, 20, 21)
  e.submit(TurnRequest("old", old, 40, stop_on_eos=False, arrival_s=0.0))
  for _ in range(30):
    e.step()
  e.submit(TurnRequest("new", new, 4, stop_on_eos=False, arrival_s=1.0))
  finished = []
  while e.has_work():
    finished += [o.request.request_id for o in e.step()]
    assert "old" not in [s.rid for s in e._waiting]  # never sent back
  assert finished == ["old", "new"]
  assert _pool_whole(e)


def test_per_sequence_block_limit_is_refused_at_submit(tiny):
  cache = CacheConfig(block_size=BS, num_blocks=64)
  manager = KVCacheManager(BlockPool(64), BS, model_fingerprint(tiny),
                           max_blocks_per_seq=16)
  e = Engine(ModelRunner(tiny.model, cache), manager,
             EngineConfig(max_batch_size=2, max_prefill_chunk=16,
                          max_context=100),
             eos_ids=tiny.config.eos_token_ids, block_size=BS)
  (prompt,) = _prompts(1, 1, 60, 61)
  with pytest.raises(RequestTooLargeError, match="at most 16"):
    e.submit(TurnRequest("a", prompt, 6, stop_on_eos=False))
  assert not e.has_work()


@pytest.mark.parametrize("field,value,match", [
    ("temperature", "0.5", "temperature must be a number"),
    ("temperature", True, "temperature must be a number"),
    ("top_p", "0.9", "top_p must be a number"),
    ("top_p", True, "top_p must be a number"),
    ("arrival_s", "yesterday", "arrival_s must be a finite number"),
    ("arrival_s", float("nan"), "arrival_s must be a finite number"),
    ("stop_on_eos", "no", "stop_on_eos must be a bool"),
    ("on_token", "not a function", "on_token must be callable"),
    ("on_logprob", 3, "on_logprob must be callable"),
])
def test_bad_request_fields_are_value_errors(tiny, field, value, match):
  e = _engine(tiny)
  req = TurnRequest("r", [5, 6, 7], 2, **{field: value})
  with pytest.raises(ValueError, match=match):
    e.submit(req)
  assert not e.has_work()


def test_a_raising_eviction_callback_loses_no_block():
  def broken(block, identity):
    raise OSError("host tier write failed")
  pool = BlockPool(2, on_evict=broken)
  (a,) = pool.allocate(1)
  pool.register(a, b"id-a")
  pool.release([a])
  with pytest.raises(OSError):
    pool.allocate(2)  # one free, one evictable: the callback raises
  assert pool.num_free == 2 and pool.num_referenced == 0
  assert sorted(pool.allocate(2)) == [0, 1]  # both usable, none lost


def test_engine_loop_reports_a_hook_error_to_that_request_only(tiny):
  """Through the server's engine loop: the failing request's on_error gets
  what its hook raised; its neighbour's on_finish gets its tokens."""
  import threading

  from dualpath_jax.server.engine_loop import EngineLoop, LocalEngineHandle
  pa, pb = _prompts(6, 2)
  loop = EngineLoop(LocalEngineHandle(_engine(tiny)))
  loop.start()
  results, done = {}, threading.Event()

  def record(rid):
    def on_finish(out):
      results[rid] = ("finish", out.generated_tokens)
      if len(results) == 2:
        done.set()

    def on_error(err):
      results[rid] = ("error", err)
      if len(results) == 2:
        done.set()
    return on_finish, on_error

  def boom(token):
    raise KeyError("stream gone")
  try:
    loop.submit(TurnRequest("a", pa, 5, stop_on_eos=False, on_token=boom),
                *record("a"))
    loop.submit(TurnRequest("b", pb, 5, stop_on_eos=False), *record("b"))
    assert done.wait(120)
  finally:
    loop.stop()
  assert results["a"][0] == "error" and isinstance(results["a"][1], KeyError)
  assert results["b"] == ("finish", _alone(tiny, pb, 5))
  assert loop.error is None  # no step failed


def test_a_turn_aborted_by_another_turns_hook_gets_no_token(tiny):
  """Turn a's hook aborts turn b, later in the same decode batch: b's hook
  used to get that step's token after the abort had returned True."""
  pa, pb = _prompts(8, 2)
  e = _engine(tiny)
  seen_b = []
  at_abort = []

  def hook_a(token):
    if not at_abort and len(seen_b) >= 2:
      assert e.abort("b")
      at_abort.append(len(seen_b))
  e.submit(TurnRequest("a", pa, 8, stop_on_eos=False, on_token=hook_a))
  e.submit(TurnRequest("b", pb, 8, stop_on_eos=False,
                       on_token=seen_b.append))
  outs = _drain(e)
  assert at_abort and len(seen_b) == at_abort[0]  # nothing after the abort
  assert set(outs) == {"a"} and _pool_whole(e)
