"""The contexts of a session's recorded turns, and what each found cached.

A turn's context is the chat template over the session's messages so far
(the recorded replies standing for the model's), as `agent_eval` builds
it. Its cached prefix is what the previous turn's sequence held when it
ended: that turn's prompt and its reply, without the EOS that ended the
reply (a sequence never feeds back its last token) and without what the
template writes after it. `launch.study_importance` studies these turns;
no JAX here.
"""

from __future__ import annotations

from typing import Sequence

from dualpath_jax.workload.replay import initial_messages
from dualpath_jax.workload.trace import AgentSession


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """How many leading tokens `a` and `b` share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def last_turn_contexts(sessions: Sequence[AgentSession], tokenizer,
                       study_turns: int, stop_ids: Sequence[int] = ()
                       ) -> list[tuple[str, int, list[int], int]]:
  """(session id, turn index, context tokens, cached prefix tokens) of the
  last `study_turns` turns of each session, by position (a trace's turn
  indices may skip).

  The prefix is the history before the turn's input, cut at the first of
  `stop_ids` (the model's EOS) after the previous reply's start. The
  recorded reply stands for the one the model generated, as in
  `agent_eval --reply=generate`; with `--reply=teacher_forced` the engine
  would have cached its own reply, not the recorded one, and only the
  previous prompt would match. A session's first turn has its system
  prompt as prefix (cached if another session of its tenant ran before).
  """
  if study_turns < 1:
    raise ValueError(f"study_turns must be >= 1, got {study_turns}")
  stop = set(stop_ids)
  out = []
  for s in sessions:
    messages = initial_messages(s)
    first = max(0, len(s.turns) - study_turns)
    for position, turn in enumerate(s.turns):
      before = messages
      messages = messages + list(turn.input_delta)
      if position >= first:
        tokens = tokenizer.encode_chat(messages)
        prefix = common_prefix(
            tokenizer.encode_chat(before, add_generation_prompt=False),
            tokens) if before else 0
        if before and before[-1]["role"] == "assistant":
          reply = len(tokenizer.encode_chat(before[:-1]))  # its first token
          prefix = next((i for i in range(reply, prefix) if tokens[i] in stop),
                        prefix)
        out.append((s.session_id, turn.index, tokens, prefix))
      messages = messages + [{"role": "assistant",
                              "content": turn.assistant_text}]
  return out
