"""Audit of the pinned hot tier and of session deletion across the tiers.

Each test here failed before its fix:

* `DELETE /v1/sessions/{id}` while the engine loop is not running (the
  server is shutting down: the loop has stopped, the handle not yet
  closed) answered a plain-text 500, and hid the store's own 503: the
  memory tiers' forget, awaited in a `finally`, raised the loop's
  RuntimeError over both the reply and the store's error. Now the cold
  tier's count stands and the memory tiers' are null (not removed: they
  go with the process).
"""

from __future__ import annotations

import http.client
import json

from dualpath_jax.server import ServerConfig, create_app, serve_in_thread


class _StoreOnlyHandle:
  """An `EngineHandle` with a cold tier and no turns: what DELETE calls.
  Its `close` keeps the store open (as while a shutdown is under way)."""

  def __init__(self):
    self.forgotten: list[list[bytes]] = []
    self.delete_error: OSError | None = None

  def validate(self, req):
    del req

  def submit(self, req):
    del req

  def abort(self, request_id):
    del request_id

  def step(self):
    return []

  def has_work(self) -> bool:
    return False

  def now(self) -> float:
    return 0.0

  def snapshot(self) -> dict:
    return {}

  def close(self) -> None:
    pass

  def delete_session(self, tenant: str, session: str) -> int:
    del tenant, session
    if self.delete_error is not None:
      raise self.delete_error
    return 2

  def session_block_ids(self, tenant: str, session: str) -> list[bytes]:
    del tenant, session
    return [b"a", b"b"]

  def forget_blocks(self, ids: list[bytes]) -> dict:
    self.forgotten.append(list(ids))
    return {"hot_tier_blocks": 1, "pool_blocks": 2}


def _delete(srv, path: str) -> tuple[int, bytes]:
  conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
  try:
    conn.request("DELETE", path)
    reply = conn.getresponse()
    return reply.status, reply.read()
  finally:
    conn.close()


def test_a_session_delete_with_the_loop_stopped_still_answers():
  """The loop refuses the forget once it has stopped: the cold tier's
  removal is still reported (the memory tiers' counts null: nothing
  removed there), and a store that could not finish its removal still
  answers its own 503."""
  handle = _StoreOnlyHandle()
  app = create_app(handle, None, ServerConfig(model_names=("m",)))
  srv = serve_in_thread(app)
  try:
    status, body = _delete(srv, "/v1/sessions/s1?user=t")
    assert status == 200, body
    assert json.loads(body)["pool_blocks"] == 2
    assert handle.forgotten == [[b"a", b"b"]]
    app.state.engine_loop.stop()  # shutting down: no forget runs now
    status, body = _delete(srv, "/v1/sessions/s1?user=t")
    assert status == 200, body
    assert json.loads(body) == {
        "id": "s1", "object": "session.deleted", "user": "t",
        "deleted": True, "cold_tier_blocks": 2, "hot_tier_blocks": None,
        "pool_blocks": None}
    handle.delete_error = OSError("removing 2 blocks failed; no longer served")
    status, body = _delete(srv, "/v1/sessions/s1?user=t")
    assert status == 503, body
    error = json.loads(body)["error"]
    assert error["type"] == "server_error"
    assert "no longer served" in error["message"]
    assert handle.forgotten == [[b"a", b"b"]]
  finally:
    srv.close()
