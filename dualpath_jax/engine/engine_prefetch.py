"""One engine's prefetcher: cold tier -> its hot tier, while its reader idles.

One engine serving prefill and decode, with a hot tier in front of a cold
tier, reads a turn's missing prefix when the turn heads the queue
(`ColdTierConnector.start_load`). The turns behind it, and the sessions
away between turns, wait for those reads only when their own time comes.
This prefetcher reads their blocks into the hot tier before then, on the
connector's reader thread whenever it has no turn's read to make, so that
a turn heading the queue finds its prefix hot and its load is a host copy,
not a storage read. It is the P/D cluster's prefetcher
(`engine.prefetch.TierPrefetcher`, which says what it reads for, in which
order, and how it pins) with the engine as its only prefill engine:

* **the NIC** is the reader thread. It is idle when no turn read, and no
  dropped one, is queued or running on it (`ColdTierConnector.reader_busy`)
  and the emulated storage NIC, if any, has no backlog. Reads are FIFO on
  that thread, so a turn's load waits behind at most one prefetch read of
  `batch_blocks` blocks;
* **the pins** are the prefetcher's own (`HotTier.set_pins(owner=)`): the
  load's pins of the hot run in front of its cold read stay as they are.

The engine drives it: `Engine.step` installs finished reads before it
admits, then steps it with the waiting turns (all but a head whose load has
started); `Engine.prefetch_pending` tells a driver with no turn to submit
to keep stepping while reads go on.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Sequence

from dualpath_jax.cache.prefetcher import ReturnPredictor
from dualpath_jax.engine.cold_tier import ColdTierConnector, count_store_error
from dualpath_jax.engine.prefetch import TierPrefetcher, session_key

ENGINE = "engine"  # the engine's name as the prefetcher's only PE and NIC


class _ConnectorReads:
  """The prefetcher's loader: reads on the connector's reader thread."""

  def __init__(self, connector: ColdTierConnector):
    self._connector = connector
    self.block_bytes = connector.block_bytes

  def read_blocks_async(self, ids: Sequence[bytes], nic: str) -> cf.Future:
    del nic  # one reader
    return self._connector.read_blocks_async(list(ids))


class _ReaderAsNic:
  """The reader thread as the NIC the prefetcher checks for a backlog."""

  def __init__(self, connector: ColdTierConnector):
    self._connector = connector

  def backlog_bytes(self) -> float:
    if self._connector.reader_busy():
      return float(self._connector.block_bytes)  # some: it is not idle
    nic = self._connector.nic
    return 0.0 if nic is None else nic.backlog_bytes()


class _EngineAsPrefillEngine:
  """The engine as the prefetcher's one prefill engine."""

  name = ENGINE

  def __init__(self, connector: ColdTierConnector, manager):
    self.hot_tier = connector.hot
    self.manager = manager

  def queued_tokens(self) -> int:
    return 0  # one engine: nothing to weigh it against


class EnginePrefetcher:
  """A `TierPrefetcher` over one engine's connector; see the module docstring.

  Args:
    connector: the engine's `ColdTierConnector`, with a hot and a cold tier.
    manager: the engine's `KVCacheManager` (whose pool the prefetcher looks
      in: blocks running turns hold there are not read).
    batch_blocks, max_candidates, pin_fraction, predictor: as
      `TierPrefetcher`'s.
  """

  def __init__(self, connector: ColdTierConnector, manager, *,
               batch_blocks: int = 4, max_candidates: int = 8,
               pin_fraction: float = 0.5,
               predictor: ReturnPredictor | None = None):
    if connector.hot is None or connector.store is None:
      raise ValueError("prefetching needs a hot tier (where prefetched "
                       "blocks go) and a cold tier (where they come from)")
    self.prefetcher = TierPrefetcher(
        _ConnectorReads(connector), connector.store,
        [_EngineAsPrefillEngine(connector, manager)], [],
        {ENGINE: _ReaderAsNic(connector)}, batch_blocks=batch_blocks,
        max_candidates=max_candidates, pin_fraction=pin_fraction,
        predictor=predictor,
        on_store_error=lambda what, err: count_store_error(
            connector.stats, what, err))
    connector.prefetcher = self

  @property
  def max_candidates(self) -> int:
    return self.prefetcher.max_candidates

  def turn_arrived(self, req, now: float) -> None:
    if req.session_id:
      self.prefetcher.turn_arrived(session_key(req), now)

  def turn_finished(self, req, now: float, chain: Sequence[bytes]) -> None:
    """`req`'s turn ended at `now`; `chain`: its sequence's full blocks."""
    if req.session_id:
      self.prefetcher.turn_finished(session_key(req), now, chain, ENGINE)

  def note_hot_read(self, ids: Sequence[bytes]) -> None:
    """A load read `ids` from the hot tier (the prefetcher's hits)."""
    self.prefetcher.note_hot_read(ENGINE, ids)

  def forget(self, ids: Sequence[bytes]) -> None:
    """`ids` were dropped from the memory tiers (`Engine.forget_blocks`):
    reads still out do not put them back, and the prefetcher stops
    following them (`TierPrefetcher.forget`)."""
    self.prefetcher.forget(ids)

  def install_done(self) -> None:
    self.prefetcher.install_done()

  def step(self, waiting: Sequence[tuple[object, Sequence[bytes]]],
           now: float) -> None:
    """Pins and reads for `waiting` ((request, chain) of each turn queued,
    first come first) and then the sessions away."""
    self.prefetcher.step([(session_key(req), chain) for req, chain in waiting],
                         now)

  def in_flight(self) -> list[cf.Future]:
    return self.prefetcher.in_flight()

  def pending(self) -> bool:
    return self.prefetcher.pending()

  def counts(self) -> dict[str, int]:
    return self.prefetcher.counts()

  def report(self) -> dict:
    return self.prefetcher.report()

  def close(self) -> None:
    self.prefetcher.close()
