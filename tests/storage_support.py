"""What the storage tests need to know of the machine they run on."""

from __future__ import annotations

import errno
import os


def o_direct_works(directory) -> bool:
  """Whether the file system holding `directory` takes O_DIRECT opens
  (tmpfs does not; macOS has no O_DIRECT at all)."""
  if not hasattr(os, "O_DIRECT"):
    return False
  path = os.path.join(directory, "probe")
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
  except OSError as err:
    assert err.errno == errno.EINVAL
    return False
  os.close(fd)
  os.unlink(path)
  return True
