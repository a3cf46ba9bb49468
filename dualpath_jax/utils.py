"""Two small helpers with no better home: the integer test every count and
id taken from a caller or a file needs, and a launcher's listening socket."""

from __future__ import annotations

import numbers
import socket

def is_integer(value: object) -> bool:
  """A Python or NumPy integer, not a bool (which Python counts as an int):
  the one test every count and id taken from a caller or a file needs."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# fsync of a directory that its file system cannot do (some network and


def listen_socket(host: str, port: int) -> socket.socket:
  """A TCP socket bound to (host, port) (0: a free port) for a server to
  listen on, bound first so that a launcher can refuse a busy address
  before any slow start and tell the port it got.

  Raises:
    ValueError: the host does not resolve, or the address cannot be bound
      (a port in use, an address not on this machine).
  """
  try:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
  except socket.gaierror as e:
    raise ValueError(f"cannot resolve host {host!r}: {e.strerror}") from None
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
  return sock
