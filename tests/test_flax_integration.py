"""The user-facing example of docs/flax_integration.md, executed and checked.

The test pulls the two ```python blocks out of the doc and runs them (the
module, then its use on one sequence), checks the second one's outputs, and
drives the `PagedSelfAttention` through a ragged batched prefill and decode
steps on a shuffled page pool. Each step's outputs are compared with dense causal
attention over the whole sequence in float64 numpy, computed from the module's
own weights (tolerance atol = rtol = 1e-5, float32).
"""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs/flax_integration.md"


@pytest.fixture(scope="module")
def example() -> dict:
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) == 2, f"expected 2 python blocks in {DOC}"
  namespace: dict = {"__name__": "flax_integration_example"}
  exec(compile(blocks[0], str(DOC), "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_doc_usage_block_runs_and_matches_dense_attention(example):
  """The doc's second block (prefill of 5 tokens, decode of a sixth) runs as
  written after the first and gives dense attention's outputs."""
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  usage = dict(example)
  exec(compile(blocks[1], str(DOC), "exec"), usage)  # pylint: disable=exec-used
  got = np.concatenate([np.asarray(usage["out"])[0],
                        np.asarray(usage["out_next"])[0]])
  want = _dense_attention(usage["module"],
                          np.asarray(usage["x"], np.float64)[0])
  assert got.shape == want.shape == (6, 64)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _dense_attention(module, x_all: np.ndarray) -> np.ndarray:
  """[T, hidden] causal self-attention of one whole sequence, float64."""
  w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
  t = x_all.shape[0]
  d, group = module.head_dim, module.num_heads // module.num_kv_heads
  q = (x_all @ w(module.q_proj)).reshape(t, module.num_heads, d)
  k = np.repeat((x_all @ w(module.k_proj)).reshape(t, -1, d), group, 1)
  v = np.repeat((x_all @ w(module.v_proj)).reshape(t, -1, d), group, 1)
  s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("hqk,khd->qhd", p, v).reshape(t, -1) @ w(module.o_proj)


@pytest.mark.parametrize("num_heads,num_kv_heads,block_size",
                         [(4, 4, 4), (4, 2, 8), (6, 2, 4)])
def test_doc_example_matches_dense_attention(example, np_rng, num_heads,
                                             num_kv_heads, block_size):
  hidden, head_dim, num_blocks, width = 32, 8, 24, 5
  module = example["PagedSelfAttention"](
      hidden, num_heads, num_kv_heads, head_dim,
      rngs=nnx.Rngs(int(np_rng.integers(1 << 30))))
  step = example["make_step"](module)
  lengths = [9, 14]
  xs = [np_rng.standard_normal((n, hidden)).astype(np.float32)
        for n in lengths]
  tables = np_rng.permutation(num_blocks)[:2 * width].reshape(2, width)
  tables = tables.astype(np.int32)
  kv = jnp.zeros((num_blocks, 2, num_kv_heads, block_size, head_dim))
  done = [0, 0]
  # (new tokens of seq 0, of seq 1) per step: ragged prefill, then decode.
  for counts in [(6, 11), (2, 1), (1, 1), (0, 1)]:
    q_len = max(counts)
    x = np.zeros((2, q_len, hidden), np.float32)
    slots = np.full((2, q_len), -1, np.int32)
    for b, n in enumerate(counts):
      x[b, :n] = xs[b][done[b]:done[b] + n]
      pos = np.arange(done[b], done[b] + n)
      slots[b, :n] = tables[b, pos // block_size] * block_size + (
          pos % block_size)
      done[b] += n
    q_lens = np.array(counts, np.int32)
    out, kv = step(kv, jnp.asarray(x), tables, np.array(done, np.int32),
                   q_lens, slots)
    out = np.asarray(out)
    for b, n in enumerate(counts):
      want = _dense_attention(module, xs[b][:done[b]].astype(np.float64))
      np.testing.assert_allclose(out[b, :n], want[done[b] - n:done[b]],
                                 atol=1e-5, rtol=1e-5)
  assert done == lengths
