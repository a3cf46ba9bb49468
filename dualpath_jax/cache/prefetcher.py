"""When each agent session comes back, and so which blocks to fetch first.

An agent session alternates between a turn on the engines and a wait
outside them: a tool call, the agent's own code, a user. Its next turn
reads the whole context again. When the hot tier could not keep that
context, it is in the cold tier, behind a storage NIC, and the turn would
wait for those reads after it arrives. A prefetcher reads it back into the
hot tier before then, on a NIC with nothing else to do
(`engine.prefetch.TierPrefetcher`, on the P/D cluster or one engine).

What to read first is a prediction of who returns first. `ReturnPredictor`
learns, per session, the gap between the end of a turn and the arrival of
the next (an exponential moving average), and lists the sessions that are
away by predicted return, soonest first. A session with no gap of its own
yet takes the median of the recent gaps of all sessions (`prior_gap_s`
before any). A session overdue by `expire_factor` times its gap is taken
to have ended (an agent's last turn has no next one) and dropped, so it
does not head the list for ever; if it comes back after all, that gap
is learnt as any other.

Why per session and not per token: attention here is exact, so a returning
turn reads every block of its prefix, whatever weight attention gave each
one last time; what decides which blocks are worth host memory is when
their session comes back (docs/hot_tier.md).

`pin_prefixes` and `blocks_to_read` are the rest of the plan, shared by
the P/D cluster's prefetcher and the simulator's: which blocks a tier keeps
for the predicted turns, and which of them one read asks for.

Pure Python, no JAX; the caller passes the times. Block ids are any
hashable (the runtime's digests, the simulator's (session, index) keys).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Callable, Collection, Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class AwaySession:
  """A session between turns, and what its next turn will read."""

  session_id: Hashable  # the caller's key (the cluster's: tenant and id)
  chain: tuple[Hashable, ...]  # its context's full blocks, shallowest first
  engine: str  # the prefill engine whose hot tier its blocks went to
  finished_s: float  # when its last turn ended
  due_s: float  # predicted arrival of its next turn


class ReturnPredictor:
  """Predicts each away session's next arrival from its past gaps.

  Args:
    prior_gap_s: the gap assumed before any has been seen.
    smoothing: weight of the newest gap in a session's moving average.
    expire_factor: a session not back after this many times its predicted
      gap is taken to have ended.
    max_sessions: sessions remembered (the least recently active are
      forgotten first), so a long-running server's memory stays bounded.
    history: recent gaps, of all sessions, whose median a new session takes.
  """

  def __init__(self, *, prior_gap_s: float = 1.0, smoothing: float = 0.5,
               expire_factor: float = 4.0, max_sessions: int = 4096,
               history: int = 256):
    if not prior_gap_s >= 0:
      raise ValueError(f"prior_gap_s must be >= 0, got {prior_gap_s!r}")
    if not 0 < smoothing <= 1:
      raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
    if not expire_factor > 1:
      raise ValueError(f"expire_factor must be > 1, got {expire_factor!r}")
    if max_sessions < 1 or history < 1:
      raise ValueError("max_sessions and history must be >= 1")
    self.prior_gap_s = float(prior_gap_s)
    self.smoothing = float(smoothing)
    self.expire_factor = float(expire_factor)
    self.max_sessions = int(max_sessions)
    self._gaps: collections.deque[float] = collections.deque(maxlen=history)
    # session -> its gap's moving average; least recently active first.
    self._gap: collections.OrderedDict[str, float] = collections.OrderedDict()
    self._away: collections.OrderedDict[str, AwaySession] = (
        collections.OrderedDict())
    self._engine: collections.OrderedDict[str, str] = collections.OrderedDict()
    # session -> when its last turn ended, for those dropped as ended: one
    # that comes back after all still teaches its (long) gap, else a session
    # whose gaps grew past `expire_factor` times its average never would.
    self._ended: collections.OrderedDict[str, float] = (
        collections.OrderedDict())
    self.expired = 0  # sessions dropped as ended

  def gap_s(self, session_id: Hashable) -> float:
    """The session's predicted gap between a turn's end and the next."""
    gap = self._gap.get(session_id)
    if gap is not None:
      return gap
    return statistics.median(self._gaps) if self._gaps else self.prior_gap_s

  def last_engine(self, session_id: Hashable) -> str | None:
    """The prefill engine of the session's last finished turn, if known."""
    return self._engine.get(session_id)

  def finished(self, session_id: Hashable, now: float,
               chain: Sequence[Hashable],
               engine: str) -> None:
    """The session's turn ended at `now`; its context is `chain`, kept on
    `engine` (whose hot tier the blocks went to)."""
    self._away.pop(session_id, None)
    self._ended.pop(session_id, None)
    self._away[session_id] = AwaySession(
        session_id, tuple(chain), engine, now, now + self.gap_s(session_id))
    self._remember(self._engine, session_id, engine)
    while len(self._away) > self.max_sessions:
      self._away.popitem(last=False)

  def arrived(self, session_id: Hashable, now: float) -> None:
    """The session's next turn arrived at `now`: learns its gap."""
    away = self._away.pop(session_id, None)
    finished_s = (self._ended.pop(session_id, None) if away is None
                  else away.finished_s)
    if finished_s is None:
      return
    gap = max(0.0, now - finished_s)
    self._gaps.append(gap)
    old = self._gap.get(session_id)
    self._remember(self._gap, session_id, gap if old is None else
                   self.smoothing * gap + (1 - self.smoothing) * old)

  def forget(self, ids: Collection[Hashable]) -> None:
    """`ids` are gone from every tier (a deleted session's blocks): each
    away session's chain is cut before the first of them (a prefix is of
    use only up to its first missing block), and a session left with
    nothing to read is dropped from the list."""
    ids = set(ids)
    for session_id, a in list(self._away.items()):
      cut = next((k for k, i in enumerate(a.chain) if i in ids), None)
      if cut is None:
        continue
      if cut == 0:
        del self._away[session_id]
      else:
        self._away[session_id] = dataclasses.replace(a, chain=a.chain[:cut])

  def away(self, now: float) -> list[AwaySession]:
    """Sessions between turns, soonest predicted return first; drops those
    overdue past `expire_factor` times their gap (ended)."""
    out = []
    for session_id, a in list(self._away.items()):
      gap = max(a.due_s - a.finished_s, 1e-3)
      if now > a.finished_s + self.expire_factor * gap:
        del self._away[session_id]
        self._remember(self._ended, session_id, a.finished_s)
        self.expired += 1
        continue
      out.append(a)
    out.sort(key=lambda a: a.due_s)
    return out

  def _remember(self, table: collections.OrderedDict, key: str,
                value) -> None:
    table.pop(key, None)
    table[key] = value
    while len(table) > self.max_sessions:
      table.popitem(last=False)


def pin_prefixes(chains: Sequence[Sequence[Hashable]],
                 budget: int) -> list[Hashable]:
  """The blocks to pin in one tier: the `chains` (soonest turn first, each
  shallowest block first) taken in order, at most `budget` blocks. A prefix
  is of use only up to its first missing block, so a chain that does not
  fit keeps its head."""
  pins: list[Hashable] = []
  for chain in chains:
    if len(pins) >= budget:
      break
    pins.extend(chain[:budget - len(pins)])
  return pins


def blocks_to_read(chain: Sequence[Hashable], start: int,
                   pinned: Callable[[Hashable], bool],
                   have: Callable[[Hashable], bool],
                   limit: int) -> list[Hashable]:
  """Up to `limit` blocks of `chain`, from `start`, for one prefetch read:
  those `have` says are missing (not held, not being read). Stops at the
  first block not `pinned` (past the pin budget, or one a read failed on):
  a block read there would not stay, or would be of no use."""
  want: list[Hashable] = []
  for block_id in chain[start:]:
    if not pinned(block_id):
      break
    if not have(block_id):
      want.append(block_id)
      if len(want) == limit:
        break
  return want
