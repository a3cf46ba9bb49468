"""Which blocks each sequence holds, and prefix reuse by hash chain.

The manager sits between the engine and the `BlockPool`. For each running
sequence it keeps a block table (logical block i -> pool block), the tokens
whose KV is known, how many of them are computed, and the identities of its
full blocks. The life of one turn:

  begin(seq, context)   hashes the context's full blocks and acquires the
                        longest run of them already cached; returns how many
                        tokens need no compute. At least one token is always
                        left to compute, so prefill produces the next logits.
  extend_cached_prefix(seq)
                        acquires the context's next blocks if they were
                        registered since (another sequence with the same
                        prefix computed them meanwhile): n samples of one
                        prompt admitted together compute it once.
  allocate(seq, n)      grows the block table to fit n more tokens.
  slot_mapping(seq,..)  where the engine writes the new tokens' KV.
  append_tokens(seq,..) records the written tokens; every block that became
                        full gets its identity and is registered in the pool,
                        so other sessions and later turns can find it.
  end(seq)              releases the blocks; full ones stay cached until the
                        pool evicts them, tail blocks first.

A multi-turn session calls `begin` again next turn with its whole context, and
finds its earlier full blocks by hash if they were not evicted. A partially
filled block has no identity and is freed at `end`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from dualpath_jax.cache.block_hash import (BlockHash, hash_block, loadable_chain,
                                           token_array)
from dualpath_jax.cache.block_pool import BlockPool, OutOfBlocksError
from dualpath_jax.utils import is_integer

__all__ = ["KVCacheManager", "OutOfBlocksError", "RequestTooLargeError"]


class RequestTooLargeError(ValueError):
  """A sequence needs more blocks than it may ever hold (context or pool)."""


@dataclasses.dataclass
class _Sequence:
  """Bookkeeping of one running sequence."""

  tenant_salt: str
  tokens: list[int]  # every token whose KV is or will be at positions 0..
  num_computed: int  # leading tokens whose KV is written
  block_table: list[int]  # logical block -> pool block
  block_hashes: list[BlockHash]  # identities of its leading full blocks


def _non_negative_int(value: object, name: str) -> int:
  if (not is_integer(value) or
      value < 0):
    raise ValueError(f"{name} must be a non-negative int, got {value!r}")
  return int(value)


class KVCacheManager:
  """Block tables of running sequences over one `BlockPool`.

  Args:
    pool: the pool the blocks come from. Several managers may share one pool:
      identities include the fingerprint and the salt, so they never clash.
    block_size: tokens per block.
    model_fingerprint: `ModelConfig.fingerprint()`; part of every identity.
    max_blocks_per_seq: the most blocks one sequence may hold (max context
      divided by block_size, rounded up).
  """

  def __init__(self, pool: BlockPool, block_size: int, model_fingerprint: str,
               max_blocks_per_seq: int):
    if not isinstance(pool, BlockPool):
      raise ValueError(f"pool must be a BlockPool, got {type(pool).__name__}")
    if _non_negative_int(block_size, "block_size") == 0:
      raise ValueError("block_size must be positive")
    if _non_negative_int(max_blocks_per_seq, "max_blocks_per_seq") == 0:
      raise ValueError("max_blocks_per_seq must be positive")
    if not isinstance(model_fingerprint, str) or not model_fingerprint:
      raise ValueError(
          "model_fingerprint must be a non-empty str, "
          f"got {model_fingerprint!r}")
    self.pool = pool
    self.block_size = int(block_size)
    self.model_fingerprint = model_fingerprint
    self.max_blocks_per_seq = int(max_blocks_per_seq)
    self._sequences: dict[Hashable, _Sequence] = {}
    self._lookups = 0
    self._query_tokens = 0
    self._hit_tokens = 0
    self._registered_blocks = 0

  # --- queries -------------------------------------------------------------

  @property
  def max_tokens_per_seq(self) -> int:
    """The longest sequence `allocate` can ever fit."""
    return min(self.max_blocks_per_seq, self.pool.num_blocks) * self.block_size

  def __contains__(self, seq_id: Hashable) -> bool:
    return seq_id in self._sequences

  @property
  def active_sequences(self) -> list[Hashable]:
    """Ids of the sequences begun and not yet ended."""
    return list(self._sequences)

  def block_table(self, seq_id: Hashable) -> list[int]:
    """The sequence's pool blocks, logical block order (a copy)."""
    return list(self._get(seq_id).block_table)

  def num_computed(self, seq_id: Hashable) -> int:
    """Leading tokens whose KV is in the sequence's blocks."""
    return self._get(seq_id).num_computed

  def num_tokens(self, seq_id: Hashable) -> int:
    """Tokens known for the sequence: its context plus any appended beyond."""
    return len(self._get(seq_id).tokens)

  def block_hashes(self, seq_id: Hashable) -> list[BlockHash]:
    """Identities of the sequence's full computed blocks, in order (a copy)."""
    return list(self._get(seq_id).block_hashes)

  def blocks_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
    """New pool blocks `allocate(seq_id, num_new_tokens)` would take."""
    seq = self._get(seq_id)
    num_new_tokens = _non_negative_int(num_new_tokens, "num_new_tokens")
    total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
    return max(0, total - len(seq.block_table))

  def can_allocate(self, seq_id: Hashable, num_new_tokens: int) -> bool:
    """Whether `allocate(seq_id, num_new_tokens)` would succeed now."""
    seq = self._get(seq_id)
    needed = self.blocks_needed(seq_id, num_new_tokens)
    if len(seq.block_table) + needed > self._block_limit():
      return False
    return needed <= self.pool.num_free

  def slot_mapping(self, seq_id: Hashable, start: int, n: int) -> np.ndarray:
    """Pool slots of positions start .. start+n-1.

    Returns:
      [n] int32, `block * block_size + offset`, as `kernels.write_kv` takes.
    """
    seq = self._get(seq_id)
    start = _non_negative_int(start, "start")
    n = _non_negative_int(n, "n")
    capacity = len(seq.block_table) * self.block_size
    if start + n > capacity:
      raise ValueError(
          f"positions [{start}, {start + n}) of sequence {seq_id!r} exceed its "
          f"{len(seq.block_table)} allocated blocks ({capacity} tokens); "
          "call allocate() first")
    positions = np.arange(start, start + n, dtype=np.int64)
    table = np.asarray(seq.block_table, dtype=np.int64)
    if n:
      slots = table[positions // self.block_size] * self.block_size
      slots += positions % self.block_size
    else:
      slots = positions
    return slots.astype(np.int32)

  @property
  def stats(self) -> dict[str, float]:
    """Prefix-cache counters of this manager and occupancy of its pool."""
    pool_stats = self.pool.stats
    return {
        "lookups": self._lookups,
        "query_tokens": self._query_tokens,
        "hit_tokens": self._hit_tokens,
        "hit_rate": (self._hit_tokens / self._query_tokens
                     if self._query_tokens else 0.0),
        "registered_blocks": self._registered_blocks,
        "evictions": pool_stats.evictions,
        "active_sequences": len(self._sequences),
        "blocks_referenced": self.pool.num_referenced,
        "blocks_cached": self.pool.num_cached,
        "blocks_free": self.pool.num_free,
    }

  # --- the life of a sequence ------------------------------------------------

  def begin(self, seq_id: Hashable, tokens: Sequence[int],
            tenant_salt: str = "", *, count: bool = True) -> int:
    """Starts a sequence whose context is `tokens`; reuses its cached prefix.

    Acquires the longest run of the context's full blocks found in the pool,
    covering at most len(tokens) - 1 tokens (rounded down to whole blocks), so
    at least one token is left to compute. `count=False`: a probe (the
    engine looking whether a queued turn could go ahead, and ending it if
    not) that leaves the prefix-cache counters alone; `count_lookup` counts
    it once it is kept.

    Returns:
      The number of context tokens whose KV is already cached (num_computed).
    """
    if seq_id in self._sequences:
      raise ValueError(
          f"sequence {seq_id!r} is already running; end() it first")
    context = token_array(tokens)
    if context.size == 0:
      raise ValueError(f"sequence {seq_id!r}: the context must not be empty")
    if not isinstance(tenant_salt, str):
      raise ValueError(f"tenant_salt must be a str, got {tenant_salt!r}")
    candidates = loadable_chain(context, context.size, self.block_size,
                                self.model_fingerprint, tenant_salt)
    hits: list[int] = []
    for h in candidates:
      block = self.pool.lookup(h)
      if block is None:
        break
      hits.append(block)
    for block in hits:
      self.pool.acquire(block)
    num_cached = len(hits) * self.block_size
    self._sequences[seq_id] = _Sequence(
        tenant_salt=tenant_salt,
        tokens=context.tolist(),
        num_computed=num_cached,
        block_table=hits,
        block_hashes=candidates[:len(hits)],
    )
    if count:
      self.count_lookup(int(context.size), num_cached)
    return num_cached

  def count_lookup(self, query_tokens: int, hit_tokens: int) -> None:
    """Counts one prefix lookup (`begin`'s counters): of a `begin(count=False)`
    probe that was kept, so probes that were not do not dilute the hit
    rate."""
    self._lookups += 1
    self._query_tokens += query_tokens
    self._hit_tokens += hit_tokens

  def extend_cached_prefix(self, seq_id: Hashable) -> int:
    """Acquires the context's blocks registered after `begin` looked.

    `begin` finds only the blocks cached when it runs. Sequences sharing a
    prefix that are begun together (the n samples of one prompt, agents
    forked from one history) would each compute it; called before each
    prefill chunk, this lets a later one pick up what an earlier one has
    registered meanwhile. It extends only a sequence whose computed tokens
    end on a block boundary, through the blocks of its known tokens but the
    last token (one is always left to compute, as in `begin`). A block
    allocated there and not yet written is given back for the cached one.

    Returns:
      How many tokens it added to num_computed (a multiple of block_size).
    """
    seq = self._get(seq_id)
    bs = self.block_size
    if seq.num_computed != len(seq.block_hashes) * bs:
      return 0  # a partial block is computed: the chain cannot continue
    limit = (len(seq.tokens) - 1) // bs
    gained = 0
    for index in range(len(seq.block_hashes), limit):
      parent = seq.block_hashes[-1] if seq.block_hashes else None
      h = hash_block(parent, seq.tokens[index * bs:(index + 1) * bs],
                     self.model_fingerprint, seq.tenant_salt)
      block = self.pool.lookup(h)
      if block is None:
        break
      self.pool.acquire(block)
      if index < len(seq.block_table):  # allocated ahead, nothing written
        self.pool.release([seq.block_table[index]])
        seq.block_table[index] = block
      else:
        seq.block_table.append(block)
      seq.block_hashes.append(h)
      seq.num_computed += bs
      gained += bs
    self._hit_tokens += gained
    return gained

  def allocate(self, seq_id: Hashable, num_new_tokens: int) -> None:
    """Grows the block table so num_computed + num_new_tokens tokens fit.

    Raises:
      RequestTooLargeError: the sequence would need more than
        max_blocks_per_seq blocks or more than the whole pool.
      OutOfBlocksError: the pool cannot provide the blocks now (retry after
        other sequences end); the table is unchanged.
    """
    seq = self._get(seq_id)
    needed = self.blocks_needed(seq_id, num_new_tokens)
    total = len(seq.block_table) + needed
    limit = self._block_limit()
    if total > limit:
      raise RequestTooLargeError(
          f"sequence {seq_id!r} needs {total} blocks for "
          f"{seq.num_computed + num_new_tokens} tokens, but one sequence may "
          f"hold at most {limit} blocks ({limit * self.block_size} tokens; "
          f"max_blocks_per_seq={self.max_blocks_per_seq}, "
          f"pool={self.pool.num_blocks} blocks)")
    if needed:
      seq.block_table.extend(self.pool.allocate(needed))

  def append_tokens(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
    """Records that `tokens` now have KV at positions num_computed.. onward.

    Tokens inside the context given to `begin` must match it; tokens beyond
    it (generated ones) extend the known tokens. Every block that became full
    gets its identity, chained from the previous full block, and is
    registered in the pool.
    """
    seq = self._get(seq_id)
    new = token_array(tokens)
    start = seq.num_computed
    end = start + int(new.size)
    capacity = len(seq.block_table) * self.block_size
    if end > capacity:
      raise ValueError(
          f"sequence {seq_id!r}: {end} computed tokens do not fit its "
          f"{len(seq.block_table)} blocks ({capacity} tokens); call allocate() "
          "first")
    overlap_end = min(end, len(seq.tokens))
    if overlap_end > start:
      expected = np.asarray(seq.tokens[start:overlap_end], dtype=np.int64)
      if not np.array_equal(new[:overlap_end - start], expected):
        raise ValueError(
            f"sequence {seq_id!r}: tokens appended at positions "
            f"[{start}, {overlap_end}) differ from the context given to "
            "begin()")
    if end > len(seq.tokens):
      seq.tokens.extend(new[len(seq.tokens) - start:].tolist())
    seq.num_computed = end
    self._register_full_blocks(seq)

  def end(self, seq_id: Hashable, keep_cached: bool = True) -> None:
    """Releases the sequence's blocks; full ones stay cached until evicted.

    With `keep_cached=False` its blocks no other sequence holds are freed
    at once, identities dropped (a prefill engine that keeps no prefix
    between turns).

    Blocks are released last-first, so under pressure the pool evicts a
    sequence's tail before its prefix (a prefix is useless without its
    head, and shared prefixes are the most valuable blocks).
    """
    seq = self._get(seq_id)
    del self._sequences[seq_id]
    self.pool.release(reversed(seq.block_table), keep_cached)

  # --- internals -------------------------------------------------------------

  def _register_full_blocks(self, seq: _Sequence) -> None:
    for index in range(len(seq.block_hashes),
                       seq.num_computed // self.block_size):
      parent = seq.block_hashes[-1] if seq.block_hashes else None
      block_tokens = seq.tokens[index * self.block_size:
                                (index + 1) * self.block_size]
      h = hash_block(parent, block_tokens, self.model_fingerprint,
                     seq.tenant_salt)
      block = seq.block_table[index]
      if self.pool.register(block, h) == block:
        self._registered_blocks += 1
      seq.block_hashes.append(h)

  def _block_limit(self) -> int:
    return min(self.max_blocks_per_seq, self.pool.num_blocks)

  def _get(self, seq_id: Hashable) -> _Sequence:
    try:
      return self._sequences[seq_id]
    except (KeyError, TypeError):
      raise ValueError(
          f"unknown sequence {seq_id!r}; call begin() first") from None
