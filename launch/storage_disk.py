"""The cold-tier benchmark's baselines: the raw disk, the file floor and memory.

`launch.bench_storage` pairs every store run with these: the raw disk
(O_DIRECT, block-sized requests at the store's queue depth), the
file-per-block protocol of TensorStore's `file` kvstore done by hand, and
the bandwidth of first-touch vs touched memory. Each returns a dict of
bytes/s, CPU seconds per GB and latency percentiles for the report.
"""

from __future__ import annotations

import mmap
import os
import shutil
import threading
import time

import numpy as np

from dualpath_jax.disk_io import sync_directory
from storage.page_cache import drop_page_cache, resident_bytes

MiB = 1 << 20


def pool_run(n: int, depth: int, task, make_state=lambda: None) -> float:
  """Seconds to run `task(i, state)` for i in range(n) on `depth` threads.

  Threads take the next index from a shared counter (a pool, like
  TensorStore's file I/O threads), so `depth` requests stay in flight.
  `make_state()` runs once per thread before the clock starts (buffers).
  """
  lock = threading.Lock()
  nxt = [0]
  errors: list[BaseException] = []
  ready = threading.Barrier(depth + 1)

  def worker() -> None:
    state = make_state()
    ready.wait()
    try:
      while True:
        with lock:
          i = nxt[0]
          nxt[0] += 1
        if i >= n:
          return
        task(i, state)
    except BaseException as err:  # pylint: disable=broad-except
      errors.append(err)

  threads = [threading.Thread(target=worker) for _ in range(depth)]
  for t in threads:
    t.start()
  ready.wait()
  start = time.perf_counter()
  for t in threads:
    t.join()
  seconds = time.perf_counter() - start
  if errors:
    raise errors[0]
  return seconds


def cpu_seconds() -> float:
  """CPU seconds of this process so far (all threads, user + system)."""
  t = os.times()
  return t.user + t.system


def aligned_buffer(size: int, fill: bool) -> mmap.mmap:
  buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT needs; touched below
  buf.write(os.urandom(size) if fill else bytes(size))
  return buf


def bench_raw(directory: str, n: int, request: int, depth: int, order: list[int],
              latency_samples: list[int]) -> dict:
  """O_DIRECT block-sized write, sequential and random read of one fresh file."""
  path = os.path.join(directory, "raw_disk.bin")
  with open(path, "wb") as f:
    f.truncate(n * request)
  fd = os.open(path, os.O_RDWR | os.O_DIRECT)
  out = {"requests": n, "request_bytes": request, "queue_depth": depth,
         "bytes": n * request}
  try:
    def write(i, buf):
      if os.pwritev(fd, [buf], i * request) != request:
        raise OSError("short O_DIRECT write")

    def read_at(offsets):
      def task(i, buf):
        if os.preadv(fd, [buf], offsets[i]) != request:
          raise OSError("short O_DIRECT read")
      return task

    cpu = {}
    cpu0 = cpu_seconds()
    seconds = pool_run(n, depth, write, lambda: aligned_buffer(request, True))
    start = time.perf_counter()
    os.fsync(fd)
    out["write"] = n * request / (seconds + time.perf_counter() - start)
    cpu["write"] = cpu_seconds() - cpu0
    out["resident_before"] = (resident_bytes(path) or (None,))[0]
    for name, offsets in (("seq_read", [i * request for i in range(n)]),
                          ("random_read", [i * request for i in order])):
      cpu0 = cpu_seconds()
      out[name] = n * request / pool_run(n, depth, read_at(offsets),
                                          lambda: aligned_buffer(request, False))
      cpu[name] = cpu_seconds() - cpu0
    out["cpu_s_per_gb"] = {k: v / (n * request / 1e9) for k, v in cpu.items()}
    buf = aligned_buffer(request, False)
    lat = []
    for i in latency_samples:
      start = time.perf_counter()
      os.preadv(fd, [buf], i * request)
      lat.append(time.perf_counter() - start)
    out["latency_ms_single_block"] = latency_percentiles(lat)
  finally:
    os.close(fd)
    os.unlink(path)
  return out


def bench_file_floor(directory: str, n: int, size: int, depth: int, order: list[int],
                     global_drop: bool = False) -> dict:
  """The `file` kvstore's protocol by hand: one durable file per block.

  Write: open `<slot>/0.__lock`, one buffered write, fsync, rename to
  `<slot>/0`, fsync the slot directory (what TensorStore does for a chunk).
  Reads: open, one buffered pread into a reused buffer, close, after the
  files' pages were evicted. No CRC, no index, no result arrays.
  """
  root = os.path.join(directory, "file_floor")
  os.makedirs(root)
  for i in range(n):
    os.mkdir(os.path.join(root, str(i)))
  sync_directory(root)
  payload = os.urandom(size)

  def write(i, _):
    slot = os.path.join(root, str(i))
    tmp = os.path.join(slot, "0.__lock")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      if os.write(fd, payload) != size:
        raise OSError("short write")
      os.fsync(fd)
      os.rename(tmp, os.path.join(slot, "0"))
    finally:
      os.close(fd)
    sync_directory(slot)

  def read_in(slots):
    def task(i, buf):
      fd = os.open(os.path.join(root, str(slots[i]), "0"), os.O_RDONLY)
      try:
        if os.preadv(fd, [buf], 0) != size:
          raise OSError("short read")
      finally:
        os.close(fd)
    return task

  out = {"files": n, "file_bytes": size, "queue_depth": depth, "bytes": n * size}
  try:
    cpu0 = cpu_seconds()
    out["write"] = n * size / pool_run(n, depth, write)
    cpu = {"write": cpu_seconds() - cpu0}
    cold = []
    for name, slots in (("seq_read", list(range(n))), ("random_read", order)):
      drop_page_cache(root, global_drop)
      cold.append((resident_bytes(root) or (None,))[0])
      cpu0 = cpu_seconds()
      out[name] = n * size / pool_run(n, depth, read_in(slots), lambda: bytearray(size))
      cpu[name] = cpu_seconds() - cpu0
    out["resident_before"] = cold
    out["cpu_s_per_gb"] = {k: v / (n * size / 1e9) for k, v in cpu.items()}
  finally:
    shutil.rmtree(root)
  return out


def bench_memory(nbytes: int = 256 * MiB) -> dict:
  """Bytes/s of filling fresh memory (first touch) vs memory already touched."""
  src = np.ones(nbytes, np.uint8)
  start = time.perf_counter()
  fresh = np.empty(nbytes, np.uint8)
  fresh[:] = src
  first = time.perf_counter() - start
  start = time.perf_counter()
  fresh[:] = src
  again = time.perf_counter() - start
  return {"first_touch": nbytes / first, "touched": nbytes / again}


def latency_percentiles(seconds: list[float]) -> dict:
  """p50/p90/p99, mean and max of `seconds`, in milliseconds."""
  ms = np.asarray(seconds) * 1e3
  return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {
      "mean": float(ms.mean()), "max": float(ms.max())}
