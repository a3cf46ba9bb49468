"""A crash-test writer that SIGKILLs itself at one chosen point of a put.

`python tests/crash_writer.py ROOT POINT` runs `launch.crash_test_storage`'s
writer on the store at ROOT; its first `PUTS_BEFORE` puts complete, and the
next one is killed (SIGKILL, as the random crash test does) at POINT:

  reserved      its rows reserved, before its first chunk byte;
  half_written  with half of its chunk files written, none synced;
  written       its chunks written and synced, before the index commits;
  committed     just after the index committed its rows.

The random crash test (`crash_test_storage.crash_test`) lands where the
timing puts it; this lands on each point of a put every time, so that a put
that commits its rows before their bytes are durable fails
`tests/test_storage_processes.py` whatever the timing.
"""

from __future__ import annotations

import os
import signal
import sys

from launch import crash_test_storage as ct
from storage import chunk_writer, index

PUTS_BEFORE = 3  # puts that complete before the killed one
POINTS = ("reserved", "half_written", "written", "committed")


def _die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def main(root: str, point: str) -> None:
  if point not in POINTS:
    raise SystemExit(f"point must be one of {POINTS}, got {point!r}")
  puts = [0]
  chunks = [0]
  reserve, commit = index.BlockIndex.reserve, index.BlockIndex.commit
  write_one = chunk_writer.DirectChunkWriter._write_one  # pylint: disable=protected-access

  def killing_reserve(self, *args, **kwargs):
    puts[0] += 1
    return reserve(self, *args, **kwargs)

  def killing_write_one(self, slot, chunk):
    if puts[0] > PUTS_BEFORE:
      if point == "reserved" or (point == "half_written"
                                 and chunks[0] == ct.BATCH // 2):
        _die()
      chunks[0] += 1
    return write_one(self, slot, chunk)

  def killing_commit(self, refs):
    if puts[0] > PUTS_BEFORE and point == "written":
      _die()
    out = commit(self, refs)
    if puts[0] > PUTS_BEFORE and point == "committed":
      _die()
    return out

  index.BlockIndex.reserve = killing_reserve
  index.BlockIndex.commit = killing_commit
  chunk_writer.DirectChunkWriter._write_one = killing_write_one  # pylint: disable=protected-access
  ct.run_writer(root, "d", PUTS_BEFORE + 2, "file", "raw")
  raise SystemExit(f"the writer was not killed at {point!r}")


if __name__ == "__main__":
  main(*sys.argv[1:])
