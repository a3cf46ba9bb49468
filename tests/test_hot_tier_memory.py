"""The hot tier's two memories (pageable numpy, pinned_host JAX): exact
bytes in and out, to and from pool pages, against numpy indexing of the
same random data; and a copy that fails leaves no block held under its id.

CPU has the `pinned_host` memory kind, so the pinned tier's code paths
(`kernels.block_copy`'s gather, scatter and put) run here as on a GPU.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.cache import hot_tier_memory
from dualpath_jax.cache.hot_tier import HotTier

MEMORIES = hot_tier_memory.MEMORY_KINDS
BLOCK = (3, 2, 2, 4, 8)  # [L, 2, Hkv, P, D]
NUM_PAGES = 12

pytestmark = pytest.mark.filterwarnings(
    "ignore:Some donated buffers were not usable")


def _blocks(rng, n, dtype=np.float32):
  return rng.standard_normal((n, *BLOCK)).astype(dtype)


def _pool(rng, dtype=jnp.float32):  # [L, N, 2, Hkv, P, D], fresh values
  return jnp.asarray(
      rng.standard_normal((BLOCK[0], NUM_PAGES, *BLOCK[1:])), dtype)


def _page(pool, page):  # [L, 2, Hkv, P, D] of one page, numpy
  return np.asarray(pool)[:, page]


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_written_read_back_and_moved_to_pool_pages_exactly(
    memory, dtype, monkeypatch):
  # Calls of 3 blocks at most: 7 blocks cross in three calls, the last one
  # padded (a padding entry must move nothing).
  monkeypatch.setattr(hot_tier_memory, "MAX_BLOCKS_PER_CALL", 3)
  rng = np.random.default_rng(1)
  dt = jnp.dtype(dtype)
  store = hot_tier_memory.make_blocks(memory, 9, BLOCK, dt)
  data = _blocks(rng, 7).astype(dt)
  slots = [8, 0, 4, 2, 7, 1, 5]
  store.write(slots, data)
  out = np.full((8, *BLOCK), np.nan, np.float32).astype(dt)  # poisoned
  store.read(slots[::-1], out)
  np.testing.assert_array_equal(out[:7], data[::-1])
  assert np.isnan(out[7].astype(np.float32)).all()

  pool = _pool(rng, dt)
  want = np.asarray(pool).copy()
  pages = [11, 3, 0, 6, 9]
  for page, k in zip(pages, [4, 0, 2, 6, 1]):
    want[:, page] = data[k]
  pool = store.to_pool(pool, [slots[k] for k in [4, 0, 2, 6, 1]], pages)
  np.testing.assert_array_equal(np.asarray(pool), want)  # others untouched

  store.from_pool(pool, [1, 10, 5, 3], [3, 6, 0, 8])
  got = np.empty((4, *BLOCK), dt)
  store.read([3, 6, 0, 8], got)
  for k, page in enumerate([1, 10, 5, 3]):
    np.testing.assert_array_equal(got[k], want[:, page])
  if memory == "pinned_host":  # still one pinned buffer, updated in place
    assert store._data.sharding.memory_kind == "pinned_host"


@pytest.mark.parametrize("memory", MEMORIES)
def test_tier_moves_runs_between_itself_and_the_pool(memory):
  rng = np.random.default_rng(2)
  tier = HotTier(6, BLOCK, np.float32, memory=memory)
  assert tier.memory == memory
  ids = [f"b{i}".encode() for i in range(4)]
  pool = _pool(rng)
  # Into the tier from pool pages 7, 2, 9 (no host copy given)...
  assert tier.put_from_pool(ids[:3], pool, [7, 2, 9]) == 3
  # ... a held id is not copied again, a new one is (with a host copy).
  host = np.stack([_page(pool, 4), _page(pool, 5)])
  assert tier.put_from_pool(ids[2:], pool, [4, 5], host_blocks=host) == 1
  fresh = _pool(np.random.default_rng(3))
  want = np.asarray(fresh).copy()
  for page, src in zip([0, 1, 10, 11], [7, 2, 9, 5]):
    want[:, page] = _page(pool, src)
  got, n = tier.read_run_to_pool(ids + [b"missing"], fresh, [0, 1, 10, 11, 3])
  assert n == 4 and tier.stats.hits == 4 and tier.stats.lookups == 5
  np.testing.assert_array_equal(np.asarray(got), want)
  # A run that starts with a block the tier lacks moves nothing.
  same, n = tier.read_run_to_pool([b"missing", ids[0]], got, [4, 5])
  assert n == 0
  np.testing.assert_array_equal(np.asarray(same), want)


@pytest.mark.parametrize("memory", MEMORIES)
def test_a_copy_that_raises_leaves_no_block_held(memory, monkeypatch):
  """A put whose copy fails (a device error, a full host) must not leave
  ids mapped to slots whose bytes are not those blocks."""
  rng = np.random.default_rng(4)
  tier = HotTier(4, BLOCK, np.float32, memory=memory)
  kept = [b"k0"]
  tier.put(kept, _blocks(rng, 1))
  cls = type(tier._blocks)

  def broken(*args, **kw):
    raise RuntimeError("copy failed")
  monkeypatch.setattr(cls, "write", broken)
  monkeypatch.setattr(cls, "from_pool", broken)
  with pytest.raises(RuntimeError, match="copy failed"):
    tier.put([b"a", b"b"], _blocks(rng, 2))
  with pytest.raises(RuntimeError, match="copy failed"):
    tier.put_from_pool([b"c"], _pool(rng), [3])
  assert tier.contains([b"a", b"b", b"c", b"k0"]) == [False, False, False,
                                                      True]
  assert len(tier) == 1 and tier.stats.puts == 1
  assert tier.room(keep=kept) == 3  # their slots are free again


def test_bad_arguments_are_refused():
  rng = np.random.default_rng(5)
  with pytest.raises(ValueError, match="unknown hot-tier memory"):
    HotTier(2, BLOCK, np.float32, memory="hbm")
  tier = HotTier(4, BLOCK, np.float32, memory="pinned_host")
  tier.put([b"a"], _blocks(rng, 1))
  with pytest.raises(ValueError, match="as many pool pages"):
    tier.read_run_to_pool([b"a", b"b"], _pool(rng), [0])
  with pytest.raises(ValueError, match="as many pool pages"):
    tier.put_from_pool([b"x", b"y"], _pool(rng), [0])
  with pytest.raises(ValueError, match="host_blocks"):
    tier.put_from_pool([b"x"], _pool(rng), [0], host_blocks=_blocks(rng, 2))


def test_pool_device_names_one_device_or_none():
  pool = jax.device_put(jnp.zeros((2, 3)), jax.devices()[0])
  assert hot_tier_memory.pool_device(pool) == jax.devices()[0]
