"""What goes into the engine (a turn to serve) and what comes out."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class TurnRequest:
  """One LLM call: generate after `prompt_tokens` (the whole context).

  `prompt_tokens` is the session's full context (history plus the new
  messages); the engine finds which of its blocks are already cached.
  """

  request_id: str
  prompt_tokens: list[int]
  max_new_tokens: int
  tenant: str = ""
  session_id: str = ""
  turn_index: int = 0
  arrival_s: float | None = None  # engine clock; None = when submitted
  stop_on_eos: bool = True
  # Per-request sampling; None = the engine's `EngineConfig` setting.
  # temperature == 0 is greedy. `seed` gives the turn its own generator.
  temperature: float | None = None
  top_p: float | None = None
  seed: int | None = None
  # Streaming hook, called in the engine's thread with every accepted token
  # (EOS included) as soon as it is sampled. Returning True finishes the turn
  # after this token with finish_reason "stop" (e.g. a stop string matched).
  on_token: Callable[[int], bool | None] | None = dataclasses.field(
      default=None, repr=False, compare=False)


@dataclasses.dataclass
class TurnOutput:
  """A finished turn, with the timestamps the metrics are computed from."""

  request: TurnRequest
  generated_tokens: list[int]
  cached_prompt_tokens: int
  arrival_s: float
  first_token_s: float
  finish_s: float
  finish_reason: str  # "eos" | "length" | "stop" (`on_token` asked to stop)
