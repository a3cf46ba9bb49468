"""Request bodies bounded in size and in time, before the app reads them.

Without a bound, a request that declared `Content-Length: 10000000000` and
sent two bytes held its connection (and, at a signal, the server's shutdown
for its 30 s of grace) while the body was awaited, and a 100 MB body was
read whole into memory before it was refused as a bad request. This ASGI
middleware answers 413 at once when the declared length is over the limit,
413 when a body sent in chunks (no length) passes it, and 408 when a body
stops arriving for `chunk_timeout_s`. The errors are raised as Starlette's
`HTTPException`, so the app's own handler shapes them (OpenAI-style JSON).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BYTES = 32 << 20  # a 128k-token agent context is ~1 MB of JSON
DEFAULT_CHUNK_TIMEOUT_S = 10.0


class BodyLimit:
  """ASGI middleware: at most `max_bytes` of request body, each part of it
  within `chunk_timeout_s` of the last. `reject(status, message)` returns
  the ASGI response sent when the declared length alone is refused (the app
  has not run yet)."""

  def __init__(self, app, *, reject: Callable[[int, str], Any],
               max_bytes: int = DEFAULT_MAX_BYTES,
               chunk_timeout_s: float = DEFAULT_CHUNK_TIMEOUT_S):
    if max_bytes <= 0 or chunk_timeout_s <= 0:
      raise ValueError(f"max_bytes and chunk_timeout_s must be positive; got "
                       f"{max_bytes}, {chunk_timeout_s}")
    self.app = app
    self.reject = reject
    self.max_bytes = max_bytes
    self.chunk_timeout_s = chunk_timeout_s

  def _too_large(self, what: str) -> str:
    return (f"the request body {what}; this server takes at most "
            f"{self.max_bytes} bytes (launch.serve --max_request_mb)")

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    declared = dict(scope.get("headers") or ()).get(b"content-length")
    if declared is not None:
      try:
        length = int(declared)
      except ValueError:
        length = -1
      if length < 0:
        await self.reject(400, f"Content-Length {declared[:40]!r} is not a "
                          "byte count")(scope, receive, send)
        return
      if length > self.max_bytes:
        await self.reject(413, self._too_large(
            f"declares {length} bytes"))(scope, receive, send)
        return
    received = 0
    body_done = False

    async def bounded_receive() -> Message:
      nonlocal received, body_done
      if body_done:  # after the body: only a disconnect, awaited as long
        return await receive()
      try:
        message = await asyncio.wait_for(receive(), self.chunk_timeout_s)
      except asyncio.TimeoutError:
        raise HTTPException(408, f"the request body stopped arriving for "
                            f"{self.chunk_timeout_s:g} s") from None
      if message["type"] != "http.request":
        body_done = True
        return message
      received += len(message.get("body", b""))
      if received > self.max_bytes:
        raise HTTPException(413, self._too_large(f"passed {received} bytes"))
      body_done = not message.get("more_body", False)
      return message

    await self.app(scope, bounded_receive, send)
