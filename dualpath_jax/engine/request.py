"""What goes into the engine (a turn to serve) and what comes out."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from dualpath_jax.cache.kv_cache_manager import RequestTooLargeError


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


def validate_request(req: TurnRequest, *, max_context: int, block_size: int,
                     pool_blocks: int) -> None:
  """Raises ValueError (`RequestTooLargeError` for size) if `req` can never run.

  Reads only configuration, so a front end may call it from any thread
  before handing the request to the thread that steps the engine.
  """
  if not req.prompt_tokens:
    raise ValueError(f"{req.request_id}: empty prompt")
  if req.max_new_tokens < 1:
    raise ValueError(f"{req.request_id}: max_new_tokens must be >= 1")
  total = len(req.prompt_tokens) + req.max_new_tokens
  if total > max_context:
    raise RequestTooLargeError(
        f"{req.request_id}: prompt ({len(req.prompt_tokens)}) + max_new_tokens "
        f"({req.max_new_tokens}) = {total} exceeds max_context {max_context}")
  blocks = math.ceil(total / block_size)
  if blocks > pool_blocks:
    raise RequestTooLargeError(
        f"{req.request_id}: needs {blocks} blocks but the pool has "
        f"{pool_blocks}")
  if req.temperature is not None and req.temperature < 0:
    raise ValueError(f"{req.request_id}: temperature must be >= 0, got "
                     f"{req.temperature}")
  if req.top_p is not None and not 0 < req.top_p <= 1:
    raise ValueError(f"{req.request_id}: top_p must be in (0, 1], got "
                     f"{req.top_p}")
