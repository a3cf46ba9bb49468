"""FastAPI routes of the OpenAI-compatible server.

    GET  /v1/models            the served model, with `max_model_len`
    GET  /v1/models/{id}       one of its names
    DELETE /v1/sessions/{id}   a session's blocks, from every tier
    POST /v1/chat/completions  chat (messages -> chat template -> tokens)
    POST /v1/completions       raw text or token-id prompt
    GET  /health               200 while the engine loop runs
    GET  /metrics              Prometheus text (see prometheus.py)

A request becomes one `TurnRequest` per choice (the whole prompt: chat
clients resend the conversation every turn, and the engine's prefix cache
finds the blocks it already holds, reported as
`usage.prompt_tokens_details.cached_tokens`). The `n` turns of a request
are submitted together, so the engine prefills their prompt once; each
has its own seed (`protocol.choice_seed`) and its own stop strings.
`user` becomes the engine's tenant: the prefix-sharing domain. Requests with
different `user` values never share cached blocks; requests without one
share the anonymous tenant "".

Each choice gets a `_RequestStream`: the engine thread feeds it tokens
(`on_token`), it detokenizes and matches stop strings (`TextStream`), and
posts text events, tagged with the choice, to the request's one asyncio
queue. A streamed response relays them as SSE chunks as they come; a plain
one gathers them. If the client goes away first, or one choice fails, the
request's turns are aborted in the engine and their blocks are released.
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
from dualpath_jax.server import body_limit
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
  max_request_bytes: int = body_limit.DEFAULT_MAX_BYTES
  body_chunk_timeout_s: float = body_limit.DEFAULT_CHUNK_TIMEOUT_S

  def __post_init__(self):
    if not self.model_names or not all(self.model_names):
      raise ValueError("model_names needs at least one name, and no empty "
                       f"one; got {list(self.model_names)}")
    if self.max_request_bytes <= 0 or self.body_chunk_timeout_s <= 0:
      raise ValueError("max_request_bytes and body_chunk_timeout_s must be "
                       "positive")
    if not 0 <= self.default_temperature <= 2:
      raise ValueError("default_temperature must be in [0, 2]")
    if not 0 < self.default_top_p <= 1:
      raise ValueError("default_top_p must be in (0, 1]")


class _RequestStream:
  """Bridges one choice's engine callbacks (engine thread) to asyncio:
  events `(kind, index, ...)` go to the request's queue `events`."""

  def __init__(self, loop: asyncio.AbstractEventLoop, text: TextStream,
               events: asyncio.Queue, index: int = 0):
    self._loop = loop
    self._text = text
    self.events = events
    self.index = index
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
      self._post(("error", self.index, e))
      return True
    if delta:
      self._post(("text", self.index, delta, self._take_logprobs()))
    return self._text.stopped

  def on_finish(self, out: TurnOutput) -> None:
    tail = self._text.flush() if out.finish_reason != "stop" else ""
    self._post(("finish", self.index, tail, out, self._take_logprobs()))

  def on_error(self, error: BaseException) -> None:
    self._post(("error", self.index, error))


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
    if err.status_code == 400 and err.detail == _FASTAPI_BODY_ERROR:
      # FastAPI's answer to a body json.loads could not even decode (bytes
      # that are not UTF-8): the JSON error it is, named as such.
      return error_response(APIError(
          "the request body is not valid JSON (not UTF-8 text)",
          code="invalid_json"))
    return error_response(APIError(str(err.detail), status_code=err.status_code,
                                   type="invalid_request_error"))

  def reject_body(status: int, message: str) -> responses.JSONResponse:
    return error_response(APIError(message, status_code=status,
                                   type="invalid_request_error"))

  app.add_middleware(body_limit.BodyLimit, reject=reject_body,
                     max_bytes=config.max_request_bytes,
                     chunk_timeout_s=config.body_chunk_timeout_s)

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
    """Removes what the tiers hold of the session (of tenant `user`): an
    agent platform ends a session, or forgets it. The cold tier's blocks
    the session put go (blocks its turns still write are removed when
    written), and the same blocks leave the hot tier(s) and the device
    pools' caches, between two engine steps. Blocks the session shares with
    others of the tenant (a system prompt it put) go too and are recomputed
    when next needed. Without a cold tier nothing records which blocks are
    the session's: nothing is removed (the counts are null)."""
    if not session_id:
      # Requests without a session_id share the empty one: an id left unset
      # in a client's URL deleted their blocks (every tenant's `user` alike).
      raise APIError("session_id: give the session's id (DELETE "
                     "/v1/sessions/{session_id})", param="session_id")
    protocol.check_name(session_id, "session_id")
    protocol.check_name(user, "user")
    ids = await asyncio.to_thread(handle.session_block_ids, user, session_id)
    forgot = {"hot_tier_blocks": None, "pool_blocks": None}
    try:
      removed = await asyncio.to_thread(handle.delete_session, user,
                                        session_id)
    except OSError as e:  # hidden already; the store finishes the removal
      raise APIError(str(e), status_code=503, type="server_error") from e
    finally:  # the memory tiers' copies go even if the disk's removal lags
      if ids is not None:
        try:
          forgot = await asyncio.wrap_future(engine_loop.forget_blocks(ids))
        except RuntimeError:
          if engine_loop.running:
            raise
          # The loop has stopped (a shutdown): the memory tiers go with the
          # process. Their counts stay null (not removed); the reply, or
          # the store's 503, stands.
    return {"id": session_id, "object": "session.deleted", "user": user,
            "deleted": True, "cold_tier_blocks": removed, **forgot}

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
        raise APIError("only one prompt per request is supported (send one "
                       "request per prompt; n asks for several completions "
                       f"of one); got {len(prompt)}", param="prompt",
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

  def make_turn(body, prompt: list[int], rid: str, stream: _RequestStream,
                seed: int | None) -> TurnRequest:
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
        seed=seed, on_token=stream.on_token,
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
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    streams, turns = [], []
    texts = _text_streams(tokenizer, body.choices, body.stop_strings(),
                          body.stop_token_ids or ())
    for index, text in enumerate(texts):  # all checked before any is submitted
      streams.append(_RequestStream(loop, text, events, index))
      turns.append(make_turn(
          body, prompt, rid if body.choices == 1 else f"{rid}-{index}",
          streams[-1], protocol.choice_seed(body.seed, index)))
    request = _Request(rid, endpoint, chat, body.model, streams, turns,
                       body.stop_token_ids or ())
    submitted = 0
    try:
      for stream, turn in zip(streams, turns):
        engine_loop.submit(turn, stream.on_finish, stream.on_error)
        submitted += 1
    except RuntimeError as e:
      # Refused (the loop is stopping; counted as a 503): the turns
      # submitted are withdrawn, and no choice counts as a generation.
      for turn in turns[:submitted]:
        engine_loop.abort(turn.request_id)
      raise APIError(str(e), status_code=503, type="server_error") from e
    if body.stream:
      return responses.StreamingResponse(
          sse_events(request, body.stream_options or protocol.StreamOptions()),
          media_type="text/event-stream")
    return await gather(request, raw)

  def request_usage(request: "_Request") -> dict[str, Any]:
    """The prompt counted once, as OpenAI does, with the cache hit of the
    first choice (the one that prefilled it); the choices' tokens summed."""
    first = request.outputs[0]
    return protocol.usage(
        len(first.request.prompt_tokens),
        sum(len(out.generated_tokens) for out in request.outputs),
        first.cached_prompt_tokens)

  def observe(endpoint: str, out: TurnOutput) -> None:
    metrics.observe_finished(
        endpoint, protocol.finish_reason(out.finish_reason),
        prompt_tokens=len(out.request.prompt_tokens),
        cached_tokens=out.cached_prompt_tokens,
        generated_tokens=len(out.generated_tokens), arrival_s=out.arrival_s,
        first_token_s=out.first_token_s, finish_s=out.finish_s)

  def abandon(request: "_Request", reason: str) -> None:
    """Aborts the request's unfinished choices in the engine."""
    for stream, turn in zip(request.streams, request.turns):
      if not stream.finished:
        stream.finished = True
        engine_loop.abort(turn.request_id)
        metrics.requests.labels(request.endpoint, reason).inc()

  def fail(request: "_Request", index: int, error: BaseException) -> APIError:
    """The choice `index` failed: the request fails, and its other choices
    are aborted in the engine; all are counted as errors (the request's
    answer), none as the client's abort."""
    request.streams[index].finished = True
    metrics.requests.labels(request.endpoint, "error").inc()
    abandon(request, "error")
    return _generation_error(error)

  def finish(request: "_Request", index: int, out: TurnOutput) -> None:
    request.streams[index].finished = True
    request.outputs[index] = out
    observe(request.endpoint, out)

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

  async def gather(request: "_Request", raw: fastapi.Request):
    n = len(request.turns)
    pieces: list[list[str]] = [[] for _ in range(n)]
    events = request.streams[0].events
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
      while not request.done:
        # Check the client at least every DISCONNECT_POLL_S, also while
        # tokens keep arriving (they would otherwise hide a disconnect
        # until the whole generation is done).
        if loop.time() >= next_check:
          next_check = loop.time() + DISCONNECT_POLL_S
          if await raw.is_disconnected():
            abandon(request, "abort")
            return responses.Response(status_code=499)
        try:
          event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
          continue
        kind, index = event[0], event[1]
        if kind == "text":
          pieces[index].append(event[2])
        elif kind == "error":
          raise fail(request, index, event[2])
        else:
          _, _, tail, out, _ = event
          pieces[index].append(tail)
          finish(request, index, out)
      return protocol.response(request.chat, request.rid, request.model, [
          protocol.response_choice(
              request.chat, index, "".join(pieces[index]),
              protocol.finish_reason(out.finish_reason),
              format_logprobs(out.logprobs, request.chat, request.stops))
          for index, out in enumerate(request.outputs)],
          request_usage(request))
    finally:
      abandon(request, "abort")

  async def sse_events(request: "_Request", opts: protocol.StreamOptions
                       ) -> AsyncIterator[str]:
    chat, stops = request.chat, request.stops
    n = len(request.turns)
    asked_logprobs = request.turns[0].logprobs is not None
    events = request.streams[0].events
    # Completions' text_offset counts the tokens' text, not the text sent:
    # a chunk's text may be an earlier token's (held back until then).
    offsets = [logprob_format.TextOffsets() for _ in range(n)]

    def chunk(index: int, entries=None, **kw) -> str:
      if asked_logprobs and entries is not None:
        kw["logprobs"] = format_logprobs(entries, chat, stops, offsets[index])
      payload = protocol.stream_chunk(chat, request.rid, request.model,
                                      index=index,
                                      with_usage_field=opts.include_usage, **kw)
      return f"data: {json.dumps(payload)}\n\n"
    try:
      if chat:
        for index in range(n):
          yield chunk(index, role="assistant", text="")
      while not request.done:
        event = await events.get()
        kind, index = event[0], event[1]
        if kind == "text":
          yield chunk(index, event[3], text=event[2])
        elif kind == "error":
          error = fail(request, index, event[2])
          yield f"data: {json.dumps(error.body())}\n\n"
          return
        else:
          _, _, tail, out, entries = event
          finish(request, index, out)
          if tail or visible_logprobs(entries, stops):
            yield chunk(index, entries, text=tail)
          yield chunk(index, reason=protocol.finish_reason(out.finish_reason))
      if opts.include_usage:
        yield chunk(0, usage_only=True, usage_=request_usage(request))
      yield "data: [DONE]\n\n"
    finally:
      abandon(request, "abort")

  return app


@dataclasses.dataclass
class _Request:
  """One HTTP request in flight: its choices' streams and engine turns,
  and the outputs of those finished (by choice index)."""

  rid: str
  endpoint: str  # "chat" | "completions": the metrics' label
  chat: bool
  model: str
  streams: list[_RequestStream]
  turns: list[TurnRequest]
  stops: Sequence[int]  # stop_token_ids
  outputs: list[TurnOutput | None] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.outputs = [None] * len(self.turns)

  @property
  def done(self) -> bool:
    return all(out is not None for out in self.outputs)


def _text_streams(tokenizer, n: int, stops: Sequence[str],
                  stop_token_ids: Sequence[int]) -> list[TextStream]:
  """The `TextStream`s of a request's n choices, over one stop-string
  automaton (`TextStream.fresh`): built per choice, n=128 choices of the
  longest stop lists allowed were 128 identical automata (1 GB, 3 s of
  the event loop)."""
  first = TextStream(tokenizer, stops, stop_token_ids)
  return [first] + [first.fresh() for _ in range(n - 1)]


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


# FastAPI's detail for a body it could not parse by any other error than a
# JSON one (fastapi.routing; the same in every version since 0.100).
_FASTAPI_BODY_ERROR = "There was an error parsing the body"

