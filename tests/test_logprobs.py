"""Log-probabilities of generated tokens (`TurnRequest.logprobs`).

Checked against an independent computation: `jax.nn.log_softmax` of the
logits a full recompute of the whole context gives at every step (no
cache, no batching), on one engine and on the P/D cluster, greedy and
sampled, across page boundaries and a preemption.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TokenLogprob, TurnRequest
from dualpath_jax.engine.sampling import token_logprobs
from dualpath_jax.model import load_model
from dualpath_jax.transfer import DualPathConfig, MeshConfig
from storage.config import ColdTierConfig
from tests.test_cluster import _run  # every request to its end, by id
from tests.test_engine import (BS, REF_LEN, ref_runner,  # noqa: F401
                               reference_logits)

TOL = 2e-4  # batched paged steps against a full recompute, float32


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _reference_logprobs(runner, context: list[int]) -> np.ndarray:
  """log_softmax of the next-token logits after `context`, recomputed from
  scratch: [vocab] float32."""
  return np.asarray(jax.nn.log_softmax(reference_logits(runner, context)))


def _check_against_reference(runner, req, out):
  assert len(out.logprobs) == len(out.generated_tokens)
  context = list(req.prompt_tokens)
  for entry, token in zip(out.logprobs, out.generated_tokens):
    want = _reference_logprobs(runner, context)
    assert entry.token == token
    assert abs(entry.logprob - want[token]) < TOL
    assert len(entry.top) == req.logprobs
    order = np.argsort(-want, kind="stable")[:req.logprobs]
    got_ids = [t for t, _ in entry.top]
    # The same tokens, most likely first (a near-tie may swap within TOL).
    np.testing.assert_allclose([lp for _, lp in entry.top], want[order],
                               atol=TOL)
    assert sorted(got_ids) == sorted(order.tolist()) or np.allclose(
        want[got_ids], want[order], atol=TOL)
    context.append(token)


def _requests(data_seed, n, **kw):
  rng = np.random.default_rng(data_seed)
  return [TurnRequest(f"r{i}", rng.integers(3, 256, int(rng.integers(3, 30)))
                      .tolist(), max_new_tokens=int(rng.integers(2, 9)),
                      stop_on_eos=False, **kw) for i in range(n)]


def test_token_logprobs_equal_jaxs_log_softmax():
  rng = np.random.default_rng()
  for vocab in (5, 1000):
    logits = (rng.standard_normal(vocab) * 8).astype(np.float32)
    logits[rng.integers(vocab)] = logits.max()  # a tie at the top
    want = np.asarray(jax.nn.log_softmax(logits))  # float32: to 1e-5
    token = int(rng.integers(vocab))
    logprob, top = token_logprobs(logits, token, 4)
    assert abs(logprob - want[token]) < 1e-5
    ids = [t for t, _ in top]
    np.testing.assert_allclose([lp for _, lp in top], want[ids], atol=1e-5)
    assert ids == sorted(range(vocab), key=lambda i: (-logits[i], i))[:4]
    assert token_logprobs(logits, token, 0)[1] == ()


@pytest.mark.parametrize("sampled", [False, True])
def test_engine_logprobs_equal_a_full_recompute(tiny, ref_runner, sampled):
  kw = dict(temperature=0.8, top_p=0.9, seed=3) if sampled else {}
  reqs = _requests(1, 6, logprobs=3, **kw)  # more than a batch of 4
  engine = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=256),
                       EngineConfig(max_batch_size=4, max_prefill_chunk=16,
                                    max_context=REF_LEN))
  outs = _run(engine, [TurnRequest(**r.__dict__) for r in reqs])
  for req in reqs:
    out = outs[req.request_id]
    _check_against_reference(ref_runner, req, out)
    if not sampled:  # greedy: the most likely token
      assert all(e.top[0][0] == e.token for e in out.logprobs)


def test_logprobs_survive_a_preemption(tiny, ref_runner):
  # A pool too small for all four at once: some are preempted and resumed.
  reqs = _requests(2, 4, logprobs=1)
  engine = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=14),
                       EngineConfig(max_batch_size=4, max_prefill_chunk=16,
                                    max_context=REF_LEN))
  outs = _run(engine, [TurnRequest(**r.__dict__) for r in reqs])
  assert engine.stats.preemptions > 0
  for req in reqs:
    _check_against_reference(ref_runner, req, outs[req.request_id])


def test_no_logprobs_unless_asked_and_bad_values_refused(tiny):
  engine = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=64),
                       EngineConfig(max_batch_size=2, max_prefill_chunk=16,
                                    max_context=REF_LEN))
  (req,) = _requests(3, 1)
  assert _run(engine, [req])[req.request_id].logprobs is None
  for bad in (-1, 21, 1.5, True, "3"):
    with pytest.raises(ValueError, match="logprobs must be None or an integer"):
      engine.submit(TurnRequest("bad", [5, 6], 2, logprobs=bad))
  out = _run(engine, [TurnRequest("zero", [5, 6, 7], 3, stop_on_eos=False,
                                  logprobs=0)])["zero"]
  assert [type(e) for e in out.logprobs] == [TokenLogprob] * 3
  assert all(e.top == () for e in out.logprobs)


def test_cluster_logprobs_equal_a_full_recompute(tiny, ref_runner, tmp_path):
  reqs = _requests(4, 5, logprobs=2, tenant="t")
  cluster = make_cluster(
      tiny, CacheConfig(block_size=BS, num_blocks=96),
      EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=REF_LEN),
      ColdTierConfig(root=str(tmp_path / "kv"), file_io_mode="default"),
      MeshConfig.parse("1P2D"), DualPathConfig())
  try:
    outs = _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
  finally:
    cluster.close()
  for req in reqs:
    _check_against_reference(ref_runner, req, outs[req.request_id])


def test_a_raising_on_logprob_fails_its_turn_only(tiny):
  seen = []

  def broken(entry):
    raise RuntimeError("client gone")

  engine = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=64),
                       EngineConfig(max_batch_size=2, max_prefill_chunk=16,
                                    max_context=REF_LEN))
  outs = _run(engine, [
      TurnRequest("bad", [5, 6, 7], 4, stop_on_eos=False, logprobs=0,
                  on_logprob=broken),
      TurnRequest("good", [8, 9, 10], 4, stop_on_eos=False, logprobs=1,
                  on_logprob=seen.append)])
  assert outs["bad"].finish_reason == "error"
  assert isinstance(outs["bad"].error, RuntimeError)
  assert outs["good"].finish_reason == "length"
  assert seen == outs["good"].logprobs  # each entry once, as it came


def test_completion_top_logprobs_hold_the_sampled_token_too(
    smollm2_tokenizer):
  """As OpenAI's: up to `logprobs + 1` entries, the sampled token's
  included when sampling picked one outside the most likely."""
  from dualpath_jax.server.logprobs import completion_logprobs
  tok = smollm2_tokenizer
  rng = np.random.default_rng()
  a, b, c, d = (int(i) for i in rng.choice(np.arange(1000, 5000), 4,
                                           replace=False))
  outside = TokenLogprob(c, -5.0, ((a, -0.1), (b, -1.0)))
  inside = TokenLogprob(a, -0.1, ((a, -0.1), (d, -2.0)))
  bare = TokenLogprob(b, -1.0, ())
  text = lambda t: tok.token_bytes(t).decode("utf-8", "replace")  # noqa: E731
  tops = completion_logprobs([outside, inside, bare], tok)["top_logprobs"]
  assert tops[0] == {text(a): -0.1, text(b): -1.0, text(c): -5.0}
  assert tops[1] == {text(a): -0.1, text(d): -2.0}
  assert tops[2] == {}  # logprobs=0: the token's own logprob only
