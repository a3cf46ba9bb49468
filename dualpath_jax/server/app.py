"""FastAPI routes of the OpenAI-compatible server.

    GET  /v1/models            the served model, with `max_model_len`
    POST /v1/chat/completions  chat (messages -> chat template -> tokens)
    POST /v1/completions       raw text or token-id prompt
    GET  /health               200 while the engine loop runs
    GET  /metrics              Prometheus text (see prometheus.py)

A request becomes one `TurnRequest` (the whole prompt: chat clients resend
the conversation every turn, and the engine's prefix cache finds the blocks
it already holds, reported as `usage.prompt_tokens_details.cached_tokens`).
`user` becomes the engine's tenant: the prefix-sharing domain. Requests with
different `user` values never share cached blocks; requests without one
share the anonymous tenant "".

Each request gets a `_RequestStream`: the engine thread feeds it tokens
(`on_token`), it detokenizes and matches stop strings (`TextStream`), and
posts text events to the asyncio loop. A streamed response relays them as
SSE chunks; a plain one gathers them. If the client goes away first, the
request is aborted in the engine and its blocks are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any, AsyncIterator, Sequence

import fastapi
from absl import logging
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dualpath_jax.cache.kv_cache_manager import RequestTooLargeError
from dualpath_jax.engine.request import TurnOutput, TurnRequest
from dualpath_jax.server import protocol
from dualpath_jax.server.engine_loop import (EngineHandle, EngineLoop,
                                             ShuttingDown)
from dualpath_jax.server.prometheus import CONTENT_TYPE, ServerMetrics
from dualpath_jax.server.protocol import (APIError, ChatCompletionRequest,
                                          CompletionRequest)
from dualpath_jax.server import logprobs as logprob_format
from dualpath_jax.server.text_stream import TextStream

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks its client


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """What the HTTP layer adds to the engine's configuration."""

  model_names: tuple[str, ...]  # first = the id /v1/models reports
  default_temperature: float = 1.0  # OpenAI's default when a request omits it
  default_top_p: float = 1.0

  def __post_init__(self):
    if not self.model_names or not all(self.model_names):
      raise ValueError("model_names needs at least one non-empty name")
    if not 0 <= self.default_temperature <= 2:
      raise ValueError("default_temperature must be in [0, 2]")
    if not 0 < self.default_top_p <= 1:
      raise ValueError("default_top_p must be in (0, 1]")


class _RequestStream:
  """Bridges one request's engine callbacks (engine thread) to asyncio."""

  def __init__(self, loop: asyncio.AbstractEventLoop, text: TextStream):
    self._loop = loop
    self._text = text
    self.events: asyncio.Queue = asyncio.Queue()
    self.finished = False  # set by the consumer once it saw the end
    # TokenLogprobs of tokens whose text is not out yet (held back by an
    # incomplete character or a possible stop string): sent with the next
    # text, or at the end.
    self._logprobs: list = []

  def on_logprob(self, entry) -> None:
    self._logprobs.append(entry)

  def _take_logprobs(self) -> list:
    taken, self._logprobs = self._logprobs, []
    return taken

  def _post(self, event: tuple) -> None:
    with contextlib.suppress(RuntimeError):  # the event loop already closed
      self._loop.call_soon_threadsafe(self.events.put_nowait, event)

  def on_token(self, token: int) -> bool:
    try:
      delta = self._text.push(token)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("detokenizing token %d failed", token)
      self._post(("error", e))
      return True
    if delta:
      self._post(("text", delta, self._take_logprobs()))
    return self._text.stopped

  def on_finish(self, out: TurnOutput) -> None:
    tail = self._text.flush() if out.finish_reason != "stop" else ""
    self._post(("finish", tail, out, self._take_logprobs()))

  def on_error(self, error: BaseException) -> None:
    self._post(("error", error))


