"""Offline replay of agent sessions through an engine (the agent_eval loop).

Sessions run concurrently: every session's next turn is submitted as soon as
its previous turn finished (plus the recorded tool wait when `honor_gaps`),
so the engine batches turns of many sessions, as a batch evaluation or an RL
rollout does. The context of each turn is the chat template rendered over the
session's messages so far; the reply that joins the history is either what
the model generated or, when teacher forcing, the recorded `assistant_text`,
so that the context grows exactly as it did when the trace was recorded.

`samples_per_turn` = n samples each turn n times, as an RL trainer's group
(GRPO) does: the n turns are submitted together (the engine prefills their
context once), every sample is a record and a rollout of its own (`sample`
0..n-1), and the session goes on with sample 0's reply once all n are done.

`seed` gives every sample its own sampling seed, drawn from (seed, session
id, turn index, sample) (`turn_seed`), so that a run's samples do not depend
on which turns the engine batched together or on the clock (`honor_gaps`,
`--max_batch`): without it they are drawn from the engine's one generator in
batch order.

`start_s` turns the same loop into an open-loop driver (`workload.online`):
each session's first turn becomes ready at its own offset, whatever the
engine is doing, and a turn's arrival time is when it became ready, not when
the loop got round to submitting it (a turn that waits behind a long engine
step counts that wait in its TTFT). `on_tick` sees the clock after every
engine step and before every idle wait, for sampling counters over time.
While every session is away, an engine whose prefetcher has reads going
(`PDCluster.prefetch_pending`) is stepped instead of the loop sleeping, so
the reads land in the hot tier before the sessions return.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import time
from typing import Callable, Sequence

import numpy as np

from dualpath_jax.config import check_sampling
from dualpath_jax.engine.request import (TurnOutput, TurnRequest,
                                          check_logprobs)
from dualpath_jax.metrics import TurnRecord
from dualpath_jax.utils import is_integer
from dualpath_jax.workload.trace import AgentSession

MAX_SLEEP_S = 1e6  # one idle wait's longest sleep (the loop sleeps again)

REPLY_MODES = ("generate", "teacher_forced")


@dataclasses.dataclass
class _SessionState:
  session: AgentSession
  messages: list[dict[str, str]]
  next_turn: int = 0
  ready_at: float = 0.0
  in_flight: bool = False
  stopped: str = ""  # why the session ended early, if it did
  # The in-flight turn's finished samples: sample -> (reply, finish_s).
  done: dict[int, tuple[str, float]] = dataclasses.field(default_factory=dict)


def turn_seed(seed: int, session_id: str, turn_index: int,
              sample: int) -> int:
  """The sampling seed of sample `sample` of turn `turn_index` of session
  `session_id` in a run seeded `seed`: 64 bits of
  `SeedSequence(seed, spawn_key=(session, turn, sample))`, the session as
  the first 8 bytes of its id's SHA-256, so the same run draws the same
  samples in any process and any batching."""
  digest = hashlib.sha256(session_id.encode("utf-8")).digest()
  key = (int.from_bytes(digest[:8], "little"), int(turn_index), int(sample))
  state = np.random.SeedSequence(int(seed), spawn_key=key).generate_state(2)
  return int(state[0]) << 32 | int(state[1])


def initial_messages(session: AgentSession) -> list[dict[str, str]]:
  """The messages a session starts from: its system prompt, if it has one.

  An empty system prompt sends no system message at all (a chat template
  may then put in a default one of its own, e.g. SmolLM2's), so whatever
  bounds a session's context (`launch.workload_flags.max_context_bound`)
  must start from these same messages.
  """
  if not session.system_prompt:
    return []
  return [{"role": "system", "content": session.system_prompt}]


def _check_sessions(sessions: Sequence[AgentSession],
                    start_s: Sequence[float]) -> None:
  """ValueError unless session ids are distinct (a repeated id would replay
  only one of its sessions) and `start_s` holds one finite offset >= 0 per
  session."""
  counts = collections.Counter(s.session_id for s in sessions)
  dup = sorted(i for i, n in counts.items() if n > 1)
  if dup:
    raise ValueError(f"session ids must be distinct; repeated: {dup[:5]}")
  if len(start_s) != len(sessions) or any(
      not (o >= 0 and math.isfinite(o)) for o in start_s):
    raise ValueError("start_s needs one finite offset >= 0 per session")


@dataclasses.dataclass
class Rollout:
  """One finished turn's text and tokens: what an RL trainer or an offline
  evaluation reads (`launch.agent_eval --rollouts`)."""

  session_id: str
  tenant: str
  turn_index: int
  prompt_tokens: list[int]  # the whole context the turn was given
  generated_tokens: list[int]
  # This sample's text: generated (EOS left out) or, teacher forcing, the
  # recorded reply; sample 0's is what went into the session's history.
  reply: str
  finish_reason: str
  cached_prompt_tokens: int
  logprobs: list | None  # TokenLogprob per generated token, if asked
  sample: int = 0  # which of the turn's `samples_per_turn` samples

  def as_dict(self) -> dict:
    """JSON-ready: logprobs as {token, logprob, top: [[token, logprob]]}."""
    d = dataclasses.asdict(self)
    if self.logprobs is not None:
      d["logprobs"] = [{"token": e.token, "logprob": e.logprob,
                        "top": [list(t) for t in e.top]}
                       for e in self.logprobs]
    return d


@dataclasses.dataclass
class ReplayResult:
  records: list[TurnRecord]
  wall_s: float
  truncated_sessions: dict[str, str]  # session_id -> reason


def replay_sessions(engine, tokenizer, sessions: Sequence[AgentSession], *,
                    reply_mode: str = "generate", max_new_tokens: int = 32,
                    honor_gaps: bool = False,
                    on_turn: Callable[[TurnRecord], None] | None = None,
                    on_rollout: Callable[[Rollout], None] | None = None,
                    logprobs: int | None = None,
                    samples_per_turn: int = 1,
                    temperature: float | None = None,
                    top_p: float | None = None,
                    start_s: Sequence[float] | None = None,
                    on_tick: Callable[[float], None] | None = None,
                    seed: int | None = None,
                    clock: Callable[[], float] = time.perf_counter,
                    sleep: Callable[[float], None] = time.sleep) -> ReplayResult:
  """Runs every turn of every session through `engine`; returns the records.

  `max_new_tokens` caps each turn's generation budget (the recorded
  `output_tokens`, when positive, lowers it further). A turn whose context
  would exceed the engine's `max_context` ends its session early; the
  session is listed in `truncated_sessions` with the reason.

  `start_s[i]` (seconds after the start, default 0) is when session `i`'s
  first turn arrives; `on_rollout(r)` gets each finished turn's tokens and
  reply (`Rollout`; with `logprobs=k`, each generated token's
  log-probability and the k most likely tokens', `TurnRequest.logprobs`),
  just before `on_turn` gets its record; `on_tick(t)` is called with the
  seconds since the start after every engine step and before every idle
  wait. `samples_per_turn` samples each turn that many times (module
  docstring); `temperature` and `top_p` are every turn's sampling (None:
  the engine's); `seed`, when given, seeds each sample by `turn_seed`.
  """
  if seed is not None and (not is_integer(seed) or seed < 0):
    raise ValueError(f"seed must be an integer >= 0 or None; got {seed!r}")
  if reply_mode not in REPLY_MODES:
    raise ValueError(f"reply_mode must be one of {REPLY_MODES}, got {reply_mode!r}")
  check_logprobs(logprobs)  # before any turn is submitted
  if not is_integer(samples_per_turn) or samples_per_turn < 1:
    raise ValueError(f"samples_per_turn must be an integer >= 1; got "
                     f"{samples_per_turn!r}")
  if temperature is not None or top_p is not None:
    check_sampling(1.0 if temperature is None else temperature,
                   1.0 if top_p is None else top_p)
  if start_s is None:
    start_s = [0.0] * len(sessions)
  _check_sessions(sessions, start_s)
  t0 = clock()
  states = {}
  for s, offset in zip(sessions, start_s):
    states[s.session_id] = _SessionState(session=s,
                                         messages=initial_messages(s),
                                         ready_at=t0 + offset)
  records: list[TurnRecord] = []
  max_context = engine.config.max_context
  samples: dict[str, tuple[_SessionState, int]] = {}  # request id -> whose

  def submit_ready(now: float) -> None:
    for st in states.values():
      if st.in_flight or st.stopped or st.next_turn >= len(st.session.turns):
        continue
      if st.ready_at > now:
        continue
      turn = st.session.turns[st.next_turn]
      st.messages.extend(turn.input_delta)
      prompt = tokenizer.encode_chat(st.messages, add_generation_prompt=True)
      budget = min(max_new_tokens, turn.output_tokens) if turn.output_tokens > 0 \
          else max_new_tokens
      if len(prompt) + budget > max_context:
        st.stopped = (f"turn {turn.index}: {len(prompt)} prompt + {budget} new "
                      f"tokens exceed max_context {max_context}")
        logging.warning("session %s ends early: %s", st.session.session_id,
                        st.stopped)
        continue
      base = f"{st.session.session_id}#{turn.index}"
      for k in range(samples_per_turn):  # together: one prefill of the context
        rid = base if samples_per_turn == 1 else f"{base}/{k}"
        engine.submit(TurnRequest(
            request_id=rid, prompt_tokens=prompt, max_new_tokens=budget,
            tenant=st.session.tenant, session_id=st.session.session_id,
            turn_index=st.next_turn, arrival_s=st.ready_at, logprobs=logprobs,
            temperature=temperature, top_p=top_p,
            seed=None if seed is None else turn_seed(
                seed, st.session.session_id, turn.index, k)))
        samples[rid] = (st, k)
      st.in_flight = True

  def finish(out: TurnOutput) -> None:
    st, k = samples.pop(out.request.request_id)
    turn = st.session.turns[out.request.turn_index]
    if reply_mode == "teacher_forced":
      reply = turn.assistant_text
    else:
      ids = out.generated_tokens
      if out.finish_reason == "eos":
        ids = ids[:-1]
      reply = tokenizer.decode(ids)
    st.done[k] = (reply, out.finish_s)
    if len(st.done) == samples_per_turn:  # the group is in: the session goes on
      st.messages.append({"role": "assistant", "content": st.done[0][0]})
      st.in_flight = False
      st.next_turn += 1
      gap = 0.0
      if honor_gaps and st.next_turn < len(st.session.turns):
        gap = st.session.turns[st.next_turn].pre_gap_ms / 1000.0
      st.ready_at = max(f for _, f in st.done.values()) + gap
      st.done = {}
    rec = TurnRecord(
        session_id=st.session.session_id, turn_index=turn.index,
        prompt_tokens=len(out.request.prompt_tokens),
        cached_prompt_tokens=out.cached_prompt_tokens,
        generated_tokens=len(out.generated_tokens),
        arrival_s=out.arrival_s - t0, first_token_s=out.first_token_s - t0,
        finish_s=out.finish_s - t0, finish_reason=out.finish_reason, sample=k)
    records.append(rec)
    if on_rollout is not None:
      on_rollout(Rollout(
          session_id=st.session.session_id, tenant=st.session.tenant,
          turn_index=turn.index,
          prompt_tokens=list(out.request.prompt_tokens),
          generated_tokens=list(out.generated_tokens), reply=reply,
          finish_reason=out.finish_reason,
          cached_prompt_tokens=out.cached_prompt_tokens,
          logprobs=out.logprobs, sample=k))
    if on_turn is not None:
      on_turn(rec)

  while True:
    submit_ready(clock())
    if engine.has_work():
      for out in engine.step():
        finish(out)
      if on_tick is not None:
        on_tick(clock() - t0)
      continue
    pending = [st.ready_at for st in states.values()
               if not st.stopped and not st.in_flight
               and st.next_turn < len(st.session.turns)]
    if not pending:
      break
    if on_tick is not None:
      on_tick(clock() - t0)
    prefetching = getattr(engine, "prefetch_pending", None)
    if prefetching is not None and prefetching():
      for out in engine.step():  # no turn runs: it prefetches (<= 50 ms)
        finish(out)
      continue
    # In steps of at most MAX_SLEEP_S: a trace's gap of centuries passed
    # to one `time.sleep` raised OverflowError mid-run.
    sleep(min(max(0.0, min(pending) - clock()), MAX_SLEEP_S))
  return ReplayResult(
      records=records, wall_s=clock() - t0,
      truncated_sessions={sid: st.stopped for sid, st in states.items() if st.stopped})
