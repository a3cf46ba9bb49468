"""Regressions from an audit of the workload package, metrics and launchers:
input the trace loader let through until it failed mid-run, a trace save
that destroyed the previous file, sessions a replay silently dropped, a
context bound that was no bound, and report helpers that misreported."""

from __future__ import annotations

import json
import math

import pytest

from dualpath_jax import metrics
from dualpath_jax.workload import (AgentSession, AgentTurn, TraceError,
                                   load_trace, save_trace,
                                   synthetic_agent_workload)
from dualpath_jax.workload.replay import replay_sessions
from dualpath_jax.workload.slo import SloSpec


def _session(sid: str = "a", **kw) -> AgentSession:
  return AgentSession(session_id=sid, system_prompt=kw.pop("system", "sys"),
                      turns=[AgentTurn(index=0, input_delta=[
                          {"role": "user", "content": "hi"}], **kw)])


@pytest.mark.parametrize("field", ["tenant", "session_id"])
def test_load_trace_refuses_a_lone_surrogate_in_ids(tmp_path, field):
  """A tenant with a lone surrogate passed the loader and failed the run at
  its first turn (the cache hashes the tenant as UTF-8); a session id the
  same way failed `save_trace`."""
  raw = {"session_id": "a", "tenant": "t",
         "turns": [{"input_delta": [{"role": "user", "content": "x"}]}]}
  raw[field] = "ok\ud800"
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(raw) + "\n")  # ensure_ascii: "\ud800" escaped
  with pytest.raises(TraceError, match=f"t.jsonl:1: '{field}'.*surrogate"):
    load_trace(str(path))


@pytest.mark.parametrize("source", ['"web"', "[1, 2]", "3"])
def test_load_trace_refuses_a_source_that_is_no_object(tmp_path, source):
  path = tmp_path / "t.jsonl"
  path.write_text('{"session_id": "a", "source": ' + source
                  + ', "turns": [{"input_delta": []}]}\n')
  with pytest.raises(TraceError, match="'source' must be a JSON object"):
    load_trace(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("bad", [
    _session("b", output_tokens=-1),        # load_trace refuses it
    _session("b", assistant_text="\ud800"),  # cannot be written as UTF-8
    _session("a"),                           # a repeated session id
])
def test_save_trace_refuses_bad_sessions_and_keeps_the_old_file(
    tmp_path, suffix, bad):
  """`save_trace` wrote straight into `path`: a session that failed midway
  left a cut-short file in place of the previous trace, and sessions that
  `load_trace` refuses were saved without a word."""
  path = str(tmp_path / f"t{suffix}")
  old = synthetic_agent_workload(num_sessions=2, turns_per_session=2)
  save_trace(old, path)
  with open(path, "rb") as f:
    before = f.read()
  with pytest.raises(TraceError, match="session 1"):
    save_trace([_session("a"), bad], path)
  with open(path, "rb") as f:
    assert f.read() == before
  assert [s.to_dict() for s in load_trace(path)] == [s.to_dict() for s in old]
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"t{suffix}"]


def test_replay_refuses_repeated_session_ids():
  """Two sessions of one id shared one state: only one was replayed and
  the result said nothing (2 of 3 turns ran)."""
  sessions = [_session("dup"), _session("dup"), _session("other")]
  with pytest.raises(ValueError, match=r"distinct.*\['dup'\]"):
    replay_sessions(None, None, sessions)  # refused before the engine is used


def test_replay_refuses_an_infinite_start():
  with pytest.raises(ValueError, match="finite offset"):
    replay_sessions(None, None, [_session("a")], start_s=[math.inf])


class _DefaultSystemTokenizer:
  """One token per character of a ChatML rendering that, like SmolLM2's
  template, puts in a default system prompt when no system message is
  given (an empty one given replaces it)."""

  DEFAULT = "You are a helpful AI assistant named SmolLM."

  def encode_chat(self, messages, add_generation_prompt=True):
    if not messages or messages[0]["role"] != "system":
      messages = [{"role": "system", "content": self.DEFAULT}, *messages]
    text = "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)
    return list(range(len(text + ("<assistant>" if add_generation_prompt
                                  else ""))))


