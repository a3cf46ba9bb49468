"""Synthetic agent sessions: a coding agent that reads ever larger tool output.

Each session starts from its tenant's system prompt (shared by every session
of the tenant, so their first blocks are shared prefixes), receives a task,
then alternates assistant tool calls with tool results whose size grows turn
by turn, the pattern that makes agent contexts long and re-read every turn.
The text is built from a fixed vocabulary of code, file listings and test logs
with a seeded RNG: the same arguments always give the same workload.
"""

from __future__ import annotations

import math

import numpy as np

from dualpath_jax.workload.trace import AgentSession, AgentTurn

_MODULES = ("parser", "cache", "scheduler", "storage", "engine", "metrics",
            "tokenizer", "server", "config", "utils", "planner", "router")
_FUNCS = ("load", "save", "merge", "split", "lookup", "insert", "evict",
          "flush", "encode", "decode", "schedule", "validate", "resolve")
_WORDS = ("block", "table", "request", "token", "session", "layer", "page",
          "queue", "batch", "prefix", "hash", "chunk", "buffer", "index")
_TASKS = (
    "The test suite fails in the {m} module after the last refactor. Find the "
    "cause and fix it without changing the public API.",
    "Add a `{f}_all` helper to {m}.py that applies `{f}` to a list of items, "
    "with tests.",
    "Profile {m}.py: `{f}` is slow on large inputs. Make it faster and show the "
    "numbers.",
    "Users report a crash when `{f}` gets an empty input in {m}.py. Reproduce it, "
    "fix it, and add a regression test.",
)


def _system_prompt(tenant: str) -> str:
  return (
      f"You are a careful software engineering agent working for {tenant}. "
      "You can call tools by replying with a JSON object on one line: "
      '{"tool": "bash", "cmd": "..."} runs a shell command, '
      '{"tool": "read", "path": "..."} prints a file, '
      '{"tool": "edit", "path": "...", "old": "...", "new": "..."} edits one. '
      "Think briefly, then call exactly one tool per reply. Keep changes small, "
      "run the tests after every edit, and stop when they pass.")


def _code_lines(rng: np.random.Generator, n: int) -> list[str]:
  lines = []
  for _ in range(n):
    kind = rng.integers(4)
    f, w = rng.choice(_FUNCS), rng.choice(_WORDS)
    if kind == 0:
      lines.append(f"def {f}_{w}(self, {w}s, limit={int(rng.integers(1, 512))}):")
    elif kind == 1:
      lines.append(f"    for {w} in {w}s[:limit]:")
    elif kind == 2:
      lines.append(f"        self._{w}_count += len({w}.{rng.choice(_WORDS)}s)")
    else:
      lines.append(f"    return [{f}({w}) for {w} in {w}s if {w} is not None]")
  return lines


def _log_lines(rng: np.random.Generator, n: int) -> list[str]:
  lines = []
  for _ in range(n):
    m, f = rng.choice(_MODULES), rng.choice(_FUNCS)
    ok = rng.random() < 0.85
    ms = float(rng.gamma(2.0, 8.0))
    lines.append(f"tests/test_{m}.py::test_{f}_{rng.choice(_WORDS)} "
                 f"{'PASSED' if ok else 'FAILED'} [{ms:.1f} ms]")
  return lines


def _listing_lines(rng: np.random.Generator, n: int) -> list[str]:
  return [f"-rw-r--r-- 1 dev dev {int(rng.integers(200, 90000)):>6} "
          f"src/{rng.choice(_MODULES)}/{rng.choice(_FUNCS)}_{rng.choice(_WORDS)}.py"
          for _ in range(n)]


def _tool_output(rng: np.random.Generator, lines: int) -> str:
  kind = rng.integers(3)
  make = (_code_lines, _log_lines, _listing_lines)[kind]
  return "\n".join(make(rng, lines))


def _assistant_reply(rng: np.random.Generator, module: str) -> str:
  f = rng.choice(_FUNCS)
  action = rng.integers(3)
  if action == 0:
    call = f'{{"tool": "bash", "cmd": "pytest -q tests/test_{module}.py -k {f}"}}'
  elif action == 1:
    call = f'{{"tool": "read", "path": "src/{module}/{f}.py"}}'
  else:
    call = (f'{{"tool": "edit", "path": "src/{module}/{f}.py", '
            f'"old": "return {f}(x)", "new": "return {f}(x) if x else []"}}')
  return f"I will look at `{f}` in {module} next.\n{call}"


def _check_sizes(num_sessions: int, turns_per_session: int, num_tenants: int,
                 first_tool_lines: int, growth_lines: int, output_tokens: int,
                 gap_ms: float) -> None:
  """ValueError for arguments that would make sessions `load_trace` refuses
  (a negative `output_tokens`, a NaN or infinite gap) or numpy's bare
  "scale < 0" (a negative gap)."""
  if num_sessions < 1 or turns_per_session < 1 or num_tenants < 1:
    raise ValueError("num_sessions, turns_per_session and num_tenants must be >= 1")
  if first_tool_lines < 0 or growth_lines < 0 or output_tokens < 0:
    raise ValueError("first_tool_lines, growth_lines and output_tokens must be "
                     f">= 0, got {first_tool_lines}, {growth_lines}, "
                     f"{output_tokens}")
  if not (gap_ms >= 0 and math.isfinite(gap_ms)):
    raise ValueError(f"gap_ms must be a finite number >= 0, got {gap_ms!r}")


def synthetic_agent_workload(num_sessions: int = 8, turns_per_session: int = 6,
                             num_tenants: int = 2, first_tool_lines: int = 6,
                             growth_lines: int = 6, output_tokens: int = 32,
                             gap_ms: float = 200.0,
                             seed: int = 0) -> list[AgentSession]:
  """Builds `num_sessions` coding-agent sessions of `turns_per_session` turns.

  Turn `i > 0` appends a tool result of `first_tool_lines + i * growth_lines`
  lines (about 12 tokens a line), so contexts grow quadratically in the
  number of turns, as real agent contexts do.
  """
  _check_sizes(num_sessions, turns_per_session, num_tenants,
               first_tool_lines, growth_lines, output_tokens, gap_ms)
  rng = np.random.default_rng(seed)
  sessions = []
  for s in range(num_sessions):
    tenant = f"tenant-{s % num_tenants}"
    module = str(rng.choice(_MODULES))
    task = str(rng.choice(_TASKS)).format(m=module, f=rng.choice(_FUNCS))
    turns = []
    for i in range(turns_per_session):
      if i == 0:
        delta = [{"role": "user", "content": task}]
      else:
        lines = first_tool_lines + i * growth_lines
        delta = [{"role": "user",
                  "content": "Tool output:\n" + _tool_output(rng, lines)}]
      turns.append(AgentTurn(
          index=i, input_delta=delta,
          assistant_text=_assistant_reply(rng, module),
          output_tokens=output_tokens,
          pre_gap_ms=0.0 if i == 0 else float(rng.exponential(gap_ms))))
    sessions.append(AgentSession(
        session_id=f"synthetic-{s:04d}", system_prompt=_system_prompt(tenant),
        turns=turns, tenant=tenant, source={"dataset": "synthetic", "seed": seed}))
  return sessions
