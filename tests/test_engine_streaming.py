"""Engine hooks the server relies on: `on_token`, `abort`, per-request sampling.

Reference outputs come from a second engine running the same requests with
plain greedy settings (itself checked against full recomputation in
test_engine.py), so the hooks must not change a single token.
"""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.cache.block_pool import BlockPool
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.engine import Engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import ModelRunner, load_model

BS = 4
NUM_BLOCKS = 128


@pytest.fixture(scope="module")
def tiny():
  """The tiny model and one runner, so every engine reuses its compilations."""
  loaded = load_model("random:tiny-test")
  runner = ModelRunner(loaded.model, CacheConfig(block_size=BS,
                                                 num_blocks=NUM_BLOCKS))
  return loaded, runner


def _engine(tiny, **kw):
  loaded, runner = tiny
  cfg = dict(max_batch_size=4, max_prefill_chunk=16, max_context=128)
  cfg.update(kw)
  cfg = EngineConfig(**cfg)
  manager = KVCacheManager(BlockPool(NUM_BLOCKS), BS, "tiny-test",
                           max_blocks_per_seq=cfg.max_context // BS)
  return Engine(runner, manager, cfg, eos_ids=loaded.config.eos_token_ids,
                block_size=BS)


def _drain(engine):
  outs = {}
  while engine.has_work():
    for o in engine.step():
      outs[o.request.request_id] = o
  return outs


def _prompts(rng, n, lo=5, hi=30):
  return [rng.integers(3, 256, size=int(rng.integers(lo, hi))).tolist()
          for _ in range(n)]


def _pool_is_idle(engine):
  pool = engine.manager.pool
  return (pool.num_referenced == 0 and not engine.manager.active_sequences
          and not engine.has_work())


@pytest.mark.parametrize("num_requests,max_new", [(1, 5), (5, 9)])
def test_on_token_sees_every_token_in_order(tiny, np_rng, num_requests,
                                            max_new):
  engine = _engine(tiny)
  seen: dict[str, list[int]] = {}
  for i, p in enumerate(_prompts(np_rng, num_requests)):
    seen[f"r{i}"] = []
    engine.submit(TurnRequest(f"r{i}", p, max_new, stop_on_eos=False,
                              on_token=seen[f"r{i}"].append))
  outs = _drain(engine)
  assert set(outs) == set(seen)
  for rid, out in outs.items():
    assert seen[rid] == out.generated_tokens
    assert len(seen[rid]) == max_new


def test_on_token_true_stops_after_that_token(tiny, np_rng):
  prompt = _prompts(np_rng, 1)[0]
  ref = _drain(_engine_with(tiny, [TurnRequest("a", prompt, 10,
                                               stop_on_eos=False)]))["a"]
  engine = _engine(tiny)
  stop_at = 4  # stop once the 4th token arrives
  count = []

  def hook(tok):
    count.append(tok)
    return len(count) == stop_at

  engine.submit(TurnRequest("a", prompt, 10, stop_on_eos=False, on_token=hook))
  out = _drain(engine)["a"]
  assert out.finish_reason == "stop"
  assert out.generated_tokens == ref.generated_tokens[:stop_at]
  assert _pool_is_idle(engine)


def _engine_with(tiny, reqs, **kw):
  engine = _engine(tiny, **kw)
  for r in reqs:
    engine.submit(r)
  return engine


@pytest.mark.parametrize("steps_before_abort", [0, 1, 6])
def test_abort_frees_blocks_and_leaves_others_unchanged(tiny, np_rng,
                                                        steps_before_abort):
  prompts = _prompts(np_rng, 3, 20, 40)
  reqs = lambda: [TurnRequest(f"r{i}", p, 8, stop_on_eos=False)  # noqa: E731
                  for i, p in enumerate(prompts)]
  ref = _drain(_engine_with(tiny, reqs()))
  engine = _engine_with(tiny, reqs())
  outs = {}
  for _ in range(steps_before_abort):
    for o in engine.step():
      outs[o.request.request_id] = o
  held_before = engine.manager.pool.num_referenced
  assert engine.abort("r1")
  assert not engine.abort("r1")  # already gone
  assert engine.manager.pool.num_referenced <= held_before
  assert "r1" not in engine.manager
  outs |= _drain(engine)
  assert "r1" not in outs
  for rid in ("r0", "r2"):
    assert outs[rid].generated_tokens == ref[rid].generated_tokens
  assert _pool_is_idle(engine)


def test_abort_of_a_waiting_request_and_of_an_unknown_id(tiny, np_rng):
  engine = _engine(tiny, max_batch_size=1)
  a, b = _prompts(np_rng, 2)
  engine.submit(TurnRequest("a", a, 3, stop_on_eos=False))
  engine.submit(TurnRequest("b", b, 3, stop_on_eos=False))
  engine.step()  # admits only "a" (batch of one)
  assert engine.num_waiting == 1
  assert engine.abort("b")
  assert engine.num_waiting == 0
  assert not engine.abort("nope")
  assert set(_drain(engine)) == {"a"}
  assert _pool_is_idle(engine)


def test_per_request_temperature_zero_is_greedy_on_a_sampling_engine(
    tiny, np_rng):
  prompts = _prompts(np_rng, 3)
  greedy = _drain(_engine_with(
      tiny, [TurnRequest(f"r{i}", p, 6, stop_on_eos=False)
             for i, p in enumerate(prompts)]))
  engine = _engine_with(
      tiny, [TurnRequest(f"r{i}", p, 6, stop_on_eos=False, temperature=0.0)
             for i, p in enumerate(prompts)],
      greedy=False, temperature=1.0)
  outs = _drain(engine)
  assert set(outs) == set(greedy) == {"r0", "r1", "r2"}
  for rid, out in outs.items():
    assert len(out.generated_tokens) == 6
    assert out.generated_tokens == greedy[rid].generated_tokens


def test_per_request_seed_reproduces_across_batches(tiny, np_rng):
  prompt, other = _prompts(np_rng, 2)
  run = lambda extra, seed: _drain(_engine_with(  # noqa: E731
      tiny, [TurnRequest("x", prompt, 12, stop_on_eos=False, temperature=1.5,
                         seed=seed)] + extra))["x"].generated_tokens
  alone = run([], 7)
  batched = run([TurnRequest("y", other, 12, stop_on_eos=False,
                             temperature=1.0)], 7)
  assert alone == batched
  assert run([], 8) != alone  # 12 tokens from 256 at T=1.5: never equal


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0),
                                         ("top_p", 1.5)])
def test_validate_rejects_bad_sampling(tiny, field, value):
  engine = _engine(tiny)
  req = TurnRequest("r", [5, 6, 7], 3, **{field: value})
  with pytest.raises(ValueError, match=field):
    engine.validate(req)
  with pytest.raises(ValueError, match=field):
    engine.submit(req)
  assert not engine.has_work()
  np.testing.assert_equal(engine.num_waiting, 0)
