"""A request's prompt and fields turned into the engine's `TurnRequest`s.

The server's checks that need the model: a prompt that surely overflows the
context is refused before it is encoded (`Tokenizer.min_tokens`), token ids
outside the vocabulary and empty prompts are refused, and each choice's
token budget is fitted to the context (all of what is left when the body
names none, as OpenAI's completions do). The engine's own `validate`
refusals come back as the OpenAI error they are (`context_length_exceeded`
for a request no pool could hold).
"""

from __future__ import annotations

from typing import Any, Protocol

from dualpath_jax.cache.kv_cache_manager import RequestTooLargeError
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.server.engine_loop import EngineHandle
from dualpath_jax.server.protocol import (APIError, ChatCompletionRequest,
                                          CompletionRequest)


class ChoiceCallbacks(Protocol):
  """What a choice's turn reports to (`generation.ChoiceStream`)."""

  def on_token(self, token: int) -> bool: ...

  def on_logprob(self, entry) -> None: ...


class TurnBuilder:
  """Builds and checks the turns of the requests one server answers.

  Args:
    handle: the engine (`max_context`, `clock`, `validate`).
    tokenizer: a `dualpath_jax.model.Tokenizer` (encode, vocab_size and,
      optionally, min_tokens).
    default_temperature, default_top_p: for a body that omits them.
  """

  def __init__(self, handle: EngineHandle, tokenizer, *,
               default_temperature: float, default_top_p: float):
    self._handle = handle
    self._tokenizer = tokenizer
    self._default_temperature = default_temperature
    self._default_top_p = default_top_p

  def check_length(self, text: str, param: str) -> None:
    """Refuses text that surely holds more tokens than the context, before
    encoding it (`Tokenizer.min_tokens`, a lower bound)."""
    min_tokens = getattr(self._tokenizer, "min_tokens", None)
    if min_tokens is None:
      return
    at_least = min_tokens(text)
    max_context = self._handle.max_context
    if at_least >= max_context:
      raise APIError(
          f"This model's maximum context length is {max_context} "
          f"tokens; the prompt has at least {at_least} tokens",
          param=param, code="context_length_exceeded")

  def completion_prompt(self, prompt: Any) -> list[int]:
    """A completion's prompt (text, token ids, or a list of one of them) as
    token ids, checked."""
    if isinstance(prompt, list) and prompt and \
        isinstance(prompt[0], (str, list)):
      if len(prompt) != 1:
        raise APIError("only one prompt per request is supported (send one "
                       "request per prompt; n asks for several completions "
                       f"of one); got {len(prompt)}", param="prompt",
                       code="unsupported_value")
      prompt = prompt[0]
    if isinstance(prompt, str):
      try:
        tokens = self._tokenizer.encode(prompt)
      except ValueError as e:  # not valid Unicode
        raise APIError(f"prompt: {e}", param="prompt") from None
    else:
      tokens = [int(t) for t in prompt]
      bad = [t for t in tokens if not 0 <= t < self._tokenizer.vocab_size]
      if bad:
        raise APIError(
            f"token ids out of range [0, {self._tokenizer.vocab_size}): "
            f"{bad[:5]}", param="prompt")
    if not tokens:
      raise APIError("the prompt is empty", param="prompt")
    return tokens

  def turn(self, body: ChatCompletionRequest | CompletionRequest,
           prompt: list[int], rid: str, stream: ChoiceCallbacks,
           seed: int | None) -> TurnRequest:
    """One choice's turn: `prompt` with the body's budget and sampling,
    `stream`'s callbacks (`on_token`; `on_logprob` when streamed). Refuses
    (`APIError`) a prompt or budget past the context and whatever the
    engine's `validate` refuses."""
    max_context = self._handle.max_context
    budget = body.token_budget()
    param = ("max_completion_tokens" if getattr(
        body, "max_completion_tokens", None) is not None else "max_tokens")
    if len(prompt) >= max_context:
      raise APIError(
          f"This model's maximum context length is {max_context} tokens; "
          f"the prompt has {len(prompt)} tokens, leaving no room to generate",
          param="messages" if isinstance(body, ChatCompletionRequest)
          else "prompt", code="context_length_exceeded")
    if budget is None:
      budget = max_context - len(prompt)
    elif budget < 1:
      raise APIError(f"{param} must be at least 1, got {budget}", param=param,
                     code="invalid_value")
    elif len(prompt) + budget > max_context:
      raise APIError(
          f"This model's maximum context length is {max_context} tokens; "
          f"you requested {len(prompt) + budget} ({len(prompt)} in the "
          f"prompt, {budget} for the completion)", param=param,
          code="context_length_exceeded")
    temperature = (self._default_temperature if body.temperature is None
                   else body.temperature)
    turn = TurnRequest(
        request_id=rid, prompt_tokens=prompt, max_new_tokens=budget,
        tenant=body.user or "", session_id=body.session_id or "",
        stop_on_eos=not body.ignore_eos,
        arrival_s=self._handle.clock(), temperature=temperature,
        top_p=self._default_top_p if body.top_p is None else body.top_p,
        seed=seed, on_token=stream.on_token,
        logprobs=body.logprob_count(),
        # Per token only for a stream; a plain response reads them from the
        # turn's output (`TurnOutput.logprobs`).
        on_logprob=stream.on_logprob if body.stream else None)
    try:
      self._handle.validate(turn)
    except RequestTooLargeError as e:
      raise APIError(str(e), param=param,
                     code="context_length_exceeded") from e
    except ValueError as e:
      raise APIError(str(e), code="invalid_value") from e
    return turn
