"""`AttentionProbe`: its attention against numpy, its logits against the
dense numpy model (tests/test_model_mechanics.reference_logits), sparse
rows included, on fresh random models and inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax import config
from dualpath_jax.model.attention_probe import AttentionProbe, attend, block_sums
from test_model_mechanics import make_model, params_of, reference_logits

TOL = 2e-4  # float32 model against float64 numpy, relative to the logits' scale


def _numpy_attend(q, k, v, allowed, k_self, v_self):
  """Loops over rows, queries and heads: softmax over the allowed keys
  (and the row's own key, when given)."""
  r, t, hq, d = q.shape
  group = hq // k.shape[1]
  out = np.zeros((r, t, hq, d))
  probs = np.zeros((r, t, hq, k.shape[0]))
  p_self = np.zeros((r, t, hq))
  for a in range(r):
    for i in range(t):
      for h in range(hq):
        keys = [c for c in range(k.shape[0]) if allowed[a, i, c]]
        s = [q[a, i, h] @ k[c, h // group] / np.sqrt(d) for c in keys]
        vals = [v[c, h // group] for c in keys]
        if k_self is not None:
          s.append(q[a, i, h] @ k_self[a, h // group] / np.sqrt(d))
          vals.append(v_self[a, h // group])
        if not s:
          continue
        w = np.exp(np.array(s) - max(s))
        w /= w.sum()
        out[a, i, h] = w @ np.array(vals)
        probs[a, i, h, keys] = w[:len(keys)]
        if k_self is not None:
          p_self[a, i, h] = w[-1]
  return out, probs, p_self


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3), (8, 2)])
@pytest.mark.parametrize("with_self", [False, True])
def test_attend_matches_numpy(np_rng, hq, hkv, with_self):
  r, t, c, d = 3, 2, 11, 8
  q = np_rng.normal(size=(r, t, hq, d)).astype(np.float32)
  k = np_rng.normal(size=(c, hkv, d)).astype(np.float32)
  v = np_rng.normal(size=(c, hkv, d)).astype(np.float32)
  allowed = np_rng.random((r, t, c)) < 0.5
  allowed[0, 0] = False  # a query that reads nothing from the cache
  ks = np_rng.normal(size=(r, hkv, d)).astype(np.float32) if with_self else None
  vs = np_rng.normal(size=(r, hkv, d)).astype(np.float32) if with_self else None
  got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
               jnp.asarray(allowed), None if ks is None else jnp.asarray(ks),
               None if vs is None else jnp.asarray(vs))
  want = _numpy_attend(q, k, v, allowed, ks, vs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)
  total = np.asarray(got[1]).sum(-1) + np.asarray(got[2])
  np.testing.assert_allclose(total[1:], 1.0, atol=1e-5)  # rows with keys


def test_block_sums():
  p = jnp.arange(12.0).reshape(1, 12)
  np.testing.assert_array_equal(np.asarray(block_sums(p, 4)),
                                [[6.0, 22.0, 38.0]])


def _masked_reference(params, cfg, tokens, hot_blocks, block_size):
  """Logits of the last token when it reads only the earlier tokens of the
  blocks in `hot_blocks` (and itself); every earlier token reads exactly."""
  t = len(tokens)
  mask = np.tril(np.ones((t, t), bool))
  last = np.zeros(t, bool)
  for b in hot_blocks:
    last[b * block_size:(b + 1) * block_size] = True
  last[t - 1] = True
  mask[t - 1] = last[:t]
  return reference_logits(params, cfg, np.asarray(tokens), mask)[-1]


@pytest.mark.parametrize("prompt_len,chunk", [(37, 16), (16, 16), (5, 32)])
def test_probe_matches_the_dense_model(np_rng, prompt_len, chunk):
  """Prefill in chunks (ragged, off and on block boundaries), then decode
  steps with an exact row, a row that reads every block (the same) and
  sparse rows; every row's logits against the numpy model with its mask."""
  cfg = config.TINY.replace(num_heads=6, num_kv_heads=2)  # GQA 3
  model = make_model(cfg, np_rng)
  params = params_of(model)
  bs = 4
  probe = AttentionProbe(model, capacity=64, block_size=bs, chunk=chunk)
  tokens = list(np_rng.integers(0, cfg.vocab_size, prompt_len))
  logits, prompt_mass = probe.prefill(tokens)
  scale = np.abs(reference_logits(params, cfg, np.asarray(tokens))).max()
  want = reference_logits(params, cfg, np.asarray(tokens))[-1]
  np.testing.assert_allclose(logits, want, atol=TOL * scale)
  assert prompt_mass.shape == (prompt_len, probe.num_blocks)
  np.testing.assert_allclose(prompt_mass.sum(-1), 1.0, atol=1e-5)
  assert not prompt_mass[0, 1:].any()  # token 0 reads only itself
  for step in range(3):
    nb = probe.num_blocks
    n_blocks_now = probe.length // bs + 1
    sparse = np_rng.random(nb) < 0.4
    sparse[n_blocks_now - 1] = True  # the newest block, as select_hot does
    none = np.zeros(nb, bool)  # reads only itself
    masks = np.stack([np.ones(nb, bool), np.ones(nb, bool), sparse, none])
    token = int(np.argmax(logits))
    out = probe.decode(token, masks)
    tokens.append(token)
    full = reference_logits(params, cfg, np.asarray(tokens))[-1]
    np.testing.assert_allclose(out.logits[0], full, atol=TOL * scale)
    np.testing.assert_array_equal(out.logits[1], out.logits[0])
    hot = [b for b in range(n_blocks_now) if sparse[b]]
    np.testing.assert_allclose(
        out.logits[2], _masked_reference(params, cfg, tokens, hot, bs),
        atol=TOL * scale)
    np.testing.assert_allclose(
        out.logits[3], _masked_reference(params, cfg, tokens, [], bs),
        atol=TOL * scale)
    assert out.block_mass.shape == (4, cfg.num_layers, cfg.num_heads, nb)
    total = out.block_mass.sum(-1) + out.self_mass
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert not out.block_mass[2][..., ~sparse].any()
    np.testing.assert_array_equal(out.self_mass[3], 1.0)
    logits = out.logits[0]


def test_probe_refuses_bad_input(np_rng):
  model = make_model(config.TINY, np_rng)
  with pytest.raises(ValueError, match="multiple of block_size"):
    AttentionProbe(model, capacity=30, block_size=4)
  probe = AttentionProbe(model, capacity=16, block_size=4, chunk=8)
  with pytest.raises(RuntimeError, match="before prefill"):
    probe.decode(1, np.ones((1, 4), bool))
  with pytest.raises(ValueError, match="does not fit"):
    probe.prefill(list(range(16)))
  with pytest.raises(ValueError, match="does not fit"):
    probe.prefill([])
  with pytest.raises(ValueError, match="token ids must be integers"):
    probe.prefill([1, 2, config.TINY.vocab_size])
  with pytest.raises(ValueError, match="token ids must be integers"):
    probe.prefill([-1, 2])
  probe.prefill(list(range(15)))
  with pytest.raises(ValueError, match="token ids must be integers"):
    probe.decode(config.TINY.vocab_size, np.ones((1, 4), bool))
  with pytest.raises(ValueError, match=r"block_masks must be \[rows, 4\]"):
    probe.decode(1, np.ones((1, 3), bool))
  probe.decode(1, np.ones((1, 4), bool))
  with pytest.raises(ValueError, match="capacity .* is full"):
    probe.decode(1, np.ones((1, 4), bool))
