"""The abench-session-jsonl-v1 trace: round trips, validation, zstd."""

from __future__ import annotations

import json
import os

import pytest

from dualpath_jax.workload import (TraceError, load_trace, save_trace,
                                   synthetic_agent_workload)

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "dualpath_jax",
                      "workload", "data", "sample_trace.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_round_trip(tmp_path, suffix):
  sessions = synthetic_agent_workload(num_sessions=3, turns_per_session=4, seed=3)
  path = str(tmp_path / f"t{suffix}")
  save_trace(sessions, path)
  back = load_trace(path)
  assert [s.to_dict() for s in back] == [s.to_dict() for s in sessions]
  if suffix.endswith(".zst"):
    with open(path, "rb") as f:
      assert f.read(4) == b"\x28\xb5\x2f\xfd"  # zstd frame magic


def test_shipped_sample_follows_schema():
  sessions = load_trace(SAMPLE)
  assert len(sessions) >= 3
  for s in sessions:
    assert s.system_prompt and s.turns
    for t in s.turns:
      assert t.input_delta and t.assistant_text and t.output_tokens > 0


def test_reads_abench_fields_and_ignores_extras(tmp_path):
  raw = {"session_id": "abc", "source": {"dataset": "deepswe", "agent": "x"},
         "system_prompt": "sys", "turns": [
             {"index": 0, "input_delta": [{"role": "user", "content": "hi"}],
              "assistant_text": "hello", "input_tokens": 10, "output_tokens": 5,
              "cached_tokens": 0, "pre_gap_ms": 12.5, "tool_calls": [{"n": 1}]}]}
  path = tmp_path / "a.jsonl"
  path.write_text(json.dumps(raw) + "\n\n")
  (s,) = load_trace(str(path))
  assert s.session_id == "abc" and s.tenant == ""
  assert s.turns[0].pre_gap_ms == 12.5 and s.turns[0].output_tokens == 5


@pytest.mark.parametrize("line,msg", [
    ("{not json", "invalid JSON"),
    (json.dumps({"turns": []}), "session_id"),
    (json.dumps({"session_id": "a", "turns": []}), "non-empty list"),
    (json.dumps({"session_id": "a", "turns": [{"input_delta": "x"}]}), "input_delta"),
    (json.dumps({"session_id": "a", "turns": [{"input_delta": [
        {"role": "robot", "content": "x"}]}]}), "role"),
    (json.dumps({"session_id": "a", "turns": [{"input_delta": [],
                                               "output_tokens": -1}]}),
     "output_tokens"),
    # JSON's "\ud800" is a lone surrogate: no tokenizer takes it mid-run
    (json.dumps({"session_id": "a", "turns": [{"input_delta": [
        {"role": "user", "content": "x\ud800"}]}]}),
     r"turns\[0\]\.input_delta\[0\]: 'content': .* lone surrogate"),
    (json.dumps({"session_id": "a", "system_prompt": "\udc80", "turns": [
        {"input_delta": []}]}), "'system_prompt': .* U\\+DC80 at character 0"),
    (json.dumps({"session_id": "a", "turns": [{"input_delta": [],
                                               "assistant_text": "ok\ud83d"}]}),
     "'assistant_text': .* at character 2"),
    # These crashed with a TypeError, said "invalid literal for int()"
    # without a place, or were truncated (1.9 -> 1).
    *[(json.dumps({"session_id": "a", "turns": [{"input_delta": [],
                                                 key: value}]}),
       rf"turns\[0\]: '{key}' must be a non-negative integer")
      for key, value in (("index", "first"), ("index", 1.9), ("index", [1]),
                         ("input_tokens", [5]), ("cached_tokens", "many"),
                         ("output_tokens", True))],
    # Python's json reads Infinity; replay then crashed in sleep() mid-run
    ('{"session_id": "a", "turns": [{"input_delta": [], '
     '"pre_gap_ms": Infinity}]}', "'pre_gap_ms' must be a finite"),
    # replay follows the file's order: indices out of order or repeated
    (json.dumps({"session_id": "a", "turns": [
        {"input_delta": [], "index": 1}, {"input_delta": [], "index": 0}]}),
     r"turns\[1\]: 'index' 0 does not follow the turn before it \(1\)"),
    (json.dumps({"session_id": "a", "turns": [
        {"input_delta": [], "index": 0}, {"input_delta": [], "index": 0}]}),
     "does not follow"),
])
def test_bad_input_says_where(tmp_path, line, msg):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"session_id": "ok", "turns": [{"input_delta": []}]})
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(TraceError, match=msg) as e:
    load_trace(str(path))
  assert "bad.jsonl:2" in str(e.value)


