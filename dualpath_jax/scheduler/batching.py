"""Intra-engine batch choice: which waiting turns join the next prefill batch.

A prefill engine keeps a queue of placed turns. Their hit blocks arrive at
different times (each has its own NIC queues), so strict FIFO would let a
turn still loading block ready turns behind it. The rule here:

1. only turns whose loads are done by `now` (`load_ready_s <= now`) are
   candidates; a turn still loading keeps its place in the queue;
2. candidates join in arrival order (ties: turn id) while the batch stays
   within `max_batch_tokens` new tokens and `max_batch_turns` turns;
3. a candidate that does not fit is skipped (a smaller later one may fit),
   but the first candidate always joins even if it alone exceeds the token
   budget (the engine chunks its prefill). So a long turn never starves: once
   the turns ahead of it have run, it is first.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence


def _is_number(value) -> bool:
  """A real number (numpy scalars included), not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class WaitingTurn:
  """A placed turn waiting on a prefill engine.

  Attributes:
    turn_id: unique id.
    arrival_s: when it was placed on this engine.
    new_tokens: tokens its prefill computes.
    load_ready_s: when its hit blocks are all on the engine (the transfer's
      completion time, or the placement's estimate before it completes).
  """

  turn_id: str
  arrival_s: float
  new_tokens: int
  load_ready_s: float = -math.inf

  def __post_init__(self):
    # NaN compares false with everything: a NaN load_ready_s would never be
    # ready (the turn starves), a NaN new_tokens would make every later
    # turn fit the token budget, a NaN arrival_s would scramble the order.
    if not _is_number(self.new_tokens) or not 0 <= self.new_tokens < math.inf:
      raise ValueError(f"{self.turn_id}: new_tokens must be a finite number "
                       f">= 0, got {self.new_tokens!r}")
    for name in ("arrival_s", "load_ready_s"):
      value = getattr(self, name)
      if not _is_number(value) or math.isnan(value):
        raise ValueError(f"{self.turn_id}: {name} must be a number (not "
                         f"NaN), got {value!r}")


def choose_prefill_batch(waiting: Sequence[WaitingTurn], now_s: float, *,
                         max_batch_tokens: int,
                         max_batch_turns: int) -> list[str]:
  """Ids of the turns that join the next prefill batch, in batch order."""
  if not _is_number(max_batch_tokens) or not max_batch_tokens > 0:
    raise ValueError("max_batch_tokens must be positive (inf: no limit), "
                     f"got {max_batch_tokens!r}")
  if (not isinstance(max_batch_turns, numbers.Integral) or
      isinstance(max_batch_turns, bool) or max_batch_turns <= 0):
    raise ValueError("max_batch_turns must be a positive int, "
                     f"got {max_batch_turns!r}")
  if not _is_number(now_s) or math.isnan(now_s):
    raise ValueError(f"now_s must be a number (not NaN), got {now_s!r}")
  ids = [w.turn_id for w in waiting]
  if len(set(ids)) != len(ids):
    raise ValueError(f"duplicate turn ids in the waiting queue: {ids}")
  ready = [w for w in waiting if w.load_ready_s <= now_s]
  ready.sort(key=lambda w: (w.arrival_s, w.turn_id))
  batch: list[str] = []
  tokens = 0
  for w in ready:
    if len(batch) == max_batch_turns:
      break
    if batch and tokens + w.new_tokens > max_batch_tokens:
      continue  # a smaller later turn may still fit
    batch.append(w.turn_id)
    tokens += w.new_tokens
  return batch
