"""Flags that pick the agent workload, shared by `agent_eval` and `bench_online`.

A workload is either a recorded trace (`--trace`, abench-session-jsonl-v1)
or the built-in synthetic coding-agent sessions (`--sessions`, `--turns`,
`--first_tool_lines`, `--growth_lines`), tokenized by the model's own
tokenizer or, for random weights, one token per byte (`--tokenizer=bytes`,
`workload.byte_tokenizer`). `define()` is idempotent
(`cluster_flags.define_once`); each launcher keeps its own `--seed`, which the
synthetic workload uses unless `--workload_seed` is given.
"""

from __future__ import annotations

from absl import flags

from launch import cluster_flags

FLAGS = flags.FLAGS


def define(honor_gaps_default: bool = False) -> None:
  """Defines the workload flags (once per process)."""
  once = cluster_flags.define_once
  once(flags.DEFINE_string, "trace", None, "abench-session-jsonl-v1 trace "
       "(.jsonl or .jsonl.zst); default: the built-in synthetic workload")
  once(flags.DEFINE_integer, "workload_seed", None,
       "synthetic workload: the seed of its sessions' text (default: "
       "--seed); set it to sample the same prompts under other --seed "
       "values", lower_bound=0)
  once(flags.DEFINE_integer, "sessions", 8,
       "synthetic workload: number of sessions")
  once(flags.DEFINE_integer, "turns", 6, "synthetic workload: turns per session")
  once(flags.DEFINE_integer, "first_tool_lines", 6, "synthetic workload: "
       "base size of the tool outputs: turn i > 0 reads one of "
       "first_tool_lines + i * growth_lines lines (turn 0 reads only the task)")
  once(flags.DEFINE_integer, "growth_lines", 6, "synthetic workload: "
       "lines each later turn's tool output has over the turn before's")
  once(flags.DEFINE_integer, "limit_sessions", None,
       "use only the first N sessions (of the trace, or of the synthetic "
       "workload)", lower_bound=1)
  once(flags.DEFINE_enum, "reply", "generate", ["generate", "teacher_forced"],
       "what joins the history after a turn: the generated reply or the "
       "recorded assistant_text")
  once(flags.DEFINE_integer, "max_new_tokens", 32, "cap on tokens generated "
       "per turn (the trace's output_tokens lowers it per turn)", lower_bound=1)
  once(flags.DEFINE_bool, "honor_gaps", honor_gaps_default,
       "wait each turn's recorded pre_gap_ms (tool time) after the turn "
       "before it finished; a session's first turn arrives at the session's "
       "start, its own pre_gap_ms unused")
  once(flags.DEFINE_enum, "tokenizer", "model", ["model", "bytes"],
       "model: the model's own; bytes: one token per byte, a stand-in for "
       "random weights (random:<preset>)")


def pick_tokenizer(config, model_tokenizer):
  """The tokenizer `--tokenizer` names, for a model of `config` whose own
  is `model_tokenizer` (None for random weights).

  Raises:
    ValueError: the model has none and `--tokenizer=model`.
  """
  if FLAGS.tokenizer == "bytes":
    from dualpath_jax.workload.byte_tokenizer import ByteChatTokenizer  # pylint: disable=g-import-not-at-top
    return ByteChatTokenizer(config.vocab_size)
  if model_tokenizer is None:
    raise ValueError("random weights have no tokenizer: add "
                     "--tokenizer=bytes (or use a GGUF or a converted "
                     "checkpoint)")
  return model_tokenizer


def load_sessions():
  """The sessions the flags describe.

  Raises:
    ValueError: non-positive synthetic sizes.
    TraceError, FileNotFoundError: an unreadable trace.
  """
  from dualpath_jax.workload import load_trace, synthetic_agent_workload
  if FLAGS.trace:
    return load_trace(FLAGS.trace, limit=FLAGS.limit_sessions)
  if FLAGS.sessions < 1 or FLAGS.turns < 1:
    raise ValueError("--sessions and --turns must be >= 1")
  if FLAGS.first_tool_lines < 0 or FLAGS.growth_lines < 0:
    raise ValueError("--first_tool_lines and --growth_lines must be >= 0")
  sessions = synthetic_agent_workload(num_sessions=FLAGS.sessions,
                                      turns_per_session=FLAGS.turns,
                                      first_tool_lines=FLAGS.first_tool_lines,
                                      growth_lines=FLAGS.growth_lines,
                                      output_tokens=FLAGS.max_new_tokens,
                                      seed=synthetic_seed())
  if FLAGS.limit_sessions is not None:
    sessions = sessions[:FLAGS.limit_sessions]
  return sessions


def synthetic_seed() -> int:
  """The synthetic workload's seed: `--workload_seed`, else `--seed`."""
  return FLAGS.seed if FLAGS.workload_seed is None else FLAGS.workload_seed


def describe() -> str:
  """The workload in one string, for reports."""
  return FLAGS.trace or (f"synthetic:{FLAGS.sessions}x{FLAGS.turns}"
                         f":first{FLAGS.first_tool_lines}"
                         f":growth{FLAGS.growth_lines}")


def max_context_bound(sessions, tokenizer,
                      max_new_tokens: int | None = None) -> int:
  """Upper bound on any turn's context: every message plus every reply budget
  (`max_new_tokens`, default `--max_new_tokens`, and a few tokens of slack
  per reply). Starts from the messages the replay starts from
  (`replay.initial_messages`): a session without a system prompt sends none,
  and a chat template may add a default one that an empty system message
  would have replaced."""
  from dualpath_jax.workload.replay import initial_messages  # pylint: disable=g-import-not-at-top
  if max_new_tokens is None:
    max_new_tokens = FLAGS.max_new_tokens
  bound = 0
  for s in sessions:
    msgs = initial_messages(s)
    for t in s.turns:
      msgs += t.input_delta
      msgs.append({"role": "assistant", "content": t.assistant_text})
    replies = len(s.turns) * (max_new_tokens + 8)
    bound = max(bound, len(tokenizer.encode_chat(msgs)) + replies)
  return bound
