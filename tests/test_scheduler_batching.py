"""Tests of the intra-engine prefill batch choice."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax.scheduler import WaitingTurn, choose_prefill_batch


def test_loading_turn_does_not_block_ready_turns_behind_it():
  waiting = [WaitingTurn("a", 0.0, 100, load_ready_s=5.0),
             WaitingTurn("b", 1.0, 100, load_ready_s=2.0),
             WaitingTurn("c", 2.0, 100)]
  assert choose_prefill_batch(waiting, 3.0, max_batch_tokens=1000,
                              max_batch_turns=8) == ["b", "c"]
  assert choose_prefill_batch(waiting, 5.0, max_batch_tokens=1000,
                              max_batch_turns=8) == ["a", "b", "c"]


def test_token_and_turn_budgets():
  waiting = [WaitingTurn("a", 0.0, 300), WaitingTurn("b", 1.0, 800),
             WaitingTurn("c", 2.0, 200), WaitingTurn("d", 3.0, 100)]
  assert choose_prefill_batch(waiting, 9.0, max_batch_tokens=600,
                              max_batch_turns=8) == ["a", "c", "d"]
  assert choose_prefill_batch(waiting, 9.0, max_batch_tokens=600,
                              max_batch_turns=2) == ["a", "c"]


def test_oversized_first_turn_still_runs_alone():
  waiting = [WaitingTurn("long", 0.0, 5000), WaitingTurn("short", 1.0, 10)]
  assert choose_prefill_batch(waiting, 1.0, max_batch_tokens=512,
                              max_batch_turns=4) == ["long"]


def test_skipped_long_turn_runs_once_the_turns_ahead_have_run():
  waiting = [WaitingTurn("short0", 0.0, 200), WaitingTurn("long", 1.0, 900),
             WaitingTurn("short1", 2.0, 100)]
  kwargs = dict(max_batch_tokens=1000, max_batch_turns=8)
  first = choose_prefill_batch(waiting, 5.0, **kwargs)
  assert first == ["short0", "short1"]
  waiting = [w for w in waiting if w.turn_id not in first]
  waiting.append(WaitingTurn("short2", 6.0, 50))
  assert choose_prefill_batch(waiting, 7.0, **kwargs) == ["long", "short2"]


def test_bad_arguments():
  with pytest.raises(ValueError, match="positive"):
    choose_prefill_batch([], 0.0, max_batch_tokens=0, max_batch_turns=1)
  with pytest.raises(ValueError, match="duplicate"):
    choose_prefill_batch([WaitingTurn("a", 0, 1), WaitingTurn("a", 1, 1)], 0.0,
                         max_batch_tokens=10, max_batch_turns=2)
  with pytest.raises(ValueError, match="new_tokens"):
    WaitingTurn("a", 0.0, -1)


@st.composite
def _queues(draw):
  n = draw(st.integers(0, 12))
  return [WaitingTurn(f"t{i}", draw(st.floats(0, 50)), draw(st.integers(0, 900)),
                      draw(st.sampled_from([-math.inf, 10.0, 30.0, 60.0])))
          for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(_queues(), st.floats(0, 100), st.integers(1, 2000), st.integers(1, 6))
def test_batch_properties(waiting, now, max_tokens, max_turns):
  batch = choose_prefill_batch(waiting, now, max_batch_tokens=max_tokens,
                               max_batch_turns=max_turns)
  by_id = {w.turn_id: w for w in waiting}
  ready = [w for w in waiting if w.load_ready_s <= now]
  assert len(set(batch)) == len(batch) <= max_turns
  assert all(by_id[t].load_ready_s <= now for t in batch)
  tokens = sum(by_id[t].new_tokens for t in batch)
  assert tokens <= max_tokens or len(batch) == 1
  assert bool(batch) == bool(ready)  # work conserving
  # Maximal: no ready turn left out would still fit in both budgets.
  if len(batch) < max_turns:
    left = [w for w in ready if w.turn_id not in batch]
    assert all(tokens + w.new_tokens > max_tokens for w in left)
  # Arrival order, and the oldest ready turn always runs.
  arrivals = [by_id[t].arrival_s for t in batch]
  assert arrivals == sorted(arrivals)
  if ready:
    assert batch[0] == min(ready, key=lambda w: (w.arrival_s, w.turn_id)).turn_id
