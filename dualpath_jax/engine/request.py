"""What goes into the engine (a turn to serve) and what comes out."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import numpy as np

from dualpath_jax.cache.kv_cache_manager import RequestTooLargeError
from dualpath_jax.utils import is_integer


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
  # Log-probabilities of the generated tokens (`TurnOutput.logprobs`): None
  # = none; k in [0, MAX_TOP_LOGPROBS] = each token's, and the k most likely
  # tokens' at that step. Of the model's distribution: the log-softmax of
  # its logits, before temperature and top-p (what a trainer recomputes).
  logprobs: int | None = None
  # Streaming hook, called in the engine's thread with every accepted token
  # (EOS included) as soon as it is sampled. Returning True finishes the turn
  # after this token with finish_reason "stop" (e.g. a stop string matched).
  on_token: Callable[[int], bool | None] | None = dataclasses.field(
      default=None, repr=False, compare=False)
  # With `logprobs` set: called in the engine's thread with each token's
  # `TokenLogprob` just before `on_token` is called with the token (a
  # server streams them with the text). Raising fails the turn, as there.
  on_logprob: Callable[["TokenLogprob"], None] | None = dataclasses.field(
      default=None, repr=False, compare=False)


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A generated token's log-probability, and the most likely tokens' at
  its step (most likely first; `TurnRequest.logprobs` of them)."""

  token: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class TurnOutput:
  """A finished turn, with the timestamps the metrics are computed from."""

  request: TurnRequest
  generated_tokens: list[int]
  cached_prompt_tokens: int
  arrival_s: float
  first_token_s: float
  finish_s: float
  # "eos" | "length" | "stop" (`on_token` asked to stop) | "error"
  # (`on_token` raised: `error` holds what it raised)
  finish_reason: str
  error: BaseException | None = dataclasses.field(default=None, repr=False,
                                                  compare=False)
  # One per generated token when the request asked (`TurnRequest.logprobs`).
  logprobs: list[TokenLogprob] | None = dataclasses.field(default=None,
                                                          repr=False)


def _is_real(value: object) -> bool:
  """A real number that is not a bool (True would pass as 1)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_logprobs(value: int | None, where: str = "") -> None:
  """ValueError unless `value` is a `TurnRequest.logprobs`: None or an
  integer in [0, MAX_TOP_LOGPROBS] (a bool is not one)."""
  if value is not None and not (is_integer(value) and
                                0 <= value <= MAX_TOP_LOGPROBS):
    raise ValueError(f"{where}logprobs must be None or an integer in [0, "
                     f"{MAX_TOP_LOGPROBS}]; got {value!r}")


def validate_request(req: TurnRequest, *, max_context: int, block_size: int,
                     pool_blocks: int, vocab_size: int | None = None) -> None:
  """Raises ValueError (`RequestTooLargeError` for size) if `req` can never run.

  Everything is checked here, at submission, because a request refused
  later would be refused at the head of the queue on every step (nobody
  else served), and a token id past the vocabulary (`vocab_size`) embeds as
  NaN, whose K/V would stay in the pool's pages and spread to whoever reads
  them next. Reads only configuration, so a front end may call it from any
  thread before handing the request to the thread that steps the engine.
  """
  rid = req.request_id
  if not isinstance(rid, str):
    raise ValueError(f"request_id must be a str; got {rid!r}")
  for name in ("tenant", "session_id"):
    value = getattr(req, name)
    if not isinstance(value, str):
      raise ValueError(f"{rid}: {name} must be a str; got {value!r}")
    try:  # block ids hash it as UTF-8: a lone surrogate failed the step
      value.encode("utf-8")
    except UnicodeEncodeError:
      raise ValueError(f"{rid}: {name} is not valid Unicode (a lone "
                       f"surrogate): {value!r}") from None
  if isinstance(req.prompt_tokens, (str, bytes)):
    raise ValueError(f"{rid}: prompt_tokens must be token ids, not text")
  tokens = np.asarray(req.prompt_tokens)
  if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
    raise ValueError(f"{rid}: prompt_tokens must be a flat list of integer "
                     f"token ids; got {tokens.dtype} of shape {tokens.shape}")
  if not tokens.size:
    raise ValueError(f"{rid}: empty prompt")
  high = math.inf if vocab_size is None else vocab_size
  outside = (tokens < 0) | (tokens >= high)
  if outside.any():
    raise ValueError(f"{rid}: token id {int(tokens[outside][0])} is outside "
                     f"the vocabulary [0, {high})")
  if not is_integer(req.max_new_tokens):
    raise ValueError(f"{rid}: max_new_tokens must be an integer; got "
                     f"{req.max_new_tokens!r}")
  if req.max_new_tokens < 1:
    raise ValueError(f"{rid}: max_new_tokens must be >= 1")
  total = len(req.prompt_tokens) + req.max_new_tokens
  if total > max_context:
    raise RequestTooLargeError(
        f"{rid}: prompt ({len(req.prompt_tokens)}) + max_new_tokens "
        f"({req.max_new_tokens}) = {total} exceeds max_context {max_context}")
  blocks = math.ceil(total / block_size)
  if blocks > pool_blocks:
    raise RequestTooLargeError(
        f"{rid}: needs {blocks} blocks but the pool has "
        f"{pool_blocks}")
  if req.temperature is not None and not (
      _is_real(req.temperature) and 0 <= req.temperature < math.inf):
    raise ValueError(f"{rid}: temperature must be a number >= 0, "
                     f"got {req.temperature!r}")
  if req.top_p is not None and not (_is_real(req.top_p) and
                                    0 < req.top_p <= 1):
    raise ValueError(f"{rid}: top_p must be a number in (0, 1], got "
                     f"{req.top_p!r}")
  if req.arrival_s is not None and not (_is_real(req.arrival_s) and
                                        math.isfinite(req.arrival_s)):
    raise ValueError(f"{rid}: arrival_s must be a finite number (engine "
                     f"clock seconds) or None, got {req.arrival_s!r}")
  if not isinstance(req.stop_on_eos, bool):
    raise ValueError(f"{rid}: stop_on_eos must be a bool, got "
                     f"{req.stop_on_eos!r}")
  for hook in ("on_token", "on_logprob"):
    value = getattr(req, hook)
    if value is not None and not callable(value):
      raise ValueError(f"{rid}: {hook} must be callable or None, got "
                       f"{value!r}")
  if req.seed is not None and not (is_integer(req.seed) and req.seed >= 0):
    raise ValueError(f"{rid}: seed must be an integer >= 0; got {req.seed!r}")
  check_logprobs(req.logprobs, f"{rid}: ")


