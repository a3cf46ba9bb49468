"""Agent trajectories in the `abench-session-jsonl-v1` schema.

One JSON object per line, one line per session; the file may be plain or
zstd-compressed (`.zst`). This is the schema public agent-trajectory sets
already use (the `agentic-bench` package documents it), so recorded
trajectories replay unchanged:

    {"session_id": str,
     "tenant": str,                 # optional, ours: prefix-sharing domain
     "source": {...},               # optional, free-form provenance
     "system_prompt": str,
     "turns": [{"index": int,
                "input_delta": [{"role": str, "content": str}, ...],
                "assistant_text": str,   # recorded reply (teacher forcing)
                "output_tokens": int,    # recorded reply length (generation budget)
                "input_tokens": int,     # optional, recorded prompt length
                "cached_tokens": int,    # optional, recorded cache hit
                "pre_gap_ms": float},    # tool/user wait before this turn
               ...]}

`input_delta` holds the messages added to the conversation before the turn
(the user's message, a tool's output); the assistant's reply of turn `i`
precedes the `input_delta` of turn `i+1`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Iterable, Iterator

from dualpath_jax import outputs
from dualpath_jax.text import CHAT_ROLES, check_unicode


class TraceError(ValueError):
  """A trace file that does not follow the schema (says where and why)."""


@dataclasses.dataclass
class AgentTurn:
  """One LLM call of an agent session."""

  index: int
  input_delta: list[dict[str, str]]
  assistant_text: str = ""
  output_tokens: int = 0
  input_tokens: int = 0
  cached_tokens: int = 0
  pre_gap_ms: float = 0.0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class AgentSession:
  """A whole recorded (or synthetic) agent trajectory."""

  session_id: str
  system_prompt: str
  turns: list[AgentTurn]
  tenant: str = ""
  source: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    d = {"session_id": self.session_id, "system_prompt": self.system_prompt,
         "turns": [t.to_dict() for t in self.turns], "source": self.source}
    if self.tenant:
      d["tenant"] = self.tenant
    return d


def _open_for_writing(path: str, compress: bool) -> io.TextIOBase:
  """A text file to write, zstd-compressed when `compress` (reading goes
  through `_text_lines`, which notices a cut-short frame)."""
  if compress:
    import zstandard
    return zstandard.open(path, "wt", encoding="utf-8")
  return open(path, "w", encoding="utf-8")


def _text_lines(path: str) -> Iterator[str]:
  """The lines of a trace file, decompressed where it ends in `.zst`."""
  if not path.endswith(".zst"):
    with open(path, encoding="utf-8") as f:
      yield from f
    return
  yield from _zstd_lines(path)


def _zstd_lines(path: str) -> Iterator[str]:
  """The UTF-8 lines of a zstd file of one or more frames, TraceError if the
  last frame is cut short: zstandard's own stream reader ends there without
  a word, so a truncated trace would silently lose its last sessions."""
  import zstandard
  decompressor = zstandard.ZstdDecompressor()
  frame, in_frame, pending = decompressor.decompressobj(), False, b""
  with open(path, "rb") as raw:
    while chunk := raw.read(1 << 20):
      while chunk:
        pending += frame.decompress(chunk)
        in_frame = True
        chunk = b""
        if frame.eof:  # the rest of the chunk starts the next frame
          chunk = frame.unused_data
          frame, in_frame = decompressor.decompressobj(), False
      *lines, pending = pending.split(b"\n")
      for line in lines:
        yield line.decode("utf-8") + "\n"
  if in_frame:
    raise TraceError(f"{path}: truncated zstd data (its last frame is cut "
                     "short)")
  if pending:
    yield pending.decode("utf-8")


def _require(cond: bool, where: str, msg: str) -> None:
  if not cond:
    raise TraceError(f"{where}: {msg}")


def _require_text(value: str, where: str, field: str) -> None:
  """A string field must be valid Unicode (no lone surrogate): a tokenizer
  would refuse it at that turn, mid-run."""
  try:
    check_unicode(value)
  except ValueError as e:
    raise TraceError(f"{where}: {field}: {e}") from None


def _count(raw: dict, key: str, default: int, where: str) -> int:
  """`raw[key]` as a non-negative integer (absent or null: `default`)."""
  value = raw.get(key)
  if value is None:
    return default
  _require(isinstance(value, int) and not isinstance(value, bool)
           and value >= 0, where, f"{key!r} must be a non-negative integer")
  return value


def _parse_turn(raw: Any, where: str, position: int) -> AgentTurn:
  _require(isinstance(raw, dict), where, "a turn must be a JSON object")
  delta = raw.get("input_delta")
  _require(isinstance(delta, list), where, "'input_delta' must be a list of messages")
  for j, msg in enumerate(delta):
    _require(isinstance(msg, dict) and isinstance(msg.get("role"), str)
             and isinstance(msg.get("content"), str), f"{where}.input_delta[{j}]",
             "a message needs string 'role' and 'content'")
    _require(msg["role"] in CHAT_ROLES, f"{where}.input_delta[{j}]",
             f"role {msg['role']!r} is not one of {CHAT_ROLES}")
    _require_text(msg["content"], f"{where}.input_delta[{j}]", "'content'")
  out_tokens = _count(raw, "output_tokens", 0, where)
  gap = raw.get("pre_gap_ms", 0.0)
  _require(isinstance(gap, (int, float)) and not isinstance(gap, bool)
           and math.isfinite(gap) and gap >= 0, where,
           "'pre_gap_ms' must be a finite non-negative number")
  text = raw.get("assistant_text", "")
  _require(isinstance(text, str), where, "'assistant_text' must be a string")
  _require_text(text, where, "'assistant_text'")
  return AgentTurn(index=_count(raw, "index", position, where),
                   input_delta=[{"role": m["role"], "content": m["content"]}
                                for m in delta],
                   assistant_text=text, output_tokens=out_tokens,
                   input_tokens=_count(raw, "input_tokens", 0, where),
                   cached_tokens=_count(raw, "cached_tokens", 0, where),
                   pre_gap_ms=float(gap))


def parse_session(raw: Any, where: str = "session") -> AgentSession:
  """Validates one decoded JSON session; raises `TraceError` saying where."""
  _require(isinstance(raw, dict), where, "a session must be a JSON object")
  sid = raw.get("session_id")
  _require(isinstance(sid, str) and sid != "", where,
           "'session_id' must be a non-empty string")
  _require_text(sid, where, "'session_id'")
  system = raw.get("system_prompt", "")
  _require(isinstance(system, str), where, "'system_prompt' must be a string")
  _require_text(system, where, "'system_prompt'")
  turns = raw.get("turns")
  _require(isinstance(turns, list) and turns, where,
           "'turns' must be a non-empty list")
  tenant = raw.get("tenant", "")
  _require(isinstance(tenant, str), where, "'tenant' must be a string")
  _require_text(tenant, where, "'tenant'")  # hashed as the cache's salt
  source = raw.get("source")
  _require(source is None or isinstance(source, dict), where,
           "'source' must be a JSON object")
  parsed = [_parse_turn(t, f"{where}.turns[{i}]", i)
            for i, t in enumerate(turns)]
  for i in range(1, len(parsed)):  # replay follows the file's order
    _require(parsed[i].index > parsed[i - 1].index, f"{where}.turns[{i}]",
             f"'index' {parsed[i].index} does not follow the turn before it "
             f"({parsed[i - 1].index}): a session's turns must be listed in "
             "order, each index once")
  return AgentSession(
      session_id=sid, system_prompt=system, tenant=tenant,
      source=source or {}, turns=parsed)


def load_trace(path: str, limit: int | None = None) -> list[AgentSession]:
  """Reads a JSONL (or `.jsonl.zst`) trace; validates every session.

  `limit` keeps the first `limit` sessions (>= 1). Raises `TraceError`
  (with file and line) on malformed input or a path that is no file, and
  `FileNotFoundError` when the file is missing.
  """
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be >= 1 sessions; got {limit}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"trace file not found: {path}")
  if not os.path.isfile(path):
    raise TraceError(f"{path}: not a file (give a .jsonl or .jsonl.zst trace)")
  sessions: list[AgentSession] = []
  seen: set[str] = set()
  try:
    for lineno, line in enumerate(_text_lines(path), 1):
      if lineno == 1:  # a byte-order mark some editors write: not JSON
        line = line.removeprefix("\ufeff")
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        raise TraceError(f"{where}: invalid JSON ({e.msg})") from None
      session = parse_session(raw, where)
      _require(session.session_id not in seen, where,
               f"duplicate session_id {session.session_id!r}")
      seen.add(session.session_id)
      sessions.append(session)
      if limit is not None and len(sessions) >= limit:
        break
  except UnicodeDecodeError as e:
    raise TraceError(f"{path}: not UTF-8 text ({e.reason})") from None
  except Exception as e:  # zstandard raises its own error type on bad frames
    if type(e).__name__ == "ZstdError":
      raise TraceError(f"{path}: bad zstd data ({e})") from None
    raise
  if not sessions:
    raise TraceError(f"{path}: no sessions in trace")
  return sessions


def save_trace(sessions: Iterable[AgentSession], path: str) -> None:
  """Writes sessions as JSONL (zstd-compressed when `path` ends in `.zst`).

  Every session is checked as `load_trace` would check it (`TraceError`
  naming the session), so every session saved loads back; the file is
  written atomically (`outputs.replace_atomically`), so a failure leaves
  an earlier file at `path` whole.
  """
  def write(tmp: str) -> None:
    seen: set[str] = set()
    with _open_for_writing(tmp, compress=path.endswith(".zst")) as f:
      for i, s in enumerate(sessions):
        raw = s.to_dict()
        parse_session(raw, f"session {i}")
        _require(s.session_id not in seen, f"session {i}",
                 f"duplicate session_id {s.session_id!r}")
        seen.add(s.session_id)
        f.write(json.dumps(raw, ensure_ascii=False) + "\n")
  outputs.replace_atomically(path, write, suffix=".zst"
                             if path.endswith(".zst") else ".jsonl")
