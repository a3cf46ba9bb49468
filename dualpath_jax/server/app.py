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

This module holds the routes. Beside it: `turn_builder` (a request's prompt
and fields as checked `TurnRequest`s), `generation` (a request's choices
from submission to the plain or streamed answer), `errors` (every failure
as OpenAI's error body), `body_limit` (bodies bounded before a route runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import fastapi
from fastapi import responses

from dualpath_jax.server import body_limit
from dualpath_jax.server import protocol
from dualpath_jax.server.engine_loop import EngineHandle, EngineLoop
from dualpath_jax.server.errors import install_error_handlers
from dualpath_jax.server.generation import Generator
from dualpath_jax.server.prometheus import CONTENT_TYPE, ServerMetrics
from dualpath_jax.server.protocol import (APIError, ChatCompletionRequest,
                                          CompletionRequest)
from dualpath_jax.server.turn_builder import TurnBuilder


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


def create_app(handle: EngineHandle, tokenizer, config: ServerConfig
               ) -> fastapi.FastAPI:
  """The FastAPI app serving `handle`; its lifespan runs the engine loop.

  `tokenizer` is a `dualpath_jax.model.Tokenizer` (encode, decode,
  encode_chat, is_special, vocab_size).
  """
  engine_loop = EngineLoop(handle)
  metrics = ServerMetrics(lambda: engine_loop.snapshot)
  created = protocol.now()
  turns = TurnBuilder(handle, tokenizer,
                      default_temperature=config.default_temperature,
                      default_top_p=config.default_top_p)
  generator = Generator(engine_loop, metrics, tokenizer, turns)

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

  error_response = install_error_handlers(app, metrics)

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
    turns.check_length("".join(m["content"] for m in messages), "messages")
    try:  # off the event loop: a long prompt takes a while to encode
      prompt = await asyncio.to_thread(tokenizer.encode_chat, messages,
                                       add_generation_prompt=True)
    except ValueError as e:
      raise APIError(f"cannot apply the chat template: {e}",
                     param="messages") from e
    return await generator.generate(body, prompt, raw, chat=True)

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, raw: fastapi.Request):
    check_model(body.model)
    body.check_supported()
    text = body.prompt[0] if isinstance(body.prompt, list) and len(
        body.prompt) == 1 else body.prompt
    if isinstance(text, str):
      turns.check_length(text, "prompt")
    prompt = await asyncio.to_thread(turns.completion_prompt, body.prompt)
    return await generator.generate(body, prompt, raw, chat=False)

  return app
