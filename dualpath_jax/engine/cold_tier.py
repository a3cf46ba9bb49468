"""The engine's side of the cold tier: load missing prefix blocks, write back.

At admission, after the pool's own prefix hit, `load_prefix` looks up the
next blocks of the context in the cold tier (`storage.BlockStore`), reads the
longest run that is there and verified, writes them into freshly allocated
pages and marks them computed, so prefill starts after them. A block that is
missing, torn or corrupt ends the run: it and everything after it are
recomputed (the store counts and logs the bad block).

When a turn finishes, `write_back` copies the sequence's full blocks that
the store does not hold yet to the host and hands them to the store's write
pool (`put_async`): the engine does not wait for the disk.

Loading is synchronous here (one engine, one device): the DualPath transfer
layer overlaps it with prefill, layer by layer.

The cold tier is a cache: when the store fails (its disk is full, its
index cannot be read), a load is a miss and a write-back is skipped, with
the error logged and counted (`store_errors`); the engine serves on.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging

import jax

from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.engine import pool_io
from dualpath_jax.transfer.source import StagingRows

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ColdTierStats:
  lookups: int = 0
  loaded_blocks: int = 0
  loaded_tokens: int = 0
  missed_blocks: int = 0  # listed by contains() but unreadable
  written_blocks: int = 0
  write_requests: int = 0
  store_errors: int = 0  # store calls that raised: loads missed, writes skipped

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def count_store_error(stats: ColdTierStats, what: str,
                      err: BaseException) -> None:
  """Logs and counts (`stats.store_errors`) a store call that raised and
  was served without (a miss, a skipped write-back): the engine's and the
  P/D cluster's."""
  stats.store_errors += 1
  _log.error("cold tier %s failed, served without it: %s: %s", what,
             type(err).__name__, err)


class ColdTierConnector:
  """Moves whole blocks between the engine's pool and a `BlockStore`."""

  def __init__(self, store, manager: KVCacheManager):
    self.store = store
    self.manager = manager
    self.stats = ColdTierStats()
    # Reads land in one reused host buffer (`get(out=)`).
    self._staging = StagingRows(store.block_shape, store.codec.dtype)

  def load_prefix(self, pool: jax.Array, seq_id: str, tokens: list[int],
                  tenant: str) -> tuple[jax.Array, int]:
    """Loads the blocks after the pool hit; returns (pool, tokens loaded).

    `seq_id` must have been `begin`-ed with `tokens`. Loads at most what
    leaves one token to compute, and only as many blocks as the pool can
    give now.
    """
    bs = self.manager.block_size
    computed = self.manager.num_computed(seq_id)
    cap = (len(tokens) - 1) // bs
    have = computed // bs
    if cap <= have:
      return pool, 0
    self.stats.lookups += 1
    chain = hash_chain(tokens[:cap * bs], bs, self.manager.model_fingerprint,
                       tenant)
    wanted = chain[have:]
    try:
      present = self.store.contains(wanted)
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.stats, "lookup", err)
      return pool, 0
    run = next((i for i, p in enumerate(present) if not p), len(wanted))
    if run == 0:
      return pool, 0
    while run and not self.manager.can_allocate(seq_id, run * bs):
      run -= 1
    if run == 0:
      return pool, 0
    staging = self._staging.rows(run)
    try:
      blocks = self.store.get(wanted[:run], out=staging)
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.stats, "read", err)
      return pool, 0
    good = next((i for i, b in enumerate(blocks) if b is None), run)
    self.stats.missed_blocks += run - good
    if good == 0:
      return pool, 0
    self.manager.allocate(seq_id, good * bs)
    table = self.manager.block_table(seq_id)
    pages = table[have:have + good]
    pool = pool_io.write_blocks(pool, pages, staging[:good])  # copies it
    self.manager.append_tokens(seq_id, tokens[computed:(have + good) * bs])
    self.stats.loaded_blocks += good
    self.stats.loaded_tokens += (have + good) * bs - computed
    return pool, (have + good) * bs - computed

  def write_back(self, pool: jax.Array, seq_id: str, tenant: str,
                 session: str) -> None:
    """Queues the sequence's full blocks that the store lacks for writing."""
    hashes = self.manager.block_hashes(seq_id)
    if not hashes:
      return
    table = self.manager.block_table(seq_id)
    try:
      present = self.store.contains(hashes)
    except Exception as err:  # pylint: disable=broad-except
      count_store_error(self.stats, "lookup", err)
      return
    todo = [i for i, p in enumerate(present) if not p]
    if not todo:
      return
    blocks = pool_io.read_blocks(pool, [table[i] for i in todo])
    future = self.store.put_async([hashes[i] for i in todo], blocks,
                                  tenant=tenant, session=session)
    future.add_done_callback(self._check_put)
    self.stats.write_requests += 1
    self.stats.written_blocks += len(todo)

  def _check_put(self, future: cf.Future) -> None:
    """A write-back's put that raised is logged and counted, not lost."""
    if not future.cancelled() and future.exception() is not None:
      count_store_error(self.stats, "write", future.exception())
