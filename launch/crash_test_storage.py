r"""Crash test of the cold tier: SIGKILL a writer at random points, then verify.

    python -m launch.crash_test_storage --kills=50            # the acceptance run
    python -m launch.crash_test_storage --kills=5 --json=out.json

Each round starts a writer process (`--role=writer`) on one store directory,
kills it with SIGKILL a random delay after its store is open (during a
reservation, a chunk write, an index commit, an eviction or a session
deletion; the delay counts from the writer's "ready" line, so a slow start
on a loaded machine does not eat it), then opens the store in this process
(which recovers what the dead writer left) and checks that every block the index lists reads back
bit-identical to what was written, that no listed block is served torn or
different, and that the index has no PENDING/DELETING rows left. The block
bytes are a pure function of the block id, so the checker needs no record of
what the writer did.

The same module provides the writer and reader roles used by the
two-process sharing test (tests/test_storage_processes.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags, logging

from dualpath_jax import outputs
from dualpath_jax.config import SMOLLM2_135M, CacheConfig
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from launch import float_flags
from storage import BlockStore, ColdTierConfig
from storage.config import CODECS

FLAGS = flags.FLAGS
flags.DEFINE_enum("role", "parent", ["parent", "writer", "reader"], "which process this is")
flags.DEFINE_string("root", None, "store directory (default: a new temporary directory)")
flags.DEFINE_integer("kills", 50, "parent: writer processes to SIGKILL", lower_bound=1)
float_flags.define_float("min_delay", 0.05, "parent: shortest time from a writer's open store to its kill (s)", lower_bound=0.0)
float_flags.define_float("max_delay", 1.5, "parent: longest time from a writer's open store to its kill (s)", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "random seed", lower_bound=0)
flags.DEFINE_string("tag", "w", "writer: prefix of its block ids")
flags.DEFINE_integer("puts", 0, "writer: puts before exiting (0 = until killed)", lower_bound=0)
float_flags.define_float("duration", 5.0, "reader: seconds to keep verifying", lower_bound=0.0)
flags.DEFINE_enum("driver", "file", ["file", "ocdbt"], "kvstore driver")
flags.DEFINE_enum("codec", "raw", list(CODECS), "block codec")
flags.DEFINE_string("json", None, "parent: write the result as JSON here")

BATCH = 8  # blocks per put
READY = "ready"  # a writer's one line on stdout, once its store is open
READY_TIMEOUT_S = 300.0
CAPACITY = 48 << 20  # small, so that evictions and slot reuse happen


def store_config(root: str, driver: str = "file", codec: str = "raw") -> ColdTierConfig:
  return ColdTierConfig(root=root, driver=driver, codec=codec, capacity_bytes=CAPACITY,
                        max_batch_blocks=BATCH, io_threads=2)


CACHE = CacheConfig(block_size=16, dtype="bfloat16")


def open_store(root: str, driver: str = "file", codec: str = "raw") -> BlockStore:
  """The store used by every role (SmolLM2-135M block shape, bf16)."""
  return BlockStore(store_config(root, driver, codec), SMOLLM2_135M, CACHE)


def block_id(tag: str, i: int) -> bytes:
  return hashlib.sha256(f"{tag}:{i}".encode()).digest()


def block_content(
    block_ids: list[bytes], block_shape: tuple[int, ...]
) -> np.ndarray:  # [n, *block_shape] bf16
  """Deterministic block bytes of each id (what a writer stores for it)."""
  out = np.empty((len(block_ids), *block_shape), ml_dtypes.bfloat16)
  for i, bid in enumerate(block_ids):
    rng = np.random.default_rng(int.from_bytes(bid[:8], "little"))
    out[i] = rng.standard_normal(block_shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
  return out


def run_writer(root: str, tag: str, puts: int, driver: str, codec: str) -> int:
  """Puts batches of deterministic blocks; deletes an old session every 7th put."""
  store = open_store(root, driver, codec)
  print(READY, flush=True)  # the parent's kill delay starts here
  i = 0
  while not puts or i < puts:
    ids = [block_id(tag, i * BATCH + j) for j in range(BATCH)]
    store.put(ids, block_content(ids, store.block_shape), tenant="t", session=f"{tag}-{i // 4}")
    if i % 7 == 6:
      store.delete_session("t", f"{tag}-{i // 4 - 3}")
    i += 1
  store.close()
  return i


def verify(store: BlockStore, exact: bool = True) -> dict[str, int]:
  """Reads every listed block back and compares it with its expected bytes."""
  refs = store.index.all_ready()
  ids = [r.block_id for r in refs]
  result = {"listed": len(ids), "identical": 0, "different": 0, "unreadable": 0}
  for lo in range(0, len(ids), 32):
    chunk = ids[lo:lo + 32]
    got = store.get(chunk)
    want = block_content(chunk, store.block_shape)
    for g, w in zip(got, want):
      if g is None:
        result["unreadable"] += 1
      elif np.array_equal(g.view(np.uint16), w.view(np.uint16)) or not exact:
        result["identical"] += 1
      else:
        result["different"] += 1
  counts = store.index.counts()
  # Chunks without an index row: bytes a dead writer or a deletion left behind.
  result["orphan_chunks"] = len(store.stored_slots() - {r.slot for r in refs})
  # Temporary chunk files (`<key>.__lock`) of killed writes must be gone too.
  data_dir = os.path.join(store.config.root, "data")
  result["leftover_temp_files"] = sum(
      f.endswith(".__lock") for _, _, files in os.walk(data_dir) for f in files)
  result["pending_rows"] = counts["pending"]
  result["deleting_rows"] = counts["deleting"]
  return result


def run_reader(root: str, duration: float, driver: str, codec: str) -> dict[str, int]:
  """Verifies the store over and over for `duration` seconds (a second process)."""
  store = open_store(root, driver, codec)
  total = {"rounds": 0, "identical": 0, "different": 0, "unreadable": 0}
  end = time.monotonic() + duration
  while time.monotonic() < end:
    r = verify(store)
    total["rounds"] += 1
    for k in ("identical", "different", "unreadable"):
      total[k] += r[k]
  store.close()
  return total


def writer_command(root: str, tag: str, puts: int = 0, driver: str = "file",
                   codec: str = "raw") -> list[str]:
  return [sys.executable, "-m", "launch.crash_test_storage", "--role=writer",
          f"--root={root}", f"--tag={tag}", f"--puts={puts}", f"--driver={driver}",
          f"--codec={codec}"]


def _wait_for_ready(proc: subprocess.Popen, timeout_s: float) -> None:
  """Waits for the writer's READY line; returns early if it exits (the
  caller then reports its stderr) or after `timeout_s`."""
  ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
  if ready:
    proc.stdout.readline()


def crash_test(root: str, kills: int, max_delay: float, seed: int, driver: str = "file",
               codec: str = "raw", min_delay: float = 0.05) -> dict:
  """Runs `kills` kill-and-verify rounds on `root`; returns the totals."""
  rng = random.Random(seed)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.getcwd()] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(os.pathsep))
  totals = {"kills": 0, "killed_before_exit": 0, "listed_max": 0, "checked": 0,
            "identical": 0, "different": 0, "unreadable": 0, "leftover_rows": 0,
            "orphan_chunks": 0, "leftover_temp_files": 0, "recovered_blocks": 0}
  for k in range(kills):
    proc = subprocess.Popen(writer_command(root, f"k{k}", 0, driver, codec), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    alive = False
    try:
      # The delay counts from the writer's open store, not its start: on a
      # loaded machine its imports alone took past the delay, and a writer
      # killed before it put anything tested nothing.
      _wait_for_ready(proc, READY_TIMEOUT_S)
      time.sleep(rng.uniform(min_delay, max_delay))
      alive = proc.poll() is None
    finally:  # also on Ctrl-C: a writer that puts until killed must not outlive us
      proc.send_signal(signal.SIGKILL)
      _, err = proc.communicate()
    if not alive:
      raise RuntimeError(f"writer exited before the kill: {err.decode()[-2000:]}")
    totals["kills"] += 1
    totals["killed_before_exit"] += alive
    store = open_store(root, driver, codec)  # recovers the dead writer's rows
    totals["recovered_blocks"] += store.stats()["recovered_blocks"]
    totals["chunk_writer"] = store.chunk_writer
    r = verify(store)
    store.close()
    totals["listed_max"] = max(totals["listed_max"], r["listed"])
    totals["checked"] += r["listed"]
    for key in ("identical", "different", "unreadable"):
      totals[key] += r[key]
    totals["leftover_rows"] += r["pending_rows"] + r["deleting_rows"]
    totals["orphan_chunks"] += r["orphan_chunks"]
    totals["leftover_temp_files"] += r["leftover_temp_files"]
    logging.info("kill %d: %s", k, r)
  totals["ok"] = (totals["different"] == 0 and totals["unreadable"] == 0 and
                  totals["leftover_rows"] == 0 and totals["orphan_chunks"] == 0 and
                  totals["leftover_temp_files"] == 0 and totals["checked"] > 0)
  return totals


def main(argv):
  del argv
  try:  # before the kills: a bad path must not cost their verdict
    if FLAGS.json:
      outputs.check_output_paths([("--json", FLAGS.json)],
                                 inputs=[("--root", FLAGS.root, "dir")])
    if FLAGS.root:
      outputs.check_output_dir(FLAGS.root, "--root")
    if FLAGS.min_delay > FLAGS.max_delay:
      raise ValueError(f"--min_delay ({FLAGS.min_delay}) is above "
                       f"--max_delay ({FLAGS.max_delay})")
    if FLAGS.root and FLAGS.role == "parent" and os.path.exists(
        os.path.join(FLAGS.root, "index.sqlite")):
      # A store of another layout, or a damaged index, refused here by name
      # (the writers would each fail on it, reported as a traceback).
      open_store(FLAGS.root, FLAGS.driver, FLAGS.codec).close()
  except ValueError as e:
    sys.exit(f"crash_test_storage: {e}")
  root = FLAGS.root or tempfile.mkdtemp(prefix="crash_test_storage_")
  if FLAGS.role == "writer":
    run_writer(root, FLAGS.tag, FLAGS.puts, FLAGS.driver, FLAGS.codec)
    return
  if FLAGS.role == "reader":
    print(json.dumps(run_reader(root, FLAGS.duration, FLAGS.driver, FLAGS.codec)))
    return
  start = time.time()
  result = crash_test(root, FLAGS.kills, FLAGS.max_delay, FLAGS.seed, FLAGS.driver, FLAGS.codec,
                      FLAGS.min_delay)
  result["seconds"] = round(time.time() - start, 1)
  result["root"] = root
  print(json.dumps(result, indent=1))
  if FLAGS.json:
    outputs.write_json(result, FLAGS.json)
  if not result["ok"]:
    sys.exit(1)
  if not FLAGS.root:
    shutil.rmtree(root)  # a temporary store that passed: nothing to inspect


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "crash_test_storage"))
