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


def _numpy_attend(q, k, v, allowed, k_self, v_self, k_rows=None, v_rows=None,
                  rows_allowed=None):
  """Loops over rows, queries and heads: softmax over the allowed keys of
  the shared cache, then the row's own allowed keys, then its own token
  (each when given)."""
  r, t, hq, d = q.shape
  group = hq // k.shape[1]
  s_rows = 0 if k_rows is None else k_rows.shape[1]
  out = np.zeros((r, t, hq, d))
  probs = np.zeros((r, t, hq, k.shape[0]))
  p_self = np.zeros((r, t, hq))
  p_rows = np.zeros((r, t, hq, s_rows))
  for a in range(r):
    for i in range(t):
      for h in range(hq):
        keys = [c for c in range(k.shape[0]) if allowed[a, i, c]]
        s = [q[a, i, h] @ k[c, h // group] / np.sqrt(d) for c in keys]
        vals = [v[c, h // group] for c in keys]
        own = [j for j in range(s_rows) if rows_allowed[a, i, j]]
        s += [q[a, i, h] @ k_rows[a, j, h // group] / np.sqrt(d) for j in own]
        vals += [v_rows[a, j, h // group] for j in own]
        if k_self is not None:
          s.append(q[a, i, h] @ k_self[a, h // group] / np.sqrt(d))
          vals.append(v_self[a, h // group])
        if not s:
          continue
        w = np.exp(np.array(s) - max(s))
        w /= w.sum()
        out[a, i, h] = w @ np.array(vals)
        probs[a, i, h, keys] = w[:len(keys)]
        p_rows[a, i, h, own] = w[len(keys):len(keys) + len(own)]
        if k_self is not None:
          p_self[a, i, h] = w[-1]
  return out, probs, p_self, p_rows


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3), (8, 2)])
@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("with_rows", [False, True])
def test_attend_matches_numpy(np_rng, hq, hkv, with_self, with_rows):
  r, t, c, d, s_rows = 3, 2, 11, 8, 5
  q = np_rng.normal(size=(r, t, hq, d)).astype(np.float32)
  k = np_rng.normal(size=(c, hkv, d)).astype(np.float32)
  v = np_rng.normal(size=(c, hkv, d)).astype(np.float32)
  allowed = np_rng.random((r, t, c)) < 0.5
  allowed[0, 0] = False  # a query that reads nothing from the cache
  ks = np_rng.normal(size=(r, hkv, d)).astype(np.float32) if with_self else None
  vs = np_rng.normal(size=(r, hkv, d)).astype(np.float32) if with_self else None
  rows = {}
  if with_rows:
    rows = {"k_rows": np_rng.normal(size=(r, s_rows, hkv, d)).astype(np.float32),
            "v_rows": np_rng.normal(size=(r, s_rows, hkv, d)).astype(np.float32),
            "rows_allowed": np_rng.random((r, t, s_rows)) < 0.5}
    rows["rows_allowed"][0, 0] = False  # and nothing of its own
  got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
               jnp.asarray(allowed), None if ks is None else jnp.asarray(ks),
               None if vs is None else jnp.asarray(vs),
               **{n: jnp.asarray(a) for n, a in rows.items()})
  want = _numpy_attend(q, k, v, allowed, ks, vs, **rows)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5)
  total = (np.asarray(got.cache_probs).sum(-1) + np.asarray(got.self_probs)
           + np.asarray(got.row_probs).sum(-1))
  np.testing.assert_allclose(total[1:], 1.0, atol=1e-5)  # rows with keys
  if not with_self:  # the query that read nothing gives zeros
    np.testing.assert_array_equal(np.asarray(got.out)[0, 0], 0.0)


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


def test_probes_of_one_geometry_share_steps_and_keep_their_weights(np_rng):
  """Probes of two models of one config and geometry share their jitted
  steps (compiled once) and each prefills with its own weights; another
  capacity gets its own steps."""
  cfg = config.TINY
  models = [make_model(cfg, np_rng) for _ in range(2)]
  probes = [AttentionProbe(m, capacity=32, block_size=4, chunk=16)
            for m in models]
  assert probes[0]._fns is probes[1]._fns  # pylint: disable=protected-access
  tokens = list(np_rng.integers(0, cfg.vocab_size, 11))
  for model, probe in zip(models, probes):
    want = reference_logits(params_of(model), cfg, np.asarray(tokens))[-1]
    logits, _ = probe.prefill(tokens)
    np.testing.assert_allclose(logits, want, atol=TOL * np.abs(want).max())
  other = AttentionProbe(models[0], capacity=64, block_size=4, chunk=16)
  assert other._fns is not probes[0]._fns  # pylint: disable=protected-access


def _free_row_reference(params, cfg, prompt, fed, masks, block_size):
  """Logits of a free-running row after each token it fed: the prompt
  reads causally; fed token j (at position len(prompt) + j) reads the
  earlier positions in the blocks `masks[j]` allows, and itself."""
  t = len(prompt) + len(fed)
  mask = np.tril(np.ones((t, t), bool))
  for j, block_mask in enumerate(masks):
    row = len(prompt) + j
    keys = np.repeat(block_mask, block_size)[:row]
    mask[row, :row] = keys
  return reference_logits(params, cfg, np.asarray(list(prompt) + list(fed)),
                          mask)[len(prompt):]


@pytest.mark.parametrize("prompt_len,bs", [(13, 4), (16, 4), (9, 8)])
def test_free_rows_match_the_dense_model(np_rng, prompt_len, bs):
  """Free-running rows, each feeding its own tokens under its own block
  masks (fresh each step, some dropping the row's own earlier blocks),
  against the numpy model with the same per-query masks; after `decode`
  steps on the shared cache, which must not leak into the free rows; and
  `score` against the exact model's log-probabilities."""
  cfg = config.TINY.replace(num_heads=6, num_kv_heads=2)
  model = make_model(cfg, np_rng)
  params = params_of(model)
  probe = AttentionProbe(model, capacity=40, block_size=bs, chunk=8)
  prompt = list(np_rng.integers(0, cfg.vocab_size, prompt_len))
  probe.prefill(prompt)
  nb = probe.num_blocks
  for _ in range(2):  # the per-step rows append to the shared cache
    probe.decode(int(np_rng.integers(cfg.vocab_size)), np.ones((1, nb), bool))
  rows, steps = 3, 6
  probe.start_free_rows(rows, steps)
  fed = [[] for _ in range(rows)]
  masks = [[] for _ in range(rows)]
  scale = np.abs(reference_logits(params, cfg, np.asarray(prompt))).max()
  for step in range(steps):
    tokens = np_rng.integers(0, cfg.vocab_size, rows)
    block_masks = np_rng.random((rows, nb)) < 0.5
    block_masks[0] = True  # an exact row
    out = probe.decode_free(tokens, block_masks)
    for r in range(rows):
      fed[r].append(int(tokens[r]))
      masks[r].append(block_masks[r])
      want = _free_row_reference(params, cfg, prompt, fed[r], masks[r], bs)
      np.testing.assert_allclose(out.logits[r], want[-1], atol=TOL * scale)
    total = out.block_mass.sum(-1) + out.self_mass
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    position = prompt_len + step
    readable = np.repeat(block_masks, bs, axis=1)[:, :position]
    for r in range(rows):  # mass only on blocks the row read
      read_blocks = {p // bs for p in np.flatnonzero(readable[r])}
      unread = [b for b in range(nb) if b not in read_blocks]
      assert not out.block_mass[r][..., unread].any()
  # score: the exact model's log-probabilities of a continuation (fed in
  # two chunks of 8)
  cont = [int(x) for x in np_rng.integers(0, cfg.vocab_size, 11)]
  full = reference_logits(params, cfg, np.asarray(prompt + cont))
  full = full.astype(np.float64)[prompt_len:-1]
  full -= full.max(-1, keepdims=True)
  want = full - np.log(np.exp(full).sum(-1, keepdims=True))
  want = want[np.arange(10), cont[1:]]
  caches = [np.array(c) for c in (probe._k, probe._v)]  # pylint: disable=protected-access
  before = probe.score(cont)
  np.testing.assert_allclose(before.logprobs, want, atol=1e-3)
  np.testing.assert_array_equal(before.greedy, np.argmax(full, axis=-1))
  for cache, kept in zip((probe._k, probe._v), caches):  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(cache), kept)  # untouched
  again = probe.score(cont)
  np.testing.assert_allclose(again.logprobs, before.logprobs)
  short = probe.score(cont[:4])  # 3 tokens fed, in a chunk of 4
  np.testing.assert_allclose(short.logprobs, want[:3], atol=1e-3)


def test_probe_refuses_bad_input(np_rng):
  model = make_model(config.TINY, np_rng)
  with pytest.raises(ValueError, match="multiple of block_size"):
    AttentionProbe(model, capacity=30, block_size=4)
  probe = AttentionProbe(model, capacity=16, block_size=4, chunk=8)
  with pytest.raises(RuntimeError, match="before prefill"):
    probe.decode(1, np.ones((1, 4), bool))
  with pytest.raises(RuntimeError, match="before prefill"):
    probe.start_free_rows(1, 1)
  with pytest.raises(RuntimeError, match="before prefill"):
    probe.score([1, 2])
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
  with pytest.raises(RuntimeError, match="before start_free_rows"):
    probe.decode_free([1], np.ones((1, 4), bool))
  with pytest.raises(ValueError, match="do not fit"):
    probe.start_free_rows(2, 2)  # 15 + 2 > 16
  with pytest.raises(ValueError, match="score takes 2 to 2 tokens"):
    probe.score([1, 2, 3])
  with pytest.raises(ValueError, match="score takes"):
    probe.score([1])
  probe.start_free_rows(2, 1)
  with pytest.raises(ValueError, match=r"expected tokens \[2\]"):
    probe.decode_free([1], np.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"block_masks \[2, 4\]"):
    probe.decode_free([1, 2], np.ones((2, 3), bool))
  with pytest.raises(ValueError, match="token ids must be integers"):
    probe.decode_free([1, -2], np.ones((2, 4), bool))
  probe.decode_free([1, 2], np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="steps are used up"):
    probe.decode_free([1, 2], np.ones((2, 4), bool))
  probe.decode(1, np.ones((1, 4), bool))
  with pytest.raises(ValueError, match="capacity .* is full"):
    probe.decode(1, np.ones((1, 4), bool))
