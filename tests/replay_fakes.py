"""Stand-ins for driving `workload.replay.replay_sessions` on a fake clock.

Tests of the replay loop's own logic (idle waits, sleeps, stepping) need
an engine that finishes turns at once and a session whose gaps they
choose, not a model.
"""

from __future__ import annotations

from dualpath_jax.engine.request import TurnOutput
from dualpath_jax.workload import AgentSession, AgentTurn


class InstantEngine:
  """Each `step` finishes the first queued turn with one token, at the
  fake clock's time `now[0]`."""

  config = type("Config", (), {"max_context": 4096})()

  def __init__(self, now: list[float]):
    self.now = now
    self.queue = []

  def submit(self, req) -> None:
    self.queue.append(req)

  def has_work(self) -> bool:
    return bool(self.queue)

  def step(self) -> list[TurnOutput]:
    req = self.queue.pop(0)
    t = self.now[0]
    return [TurnOutput(request=req, generated_tokens=[5],
                       cached_prompt_tokens=0, arrival_s=t, first_token_s=t,
                       finish_s=t, finish_reason="length")]


def two_turn_session(gap_ms: float) -> AgentSession:
  """One session of two one-token turns, `gap_ms` of tool wait between."""
  return AgentSession(session_id="s", system_prompt="sys", tenant="t",
                      turns=[AgentTurn(index=j, input_delta=[
                          {"role": "user", "content": "go"}], output_tokens=1,
                          pre_gap_ms=0 if j == 0 else gap_ms)
                             for j in range(2)])
