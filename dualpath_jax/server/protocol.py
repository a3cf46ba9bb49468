"""OpenAI-compatible wire format: request bodies, responses, errors.

Requests are pydantic models that accept unknown fields (clients and SDKs
send many optional ones; vLLM and SGLang ignore what they do not use), but
reject, with an OpenAI-style 400, every field whose meaning we would silently
change: penalties, tools, non-text response formats, `echo`, `best_of`.
`n` choices (up to `MAX_CHOICES`) are n turns of one prompt, which the
engine prefills once (`choice_seed` gives each its own seed).
Log-probabilities are served (`logprobs`/`top_logprobs` up to
`MAX_TOP_LOGPROBS`; `server.logprobs` has the format).
Range checks follow the OpenAI API reference (temperature in [0, 2], top_p
in (0, 1]); stop strings are not limited to 4 (as in vLLM) but to
`MAX_STOP_STRINGS` of at most `MAX_STOP_CHARS` characters each: they are
compiled and matched on the serving path.
Responses and stream chunks are built by the functions at the end, so the
whole wire format lives in this file.

Extensions that vLLM also accepts: `ignore_eos`, `stop_token_ids`. Ours:
`session_id` (at most `MAX_SESSION_ID_CHARS` characters), the agent session
a request is a turn of (with `user`, the tenant): the cold tier records
whose blocks it writes, and the prefetcher (`--prefetch_blocks`) learns
when each session comes back.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import numpy as np
import pydantic

from dualpath_jax.engine.request import MAX_TOP_LOGPROBS
from dualpath_jax.text import CHAT_ROLES, check_unicode


MAX_STOP_STRINGS = 64
MAX_CHOICES = 128  # OpenAI's bound on `n`
MAX_STOP_CHARS = 512
MAX_SESSION_ID_CHARS = 256


class APIError(Exception):
  """An error returned as `{"error": {"message", "type", "param", "code"}}`."""

  def __init__(self, message: str, *, status_code: int = 400,
               type: str = "invalid_request_error",  # pylint: disable=W0622
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.message = message
    self.status_code = status_code
    self.type = type
    self.param = param
    self.code = code

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type,
                      "param": self.param, "code": self.code}}


def check_name(value: str, param: str) -> None:
  """APIError unless `value` can name a session or tenant (`user`): valid
  Unicode (hashed and stored in the cold tier's index as UTF-8), at most
  `MAX_SESSION_ID_CHARS` characters."""
  if len(value) > MAX_SESSION_ID_CHARS:
    raise APIError(f"{param} has {len(value)} characters; at most "
                   f"{MAX_SESSION_ID_CHARS}", param=param, code="invalid_value")
  try:
    check_unicode(value)
  except ValueError as e:
    raise APIError(f"{param}: {e}", param=param) from None


# JSON integers only: lax `int` took `true` as 1 (`n: true` one choice,
# `prompt: [true, false]` token ids 1 and 0) and `2.0` as 2.
Int = pydantic.StrictInt
# JSON booleans only: lax `bool` took "yes", "on", "1" and 1 as true
# (`"stream": "yes"` streamed).
Bool = pydantic.StrictBool


class StreamOptions(pydantic.BaseModel):
  include_usage: Bool = False


class _SamplingRequest(pydantic.BaseModel):
  """Fields shared by /v1/completions and /v1/chat/completions."""

  model_config = pydantic.ConfigDict(extra="allow")

  model: str
  max_tokens: Int | None = None
  temperature: float | None = pydantic.Field(default=None, ge=0.0, le=2.0)
  top_p: float | None = pydantic.Field(default=None, gt=0.0, le=1.0)
  n: Int | None = pydantic.Field(default=1, ge=1, le=MAX_CHOICES)
  stream: Bool | None = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  seed: Int | None = pydantic.Field(default=None, ge=0)
  user: str | None = None
  presence_penalty: float | None = 0.0
  frequency_penalty: float | None = 0.0
  logit_bias: dict[str, float] | None = None
  # vLLM extensions.
  ignore_eos: Bool = False
  stop_token_ids: list[Int] | None = None
  # Ours: the agent session this request is a turn of (module docstring).
  session_id: str | None = None

  def stop_strings(self) -> list[str]:
    if self.stop is None:
      return []
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
    return [s for s in stops if s]

  @property
  def choices(self) -> int:
    """How many choices to generate (`n`; None means 1)."""
    return 1 if self.n is None else self.n

  def check_supported(self) -> None:
    """Raises `APIError` for options this server does not implement."""
    for name in ("presence_penalty", "frequency_penalty"):
      if getattr(self, name):
        raise APIError(f"{name} is not supported (must be 0)", param=name,
                       code="unsupported_parameter")
    if self.logit_bias:
      raise APIError("logit_bias is not supported", param="logit_bias",
                     code="unsupported_parameter")
    if self.stream_options is not None and not self.stream:
      raise APIError("stream_options is only allowed when stream is true",
                     param="stream_options")
    # The prefix-sharing tenant and the agent session: hashed and stored
    # as UTF-8, and bounded alike, so `DELETE /v1/sessions` takes any pair
    # a request could name.
    for param in ("user", "session_id"):
      if getattr(self, param) is not None:
        check_name(getattr(self, param), param)
    stops = self.stop_strings()
    if len(stops) > MAX_STOP_STRINGS or any(
        len(s) > MAX_STOP_CHARS for s in stops):
      raise APIError(
          f"at most {MAX_STOP_STRINGS} stop strings of at most "
          f"{MAX_STOP_CHARS} characters each; got {len(stops)}, the longest "
          f"{max(map(len, stops))} characters", param="stop",
          code="invalid_value")


class ChatCompletionRequest(_SamplingRequest):
  """Body of POST /v1/chat/completions."""

  messages: list[dict[str, Any]]
  max_completion_tokens: Int | None = None
  logprobs: Bool | None = False
  top_logprobs: Int | None = None
  tools: list[dict[str, Any]] | None = None
  tool_choice: Any = None
  response_format: dict[str, Any] | None = None

  def check_supported(self) -> None:
    super().check_supported()
    if self.top_logprobs is not None:
      if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                       f"got {self.top_logprobs}", param="top_logprobs",
                       code="invalid_value")
      if not self.logprobs:
        raise APIError("top_logprobs needs logprobs: true",
                       param="top_logprobs", code="invalid_value")
    if self.tools:
      raise APIError("tool calling is not supported by this server; describe "
                     "tools in the prompt instead", param="tools",
                     code="unsupported_parameter")
    if self.tool_choice not in (None, "none"):
      raise APIError("tool_choice is not supported", param="tool_choice",
                     code="unsupported_parameter")
    if self.response_format and self.response_format.get("type") != "text":
      raise APIError("only response_format {'type': 'text'} is supported",
                     param="response_format", code="unsupported_parameter")

  def logprob_count(self) -> int | None:
    """`TurnRequest.logprobs`: None, or how many top tokens per step."""
    return (self.top_logprobs or 0) if self.logprobs else None

  def token_budget(self) -> int | None:
    """`max_completion_tokens`, else the deprecated `max_tokens`."""
    if self.max_completion_tokens is not None:
      return self.max_completion_tokens
    return self.max_tokens


class CompletionRequest(_SamplingRequest):
  """Body of POST /v1/completions (one prompt: text or token ids)."""

  prompt: str | list[Int] | list[str] | list[list[Int]]
  max_tokens: Int | None = 16  # the OpenAI default for completions
  echo: Bool | None = False
  logprobs: Int | None = None
  suffix: str | None = None
  best_of: Int | None = None

  def check_supported(self) -> None:
    super().check_supported()
    if self.echo:
      raise APIError("echo is not supported", param="echo",
                     code="unsupported_parameter")
    if self.logprobs is not None and not (
        0 <= self.logprobs <= MAX_TOP_LOGPROBS):
      raise APIError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                     f"{self.logprobs}", param="logprobs", code="invalid_value")
    if self.suffix:
      raise APIError("suffix is not supported", param="suffix",
                     code="unsupported_parameter")
    if self.best_of not in (None, 1):
      raise APIError("only best_of=1 is supported", param="best_of",
                     code="unsupported_value")

  def logprob_count(self) -> int | None:
    """`TurnRequest.logprobs`: None, or how many top tokens per step."""
    return self.logprobs

  def token_budget(self) -> int | None:
    return self.max_tokens


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
  """Messages as `{"role", "content": str}` for the chat template.

  Content may be a string, None (only for an assistant turn that called
  tools), or a list of `{"type": "text", "text": ...}` parts, which are joined.
  Raises `APIError` for anything else (images, audio, missing roles).
  """
  if not messages:
    raise APIError("messages must be a non-empty list", param="messages")
  out = []
  for i, m in enumerate(messages):
    role = m.get("role") if isinstance(m, dict) else None
    if not isinstance(role, str) or not role:
      raise APIError(f"messages[{i}] has no role", param=f"messages[{i}].role")
    if role not in CHAT_ROLES:
      raise APIError(f"messages[{i}].role {role[:40]!r} is not one of "
                     f"{', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
    content = m.get("content")
    if content is None and role != "assistant":
      # Only an assistant turn that called tools has no content (OpenAI's
      # rule); a user turn without one was a completion of an empty turn.
      raise APIError(f"messages[{i}].content is required for role {role!r}",
                     param=f"messages[{i}].content")
    if content is None:
      text = ""
    elif isinstance(content, str):
      text = content
    elif isinstance(content, list):
      parts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or \
            not isinstance(part.get("text"), str):
          raise APIError(f"messages[{i}]: only text content parts are "
                         "supported", param=f"messages[{i}].content")
        parts.append(part["text"])
      text = "".join(parts)
    else:
      raise APIError(f"messages[{i}].content must be a string or a list of "
                     "text parts", param=f"messages[{i}].content")
    for field, value in (("role", role), ("content", text)):
      try:
        check_unicode(value)
      except ValueError as e:
        raise APIError(f"messages[{i}].{field}: {e}",
                       param=f"messages[{i}].{field}") from None
    out.append({"role": role, "content": text})
  return out


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int,
          cached_tokens: int) -> dict[str, Any]:
  """The `usage` object; the prefix-cache hit is in `prompt_tokens_details`."""
  return {"prompt_tokens": prompt_tokens,
          "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


FinishReason = Literal["stop", "length"]


def finish_reason(engine_reason: str) -> FinishReason:
  """OpenAI's finish_reason for the engine's ("eos" and "stop" -> "stop")."""
  return "length" if engine_reason == "length" else "stop"


def choice_seed(seed: int | None, index: int) -> int | None:
  """The engine seed of choice `index` of a request with `seed`: the seed
  itself for choice 0 (so n=1 samples as before), and for the others a
  draw of `SeedSequence(seed, spawn_key=(index,))`, so that choices differ
  and a request with seed s+1 does not repeat choice 1 of seed s."""
  if seed is None or index == 0:
    return seed
  state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(2)
  return int(state[0]) << 32 | int(state[1])


def response_choice(chat: bool, index: int, text: str, reason: str,
                    logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
  """One entry of a non-streamed response's `choices`."""
  out: dict[str, Any] = {"index": index, "logprobs": logprobs,
                         "finish_reason": reason}
  if chat:
    out["message"] = {"role": "assistant", "content": text}
  else:
    out["text"] = text
  return out


def response(chat: bool, rid: str, model: str, choices: list[dict[str, Any]],
             usage_: dict[str, Any]) -> dict[str, Any]:
  """A non-streamed `chat.completion` or `text_completion`."""
  return {"id": rid, "object": "chat.completion" if chat
          else "text_completion", "created": now(), "model": model,
          "choices": choices, "usage": usage_}


def stream_chunk(chat: bool, rid: str, model: str, *, index: int = 0,
                 text: str | None = None,
                 role: str | None = None, reason: str | None = None,
                 usage_: dict[str, Any] | None = None,
                 with_usage_field: bool = False,
                 usage_only: bool = False,
                 logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
  """One SSE chunk (`chat.completion.chunk` or `text_completion`).

  A chunk carries one choice's delta (`index`). `usage_only` makes the
  final usage chunk (`choices: []`) sent when `stream_options.include_usage`
  is set; other chunks then carry `"usage": null` (`with_usage_field`), as
  OpenAI does.
  """
  out: dict[str, Any] = {
      "id": rid, "object": "chat.completion.chunk" if chat
      else "text_completion", "created": now(), "model": model}
  if usage_only:
    out["choices"] = []
  elif chat:
    delta: dict[str, Any] = {}
    if role is not None:
      delta["role"] = role
    if text is not None:
      delta["content"] = text
    out["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs,
                       "finish_reason": reason}]
  else:
    out["choices"] = [{"index": index, "text": text or "",
                       "logprobs": logprobs, "finish_reason": reason}]
  if usage_only or with_usage_field or usage_ is not None:
    out["usage"] = usage_
  return out


def model_card(name: str, max_model_len: int, created: int,
               root: str) -> dict[str, Any]:
  """An entry of GET /v1/models (with vLLM's `max_model_len`)."""
  return {"id": name, "object": "model", "created": created,
          "owned_by": "dualpath-jax", "root": root, "parent": None,
          "max_model_len": max_model_len}
