"""`step_parts.sample_tokens`: an all-greedy batch without logprobs picks
its tokens on the logits' device (only the ids cross to the host); any
other batch samples on the host. Both give what the host sampler gives,
on fresh random logits, non-finite rows included."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.config import EngineConfig
from dualpath_jax.engine import step_parts
from dualpath_jax.engine.sampling import sample


def _turn(temperature=None, top_p=None, logprobs=None, rng=None):
  req = types.SimpleNamespace(temperature=temperature, top_p=top_p,
                              logprobs=logprobs)
  return types.SimpleNamespace(req=req, rng=rng, logprobs=[])


@pytest.fixture
def device_argmax_calls(monkeypatch):
  """Counts the device argmax's calls (it still runs)."""
  calls = []
  real = step_parts._argmax_rows  # pylint: disable=protected-access

  def counted(logits):
    calls.append(logits.shape)
    return real(logits)
  monkeypatch.setattr(step_parts, "_argmax_rows", counted)
  return calls


def _random_logits(rng, rows, vocab):
  logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
  logits[1, rng.integers(vocab, size=2)] = np.nan  # NaN: its first NaN
  logits[2, rng.integers(vocab, size=3)] = np.inf  # +inf: the first of them
  logits[3] = -np.inf  # nothing left: token 0
  top = rng.integers(vocab)  # a tie: the first of the two
  logits[4, [top, (top + 7) % vocab]] = logits[4].max() + 1
  return logits


def test_an_all_greedy_batch_picks_on_the_device(np_rng, device_argmax_calls):
  logits = _random_logits(np_rng, 6, 301)
  turns = [_turn() for _ in range(5)]  # row 5: padding
  got = step_parts.sample_tokens(turns, jnp.asarray(logits), EngineConfig(),
                                 np.random.default_rng(0))
  assert got == list(np.argmax(logits[:5], axis=-1))
  assert got == [int(sample(logits[b:b + 1], np.random.default_rng(0))[0])
                 for b in range(5)]
  assert device_argmax_calls == [(6, 301)]
  assert all(not t.logprobs for t in turns)
  # Temperature 0 asked for explicitly, with the engine sampling by default:
  explicit = [_turn(temperature=0.0) for _ in range(5)]
  assert step_parts.sample_tokens(
      explicit, jnp.asarray(logits), EngineConfig(greedy=False),
      np.random.default_rng(0)) == got
  assert len(device_argmax_calls) == 2


@pytest.mark.parametrize("odd_one", ["logprobs", "temperature", "default"])
def test_any_other_batch_samples_on_the_host(np_rng, device_argmax_calls,
                                             odd_one):
  """One turn that needs the distribution (its logprobs, or a sampled
  token) brings the batch's logits to the host: the same tokens as the
  host sampler with the same generator."""
  logits = np_rng.normal(size=(4, 97)).astype(np.float32)
  config = EngineConfig(greedy=odd_one != "default")
  odd = {"logprobs": _turn(logprobs=2), "temperature": _turn(temperature=0.8),
         "default": _turn()}[odd_one]
  turns = [_turn(temperature=0.0), odd, _turn(temperature=0.0)]
  got = step_parts.sample_tokens(turns, jnp.asarray(logits), config,
                                 np.random.default_rng(5))
  assert device_argmax_calls == []
  want = step_parts.sample_tokens(turns[:1] + [_turn(
      temperature=odd.req.temperature, logprobs=odd.req.logprobs)] + turns[2:],
      logits, config, np.random.default_rng(5))
  assert got == want
  assert got[0] == np.argmax(logits[0]) and got[2] == np.argmax(logits[2])
  if odd_one == "logprobs":
    assert got[1] == np.argmax(logits[1])
    assert odd.logprobs[0].token == got[1] and len(odd.logprobs[0].top) == 2
  else:
    assert not odd.logprobs


def test_host_logits_are_sampled_on_the_host(np_rng, device_argmax_calls):
  logits = _random_logits(np_rng, 5, 64)
  got = step_parts.sample_tokens([_turn() for _ in range(5)], logits,
                                 EngineConfig(), np.random.default_rng(0))
  assert got == list(np.argmax(logits, axis=-1)) and device_argmax_calls == []
