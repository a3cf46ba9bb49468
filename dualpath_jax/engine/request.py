"""What goes into the engine (a turn to serve) and what comes out."""

from __future__ import annotations

import dataclasses


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


@dataclasses.dataclass
class TurnOutput:
  """A finished turn, with the timestamps the metrics are computed from."""

  request: TurnRequest
  generated_tokens: list[int]
  cached_prompt_tokens: int
  arrival_s: float
  first_token_s: float
  finish_s: float
  finish_reason: str  # "eos" | "length"
