"""Tests of dualpath_jax.cache.block_pool: refcounts, cached blocks, LRU."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule)

from dualpath_jax.cache.block_pool import BlockPool, OutOfBlocksError


def _h(i: int) -> bytes:
  return hashlib.sha256(f"block-{i}".encode()).digest()


def _cache_blocks(pool: BlockPool, n: int, first_hash: int = 0) -> list[int]:
  """Allocates n blocks, registers them, releases them in order."""
  blocks = pool.allocate(n)
  for i, block in enumerate(blocks):
    pool.register(block, _h(first_hash + i))
  pool.release(blocks)
  return blocks


@pytest.mark.parametrize("num_blocks,n", [(1, 1), (8, 3), (64, 64), (5, 0)])
def test_allocate_hands_out_distinct_held_blocks(num_blocks, n):
  pool = BlockPool(num_blocks)
  blocks = pool.allocate(n)
  assert len(blocks) == len(set(blocks)) == n
  assert all(0 <= b < num_blocks for b in blocks)
  assert all(pool.ref_count(b) == 1 for b in blocks)
  assert pool.num_free == num_blocks - n
  assert pool.num_referenced == n
  assert pool.stats.allocations == n


def test_out_of_blocks_is_clear_and_changes_nothing():
  pool = BlockPool(4)
  held = pool.allocate(3)
  with pytest.raises(OutOfBlocksError,
                     match="cannot allocate 2 blocks: only 1"):
    pool.allocate(2)
  assert pool.num_free == 1
  assert all(pool.ref_count(b) == 1 for b in held)
  assert len(pool.allocate(1)) == 1


def test_release_without_identity_frees_the_block():
  pool = BlockPool(3)
  blocks = pool.allocate(3)
  pool.release(blocks[:2])
  assert pool.num_free == 2
  assert pool.num_cached == 0
  assert sorted(pool.allocate(2)) == sorted(blocks[:2])


def test_registered_block_stays_cached_and_can_be_revived():
  pool = BlockPool(4)
  [block] = pool.allocate(1)
  pool.register(block, _h(0))
  assert pool.lookup(_h(0)) == block  # found while referenced
  pool.release([block])
  assert pool.num_free == 4  # evictable blocks count as free
  assert pool.num_evictable == 1
  assert pool.lookup(_h(0)) == block  # and while cached
  assert pool.identity(block) == _h(0)
  pool.acquire(block)
  assert pool.ref_count(block) == 1
  assert pool.num_free == 3
  assert pool.num_evictable == 0
  pool.acquire(block)  # a second holder
  pool.release([block])
  assert pool.ref_count(block) == 1
  assert pool.stats.revivals == 1
  assert pool.lookup(_h(1)) is None


def test_free_blocks_are_used_before_evicting_cached_ones():
  pool = BlockPool(6)
  cached = _cache_blocks(pool, 3)
  fresh = pool.allocate(3)
  assert not set(fresh) & set(cached)
  assert pool.stats.evictions == 0
  assert all(pool.lookup(_h(i)) == b for i, b in enumerate(cached))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eviction_is_least_recently_released_first(seed):
  rng = np.random.default_rng(seed)
  pool_size = 10
  evicted = []
  pool = BlockPool(pool_size, on_evict=lambda b, h: evicted.append((b, h)))
  blocks = pool.allocate(pool_size)
  for i, block in enumerate(blocks):
    pool.register(block, _h(i))
  release_order = [blocks[i] for i in rng.permutation(pool_size)]
  for block in release_order:
    pool.release([block])
  # Reviving a block and releasing it again makes it the most recent.
  revived = release_order[0]
  pool.acquire(revived)
  pool.release([revived])
  expected = release_order[1:] + [revived]
  assert pool.eviction_order() == expected

  first = pool.allocate(4)
  assert first == expected[:4]
  assert [b for b, _ in evicted] == expected[:4]
  assert [h for _, h in evicted] == [_h(blocks.index(b)) for b in expected[:4]]
  for block in expected[:4]:
    assert pool.lookup(_h(blocks.index(block))) is None
    assert pool.identity(block) is None
  for block in expected[4:]:
    assert pool.lookup(_h(blocks.index(block))) == block
  assert pool.stats.evictions == 4


def test_release_order_within_one_call_is_eviction_order():
  pool = BlockPool(4)
  blocks = pool.allocate(4)
  for i, block in enumerate(blocks):
    pool.register(block, _h(i))
  pool.release(list(reversed(blocks)))
  assert pool.allocate(1) == [blocks[-1]]


def test_referenced_blocks_are_never_evicted():
  pool = BlockPool(4)
  held = pool.allocate(2)
  for i, block in enumerate(held):
    pool.register(block, _h(i))
  cached = _cache_blocks(pool, 2, first_hash=10)
  taken = pool.allocate(2)
  assert sorted(taken) == sorted(cached)
  with pytest.raises(OutOfBlocksError):
    pool.allocate(1)
  assert [pool.lookup(_h(i)) for i in range(2)] == held


def test_first_writer_wins():
  pool = BlockPool(4)
  a, b = pool.allocate(2)
  assert pool.register(a, _h(0)) == a
  assert pool.register(b, _h(0)) == a
  assert pool.register(a, _h(0)) == a  # idempotent
  assert pool.lookup(_h(0)) == a
  assert pool.identity(b) is None
  assert pool.stats.duplicate_registrations == 1
  pool.release([b])  # b holds no identity: plain free
  assert pool.num_evictable == 0
  assert pool.num_cached == 1


def test_numpy_block_ids_are_accepted():
  pool = BlockPool(4)
  blocks = np.asarray(pool.allocate(2), dtype=np.int32)
  pool.register(blocks[0], _h(0))
  pool.release(blocks)
  pool.acquire(np.int64(blocks[0]))
  assert pool.ref_count(int(blocks[0])) == 1
  [other] = pool.allocate(np.int64(1))
  assert isinstance(other, int) and other != int(blocks[0])
  assert pool.num_free == 2


def test_stats_snapshot_and_mapping_access():
  pool = BlockPool(2)
  _cache_blocks(pool, 2)
  pool.allocate(1)
  stats = pool.stats
  assert stats.evictions == stats["evictions"] == 1
  assert stats.as_dict()["registrations"] == 2
  pool.allocate(1)
  assert stats.evictions == 1  # a snapshot does not move
  assert pool.stats.evictions == 2
  with pytest.raises(KeyError):
    stats["no_such_counter"]  # pylint: disable=pointless-statement


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match="num_blocks"):
    BlockPool(0)
  with pytest.raises(ValueError, match="num_blocks"):
    BlockPool(2.5)
  pool = BlockPool(4)
  with pytest.raises(ValueError, match="non-negative"):
    pool.allocate(-1)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    pool.ref_count(4)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    pool.acquire(True)
  with pytest.raises(ValueError, match="free and holds no cached identity"):
    pool.acquire(0)
  [block] = pool.allocate(1)
  with pytest.raises(ValueError, match="refcount is 1"):
    pool.release([block, block])
  assert pool.ref_count(block) == 1  # the failed release changed nothing
  with pytest.raises(ValueError, match="non-empty bytes"):
    pool.register(block, "not-bytes")
  pool.register(block, _h(0))
  with pytest.raises(ValueError, match="already holds identity"):
    pool.register(block, _h(1))
  pool.release([block])
  with pytest.raises(ValueError, match="refcount is 0"):
    pool.release([block])
  with pytest.raises(ValueError, match="not referenced"):
    pool.register(block, _h(0))


class PoolMachine(RuleBasedStateMachine):
  """Random operation sequences against a plain model of the pool."""

  @initialize(num_blocks=st.integers(1, 12))
  def setup(self, num_blocks):
    self.evicted = []
    self.pool = BlockPool(
        num_blocks, on_evict=lambda b, h: self.evicted.append((b, h)))
    self.refs = {b: 0 for b in range(num_blocks)}
    self.identity = {}  # block -> hash
    self.lru = []  # cached blocks with refcount 0, oldest first

  def _held(self):
    return [b for b, r in self.refs.items() if r > 0]

  @rule(n=st.integers(0, 6))
  def allocate(self, n):
    plain_free = [b for b, r in self.refs.items()
                  if r == 0 and b not in self.identity]
    if n > len(plain_free) + len(self.lru):
      with pytest.raises(OutOfBlocksError):
        self.pool.allocate(n)
      return
    self.evicted.clear()
    blocks = self.pool.allocate(n)
    assert len(set(blocks)) == n
    for block in blocks:
      assert self.refs[block] == 0, "a referenced block was handed out"
    num_evicted = max(0, n - len(plain_free))
    expected_evicted = self.lru[:num_evicted]
    assert [b for b, _ in self.evicted] == expected_evicted
    assert [h for _, h in self.evicted] == [
        self.identity[b] for b in expected_evicted]
    assert set(blocks) - set(expected_evicted) <= set(plain_free)
    for block in expected_evicted:
      del self.identity[block]
    del self.lru[:num_evicted]
    for block in blocks:
      self.refs[block] = 1

  @rule(data=st.data())
  def acquire(self, data):
    if not self._held() and not self.lru:
      return
    block = data.draw(st.sampled_from(self._held() + self.lru))
    self.pool.acquire(block)
    if block in self.lru:
      self.lru.remove(block)
    self.refs[block] += 1

  @rule(data=st.data())
  def release(self, data):
    held = self._held()
    if not held:
      return
    blocks = data.draw(st.lists(st.sampled_from(held), min_size=1,
                                max_size=3, unique=True))
    self.pool.release(blocks)
    for block in blocks:
      self.refs[block] -= 1
      if self.refs[block] == 0 and block in self.identity:
        self.lru.append(block)

  @rule(data=st.data(), key=st.integers(0, 8))
  def register(self, data, key):
    if not self._held():
      return
    block = data.draw(st.sampled_from(self._held()))
    h = _h(key)
    current = self.identity.get(block)
    if current is not None and current != h:
      with pytest.raises(ValueError):
        self.pool.register(block, h)
      return
    holder = next((b for b, v in self.identity.items() if v == h), None)
    result = self.pool.register(block, h)
    if holder is None:
      self.identity[block] = h
      assert result == block
    else:
      assert result == holder

  @rule(key=st.integers(0, 8))
  def lookup(self, key):
    holder = next((b for b, v in self.identity.items() if v == _h(key)), None)
    assert self.pool.lookup(_h(key)) == holder

  @rule(data=st.data())
  def release_too_much_fails_atomically(self, data):
    block = data.draw(st.sampled_from(sorted(self.refs)))
    with pytest.raises(ValueError):
      self.pool.release([block] * (self.refs[block] + 1))

  @invariant()
  def matches_model(self):
    for block, count in self.refs.items():
      assert count >= 0
      assert self.pool.ref_count(block) == count
      assert self.pool.identity(block) == self.identity.get(block)
    num_held = len(self._held())
    assert self.pool.num_free + num_held == self.pool.num_blocks
    assert self.pool.num_referenced == num_held
    assert self.pool.eviction_order() == self.lru
    assert self.pool.num_cached == len(self.identity)
    assert len(set(self.identity.values())) == len(self.identity)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40,
                                    deadline=None, database=None)


def test_release_without_keeping_frees_unshared_blocks_and_drops_identity():
  pool = BlockPool(4)
  a, b = pool.allocate(2)
  ha, hb = _h(11), _h(12)
  pool.register(a, ha)
  pool.register(b, hb)
  pool.acquire(a)  # a second holder of a (a shared prefix)
  pool.release([b, a], keep_cached=False)
  assert pool.lookup(hb) is None and pool.identity(b) is None  # freed now
  assert pool.lookup(ha) == a and pool.ref_count(a) == 1  # still held
  assert pool.num_free == 3 and pool.stats.dropped == 1
  pool.release([a], keep_cached=False)
  assert pool.lookup(ha) is None and pool.num_free == 4 and pool.num_cached == 0
  assert pool.stats.dropped == 2 and pool.stats.evictions == 0
  assert sorted(pool.allocate(4)) == [0, 1, 2, 3]
