"""`server.body_limit.BodyLimit` driven as ASGI, without a server: a body
declared past the limit is answered before the app runs, one that arrives
in parts past it or stalls fails the app's read with 413 / 408, and once a
body is whole the app's later receive (a disconnect) is not timed."""

from __future__ import annotations

import asyncio

import pytest
from starlette.exceptions import HTTPException

from dualpath_jax.server.body_limit import BodyLimit


class _Recorder:
  """An ASGI app that reads the whole body, then awaits one more message."""

  def __init__(self, after_body: bool = False):
    self.body = b""
    self.after_body = after_body
    self.after = None

  async def __call__(self, scope, receive, send):
    while True:
      message = await receive()
      self.body += message.get("body", b"")
      if not message.get("more_body"):
        break
    if self.after_body:
      self.after = await receive()


def _rejecter(log):
  def reject(status, message):
    async def respond(scope, receive, send):
      log.append((status, message))
    return respond
  return reject


def _scope(length=None):
  headers = [] if length is None else [(b"content-length", str(length).encode())]
  return {"type": "http", "headers": headers}


def _feeder(parts, *, then=None, stall_after=None):
  """receive(): the body in `parts`, then `then` (or a stall)."""
  messages = [{"type": "http.request", "body": p,
               "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
  state = {"i": 0}

  async def receive():
    i = state["i"]
    state["i"] += 1
    if stall_after is not None and i >= stall_after:
      await asyncio.sleep(3600)
    if i < len(messages):
      return messages[i]
    if then is not None:
      await asyncio.sleep(0.3)  # longer than the chunk timeout below
      return then
    await asyncio.sleep(3600)
  return receive


def _run(app, scope, receive):
  async def send(message):
    del message
  return asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))


def test_a_declared_length_past_the_limit_is_answered_before_the_app():
  log, inner = [], _Recorder()
  app = BodyLimit(inner, reject=_rejecter(log), max_bytes=100)
  _run(app, _scope(10**10), _feeder([b"{}"], stall_after=0))
  assert log == [(413, "the request body declares 10000000000 bytes; this "
                  "server takes at most 100 bytes (launch.serve "
                  "--max_request_mb)")]
  assert inner.body == b""
  _run(app, _scope("12x"), _feeder([b"{}"]))
  assert log[-1][0] == 400 and "'12x'" in log[-1][1]


@pytest.mark.parametrize("parts", [[b"a" * 60, b"b" * 60],
                                   [b"a" * 101]])
def test_a_body_in_parts_past_the_limit_fails_the_read(parts):
  """No Content-Length (chunked), or one that lied: counted as it comes."""
  log = []
  app = BodyLimit(_Recorder(), reject=_rejecter(log), max_bytes=100)
  with pytest.raises(HTTPException) as err:
    _run(app, _scope(), _feeder(parts))
  assert err.value.status_code == 413 and "passed" in err.value.detail
  assert log == []


def test_a_stalled_body_times_out_and_a_whole_one_is_not_timed():
  app = BodyLimit(_Recorder(), reject=_rejecter([]), max_bytes=100,
                  chunk_timeout_s=0.1)
  with pytest.raises(HTTPException) as err:
    _run(app, _scope(), _feeder([b"{", b"}"], stall_after=1))
  assert err.value.status_code == 408 and "0.1 s" in err.value.detail
  inner = _Recorder(after_body=True)
  app = BodyLimit(inner, reject=_rejecter([]), max_bytes=100,
                  chunk_timeout_s=0.1)
  _run(app, _scope(4), _feeder([b"{", b"}"],
                              then={"type": "http.disconnect"}))
  assert inner.body == b"{}" and inner.after == {"type": "http.disconnect"}


def test_limits_must_be_positive():
  with pytest.raises(ValueError, match="positive"):
    BodyLimit(_Recorder(), reject=_rejecter([]), max_bytes=0)
