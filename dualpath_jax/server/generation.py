"""A request's choices from submission to its answer, plain or streamed.

Each choice gets a `ChoiceStream`: the engine thread feeds it tokens
(`on_token`), it detokenizes them and matches stop strings (`TextStream`),
and posts text events, tagged with the choice, to the request's one asyncio
queue. A streamed response relays them as SSE chunks as they come; a plain
one gathers them, checking the client every `DISCONNECT_POLL_S`. If the
client goes away first, or one choice fails, the request's turns are
aborted in the engine and their blocks are released. Usage counts the
prompt once (as OpenAI does) with the first choice's cache hit.
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

from dualpath_jax.engine.request import TurnOutput, TurnRequest
from dualpath_jax.server import logprobs as logprob_format
from dualpath_jax.server import protocol
from dualpath_jax.server.engine_loop import EngineLoop
from dualpath_jax.server.errors import generation_error
from dualpath_jax.server.prometheus import ServerMetrics
from dualpath_jax.server.protocol import (APIError, ChatCompletionRequest,
                                          CompletionRequest)
from dualpath_jax.server.text_stream import TextStream
from dualpath_jax.server.turn_builder import TurnBuilder

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks its client


class ChoiceStream:
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


class Generator:
  """Answers completion requests: submits each choice's turn to the engine
  loop and relays what comes back (see the module docstring).

  Args:
    engine_loop: the loop the engine runs in (`submit`, `abort`).
    metrics: counts requests by endpoint and outcome, and finished turns.
    tokenizer: for the choices' text and their logprobs' tokens.
    turns: builds and checks each choice's `TurnRequest`.
  """

  def __init__(self, engine_loop: EngineLoop, metrics: ServerMetrics,
               tokenizer, turns: TurnBuilder):
    self._engine_loop = engine_loop
    self._metrics = metrics
    self._tokenizer = tokenizer
    self._turns = turns

  async def generate(self, body: ChatCompletionRequest | CompletionRequest,
                     prompt: list[int], raw: fastapi.Request, *, chat: bool):
    """Submits the request's choices; its response, plain or streamed (SSE)."""
    endpoint = "chat" if chat else "completions"
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    streams, turns = [], []
    texts = text_streams(self._tokenizer, body.choices, body.stop_strings(),
                         body.stop_token_ids or ())
    for index, text in enumerate(texts):  # all checked before any is submitted
      streams.append(ChoiceStream(loop, text, events, index))
      turns.append(self._turns.turn(
          body, prompt, rid if body.choices == 1 else f"{rid}-{index}",
          streams[-1], protocol.choice_seed(body.seed, index)))
    request = RequestInFlight(rid, endpoint, chat, body.model, streams,
                              turns, body.stop_token_ids or ())
    submitted = 0
    try:
      for stream, turn in zip(streams, turns):
        self._engine_loop.submit(turn, stream.on_finish, stream.on_error)
        submitted += 1
    except RuntimeError as e:
      # Refused (the loop is stopping; counted as a 503): the turns
      # submitted are withdrawn, and no choice counts as a generation.
      for turn in turns[:submitted]:
        self._engine_loop.abort(turn.request_id)
      raise APIError(str(e), status_code=503, type="server_error") from e
    if body.stream:
      return responses.StreamingResponse(
          self._sse_events(request,
                           body.stream_options or protocol.StreamOptions()),
          media_type="text/event-stream")
    return await self._gather(request, raw)

  def _request_usage(self, request: RequestInFlight) -> dict[str, Any]:
    """The prompt counted once, as OpenAI does, with the cache hit of the
    first choice (the one that prefilled it); the choices' tokens summed."""
    first = request.outputs[0]
    return protocol.usage(
        len(first.request.prompt_tokens),
        sum(len(out.generated_tokens) for out in request.outputs),
        first.cached_prompt_tokens)

  def _observe(self, endpoint: str, out: TurnOutput) -> None:
    self._metrics.observe_finished(
        endpoint, protocol.finish_reason(out.finish_reason),
        prompt_tokens=len(out.request.prompt_tokens),
        cached_tokens=out.cached_prompt_tokens,
        generated_tokens=len(out.generated_tokens), arrival_s=out.arrival_s,
        first_token_s=out.first_token_s, finish_s=out.finish_s)

  def _abandon(self, request: RequestInFlight, reason: str) -> None:
    """Aborts the request's unfinished choices in the engine."""
    for stream, turn in zip(request.streams, request.turns):
      if not stream.finished:
        stream.finished = True
        self._engine_loop.abort(turn.request_id)
        self._metrics.requests.labels(request.endpoint, reason).inc()

  def _fail(self, request: RequestInFlight, index: int,
            error: BaseException) -> APIError:
    """The choice `index` failed: the request fails, and its other choices
    are aborted in the engine; all are counted as errors (the request's
    answer), none as the client's abort."""
    request.streams[index].finished = True
    self._metrics.requests.labels(request.endpoint, "error").inc()
    self._abandon(request, "error")
    return generation_error(error)

  def _finish(self, request: RequestInFlight, index: int,
              out: TurnOutput) -> None:
    request.streams[index].finished = True
    request.outputs[index] = out
    self._observe(request.endpoint, out)

  def _visible_logprobs(self, entries, stops: Sequence[int]) -> list:
    return logprob_format.visible(entries or (), self._tokenizer, stops)

  def _format_logprobs(self, entries, chat: bool, stops: Sequence[int],
                      offsets: logprob_format.TextOffsets | None = None
                      ) -> dict[str, Any] | None:
    """A choice's `logprobs` (None when the request asked for none);
    `offsets`: a stream's, which its earlier chunks' tokens went through."""
    if entries is None:
      return None
    shown = self._visible_logprobs(entries, stops)
    if chat:
      return {"content": logprob_format.chat_content(shown, self._tokenizer)}
    return logprob_format.completion_logprobs(shown, self._tokenizer, offsets)

  async def _gather(self, request: RequestInFlight, raw: fastapi.Request):
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
            self._abandon(request, "abort")
            return responses.Response(status_code=499)
        try:
          event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
          continue
        kind, index = event[0], event[1]
        if kind == "text":
          pieces[index].append(event[2])
        elif kind == "error":
          raise self._fail(request, index, event[2])
        else:
          _, _, tail, out, _ = event
          pieces[index].append(tail)
          self._finish(request, index, out)
      return protocol.response(request.chat, request.rid, request.model, [
          protocol.response_choice(
              request.chat, index, "".join(pieces[index]),
              protocol.finish_reason(out.finish_reason),
              self._format_logprobs(out.logprobs, request.chat, request.stops))
          for index, out in enumerate(request.outputs)],
          self._request_usage(request))
    finally:
      self._abandon(request, "abort")

  async def _sse_events(self, request: RequestInFlight,
                        opts: protocol.StreamOptions) -> AsyncIterator[str]:
    chat, stops = request.chat, request.stops
    n = len(request.turns)
    asked_logprobs = request.turns[0].logprobs is not None
    events = request.streams[0].events
    # Completions' text_offset counts the tokens' text, not the text sent:
    # a chunk's text may be an earlier token's (held back until then).
    offsets = [logprob_format.TextOffsets() for _ in range(n)]

    def chunk(index: int, entries=None, **kw) -> str:
      if asked_logprobs and entries is not None:
        kw["logprobs"] = self._format_logprobs(entries, chat, stops,
                                               offsets[index])
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
          error = self._fail(request, index, event[2])
          yield f"data: {json.dumps(error.body())}\n\n"
          return
        else:
          _, _, tail, out, entries = event
          self._finish(request, index, out)
          if tail or self._visible_logprobs(entries, stops):
            yield chunk(index, entries, text=tail)
          yield chunk(index, reason=protocol.finish_reason(out.finish_reason))
      if opts.include_usage:
        yield chunk(0, usage_only=True, usage_=self._request_usage(request))
      yield "data: [DONE]\n\n"
    finally:
      self._abandon(request, "abort")


@dataclasses.dataclass
class RequestInFlight:
  """One HTTP request in flight: its choices' streams and engine turns,
  and the outputs of those finished (by choice index)."""

  rid: str
  endpoint: str  # "chat" | "completions": the metrics' label
  chat: bool
  model: str
  streams: list[ChoiceStream]
  turns: list[TurnRequest]
  stops: Sequence[int]  # stop_token_ids
  outputs: list[TurnOutput | None] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.outputs = [None] * len(self.turns)

  @property
  def done(self) -> bool:
    return all(out is not None for out in self.outputs)


def text_streams(tokenizer, n: int, stops: Sequence[str],
                  stop_token_ids: Sequence[int]) -> list[TextStream]:
  """The `TextStream`s of a request's n choices, over one stop-string
  automaton (`TextStream.fresh`): built per choice, n=128 choices of the
  longest stop lists allowed were 128 identical automata (1 GB, 3 s of
  the event loop)."""
  first = TextStream(tokenizer, stops, stop_token_ids)
  return [first] + [first.fresh() for _ in range(n - 1)]