def test_max_context_bound_covers_a_session_without_system_prompt():
  """The bound rendered an empty system message that the replay never
  sends, so a template's default system prompt was left out of it: the
  bound came out below the replay's own prompt."""
  from dualpath_jax.workload.replay import initial_messages
  from launch.workload_flags import max_context_bound
  tok = _DefaultSystemTokenizer()
  session = _session("a", system="", assistant_text="done")
  prompt = tok.encode_chat(initial_messages(session)
                           + session.turns[0].input_delta)
  assert max_context_bound([session], tok, max_new_tokens=4) >= len(prompt) + 4


@pytest.mark.parametrize("kwargs,msg", [
    ({"output_tokens": -1}, "output_tokens"),
    ({"first_tool_lines": -5}, "first_tool_lines"),
    ({"gap_ms": math.nan}, "gap_ms"),
    ({"gap_ms": math.inf}, "gap_ms"),
    ({"gap_ms": -1.0}, "gap_ms"),  # was numpy's bare "scale < 0"
])
def test_synthetic_workload_refuses_bad_sizes(kwargs, msg):
  """These made sessions `load_trace` refuses (a NaN gap also reached the
  engine as a NaN arrival time) instead of a ValueError naming the
  argument."""
  with pytest.raises(ValueError, match=msg):
    synthetic_agent_workload(num_sessions=1, turns_per_session=2, **kwargs)


def test_slo_spec_refuses_a_bool_percentile():
  """`percentile=True` passed as 1 and keyed the report's TTFT "pTrue"."""
  with pytest.raises(ValueError, match="percentile"):
    SloSpec(ttft_s=1.0, percentile=True)


def test_format_table_leaves_out_an_empty_finish_reasons():
  """A run with no turns printed a `finish_reasons` row with no value
  (an empty dict passed for percentiles), one with turns none at all."""
  table = metrics.format_table(metrics.summarize([], 0.0))
  assert "finish_reasons" not in table
  assert "ttft_s" in table and "p50=None" in table


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_a_trace_with_a_byte_order_mark_loads(tmp_path, suffix):
  """Some editors start a UTF-8 file with a byte-order mark; the loader
  called such a trace invalid JSON at line 1."""
  plain = tmp_path / "plain.jsonl"
  save_trace([_session("a"), _session("b")], str(plain))
  data = "\ufeff" + plain.read_text(encoding="utf-8")
  path = tmp_path / f"bom{suffix}"
  if suffix.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    path.write_bytes(zstandard.ZstdCompressor().compress(data.encode()))
  else:
    path.write_text(data, encoding="utf-8")
  assert [s.session_id for s in load_trace(str(path))] == ["a", "b"]
  # Only at the very start: elsewhere it is still no JSON.
  path.write_text(plain.read_text(encoding="utf-8") + "\ufeff{}\n",
                  encoding="utf-8")
  if not suffix.endswith(".zst"):
    with pytest.raises(TraceError, match=":3: invalid JSON"):
      load_trace(str(path))


def test_honoring_a_gap_of_centuries_waits_in_bounded_sleeps():
  """A recorded tool wait of 1e13 ms (317 years) with `honor_gaps` went to
  one `time.sleep`, which raised OverflowError mid-run; the loop now sleeps
  at most `MAX_SLEEP_S` at a time (here on a fake clock)."""
  from dualpath_jax.workload.replay import MAX_SLEEP_S  # pylint: disable=g-import-not-at-top
  from replay_fakes import InstantEngine, two_turn_session  # pylint: disable=g-import-not-at-top
  from tests.test_replay import ByteChatTokenizer  # pylint: disable=g-import-not-at-top

  now = [0.0]
  sleeps = []

  def sleep(s):
    if s > 1e9:  # what time.sleep refuses on this platform
      raise OverflowError("timestamp out of range for platform time_t")
    sleeps.append(s)
    now[0] += s

  res = replay_sessions(InstantEngine(now), ByteChatTokenizer(),
                        [two_turn_session(1e13)], honor_gaps=True,
                        clock=lambda: now[0], sleep=sleep)
  assert len(res.records) == 2
  assert max(sleeps) == MAX_SLEEP_S and sum(sleeps) == pytest.approx(1e10)
  assert res.records[1].arrival_s == pytest.approx(1e10)
