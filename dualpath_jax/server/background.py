"""Run a server in a background thread on a loopback port (tests, notebooks).

`serve_in_thread(app)` binds the socket itself (port 0 = an ephemeral port
picked by the OS, so parallel test runs never collide), starts
`uvicorn.Server` in a daemon thread, waits until it accepts connections and
returns a `BackgroundServer`; `close()` asks uvicorn to exit, which runs the
app's lifespan shutdown (stopping the engine loop), and joins the thread.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from dualpath_jax.utils import listen_socket


class BackgroundServer:
  """A running uvicorn server; use as a context manager or call `close()`."""

  def __init__(self, server: uvicorn.Server, thread: threading.Thread,
               host: str, port: int):
    self.server = server
    self.thread = thread
    self.host = host
    self.port = port

  @property
  def base_url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def close(self, timeout_s: float = 30.0) -> None:
    self.server.should_exit = True
    self.thread.join(timeout_s)
    if self.thread.is_alive():
      raise RuntimeError(f"the server did not stop within {timeout_s} s")

  def __enter__(self) -> "BackgroundServer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *,
                    start_timeout_s: float = 60.0,
                    log_level: str = "warning") -> BackgroundServer:
  """Starts `app` on `host:port` (0 = ephemeral) in a thread; see above."""
  sock = listen_socket(host, port)  # ValueError: a busy or foreign address
  port = sock.getsockname()[1]
  config = uvicorn.Config(app, log_level=log_level, lifespan="on")
  server = uvicorn.Server(config)
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                            name=f"uvicorn-{port}", daemon=True)
  thread.start()
  deadline = time.monotonic() + start_timeout_s
  while not server.started:
    if not thread.is_alive():
      raise RuntimeError("the server thread exited during startup")
    if time.monotonic() > deadline:
      server.should_exit = True
      raise RuntimeError(f"the server did not start in {start_timeout_s} s")
    time.sleep(0.01)
  return BackgroundServer(server, thread, host, port)
