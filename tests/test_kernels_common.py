"""kernels/common.py against brute force: the key steps a prefill query tile
walks, the split-K merge, and the decode output's padding rows."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from kernels import common


def _brute_tile_steps(first_row, tile_tokens, kv_len, q_len, capacity, step):
  """Enumerates the keys each real row of the tile sees."""
  key_limit = min(kv_len, capacity)
  rows = range(first_row, min(first_row + tile_tokens, q_len))
  seen = [k for r in rows for k in range(key_limit)
          if k <= kv_len - q_len + r]
  num_steps = -(-(max(seen) + 1) // step) if seen else 0
  # A step is free when every row sees every key of it: all its keys exist
  # and sit at or before the first row's position.
  first_pos = kv_len - q_len + first_row
  num_free = sum(1 for s in range(num_steps)
                 if all(k < key_limit and k <= first_pos
                        for k in range(s * step, (s + 1) * step)))
  return key_limit, num_steps, num_free


def test_tile_steps_match_enumerated_keys(np_rng):
  for _ in range(400):
    step = int(np_rng.choice([1, 4, 16, 64]))
    tile_tokens = int(np_rng.choice([1, 3, 8, 16]))
    capacity = int(np_rng.integers(1, 12)) * 16
    q_len = int(np_rng.integers(0, 40))
    kv_len = q_len + int(np_rng.integers(0, 200))
    first_row = int(np_rng.integers(0, 48)) // tile_tokens * tile_tokens
    got = common.tile_steps(
        first_row=jnp.int32(first_row), tile_tokens=tile_tokens,
        kv_len=jnp.int32(kv_len), q_len=jnp.int32(q_len), capacity=capacity,
        step_tokens=step)
    want = _brute_tile_steps(first_row, tile_tokens, kv_len, q_len, capacity,
                             step)
    assert tuple(int(x) for x in got) == want, (
        first_row, tile_tokens, kv_len, q_len, capacity, step)


@pytest.mark.parametrize("merge", [common.merge_splits,
                                   common.merge_splits_one_reduce])
def test_merge_splits_equals_one_softmax(np_rng, merge):
  rows, keys, head_dim, splits = 5, 48, 8, 4
  logits = np_rng.standard_normal((rows, keys)) * 3  # base-2 logits
  v = np_rng.standard_normal((keys, head_dim))
  parts = np.split(np.arange(keys), splits)
  o, m, l = [], [], []
  for i, keys_of in enumerate(parts):
    part = logits[:, keys_of]
    if i == 2:  # a split that saw no keys: masked, l == 0
      part = np.full_like(part, common.MASK_VALUE)
    mi = part.max(1)
    pi = np.exp2(part - mi[:, None]) * (i != 2)
    o.append(pi @ v[keys_of])
    m.append(mi)
    l.append(pi.sum(1))
  got = merge(jnp.asarray(np.stack(o), jnp.float32),
              jnp.asarray(np.stack(m), jnp.float32),
              jnp.asarray(np.stack(l), jnp.float32))
  keep = np.concatenate([k for i, k in enumerate(parts) if i != 2])
  p = np.exp2(logits[:, keep] - logits[:, keep].max(1, keepdims=True))
  want = (p / p.sum(1, keepdims=True)) @ v[keep]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # A row no split saw gives zeros, not NaN.
  empty = merge(jnp.ones((2, 1, 3)), jnp.full((2, 1), -1.0),
                jnp.zeros((2, 1)))
  assert np.array_equal(np.asarray(empty), np.zeros((1, 3)))


def test_one_reduce_merge_on_batched_splits_far_apart(np_rng):
  """Leading batch and head axes, maxima hundreds apart (a fold rescaling
  to anything but the larger max would overflow) and empty splits: the
  variadic merge equals the softmax of all the splits' keys, computed in
  float64 from the splits' partial sums."""
  batch, heads, splits, rows, head_dim = 2, 3, 7, 8, 16
  m = np_rng.uniform(-300, 300, (batch, heads, splits, rows))
  empty = np_rng.random((batch, heads, splits, rows)) < 0.3
  empty[0, 0] = True  # a row no split saw
  m = np.where(empty, common.MASK_VALUE, m).astype(np.float32)
  l = np.where(empty, 0, np_rng.uniform(1, 50, m.shape)).astype(np.float32)
  o = np_rng.standard_normal(m.shape + (head_dim,)).astype(np.float32)
  o = np.where(empty[..., None], 0, o * l[..., None]).astype(np.float32)
  # In float64: weight each split by 2^(m - the row's largest max).
  m64 = np.where(empty, -np.inf, m.astype(np.float64))
  top = m64.max(axis=2, keepdims=True)
  w = np.where(empty, 0.0, np.exp2(m64 - np.where(np.isfinite(top), top, 0)))
  num = (w[..., None] * o.astype(np.float64)).sum(axis=2)
  den = (w * l.astype(np.float64)).sum(axis=2)[..., None]
  want = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
  got = common.merge_splits_one_reduce(jnp.asarray(o), jnp.asarray(m),
                                       jnp.asarray(l))
  assert got.shape == (batch, heads, rows, head_dim)
  assert np.isfinite(np.asarray(got)).all()
  assert not np.asarray(got[0, 0]).any()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # The three-reduction merge agrees with the same float64 result.
  three = common.merge_splits(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l))
  np.testing.assert_allclose(np.asarray(three), want, rtol=1e-5, atol=1e-6)


def test_decode_output_zeroes_padding_rows(np_rng):
  out = jnp.asarray(np_rng.standard_normal((3, 4, 8)), jnp.float32)
  got = common.decode_output(out, jnp.asarray([1, 0, 1], jnp.int32),
                             jnp.bfloat16)
  assert got.shape == (3, 1, 4, 8) and got.dtype == jnp.bfloat16
  assert not np.asarray(got[1], np.float32).any()
  np.testing.assert_array_equal(np.asarray(got[0, 0]),
                                np.asarray(out[0].astype(jnp.bfloat16)))
