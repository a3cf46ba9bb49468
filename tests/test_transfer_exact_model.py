"""Exact mode: the model's logits and tokens do not depend on the load path.

A tiny random Llama prefills a prefix, its KV blocks go to a fake cold tier,
then a fresh pool (other pages, garbage elsewhere) receives them by path 1,
path 2, a mix, or the oracle's free path, and the turn's suffix is prefilled
and greedily decoded on top. Logits must be bitwise equal to the run that
computed the prefix itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax import config
from dualpath_jax.model.llama import random_llama
from dualpath_jax.model.runner import ModelRunner
from dualpath_jax.scheduler import ReadPath
from dualpath_jax.transfer import (DualPathConfig, DualPathLoader,
                                   InMemoryBlockSource, LoadRequest,
                                   MeshConfig, StorageNic, build_cluster_mesh)

P = 8  # block size
PE, DE, FREE = ReadPath.PE_READ, ReadPath.DE_READ, ReadPath.FREE


def _step(runner, pool, tokens, pages, start):
  """Prefills `tokens` at positions start.. of a sequence on `pages`."""
  n = len(tokens)
  table = np.asarray(pages, np.int32)[None]
  pos = np.arange(start, start + n)
  slots = (table[0, pos // P] * P + pos % P)[None].astype(np.int32)
  return runner.step_all_logits(pool, np.asarray(tokens, np.int32)[None], table,
                                np.array([start + n], np.int32),
                                np.array([n], np.int32), slots)


def _continue(runner, pool, suffix, pages, start, steps):
  """Suffix prefill, then greedy decode; returns every logits array."""
  logits, pool = _step(runner, pool, suffix, pages, start)
  out = [np.asarray(logits[0])]
  pos = start + len(suffix)
  for _ in range(steps):
    token = int(np.argmax(out[-1][-1]))
    logits, pool = _step(runner, pool, [token], pages, pos)
    out.append(np.asarray(logits[0]))
    pos += 1
  return out


@pytest.fixture(scope="module")
def reference():
  """A tiny model, its prefix blocks in a fake cold tier, the reference run."""
  rng = np.random.default_rng(20261126)
  cfg = config.TINY
  cache = config.CacheConfig(block_size=P, num_blocks=16)
  runner = ModelRunner(random_llama(cfg, int(rng.integers(1 << 30))),
                       cache)
  prefix = rng.integers(3, cfg.vocab_size, 4 * P).tolist()
  suffix = rng.integers(3, cfg.vocab_size, 5).tolist()
  garbage = rng.standard_normal(runner.kv_cache_shape).astype(np.float32)
  ref_pages = [3, 7, 1, 9, 5, 6]
  _, pool = _step(runner, jnp.asarray(garbage), prefix, ref_pages, 0)
  host = np.asarray(pool)
  ids = [f"blk{i}".encode() for i in range(4)]
  source = InMemoryBlockSource({i: host[:, p] for i, p in zip(ids, ref_pages)})
  want = _continue(runner, pool, suffix, ref_pages, 4 * P, steps=3)
  return runner, source, ids, suffix, want


@pytest.mark.parametrize("paths", [[PE] * 4, [DE] * 4, [DE, PE, DE, DE],
                                   [FREE, DE, PE, FREE]])
def test_logits_identical_whichever_path_delivered_the_prefix(
    np_rng, reference, paths):
  runner, source, ids, suffix, want = reference
  cluster = build_cluster_mesh(MeshConfig.parse("1P2D"), jax.devices()[:1])
  cfg_dp = DualPathConfig()
  nics = {e.name: StorageNic(e.name, cfg_dp.nic_bytes_per_s)
          for e in cluster.engines}
  shape = runner.kv_cache_shape
  loader = DualPathLoader(cluster, source, nics, cfg_dp,
                          shape[:1] + shape[2:], np.float32)
  pages = [10, 2, 12, 4, 0, 15]
  garbage = np_rng.standard_normal(shape).astype(np.float32)
  pool, report = loader.load(jnp.asarray(garbage),
                             LoadRequest(ids, pages[:4], paths, "P0", "D1"))
  assert report.missing == []
  got = _continue(runner, pool, suffix, pages, 4 * P, steps=3)
  loader.close()
  assert len(got) == len(want) == 4
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))
