"""Agent sessions as the simulator sees them: token counts, no text.

A `SimSession` is a list of `SimTurn`s. Turn `i` appends `append_tokens`
to the context (the user's message, a tool's output; for turn 0 the system
prompt and the task), the model then generates `output_tokens`, and the
agent waits `gap_s` (its tool) before turn `i + 1` arrives. The context turn
`i` prefills is everything before it: every earlier append and output plus
its own append.

Between turns the cache lives in storage: the simulator treats the full
blocks of a turn's prompt and output (all but the last generated token,
whose KV is never computed) as stored when the turn ends, so the next turn
loads them and computes only the rest (`hit_tokens`).

Two sources:

* `synthetic_sessions`: the regime DualPath targets, long contexts that
  grow a little each turn (defaults in docs/simulator.md: 16k tokens of
  system prompt and task, then about 800 tokens appended and 200 generated
  a turn), seeded;
* `sessions_from_trace`: an `abench-session-jsonl-v1` trace
  (`workload.trace`), counting tokens with a given tokenizer, or taking the
  recorded `input_tokens` where every turn of a session has them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from dualpath_jax.workload.trace import AgentSession

# Chat-template tokens around one message (role header, end marker): the
# ChatML / Llama-3 templates add 4-5.
MESSAGE_OVERHEAD_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class SimTurn:
  """One LLM call of a simulated agent: tokens in, tokens out, tool wait."""

  append_tokens: int
  output_tokens: int
  gap_s: float = 0.0  # wait before this turn, after the previous one ends

  def __post_init__(self):
    for name in ("append_tokens", "output_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if self.output_tokens < 1:
      raise ValueError("a turn generates at least one token, got "
                       f"output_tokens={self.output_tokens}")
    if not (isinstance(self.gap_s, (int, float)) and math.isfinite(self.gap_s)
            and self.gap_s >= 0):
      raise ValueError(f"gap_s must be a finite number >= 0, got {self.gap_s!r}")


@dataclasses.dataclass(frozen=True)
class SimSession:
  """An agent: its turns run one after another.

  `stored_tokens`: leading tokens of the first turn's context already in
  storage when the session starts (an agent resumed from an earlier run,
  a prompt shared with earlier sessions); 0 for a new agent.
  """

  session_id: str
  turns: tuple[SimTurn, ...]
  stored_tokens: int = 0

  def __post_init__(self):
    object.__setattr__(self, "turns", tuple(self.turns))
    if (isinstance(self.stored_tokens, bool) or
        not isinstance(self.stored_tokens, int) or self.stored_tokens < 0):
      raise ValueError(f"session {self.session_id!r}: stored_tokens must be "
                       f"an int >= 0, got {self.stored_tokens!r}")
    if not self.turns:
      raise ValueError(f"session {self.session_id!r} has no turns")
    if self.turns[0].append_tokens < 1:
      raise ValueError(f"session {self.session_id!r}: the first turn appends "
                       "no tokens")

  def context_tokens(self, index: int) -> int:
    """Tokens turn `index` prefills (cached or not): all before it + its append."""
    earlier = self.turns[:index]
    return (sum(t.append_tokens + t.output_tokens for t in earlier) +
            self.turns[index].append_tokens)

  def hit_tokens(self, index: int, block_size: int) -> int:
    """Leading tokens of turn `index` whose blocks are stored (by the earlier
    turns, or before the session for turn 0); at least one token is left
    to compute, for the logits of the first generated token."""
    if index == 0:
      stored = min(self.stored_tokens, self.context_tokens(0) - 1)
      return (stored // block_size) * block_size
    prev = index - 1
    written = self.context_tokens(prev) + self.turns[prev].output_tokens - 1
    return (written // block_size) * block_size


def _check_count(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def synthetic_sessions(num_sessions: int = 32, turns: int = 24, *,
                       first_tokens: int = 16384, append_tokens: int = 800,
                       output_tokens: int = 200, gap_s: float = 1.0,
                       max_context: int | None = None,
                       seed: int = 0) -> list[SimSession]:
  """Seeded long-context agent sessions (the same arguments, the same sessions).

  Each count is drawn around its mean: appends and outputs lognormal (sigma
  0.5, heavy-tailed like tool outputs), the first context uniform in
  [0.5, 1.5] x `first_tokens`, gaps exponential of mean `gap_s`. A session
  whose next turn would pass `max_context` tokens (prompt plus output) ends
  before it, as an agent that compacts its context would start over.
  """
  _check_count("num_sessions", num_sessions)
  _check_count("turns", turns)
  _check_count("first_tokens", first_tokens)
  _check_count("append_tokens", append_tokens)
  _check_count("output_tokens", output_tokens)
  if not (isinstance(gap_s, (int, float)) and math.isfinite(gap_s)
          and gap_s >= 0):
    raise ValueError(f"gap_s must be a finite number >= 0, got {gap_s!r}")
  if max_context is not None:
    _check_count("max_context", max_context)
  rng = np.random.default_rng(seed)

  def lognormal(mean: float) -> int:
    sigma = 0.5  # mean of the lognormal = exp(mu + sigma^2 / 2)
    return max(1, int(round(rng.lognormal(math.log(mean) - sigma**2 / 2,
                                          sigma))))

  out = []
  for s in range(num_sessions):
    sim_turns = []
    context = 0
    for i in range(turns):
      append = (max(1, int(round(first_tokens * rng.uniform(0.5, 1.5))))
                if i == 0 else lognormal(append_tokens))
      output = lognormal(output_tokens)
      gap = 0.0 if i == 0 else float(rng.exponential(gap_s)) if gap_s else 0.0
      if max_context is not None and context + append + output > max_context:
        break
      sim_turns.append(SimTurn(append, output, gap))
      context += append + output
    if not sim_turns:
      raise ValueError(f"max_context={max_context} is smaller than session "
                       f"{s}'s first turn")
    out.append(SimSession(f"sim-{s:04d}", tuple(sim_turns)))
  return out


def sessions_from_trace(sessions: Sequence[AgentSession],
                        count_tokens: Callable[[str], int]
                        ) -> tuple[list[SimSession], dict]:
  """Token-count sessions of a trace, and how their counts were found.

  A session whose every turn recorded `input_tokens` (the prompt's length
  when the trace was recorded) takes its appends from them; otherwise
  `count_tokens` counts each message's text, plus `MESSAGE_OVERHEAD_TOKENS`
  a message (the system prompt is part of turn 0's append). Output tokens
  are the recorded `output_tokens`, or the count of `assistant_text` where
  none was recorded. Tool waits are the recorded `pre_gap_ms`.
  """
  out, recorded, counted = [], 0, 0
  for session in sessions:
    outputs = []
    for t in session.turns:
      n = t.output_tokens or count_tokens(t.assistant_text)
      outputs.append(max(1, n))
    if all(t.input_tokens > 0 for t in session.turns):
      recorded += 1
      appends, context = [], 0
      for t, out_n in zip(session.turns, outputs):
        append = t.input_tokens - context
        if append < 0:
          raise ValueError(
              f"session {session.session_id!r} turn {t.index}: input_tokens "
              f"{t.input_tokens} is smaller than the context before it "
              f"({context} tokens: earlier prompts and outputs)")
        appends.append(append)
        context = t.input_tokens + out_n
    else:
      counted += 1
      appends = []
      for i, t in enumerate(session.turns):
        n = sum(count_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS
                for m in t.input_delta)
        if i == 0 and session.system_prompt:
          n += count_tokens(session.system_prompt) + MESSAGE_OVERHEAD_TOKENS
        appends.append(n)
    turns = tuple(SimTurn(a, o, t.pre_gap_ms / 1000.0)
                  for a, o, t in zip(appends, outputs, session.turns))
    if turns[0].append_tokens < 1:
      raise ValueError(f"session {session.session_id!r}: its first turn has "
                       "no prompt tokens")
    out.append(SimSession(session.session_id, turns))
  return out, {"sessions_with_recorded_input_tokens": recorded,
               "sessions_counted_by_tokenizer": counted}
