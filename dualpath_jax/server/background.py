"""uvicorn servers that answer in-flight requests when told to stop, and
one in a background thread on a loopback port (tests, notebooks).

uvicorn, told to exit (Ctrl-C, SIGTERM, `should_exit`), waits for every
open request before it runs the app's lifespan shutdown, which stops the
engine loop: a generation in flight kept a server up for as long as it had
tokens left (minutes for a chat turn whose budget is the rest of the
context), long enough for a supervisor to kill it before it flushed the
cold tier. `AnsweringServer` stops the app's engine loop first (its turns in
flight get a 503 "shutting down"), then exits as uvicorn does.

`serve_in_thread(app)` binds the socket itself (port 0 = an ephemeral port
picked by the OS, so parallel test runs never collide), starts an
`AnsweringServer` in a daemon thread, waits until it accepts connections
and returns a `BackgroundServer`; `close()` stops it and joins the thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from dualpath_jax.utils import listen_socket


class AnsweringServer(uvicorn.Server):
  """`uvicorn.Server` that first stops the app's engine loop on exit."""

  def handle_exit(self, sig, frame) -> None:
    self.stop_engine_loop()
    super().handle_exit(sig, frame)

  def stop_engine_loop(self) -> None:
    """Fails the turns in flight (in a thread: the loop finishes its step
    first), so their requests answer now and uvicorn's wait is short."""
    state = getattr(self.config.app, "state", None)
    loop = getattr(state, "engine_loop", None)
    if loop is not None:
      threading.Thread(target=loop.stop, name="engine-loop-stop",
                       daemon=True).start()

  def run_announcing(self, sockets: list[socket.socket], line: str) -> None:
    """`run(sockets)`, printing `line` once connections are accepted."""
    async def serve() -> None:
      task = asyncio.ensure_future(self.serve(sockets=sockets))
      while not (self.started or task.done()):
        await asyncio.sleep(0.01)
      if self.started:
        print(line, flush=True)
      await task
    asyncio.run(serve())


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
    if isinstance(self.server, AnsweringServer):
      self.server.stop_engine_loop()
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
  server = AnsweringServer(config)
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
