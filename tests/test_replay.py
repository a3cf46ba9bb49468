"""Offline session replay (the agent_eval loop) on a tiny random model."""

from __future__ import annotations

import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.model import load_model
from dualpath_jax.workload import AgentSession, AgentTurn
from dualpath_jax.workload import replay
from dualpath_jax.workload.replay import replay_sessions


class ByteChatTokenizer:
  """A stand-in tokenizer for the 256-token test model: one token per byte."""

  def encode_chat(self, messages, add_generation_prompt=True):
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    if add_generation_prompt:
      text += "<assistant>"
    return [3 + (b % 250) for b in text.encode()]

  def decode(self, ids):
    return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _sessions(n=3, turns=3, reply="ok then"):
  return [AgentSession(
      session_id=f"s{i}", system_prompt="shared system prompt " * 2,
      tenant="t", turns=[AgentTurn(index=j, input_delta=[
          {"role": "user", "content": f"msg {i}.{j} " + "x" * (5 * j)}],
          assistant_text=reply, output_tokens=4) for j in range(turns)])
      for i in range(n)]


def _engine(tiny, max_context=512):
  return make_engine(tiny, CacheConfig(block_size=8, num_blocks=512),
                     EngineConfig(max_batch_size=4, max_prefill_chunk=32,
                                  max_context=max_context))


@pytest.mark.parametrize("mode", ["generate", "teacher_forced"])
def test_replay_runs_every_turn_and_reuses_prefixes(tiny, mode):
  tok = ByteChatTokenizer()
  sessions = _sessions()
  res = replay_sessions(_engine(tiny), tok, sessions, reply_mode=mode,
                        max_new_tokens=8)
  assert len(res.records) == 9 and not res.truncated_sessions
  by = {(r.session_id, r.turn_index): r for r in res.records}
  for s in sessions:
    for j in range(1, 3):
      prev, cur = by[(s.session_id, j - 1)], by[(s.session_id, j)]
      assert cur.arrival_s >= prev.finish_s  # turns of a session are serial
      assert cur.cached_prompt_tokens > 0
      assert cur.prompt_tokens > prev.prompt_tokens
    assert all(by[(s.session_id, j)].generated_tokens == 4 or
               by[(s.session_id, j)].finish_reason == "eos" for j in range(3))
  if mode == "teacher_forced":
    # The context grows by exactly the recorded reply and the next message.
    msgs = [{"role": "system", "content": sessions[0].system_prompt}]
    for j, turn in enumerate(sessions[0].turns):
      msgs += turn.input_delta
      assert by[("s0", j)].prompt_tokens == len(tok.encode_chat(msgs))
      msgs.append({"role": "assistant", "content": turn.assistant_text})


def test_long_sessions_end_early_with_a_reason(tiny):
  res = replay_sessions(_engine(tiny, max_context=96), ByteChatTokenizer(),
                        _sessions(n=1, turns=4), reply_mode="teacher_forced",
                        max_new_tokens=4)
  assert "s0" in res.truncated_sessions
  assert "max_context" in res.truncated_sessions["s0"]
  assert 0 < len(res.records) < 4


def test_bad_reply_mode(tiny):
  with pytest.raises(ValueError, match="reply_mode"):
    replay_sessions(_engine(tiny), ByteChatTokenizer(), _sessions(1, 1),
                    reply_mode="magic")


def test_samples_of_a_turn_share_its_prefill_and_sample_0_goes_on(tiny):
  tok = ByteChatTokenizer()
  sessions = _sessions(n=2, turns=2)
  engine = _engine(tiny)
  rollouts = []
  res = replay_sessions(engine, tok, sessions, max_new_tokens=6,
                        samples_per_turn=3, temperature=1.0,
                        on_rollout=rollouts.append)
  assert len(res.records) == len(rollouts) == 12
  groups = {}
  for r in rollouts:
    groups.setdefault((r.session_id, r.turn_index), {})[r.sample] = r
  assert all(sorted(g) == [0, 1, 2] for g in groups.values())
  for (sid, turn), group in groups.items():
    prompt = group[0].prompt_tokens
    assert all(r.prompt_tokens == prompt for r in group.values())
    # The later samples found the first one's full blocks (no system prompt
    # cached in turn 0 of the first session: all of it came from sample 0).
    shared = (len(prompt) - 1) // 8 * 8
    assert all(group[k].cached_prompt_tokens == shared for k in (1, 2))
  assert len({tuple(r.generated_tokens) for r in rollouts}) > 4  # sampled
  for s in sessions:  # the next turn's context holds sample 0's reply
    first, second = groups[(s.session_id, 0)], groups[(s.session_id, 1)]
    messages = [{"role": "system", "content": s.system_prompt},
                *s.turns[0].input_delta,
                {"role": "assistant", "content": first[0].reply},
                *s.turns[1].input_delta]
    assert second[0].prompt_tokens == tok.encode_chat(messages)
    arrival = min(r.arrival_s for r in res.records
                  if (r.session_id, r.turn_index) == (s.session_id, 1))
    assert arrival >= max(r.finish_s for r in res.records
                          if (r.session_id, r.turn_index) == (s.session_id, 0))
  assert {r.sample for r in res.records} == {0, 1, 2}
  assert engine.stats.shared_prefill_tokens > 0


def test_a_seeded_replay_samples_alike_in_any_batching(tiny):
  """The samples were drawn from the engine's one generator in batch order,
  so the same seed gave other tokens with another --max_batch or timing.
  Seeded, each sample draws from its own (seed, session, turn, sample)
  seed: the same rollouts at batch 4 and 1; another seed, others."""
  def run(max_batch, seed):
    engine = make_engine(tiny, CacheConfig(block_size=8, num_blocks=512),
                         EngineConfig(max_batch_size=max_batch,
                                      max_prefill_chunk=32, max_context=512,
                                      seed=1000 + max_batch))
    rollouts = []
    replay_sessions(engine, ByteChatTokenizer(), _sessions(n=3, turns=2),
                    max_new_tokens=6, samples_per_turn=2, temperature=1.0,
                    seed=seed, on_rollout=rollouts.append)
    return {(r.session_id, r.turn_index, r.sample): r.generated_tokens
            for r in rollouts}
  wide, narrow, other = run(4, 7), run(1, 7), run(4, 8)
  assert len(wide) == 12 and wide == narrow
  assert sum(wide[k] != other[k] for k in wide) >= 6
  assert replay.turn_seed(7, "s0", 1, 0) == replay.turn_seed(7, "s0", 1, 0)
  assert len({replay.turn_seed(7, s, t, k) for s in ("s0", "s1")
              for t in (0, 1) for k in (0, 1)}) == 8


@pytest.mark.parametrize("kw,match", [
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"samples_per_turn": 0}, "samples_per_turn"),
    ({"samples_per_turn": 2.0}, "samples_per_turn"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_bad_sampling_arguments_are_refused_before_any_turn(kw, match):
  with pytest.raises(ValueError, match=match):
    replay_sessions(None, ByteChatTokenizer(), _sessions(1, 1), **kw)