def create_app(handle: EngineHandle, tokenizer, config: ServerConfig
               ) -> fastapi.FastAPI:
  """The FastAPI app serving `handle`; its lifespan runs the engine loop.

  `tokenizer` is a `dualpath_jax.model.Tokenizer` (encode, decode,
  encode_chat, is_special, vocab_size).
  """
  engine_loop = EngineLoop(handle)
  metrics = ServerMetrics(lambda: engine_loop.snapshot)
  created = protocol.now()

  @contextlib.asynccontextmanager
  async def lifespan(app: fastapi.FastAPI):
    del app
    engine_loop.start()
    try:
      yield
    finally:
      engine_loop.stop()

  app = fastapi.FastAPI(title="dualpath-jax", lifespan=lifespan)
  app.state.engine_loop = engine_loop
  app.state.metrics = metrics
  app.state.config = config
  app.state.tokenizer = tokenizer

  # ------------------------------------------------------------- errors
  def error_response(err: APIError) -> responses.JSONResponse:
    metrics.rejected.labels(str(err.status_code)).inc()
    return responses.JSONResponse(err.body(), status_code=err.status_code)

  @app.exception_handler(APIError)
  async def _api_error(request, err: APIError):
    del request
    return error_response(err)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    if tuple(first.get("loc", ())) == ("body",):  # no JSON object at all
      kind = request.headers.get("content-type")
      if first.get("type") == "missing":
        why = "the request body is empty"
      elif kind is None or not kind.split(";")[0].strip().endswith("json"):
        why = f"the request body is not JSON (Content-Type: {kind})"
      else:
        why = "the request body must be a JSON object"
      return error_response(APIError(
          f"{why}; send a JSON object with Content-Type: application/json",
          code="invalid_json"))
    if first.get("type") == "json_invalid":  # its loc is a character offset
      where = first.get("loc", ("body", None))[-1]
      why = (first.get("ctx") or {}).get("error", "")
      return error_response(APIError(
          f"the request body is not valid JSON ({why}, at character "
          f"{where})", code="invalid_json"))
    param = _param_name(first.get("loc", ()))
    msg = first.get("msg", "invalid request")
    tags = [loc[-1] for loc in (e.get("loc", ()) for e in err.errors())
            if _param_name(loc) == param and _is_type_tag(loc[-1])]
    if len(tags) > 1:  # a union: each member's error names its type
      msg = f"Input should be one of {' | '.join(tags)}"
    value = first.get("input")
    if isinstance(value, float) and value != value:
      msg = "Input should be a number, not NaN"
    return error_response(APIError(
        f"{param}: {msg}" if param else msg, param=param,
        code="invalid_value" if param else "invalid_json"))

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, err: StarletteHTTPException):
    del request
    return error_response(APIError(str(err.detail), status_code=err.status_code,
                                   type="invalid_request_error"))

  # ------------------------------------------------------------- routes
  def check_model(name: str) -> str:
    if name not in config.model_names:
      raise APIError(f"The model `{name}` does not exist; this server serves "
                     f"{list(config.model_names)}", status_code=404,
                     param="model", code="model_not_found")
    return name

  @app.get("/health")
  async def health():
    if not engine_loop.running or engine_loop.error is not None:
      return responses.JSONResponse(
          {"status": "unhealthy", "error": repr(engine_loop.error)},
          status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def prometheus_metrics():
    return responses.Response(metrics.render(), media_type=CONTENT_TYPE)

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [
        protocol.model_card(n, handle.max_context, created,
                            config.model_names[0])
        for n in config.model_names]}

  @app.get("/v1/models/{model_id:path}")
  async def get_model(model_id: str):
    check_model(model_id)
    return protocol.model_card(model_id, handle.max_context, created,
                               config.model_names[0])

  @app.delete("/v1/sessions/{session_id:path}")
  async def delete_session(session_id: str, user: str = ""):
    """Removes what the cold tier stores for the session (of tenant `user`):
    an agent platform ends a session, or forgets it. Blocks its turns still
    write are removed when written; blocks the session shares with others of
    the tenant (a system prompt) are removed too and recomputed when next
    needed. The device pool and the hot tier are memory: they age out."""
    protocol.check_name(session_id, "session_id")
    protocol.check_name(user, "user")
    try:
      removed = await asyncio.to_thread(handle.delete_session, user,
                                        session_id)
    except OSError as e:  # hidden already; the store finishes the removal
      raise APIError(str(e), status_code=503, type="server_error") from e
    return {"id": session_id, "object": "session.deleted", "user": user,
            "deleted": True, "cold_tier_blocks": removed}

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest,
                             raw: fastapi.Request):
    check_model(body.model)
    body.check_supported()
    messages = protocol.normalize_messages(body.messages)
    check_length("".join(m["content"] for m in messages), "messages")
    try:  # off the event loop: a long prompt takes a while to encode
      prompt = await asyncio.to_thread(tokenizer.encode_chat, messages,
                                       add_generation_prompt=True)
    except ValueError as e:
      raise APIError(f"cannot apply the chat template: {e}",
                     param="messages") from e
    return await generate(body, prompt, raw, chat=True)

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, raw: fastapi.Request):
    check_model(body.model)
    body.check_supported()
    text = body.prompt[0] if isinstance(body.prompt, list) and len(
        body.prompt) == 1 else body.prompt
    if isinstance(text, str):
      check_length(text, "prompt")
    prompt = await asyncio.to_thread(completion_prompt, body.prompt)
    return await generate(body, prompt, raw, chat=False)

  # ------------------------------------------------------------ helpers
  def check_length(text: str, param: str) -> None:
    """Refuses text that surely holds more tokens than the context, before
    encoding it (`Tokenizer.min_tokens`, a lower bound)."""
    min_tokens = getattr(tokenizer, "min_tokens", None)
    if min_tokens is None:
      return
    at_least = min_tokens(text)
    if at_least >= handle.max_context:
      raise APIError(
          f"This model's maximum context length is {handle.max_context} "
          f"tokens; the prompt has at least {at_least} tokens",
          param=param, code="context_length_exceeded")

  def completion_prompt(prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and \
        isinstance(prompt[0], (str, list)):
      if len(prompt) != 1:
        raise APIError("only one prompt per request is supported (n=1); "
                       f"got {len(prompt)}", param="prompt",
                       code="unsupported_value")
      prompt = prompt[0]
    if isinstance(prompt, str):
      try:
        tokens = tokenizer.encode(prompt)
      except ValueError as e:  # not valid Unicode
        raise APIError(f"prompt: {e}", param="prompt") from None
    else:
      tokens = [int(t) for t in prompt]
      bad = [t for t in tokens if not 0 <= t < tokenizer.vocab_size]
      if bad:
        raise APIError(f"token ids out of range [0, {tokenizer.vocab_size}): "
                       f"{bad[:5]}", param="prompt")
    if not tokens:
      raise APIError("the prompt is empty", param="prompt")
    return tokens

  def make_turn(body, prompt: list[int], rid: str,
                stream: _RequestStream) -> TurnRequest:
    max_context = handle.max_context
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
    temperature = (config.default_temperature if body.temperature is None
                   else body.temperature)
    turn = TurnRequest(
        request_id=rid, prompt_tokens=prompt, max_new_tokens=budget,
        tenant=body.user or "", session_id=body.session_id or "",
        stop_on_eos=not body.ignore_eos,
        arrival_s=handle.clock(), temperature=temperature,
        top_p=config.default_top_p if body.top_p is None else body.top_p,
        seed=body.seed, on_token=stream.on_token,
        logprobs=body.logprob_count(),
        # Per token only for a stream; a plain response reads them from the
        # turn's output (`TurnOutput.logprobs`).
        on_logprob=stream.on_logprob if body.stream else None)
    try:
      handle.validate(turn)
    except RequestTooLargeError as e:
      raise APIError(str(e), param=param,
                     code="context_length_exceeded") from e
    except ValueError as e:
      raise APIError(str(e), code="invalid_value") from e
    return turn

  async def generate(body, prompt: list[int], raw: fastapi.Request, *,
                     chat: bool):
    endpoint = "chat" if chat else "completions"
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    text = TextStream(tokenizer, body.stop_strings(), body.stop_token_ids or ())
    stream = _RequestStream(asyncio.get_running_loop(), text)
    turn = make_turn(body, prompt, rid, stream)
    try:
      engine_loop.submit(turn, stream.on_finish, stream.on_error)
    except RuntimeError as e:
      raise APIError(str(e), status_code=503, type="server_error") from e
    model = body.model
    if body.stream:
      opts = body.stream_options or protocol.StreamOptions()
      return responses.StreamingResponse(
          sse_events(stream, turn, endpoint, chat, model, opts,
                     body.stop_token_ids or ()),
          media_type="text/event-stream")
    return await gather(stream, turn, endpoint, chat, model, raw,
                        body.stop_token_ids or ())

  def finish_usage(out: TurnOutput) -> dict[str, Any]:
    return protocol.usage(len(out.request.prompt_tokens),
                          len(out.generated_tokens), out.cached_prompt_tokens)

  def observe(endpoint: str, out: TurnOutput) -> None:
    metrics.observe_finished(
        endpoint, protocol.finish_reason(out.finish_reason),
        prompt_tokens=len(out.request.prompt_tokens),
        cached_tokens=out.cached_prompt_tokens,
        generated_tokens=len(out.generated_tokens), arrival_s=out.arrival_s,
        first_token_s=out.first_token_s, finish_s=out.finish_s)

  def abandon(stream: _RequestStream, turn: TurnRequest, endpoint: str,
              reason: str) -> None:
    if not stream.finished:
      stream.finished = True
      engine_loop.abort(turn.request_id)
      metrics.requests.labels(endpoint, reason).inc()

  def visible_logprobs(entries, stops: Sequence[int]) -> list:
    return logprob_format.visible(entries or (), tokenizer, stops)

  def format_logprobs(entries, chat: bool, stops: Sequence[int],
                      offsets: logprob_format.TextOffsets | None = None
                      ) -> dict[str, Any] | None:
    """A choice's `logprobs` (None when the request asked for none);
    `offsets`: a stream's, which its earlier chunks' tokens went through."""
    if entries is None:
      return None
    shown = visible_logprobs(entries, stops)
    if chat:
      return {"content": logprob_format.chat_content(shown, tokenizer)}
    return logprob_format.completion_logprobs(shown, tokenizer, offsets)

  async def gather(stream: _RequestStream, turn: TurnRequest, endpoint: str,
                   chat: bool, model: str, raw: fastapi.Request,
                   stops: Sequence[int]):
    pieces: list[str] = []
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
      while True:
        # Check the client at least every DISCONNECT_POLL_S, also while
        # tokens keep arriving (they would otherwise hide a disconnect
        # until the whole generation is done).
        if loop.time() >= next_check:
          next_check = loop.time() + DISCONNECT_POLL_S
          if await raw.is_disconnected():
            abandon(stream, turn, endpoint, "abort")
            return responses.Response(status_code=499)
        try:
          event = await asyncio.wait_for(stream.events.get(),
                                         DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
          continue
        if event[0] == "text":
          pieces.append(event[1])
        elif event[0] == "error":
          stream.finished = True
          metrics.requests.labels(endpoint, "error").inc()
          raise _generation_error(event[1])
        else:
          _, tail, out, _ = event
          stream.finished = True
          observe(endpoint, out)
          build = protocol.chat_response if chat else \
              protocol.completion_response
          return build(turn.request_id, model, "".join(pieces) + tail,
                       protocol.finish_reason(out.finish_reason),
                       finish_usage(out),
                       format_logprobs(out.logprobs, chat, stops))
    finally:
      abandon(stream, turn, endpoint, "abort")

  async def sse_events(stream: _RequestStream, turn: TurnRequest,
                       endpoint: str, chat: bool, model: str,
                       opts: protocol.StreamOptions,
                       stops: Sequence[int]) -> AsyncIterator[str]:
    rid = turn.request_id
    # Completions' text_offset counts the tokens' text, not the text sent:
    # a chunk's text may be an earlier token's (held back until then).
    offsets = logprob_format.TextOffsets()

    def chunk(entries=None, **kw) -> str:
      if turn.logprobs is not None and entries is not None:
        kw["logprobs"] = format_logprobs(entries, chat, stops, offsets)
      payload = protocol.stream_chunk(chat, rid, model,
                                      with_usage_field=opts.include_usage, **kw)
      return f"data: {json.dumps(payload)}\n\n"
    try:
      if chat:
        yield chunk(role="assistant", text="")
      while True:
        event = await stream.events.get()
        if event[0] == "text":
          yield chunk(event[2], text=event[1])
        elif event[0] == "error":
          stream.finished = True
          metrics.requests.labels(endpoint, "error").inc()
          yield f"data: {json.dumps(_generation_error(event[1]).body())}\n\n"
          return
        else:
          _, tail, out, entries = event
          stream.finished = True
          observe(endpoint, out)
          if tail or visible_logprobs(entries, stops):
            yield chunk(entries, text=tail)
          usage = finish_usage(out)
          yield chunk(reason=protocol.finish_reason(out.finish_reason))
          if opts.include_usage:
            yield chunk(usage_only=True, usage_=usage)
          yield "data: [DONE]\n\n"
          return
    finally:
      abandon(stream, turn, endpoint, "abort")

  return app


def _is_type_tag(part: object) -> bool:
  """Whether a pydantic error location part names a union member's type
  ("str", "list[int]") rather than a field."""
  return isinstance(part, str) and (
      "[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


def _param_name(loc: tuple) -> str | None:
  """A request error's location as the `param` OpenAI uses:
  `messages[0].role`, without pydantic's "body" and union type tags."""
  name = ""
  for part in loc:
    if part == "body" or _is_type_tag(part):
      continue
    name += f"[{part}]" if isinstance(part, int) else (
        f".{part}" if name else str(part))
  return name or None


def _generation_error(error: BaseException) -> APIError:
  """The error a request whose generation ended in `error` answers: 503
  when the server is shutting down (retry elsewhere), else 500."""
  if isinstance(error, ShuttingDown):
    return APIError(str(error), status_code=503, type="server_error",
                    code="shutting_down")
  return APIError(f"generation failed: {error}", status_code=500,
                  type="server_error")