def test_duplicate_session_and_missing_file(tmp_path):
  path = tmp_path / "dup.jsonl"
  line = json.dumps({"session_id": "a", "turns": [{"input_delta": []}]})
  path.write_text(line + "\n" + line + "\n")
  with pytest.raises(TraceError, match="duplicate"):
    load_trace(str(path))
  with pytest.raises(FileNotFoundError):
    load_trace(str(tmp_path / "nope.jsonl"))


def test_synthetic_is_deterministic_and_grows():
  a = synthetic_agent_workload(seed=5)
  b = synthetic_agent_workload(seed=5)
  c = synthetic_agent_workload(seed=6)
  assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
  assert [s.to_dict() for s in a] != [s.to_dict() for s in c]
  lines = [t.input_delta[0]["content"].count("\n") for t in a[0].turns[1:]]
  assert lines == sorted(set(lines)) and lines[-1] > 2 * lines[0]
  tenants = {s.tenant for s in a}
  assert len(tenants) == 2
  for tenant in tenants:
    prompts = {s.system_prompt for s in a if s.tenant == tenant}
    assert len(prompts) == 1  # a tenant's sessions share their system prompt


def test_limit_and_paths_that_are_no_trace(tmp_path):
  """limit=0 used to keep one session (the count was checked after the
  first append); a directory raised IsADirectoryError from open()."""
  path = tmp_path / "three.jsonl"
  path.write_text("".join(
      json.dumps({"session_id": f"s{i}", "turns": [{"input_delta": []}]})
      + "\n" for i in range(3)))
  assert [s.session_id for s in load_trace(str(path), limit=2)] == ["s0", "s1"]
  for limit in (0, -1):
    with pytest.raises(ValueError, match="limit must be >= 1"):
      load_trace(str(path), limit=limit)
  with pytest.raises(TraceError, match="not a file"):
    load_trace(str(tmp_path))


def test_zstd_trace_cut_short_or_of_several_frames(tmp_path):
  """zstandard's stream reader ends a cut-short frame without a word: a
  truncated trace read as fewer sessions (or none). Now it is an error
  wherever the cut falls; a file of several frames (`cat a.zst b.zst`)
  reads whole."""
  import zstandard  # pylint: disable=g-import-not-at-top
  sessions = synthetic_agent_workload(num_sessions=6, turns_per_session=3,
                                      seed=5)
  lines = [json.dumps(s.to_dict()) + "\n" for s in sessions]
  first = zstandard.ZstdCompressor().compress("".join(lines[:4]).encode())
  second = zstandard.ZstdCompressor().compress("".join(lines[4:]).encode())
  path = tmp_path / "t.jsonl.zst"
  path.write_bytes(first + second)
  assert [s.to_dict() for s in load_trace(str(path))] == [
      s.to_dict() for s in sessions]
  whole = first + second
  for cut in (len(first) // 2, len(first) + 5, len(whole) - 1):
    path.write_bytes(whole[:cut])
    with pytest.raises(TraceError, match="truncated zstd data"):
      load_trace(str(path))
  # Cut exactly between two frames: a whole file of fewer frames.
  path.write_bytes(first)
  assert len(load_trace(str(path))) == 4
  path.write_bytes(b"plain text, not zstd\n")
  with pytest.raises(TraceError, match="bad zstd data"):
    load_trace(str(path))


def test_turn_indices_default_to_their_position(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"session_id": "a", "turns": [
      {"input_delta": []}, {"input_delta": []}, {"input_delta": []}]}) + "\n")
  (s,) = load_trace(str(path))
  assert [t.index for t in s.turns] == [0, 1, 2]
