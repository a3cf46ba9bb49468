"""Tests of dualpath_jax.cache.kv_cache_manager: block tables, prefix reuse.

A flat numpy array stands in for the device KV pool: the engine "writes" each
token id into its slot, so reading a cached prefix's slots back must give the
new context's tokens exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule)

from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.cache.block_pool import BlockPool, OutOfBlocksError
from dualpath_jax.cache.kv_cache_manager import (KVCacheManager,
                                                 RequestTooLargeError)

FINGERPRINT = "fp-test"


class _Setup:
  """A pool, its manager and a fake KV array of one token id per slot."""

  def __init__(self, num_blocks=32, block_size=4, max_blocks_per_seq=16):
    self.pool = BlockPool(num_blocks)
    self.manager = KVCacheManager(self.pool, block_size, FINGERPRINT,
                                  max_blocks_per_seq)
    self.block_size = block_size
    self.kv = np.full(num_blocks * block_size, -1, dtype=np.int64)

  def compute(self, seq_id, tokens):
    """Allocates, writes and appends `tokens` after the computed ones."""
    start = self.manager.num_computed(seq_id)
    self.manager.allocate(seq_id, len(tokens))
    self.kv[self.manager.slot_mapping(seq_id, start, len(tokens))] = tokens
    self.manager.append_tokens(seq_id, tokens)

  def turn(self, seq_id, context, salt="", decode=()):
    """begin + prefill of the rest of `context` + decode; returns the hits."""
    hits = self.manager.begin(seq_id, context, tenant_salt=salt)
    np.testing.assert_array_equal(
        self.kv[self.manager.slot_mapping(seq_id, 0, hits)], context[:hits])
    self.compute(seq_id, list(context[hits:]))
    for token in decode:
      self.compute(seq_id, [token])
    return hits


def _tokens(rng, n):
  return rng.integers(0, 49152, size=n).tolist()


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefix_reuse_across_turns(block_size):
  rng = np.random.default_rng(block_size)
  setup = _Setup(num_blocks=64, block_size=block_size, max_blocks_per_seq=64)
  first = _tokens(rng, block_size * 5 // 2 + 1)
  generated = _tokens(rng, 3)
  assert setup.turn("s", first, decode=generated) == 0
  table_1 = setup.manager.block_table("s")
  setup.manager.end("s")

  second = first + generated + _tokens(rng, block_size + 2)
  hits = setup.turn("s", second)
  full_blocks = (len(first) + len(generated)) // block_size
  assert hits == full_blocks * block_size
  assert setup.manager.block_table("s")[:full_blocks] == table_1[:full_blocks]
  assert setup.manager.num_computed("s") == len(second)
  stats = setup.manager.stats
  assert stats["lookups"] == 2
  assert stats["query_tokens"] == len(first) + len(second)
  assert stats["hit_tokens"] == hits


def test_sessions_of_one_tenant_share_the_system_prompt():
  rng = np.random.default_rng(0)
  setup = _Setup(num_blocks=32, block_size=4)
  system = _tokens(rng, 12)
  setup.turn("a", system + _tokens(rng, 5), salt="tenant-1")
  assert setup.turn("b", system + _tokens(rng, 2), salt="tenant-1") == 12
  shared = setup.manager.block_table("a")[:3]
  assert setup.manager.block_table("b")[:3] == shared
  assert all(setup.pool.ref_count(b) == 2 for b in shared)
  # Another tenant with the same prompt never sees those blocks.
  assert setup.turn("c", system + _tokens(rng, 2), salt="tenant-2") == 0
  assert not set(setup.manager.block_table("c")) & set(shared)
  setup.manager.end("a")
  assert all(setup.pool.ref_count(b) == 1 for b in shared)


@pytest.mark.parametrize("extra,expected_blocks", [(0, 3), (1, 4), (3, 4)])
def test_hits_leave_at_least_one_token_to_compute(extra, expected_blocks):
  rng = np.random.default_rng(extra)
  setup = _Setup(block_size=4)
  context = _tokens(rng, 16)
  setup.turn("a", context)
  setup.manager.end("a")
  new = context + _tokens(rng, extra)
  assert setup.turn("b", new) == expected_blocks * 4
  assert setup.manager.begin("c", context[:1]) == 0


def test_partial_block_is_never_registered():
  rng = np.random.default_rng(1)
  setup = _Setup(num_blocks=8, block_size=4)
  context = _tokens(rng, 11)
  setup.turn("a", context)
  table = setup.manager.block_table("a")
  assert len(table) == 3
  assert setup.pool.identity(table[2]) is None
  assert len(setup.manager.block_hashes("a")) == 2
  setup.manager.end("a")
  assert setup.pool.num_cached == 2
  assert setup.pool.num_evictable == 2
  assert setup.turn("b", context + _tokens(rng, 4)) == 8


def test_generated_tokens_fill_blocks_that_later_turns_hit():
  rng = np.random.default_rng(2)
  setup = _Setup(block_size=4)
  context = _tokens(rng, 6)
  generated = _tokens(rng, 7)
  setup.turn("a", context, decode=generated)
  assert len(setup.manager.block_hashes("a")) == 3  # 13 tokens computed
  assert setup.manager.num_tokens("a") == 13
  setup.manager.end("a")
  assert setup.turn("a", context + generated + [5]) == 12


def test_eviction_under_pressure_takes_the_tail_first_then_misses():
  rng = np.random.default_rng(3)
  setup = _Setup(num_blocks=8, block_size=4, max_blocks_per_seq=8)
  context_a = _tokens(rng, 16)
  setup.turn("a", context_a)
  table_a = setup.manager.block_table("a")
  hashes_a = setup.manager.block_hashes("a")
  setup.manager.end("a")
  assert setup.pool.num_cached == 4

  # 6 blocks: the 4 plain free ones, then A's last two blocks are evicted.
  setup.turn("b", _tokens(rng, 24))
  assert setup.manager.stats["evictions"] == 2
  assert [setup.pool.lookup(h) for h in hashes_a] == table_a[:2] + [None, None]
  setup.manager.end("b")
  assert setup.turn("a", context_a + [7]) == 8
  assert setup.manager.block_table("a")[:2] == table_a[:2]
  setup.manager.end("a")

  # A full-pool sequence evicts everything that is left.
  setup.turn("c", _tokens(rng, 32))
  assert setup.pool.num_cached == 8  # only c's own blocks
  setup.manager.end("c")
  assert setup.turn("a", context_a + [7]) == 0


def test_concurrent_prefill_of_one_prompt_keeps_the_first_copy():
  rng = np.random.default_rng(4)
  setup = _Setup(block_size=4)
  prompt = _tokens(rng, 9)
  assert setup.manager.begin("a", prompt) == 0
  assert setup.manager.begin("b", prompt) == 0
  setup.compute("a", prompt)
  setup.compute("b", prompt)
  table_a = setup.manager.block_table("a")
  table_b = setup.manager.block_table("b")
  assert not set(table_a) & set(table_b)
  assert setup.manager.block_hashes("a") == setup.manager.block_hashes("b")
  assert setup.pool.identity(table_b[0]) is None
  assert setup.manager.stats["registered_blocks"] == 2
  setup.manager.end("b")
  setup.manager.end("a")
  assert setup.turn("c", prompt) == 8
  assert setup.manager.block_table("c")[:2] == table_a[:2]


def test_a_prompt_begun_twice_is_computed_once():
  """n samples of one prompt are begun together: the second finds nothing
  at `begin`, then picks up every full block the first has computed."""
  rng = np.random.default_rng(11)
  setup = _Setup(block_size=4)
  prompt = _tokens(rng, 14)
  assert setup.manager.begin("a", prompt) == 0
  assert setup.manager.begin("b", prompt) == 0
  assert setup.manager.extend_cached_prefix("b") == 0  # nothing computed yet
  setup.compute("a", prompt[:6])  # one full block, half of the next
  assert setup.manager.extend_cached_prefix("b") == 4
  setup.compute("a", prompt[6:])
  assert setup.manager.extend_cached_prefix("b") == 8  # up to (14-1)//4 blocks
  assert setup.manager.num_computed("b") == 12
  assert setup.manager.block_table("b") == setup.manager.block_table("a")[:3]
  assert setup.manager.block_hashes("b") == setup.manager.block_hashes("a")[:3]
  assert [setup.pool.ref_count(b) for b in setup.manager.block_table("b")] == [
      2, 2, 2]
  assert setup.manager.stats["hit_tokens"] == 12
  setup.compute("b", prompt[12:])  # only the last, partial block
  setup.manager.end("a")
  setup.manager.end("b")
  assert setup.pool.num_referenced == 0


def test_a_prompt_of_whole_blocks_leaves_its_last_block_to_compute():
  """`extend_cached_prefix` stops short of the last token, as `begin` does:
  with a context of exactly three blocks, the third one (holding the token
  whose logits the turn needs) is not taken even though it is cached."""
  rng = np.random.default_rng(14)
  setup = _Setup(block_size=4)
  prompt = _tokens(rng, 12)
  assert setup.manager.begin("a", prompt) == 0
  assert setup.manager.begin("b", prompt) == 0
  setup.compute("a", prompt)  # all three blocks registered
  assert all(setup.pool.lookup(h) is not None
             for h in setup.manager.block_hashes("a"))
  assert setup.manager.extend_cached_prefix("b") == 8
  assert setup.manager.num_computed("b") == 8
  assert setup.manager.begin("c", prompt) == 8  # begin's own rule, the same


def test_a_block_allocated_ahead_is_given_back_for_the_cached_one():
  rng = np.random.default_rng(12)
  setup = _Setup(num_blocks=8, block_size=4)
  prompt = _tokens(rng, 9)
  setup.manager.begin("a", prompt)
  setup.manager.begin("b", prompt)
  setup.manager.allocate("b", 9)  # three pages, none written
  ahead = setup.manager.block_table("b")
  setup.compute("a", prompt)
  free_before = setup.pool.num_free
  assert setup.manager.extend_cached_prefix("b") == 8
  table = setup.manager.block_table("b")
  assert table[:2] == setup.manager.block_table("a")[:2]
  assert table[2] == ahead[2]  # the page for the last token stays
  assert setup.pool.num_free == free_before + 2  # ahead[0:2] are free again
  assert all(setup.pool.ref_count(b) == 0 for b in ahead[:2])


def test_prefix_extension_stops_at_a_partial_block_and_a_salt():
  rng = np.random.default_rng(13)
  setup = _Setup(block_size=4)
  prompt = _tokens(rng, 13)
  setup.manager.begin("a", prompt)
  setup.manager.begin("b", prompt)
  setup.manager.begin("c", prompt, tenant_salt="other")
  setup.manager.begin("d", prompt[:5] + _tokens(rng, 8))
  setup.compute("b", prompt[:2])  # b is inside a block of its own
  setup.compute("a", prompt)
  assert setup.manager.extend_cached_prefix("b") == 0
  assert setup.manager.extend_cached_prefix("c") == 0  # another tenant
  assert setup.manager.extend_cached_prefix("d") == 4  # the shared block only


def test_hits_stop_at_the_first_missing_block():
  rng = np.random.default_rng(7)
  setup = _Setup(num_blocks=8, block_size=4)
  prompt = _tokens(rng, 9)
  setup.manager.begin("a", prompt[:5])
  setup.manager.begin("b", prompt)
  setup.compute("a", prompt[:5])  # a registers block 0
  setup.compute("b", prompt)  # b's block 0 is a duplicate, its block 1 not
  hashes = setup.manager.block_hashes("b")
  setup.manager.end("a")
  # Use every free block and a's cached block 0: block 1 stays cached in b.
  setup.turn("c", _tokens(rng, 17))
  assert setup.pool.lookup(hashes[0]) is None
  assert setup.pool.lookup(hashes[1]) == setup.manager.block_table("b")[1]
  setup.manager.end("c")
  assert setup.manager.begin("d", prompt + [3]) == 0
  assert setup.manager.block_table("d") == []


def test_allocate_errors_and_can_allocate():
  rng = np.random.default_rng(5)
  setup = _Setup(num_blocks=6, block_size=4, max_blocks_per_seq=4)
  manager = setup.manager
  assert manager.max_tokens_per_seq == 16
  context_a = _tokens(rng, 3)
  manager.begin("a", context_a)
  assert manager.can_allocate("a", 16)
  assert not manager.can_allocate("a", 17)
  with pytest.raises(RequestTooLargeError, match="at most 4 blocks"):
    manager.allocate("a", 17)
  assert issubclass(RequestTooLargeError, ValueError)

  big = KVCacheManager(setup.pool, 4, FINGERPRINT, max_blocks_per_seq=100)
  big.begin("x", _tokens(rng, 3))
  with pytest.raises(RequestTooLargeError, match="pool=6 blocks"):
    big.allocate("x", 25)
  big.end("x")

  setup.compute("a", context_a + _tokens(rng, 10))  # 4 blocks held
  manager.begin("b", _tokens(rng, 5))
  assert manager.blocks_needed("b", 12) == 3
  assert not manager.can_allocate("b", 12)
  with pytest.raises(OutOfBlocksError, match="cannot allocate 3 blocks"):
    manager.allocate("b", 12)
  assert manager.block_table("b") == []
  manager.allocate("b", 8)
  manager.allocate("b", 8)  # idempotent until tokens are appended
  assert len(manager.block_table("b")) == 2
  manager.end("a")
  assert manager.can_allocate("b", 12)
  manager.allocate("b", 12)
  assert len(manager.block_table("b")) == 3


@pytest.mark.parametrize("block_size,start,n", [(4, 0, 17), (4, 5, 9),
                                                (16, 3, 40), (1, 2, 5),
                                                (8, 10, 0)])
def test_slot_mapping_matches_numpy_reference(block_size, start, n):
  rng = np.random.default_rng(block_size * 31 + start)
  num_blocks = 16
  pool = BlockPool(num_blocks)
  # Scramble the free order so block tables are not the identity.
  pool.release([int(b) for b in rng.permutation(pool.allocate(num_blocks))])
  manager = KVCacheManager(pool, block_size, FINGERPRINT, num_blocks)
  manager.begin("s", _tokens(rng, 1))
  manager.allocate("s", start + n)
  table = manager.block_table("s")
  slots = manager.slot_mapping("s", start, n)
  expected = [table[p // block_size] * block_size + p % block_size
              for p in range(start, start + n)]
  assert slots.dtype == np.int32
  assert slots.shape == (n,)
  np.testing.assert_array_equal(slots, np.asarray(expected, np.int32))
  capacity = len(table) * block_size
  with pytest.raises(ValueError, match="call allocate"):
    manager.slot_mapping("s", capacity - n, n + 1)


def test_bad_input_raises_clear_errors():
  rng = np.random.default_rng(6)
  pool = BlockPool(8)
  with pytest.raises(ValueError, match="block_size"):
    KVCacheManager(pool, 0, FINGERPRINT, 4)
  with pytest.raises(ValueError, match="max_blocks_per_seq"):
    KVCacheManager(pool, 4, FINGERPRINT, -1)
  with pytest.raises(ValueError, match="model_fingerprint"):
    KVCacheManager(pool, 4, "", 4)
  with pytest.raises(ValueError, match="BlockPool"):
    KVCacheManager(object(), 4, FINGERPRINT, 4)
  manager = KVCacheManager(pool, 4, FINGERPRINT, 4)
  context = _tokens(rng, 6)
  with pytest.raises(ValueError, match="must not be empty"):
    manager.begin("a", [])
  with pytest.raises(ValueError, match="tenant_salt"):
    manager.begin("a", context, tenant_salt=3)
  manager.begin("a", context)
  with pytest.raises(ValueError, match="already running"):
    manager.begin("a", context)
  with pytest.raises(ValueError, match="unknown sequence"):
    manager.num_computed("nope")
  with pytest.raises(ValueError, match="non-negative"):
    manager.allocate("a", -1)
  with pytest.raises(ValueError, match="call allocate"):
    manager.append_tokens("a", context)
  manager.allocate("a", 6)
  wrong = list(context)
  wrong[2] += 1
  with pytest.raises(ValueError, match="differ from the context"):
    manager.append_tokens("a", wrong)
  assert manager.num_computed("a") == 0
  manager.append_tokens("a", context)
  manager.end("a")
  with pytest.raises(ValueError, match="unknown sequence"):
    manager.end("a")


class ManagerMachine(RuleBasedStateMachine):
  """Random multi-turn sessions on a small pool, checked against a model.

  Tokens come from a 2-letter alphabet so that sessions often share prefixes.
  The fake KV array stores (salt, position, token) per slot; a prefix hit must
  read back exactly the new context's tokens under the same salt.
  """

  SESSIONS = {"s0": "tenant-a", "s1": "tenant-a", "s2": "tenant-b"}

  @initialize(num_blocks=st.integers(3, 8), block_size=st.integers(1, 3),
              max_blocks_per_seq=st.integers(2, 8))
  def setup(self, num_blocks, block_size, max_blocks_per_seq):
    self.block_size = block_size
    self.pool = BlockPool(num_blocks)
    self.manager = KVCacheManager(self.pool, block_size, FINGERPRINT,
                                  max_blocks_per_seq)
    self.limit = min(num_blocks, max_blocks_per_seq)
    self.kv = {}  # slot -> (salt, position, token)
    self.history = {s: [] for s in self.SESSIONS}  # tokens of earlier turns
    self.tokens = {}  # active session -> known tokens

  def _write(self, session, tokens):
    """Allocates and writes `tokens`; checks errors when it cannot."""
    manager = self.manager
    start = manager.num_computed(session)
    table_before = manager.block_table(session)
    total_blocks = -(-(start + len(tokens)) // self.block_size)
    needed = max(0, total_blocks - len(table_before))
    can = manager.can_allocate(session, len(tokens))
    if total_blocks > self.limit:
      assert not can
      event("request too large")
      with pytest.raises(RequestTooLargeError):
        manager.allocate(session, len(tokens))
      return False
    if needed > self.pool.num_free:
      assert not can
      event("out of blocks")
      with pytest.raises(OutOfBlocksError):
        manager.allocate(session, len(tokens))
      assert manager.block_table(session) == table_before
      return False
    assert can
    evictions_before = self.pool.stats.evictions
    manager.allocate(session, len(tokens))
    if self.pool.stats.evictions > evictions_before:
      event("eviction")
    table = manager.block_table(session)
    assert table[:len(table_before)] == table_before
    others = {b for s in self.tokens if s != session
              for b in manager.block_table(s)}
    assert not set(table[len(table_before):]) & others
    slots = manager.slot_mapping(session, start, len(tokens))
    for offset, slot in enumerate(slots.tolist()):
      assert slot // self.block_size not in others, "wrote a shared block"
      self.kv[slot] = (self.SESSIONS[session], start + offset, tokens[offset])
    manager.append_tokens(session, tokens)
    return True

  @rule(session=st.sampled_from(sorted(SESSIONS)),
        new=st.lists(st.integers(0, 1), min_size=1, max_size=5),
        fresh=st.booleans(), fork=st.sampled_from(sorted(SESSIONS)))
  def begin_turn(self, session, new, fresh, fork):
    if session in self.tokens:
      self._end(session)
    if fresh or len(self.history[session]) > 10:
      self.history[session] = []
    if fork in self.tokens and fork != session:  # a sample of its prompt
      self.history[session] = self.tokens[fork][:12]
      event("forked")
    context = self.history[session] + new
    salt = self.SESSIONS[session]
    hits = self.manager.begin(session, context, tenant_salt=salt)
    self.tokens[session] = list(context)
    event("prefix hit" if hits else "prefix miss")
    assert hits % self.block_size == 0
    assert 0 <= hits <= len(context) - 1
    assert self.manager.num_computed(session) == hits
    slots = self.manager.slot_mapping(session, 0, hits).tolist()
    assert [self.kv[s] for s in slots] == [
        (salt, p, t) for p, t in enumerate(context[:hits])]
    # The run of hits is maximal: the next full block is not cached.
    cap = (len(context) - 1) // self.block_size
    chain = hash_chain(context[:cap * self.block_size], self.block_size,
                       FINGERPRINT, salt)
    if hits // self.block_size < cap:
      assert self.pool.lookup(chain[hits // self.block_size]) is None

  @rule(data=st.data())
  def extend_prefix(self, data):
    if not self.tokens:
      return
    session = data.draw(st.sampled_from(sorted(self.tokens)))
    manager, bs = self.manager, self.block_size
    before = manager.num_computed(session)
    gained = manager.extend_cached_prefix(session)
    event("prefix extended" if gained else "prefix not extended")
    computed = manager.num_computed(session)
    assert computed == before + gained and gained % bs == 0
    tokens, salt = self.tokens[session], self.SESSIONS[session]
    if gained:
      assert before % bs == 0 and computed <= len(tokens) - 1
    slots = manager.slot_mapping(session, before, gained).tolist()
    assert [self.kv[s] for s in slots] == [
        (salt, p, t) for p, t in enumerate(tokens[before:computed], before)]
    cap = (len(tokens) - 1) // bs
    if computed % bs == 0 and computed // bs < cap:  # stopped at a miss
      chain = hash_chain(tokens[:cap * bs], bs, FINGERPRINT, salt)
      assert self.pool.lookup(chain[computed // bs]) is None

  def _prefilling(self):
    return sorted(s for s, tokens in self.tokens.items()
                  if self.manager.num_computed(s) < len(tokens))

  @rule(data=st.data(), fraction=st.floats(0.0, 1.0))
  def prefill_chunk(self, data, fraction):
    if not self._prefilling():
      return
    session = data.draw(st.sampled_from(self._prefilling()))
    start = self.manager.num_computed(session)
    context = self.tokens[session]
    n = 1 + int(fraction * (len(context) - start - 1))
    self._write(session, context[start:start + n])

  @rule(data=st.data(), token=st.integers(0, 1))
  def decode(self, data, token):
    if not self.tokens:
      return
    session = data.draw(st.sampled_from(sorted(self.tokens)))
    start = self.manager.num_computed(session)
    context = self.tokens[session]
    if start < len(context) and not self._write(session, context[start:]):
      return  # the rest of the prefill did not fit
    if self._write(session, [token]):
      self.tokens[session].append(token)

  @rule(data=st.data())
  def end_turn(self, data):
    if not self.tokens:
      return
    self._end(data.draw(st.sampled_from(sorted(self.tokens))))

  def _end(self, session):
    self.manager.end(session)
    self.history[session] = self.tokens.pop(session)

  @invariant()
  def tables_match_refcounts(self):
    if not hasattr(self, "manager"):
      return
    holders = {}
    for session in self.tokens:
      table = self.manager.block_table(session)
      assert len(set(table)) == len(table)
      for block in table:
        holders[block] = holders.get(block, 0) + 1
    for block in range(self.pool.num_blocks):
      count = self.pool.ref_count(block)
      assert count >= 0
      assert count == holders.get(block, 0)
      if count > 1:
        assert self.pool.identity(block) is not None, "unshared block shared"
    assert self.pool.num_free + len(holders) == self.pool.num_blocks
    stats = self.manager.stats
    assert stats["active_sequences"] == len(self.tokens)
    assert 0 <= stats["hit_tokens"] <= stats["query_tokens"]

  @invariant()
  def identities_follow_the_tokens(self):
    if not hasattr(self, "manager"):
      return
    for session, tokens in self.tokens.items():
      computed = self.manager.num_computed(session)
      assert self.manager.num_tokens(session) == len(tokens)
      full = computed // self.block_size
      expected = hash_chain(tokens[:full * self.block_size], self.block_size,
                            FINGERPRINT, self.SESSIONS[session])
      assert self.manager.block_hashes(session) == expected
      table = self.manager.block_table(session)
      assert len(table) * self.block_size >= computed
      for block, h in zip(table, expected):
        assert self.pool.identity(block) in (h, None)


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=100,
                                       stateful_step_count=40, deadline=None,
                                       database=None)
