"""`last_turn_contexts`: which turns, their contexts and cached prefixes."""

from __future__ import annotations

import pytest

from dualpath_jax.model import describe_model
from dualpath_jax.workload.byte_tokenizer import ByteChatTokenizer
from dualpath_jax.workload.trace import AgentSession, AgentTurn, parse_session
from dualpath_jax.workload.turn_contexts import common_prefix, last_turn_contexts


def test_the_last_turns_by_position_and_their_cached_prefix():
  """A trace's turn indices may skip: the last N turns are the last N
  listed. Each turn's prefix is the history before its input, which the
  turn's context starts with."""
  turns = [AgentTurn(index=i, input_delta=[{"role": "user", "content": f"q{i}"}],
                     assistant_text=f"answer {i}") for i in (0, 5, 9)]
  session = AgentSession(session_id="s", system_prompt="be brief", turns=turns)
  tok = ByteChatTokenizer(256)
  assert [i for _, i, _, _ in last_turn_contexts([session], tok, 1)] == [9]
  got = last_turn_contexts([session], tok, study_turns=2)
  assert [(sid, index) for sid, index, _, _ in got] == [("s", 5), ("s", 9)]
  for _, index, tokens, prefix in got:
    history = [{"role": "system", "content": "be brief"}]
    for t in turns:
      if t.index == index:
        break
      history += t.input_delta + [{"role": "assistant",
                                   "content": t.assistant_text}]
    before = tok.encode_chat(history, add_generation_prompt=False)
    assert prefix == len(before) and tokens[:prefix] == before
    assert tokens == tok.encode_chat(history + [
        {"role": "user", "content": f"q{index}"}])
  with pytest.raises(ValueError, match="study_turns"):
    last_turn_contexts([session], tok, 0)


def test_the_prefix_is_what_the_engine_cached():
  """SmolLM2's template: a turn's cached prefix ends with the previous
  reply, before the EOS (never fed back) and the template's newline."""
  cfg, tok = describe_model(None)
  sys_msg = {"role": "system", "content": "You are a coding agent."}
  q1 = {"role": "user", "content": "Fix the failing test."}
  q2 = {"role": "tool", "content": "1 passed"}
  reply = "I changed the assertion; running the tests again."
  s = parse_session({"session_id": "s", "system_prompt": sys_msg["content"],
                     "turns": [{"index": 1, "input_delta": [q1],
                                "assistant_text": reply},
                               {"index": 2, "input_delta": [q2]}]})
  (_, index, tokens, prefix), = last_turn_contexts([s], tok, 1,
                                                   cfg.eos_token_ids)
  # the previous turn's prompt and its reply: what its sequence held
  cached = tok.encode_chat([sys_msg, q1]) + tok.encode(reply, add_bos=False)
  assert index == 2 and tokens[:len(cached)] == cached
  assert prefix == len(cached)
  # without the EOS ids, the template's EOS and newline would count too
  (_, _, _, longer), = last_turn_contexts([s], tok, 1)
  assert longer == len(cached) + 2


def test_common_prefix():
  assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
  assert common_prefix([1, 2], [1, 2, 3]) == 2
  assert common_prefix([], [1]) == 0
