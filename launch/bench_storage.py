r"""Cold-tier benchmark: the block store against the raw disk, paired round by round.

    python -m launch.bench_storage                      # every config, 5 rounds (~8 min)
    python -m launch.bench_storage --recompute=none --configs=file:raw \
        --store_bytes=536870912 --queue_depth=8 --repeats=5

Why paired rounds: the benchmark's disk (a virtual disk on a shared machine)
drifts by tens of percent between runs a minute apart, so a store figure is
only comparable with a raw-disk figure taken right beside it, with the same
access pattern. In each round, for each store configuration, the benchmark
runs two sides back to back, alternating which goes first (raw, store; then
store, raw; ...) so that drift within a round cancels over the rounds:

* raw disk: the same number of block-sized requests (one KV block, rounded
  up to 4 KiB) as the store moves, `--queue_depth` requests in flight
  (threads taking the next request from a shared counter, like a pool), with
  O_DIRECT into a fresh (sparse) file: write (fsync at the end), then
  sequential reads, then random reads in the store's random order;
* store: put_async of `--put_blocks` blocks per put, all queued, until
  durable and committed; cold sequential and cold random block reads (page
  cache of the store's files evicted first, and checked to be empty with
  mincore), TensorStore limited to `--queue_depth` concurrent file
  operations (`file_io_concurrency`), so both sides keep as many requests in
  flight; then single-block cold read latencies; then a rewrite: as many new
  blocks again into the now full store, which evicts the old ones and reuses
  their slots (the steady state of a long-running cache), reported against
  the same round's raw write.

Each round gives a paired ratio per figure (store / raw); the table shows
their median and min-max over the rounds, and how many rounds met the
targets (reads >= 85%, writes >= 70% of raw). Beside them, so that a gap can
be attributed:

* file floor (`--raw_files`): the file-per-block protocol that TensorStore's
  `file` kvstore runs, by hand (buffered write, fsync, rename, directory
  fsync; buffered cold reads into reused buffers), same order and depth;
* memory first touch: bandwidth of writing freshly allocated memory vs
  memory already touched. On a VM whose host backs guest memory lazily,
  the first touch costs more than the disk read it receives.

Which figures are warm: none of the bandwidths. Raw reads use O_DIRECT (no
guest page cache); store and file-floor reads start with the files' pages
evicted (`resident_before` in the JSON, 0 when cold). No benchmark in the
guest can empty a host-side cache of a virtual disk: both sides write and
then read the same volume in the same order, so they meet it alike.

Store configurations (`--configs`): `driver:codec[:file_io_mode][@key=value]...`
where a key is a `ColdTierConfig` field (io_threads, file_io_concurrency,
max_batch_blocks, fsync, chunk_writer, chunk_reader, sync, key_file: an
encrypted store) or `out=1`: read into one reused, pre-touched, page-aligned
buffer (`BlockStore.get(ids, out=...)`, as the engine's staging rows) instead
of fresh result arrays. The
config `raw` puts a second raw-disk run on the store side: an A/A check whose
ratios show the spread the disk alone produces under this method.

Also (`--recompute=model`): prefill tokens/s of the embedded SmolLM2-135M, its
real KV blocks as the payload, the int8 codec's effect on logits, and the
break-even of loading vs recomputing. Prints tables and writes JSON (`--json`,
default docs/results/storage_<date>.json).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags, logging

from dualpath_jax import outputs
from dualpath_jax.metrics import git_commit
from dualpath_jax.disk_io import page_aligned_empty
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from dualpath_jax.config import MODEL_PRESETS, CacheConfig
from launch.storage_disk import (bench_file_floor, bench_memory, bench_raw,
                                  cpu_seconds, latency_percentiles)
from launch.storage_report import (FIGURES, TARGETS, format_table,
                                    median_dict, summarize)
from storage import BlockStore, ColdTierConfig, encryption
from storage.page_cache import drop_page_cache, resident_bytes

FLAGS = flags.FLAGS
flags.DEFINE_string("dir", None, "where to put the test files (default: a temp dir)")
flags.DEFINE_string("model", "smollm2-135m-instruct", f"block shape preset: {list(MODEL_PRESETS)}")
flags.DEFINE_integer("block_size", 64, "tokens per block", lower_bound=1)
flags.DEFINE_string("dtype", "bfloat16", "stored KV dtype")
flags.DEFINE_integer("disk_bytes", None, "ignored (kept so that old command lines run): the "
                     "raw side now moves the same bytes as each store run")
flags.DEFINE_integer("store_bytes", 1 << 30, "bytes written per store run (and per raw run)",
                     lower_bound=1)
flags.DEFINE_integer("queue_depth", 8, "requests in flight on both sides: raw O_DIRECT "
                     "threads and the store's file_io_concurrency (unless a config sets it)",
                     lower_bound=1)
flags.DEFINE_list("configs", ["file:raw", "file:raw@out=1", "ocdbt:raw", "file:zstd",
                              "file:int8"],
                  "store configurations, driver:codec[:file_io_mode][@key=value]... "
                  "(e.g. file:raw@out=1@file_io_concurrency=8; 'raw' = the disk, A/A)")
flags.DEFINE_integer("repeats", 5, "rounds; each runs every configuration paired with its "
                     "own raw-disk run", lower_bound=1)
flags.DEFINE_integer("put_blocks", 16, "blocks per put (one turn's write-back)", lower_bound=1)
flags.DEFINE_integer("get_blocks", 64, "blocks per get", lower_bound=1)
flags.DEFINE_integer("io_threads", 4, "store batches in flight", lower_bound=1)
flags.DEFINE_integer("latency_samples", 50, "single-block cold reads for percentiles (both "
                     "sides)", lower_bound=1)
flags.DEFINE_bool("raw_files", True, "also run the file-per-block floor (see module doc)")
flags.DEFINE_string("recompute", "model", "'model' (time a prefill), 'none', or a "
                    "prefill tokens/s figure to use")
flags.DEFINE_list("prefill_lengths", ["512"], "prefill lengths to time")
flags.DEFINE_bool("global_drop", False, "drop the whole page cache (root) instead of "
                  "fadvise on the store's files")
flags.DEFINE_string("json", None, "JSON output (default docs/results/storage_<date>.json)")



# -- model: prefill speed, real KV, int8 effect on logits ---------------------


def _prompt_tokens(loaded, length: int) -> np.ndarray:
  """`length` tokens of real text (this repo's storage sources) or random ids."""
  if loaded.tokenizer is not None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = ""
    for name in sorted(os.listdir(os.path.join(here, "storage"))):
      if name.endswith(".py"):
        with open(os.path.join(here, "storage", name)) as f:
          text += f.read()
    ids = loaded.tokenizer.encode(text)
    while len(ids) < length:
      ids = ids + ids
    return np.asarray(ids[:length], np.int32)
  rng = np.random.default_rng(0)
  return rng.integers(3, loaded.config.vocab_size, size=length, dtype=np.int32)


def bench_model(block_size: int, lengths: list[int]) -> dict:
  """Prefill tokens/s per length; real KV blocks; int8 effect on next-chunk logits."""
  import jax
  from dualpath_jax.model import ModelRunner, load_model
  from storage.codecs import make_codec

  loaded = load_model(None)
  out: dict = {"model": loaded.source, "model_dtype": loaded.config.dtype,
               "backend": jax.default_backend(), "prefill": []}
  longest = max(lengths)
  probe = 64  # tokens whose logits are compared
  num_blocks = (longest + probe) // block_size + 2
  cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, dtype="float32")
  runner = ModelRunner(loaded.model, cache)
  tokens_all = _prompt_tokens(loaded, longest + probe)

  def prefill(kv, start, tokens):
    n = len(tokens)
    table = np.arange(num_blocks, dtype=np.int32)[None]
    slots = np.arange(start, start + n, dtype=np.int32)[None]
    return runner.step_all_logits(kv, tokens[None], table, np.array([start + n]),
                                  np.array([n]), slots)

  kv = runner.new_kv_cache()
  for length in lengths:
    logits, kv = prefill(kv, 0, tokens_all[:length])  # compile
    logits.block_until_ready()
    times = []
    for _ in range(2):
      start = time.perf_counter()
      logits, kv = prefill(kv, 0, tokens_all[:length])
      logits.block_until_ready()
      times.append(time.perf_counter() - start)
    out["prefill"].append({"tokens": length, "seconds": min(times),
                           "tokens_per_s": length / min(times)})
    logging.info("prefill %d tokens: %.0f tokens/s", length, length / min(times))
  # KV of the longest prompt: the store's payload, and the int8 experiment.
  pool = np.asarray(kv)  # [L, N, 2, Hkv, P, D]
  full = longest // block_size
  blocks = np.moveaxis(pool[:, :full], 1, 0)  # [full, L, 2, Hkv, P, D]
  out["kv_blocks"] = blocks
  probe_tokens = tokens_all[longest:longest + probe]
  results = {}
  variants = {"float32": None, "bf16": "raw", "int8": "int8"}
  for name, codec_name in variants.items():
    pool_v = pool.copy()
    if codec_name is not None:
      codec = make_codec(codec_name, blocks.shape[1:], "bfloat16")
      round_trip = codec.decode(codec.encode(blocks.astype(ml_dtypes.bfloat16)))
      pool_v[:, :full] = np.moveaxis(round_trip.astype(np.float32), 0, 1)
    logits, _ = prefill(jax.numpy.asarray(pool_v), longest, probe_tokens)
    results[name] = np.asarray(logits[0], np.float64)  # [probe, V]
  exact = results["float32"]
  p = _softmax(exact)
  for name in ("bf16", "int8"):
    got = results[name]
    q = _softmax(got)
    out[f"logits_{name}"] = {
        "context_tokens": longest, "probe_tokens": probe,
        "max_abs_diff": float(np.abs(got - exact).max()),
        "mean_abs_diff": float(np.abs(got - exact).mean()),
        "logit_std": float(exact.std()),
        "mean_kl": float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), -1))),
        "top1_agreement": float(np.mean(got.argmax(-1) == exact.argmax(-1))),
    }
  return out


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# -- store --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreSpec:
  """One `--configs` entry: `driver:codec[:file_io_mode][@key=value]...`."""

  name: str
  driver: str
  codec: str
  file_io_mode: str
  overrides: dict
  read_into_buffer: bool

  @classmethod
  def parse(cls, text: str) -> "StoreSpec":
    head, _, tail = text.partition("@")
    if head == "raw":
      return cls(text, "raw", "-", "O_DIRECT", {}, False)
    parts = head.split(":")
    if len(parts) not in (2, 3):
      raise ValueError(f"config {text!r}: expected driver:codec[:file_io_mode]")
    driver, codec, io_mode = (parts + [ColdTierConfig.file_io_mode])[:3]
    overrides, into = {}, False
    fields = {f.name: f.type for f in dataclasses.fields(ColdTierConfig)}
    for item in filter(None, tail.split("@")):
      key, _, value = item.partition("=")
      if key == "out":
        into = value not in ("0", "false", "False")
      elif key in ("io_threads", "file_io_concurrency", "max_batch_blocks"):
        if not value.isdigit() or int(value) < 1:
          raise ValueError(f"config {text!r}: {key} must be an integer >= 1; "
                           f"got {value!r}")
        overrides[key] = int(value)
      elif key == "fsync":
        overrides[key] = value not in ("0", "false", "False")
      elif key in ("chunk_writer", "chunk_reader", "sync"):
        overrides[key] = value
      elif key == "key_file":  # an encrypted store (storage.encryption)
        encryption.load_key(value)  # a bad key file now, not mid-run
        overrides[key] = value
      else:
        raise ValueError(f"config {text!r}: unknown key {key!r} (ColdTierConfig fields: "
                         f"{sorted(fields)}; or out=1)")
    try:  # every value checked now, not when the config's turn comes
      ColdTierConfig(root="-", driver=driver, codec=codec,
                     file_io_mode=io_mode, **overrides)
    except ValueError as e:
      raise ValueError(f"config {text!r}: {e}") from None
    return cls(text, driver, codec, io_mode, overrides, into)


def _put_all(store: BlockStore, ids: list[bytes],
             content: np.ndarray,  # [m, L, 2, Hkv, P, D], cycled over
             ) -> tuple[float, float]:
  """Puts one block per id, `--put_blocks` per put, all queued at once.

  Returns the seconds until every put is durable and committed, and this
  process's CPU seconds meanwhile. Raises unless every block was written.
  """
  n, step = len(ids), FLAGS.put_blocks
  cpu0 = cpu_seconds()
  start = time.perf_counter()
  futures = []
  for lo in range(0, n, step):
    hi = min(n, lo + step)
    off = lo % (len(content) - step + 1) if len(content) > step else 0
    futures.append(store.put_async(ids[lo:hi], content[off:off + hi - lo]))
  statuses = [s for f in futures for s in f.result().statuses]
  seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
  if statuses.count("write") != n:
    raise RuntimeError(f"store wrote {statuses.count('write')} of {n} blocks")
  return seconds, cpu


def bench_store(directory: str, spec: StoreSpec, model, cache: CacheConfig,
                payload: np.ndarray, n: int, order: list[int],
                latency_samples: list[int]) -> dict:
  """Write, cold sequential read, cold random read and latency of one store."""
  root = os.path.join(directory, "store")
  logical_block = payload[0].nbytes
  kw = {"io_threads": FLAGS.io_threads, "file_io_concurrency": FLAGS.queue_depth,
        "max_batch_blocks": FLAGS.get_blocks} | spec.overrides
  sealed = encryption.OVERHEAD if spec.overrides.get("key_file") else 0
  config = ColdTierConfig(root=root, driver=spec.driver, codec=spec.codec,
                          # full after the first pass
                          capacity_bytes=n * (logical_block + sealed),
                          max_pending_write_bytes=(n + 8) * logical_block,
                          file_io_mode=spec.file_io_mode, **kw)
  store = BlockStore(config, model, cache)
  rng = np.random.default_rng(1)
  ids = [rng.bytes(32) for _ in range(n)]
  reps = -(-n // len(payload))
  # The payload cycled: slices are views, so queued puts hold no copies.
  content = np.concatenate([payload] * min(reps, max(1, FLAGS.put_blocks * 4 // len(payload) + 1)))
  cpu = {}
  write_s, cpu["write"] = _put_all(store, ids, content)
  data_dir = os.path.join(root, "data")
  disk_bytes = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, fs in os.walk(data_dir) for f in fs)
  out = {"config": spec.name, "driver": spec.driver, "codec": spec.codec,
         "file_io_mode": spec.file_io_mode, "overrides": kw,
         "read_into_buffer": spec.read_into_buffer, "blocks": n,
         "logical_block_bytes": logical_block,
         "encoded_block_bytes": store.encoded_block_bytes, "disk_bytes": disk_bytes,
         "logical_bytes": n * logical_block,
         "chunk_writer": store.chunk_writer, "chunk_reader": store.chunk_reader,
         "write_seconds": write_s,
         "write_logical_bytes_per_s": n * logical_block / write_s,
         "write_disk_bytes_per_s": disk_bytes / write_s, "resident_before": []}
  # One buffer for `out=` reads, reused by both passes; touched now (a fresh
  # mapping's pages are zeroed on first touch, which would land in the
  # timing); page-aligned, as the engine's staging rows (`StagingRows`).
  buffer = None
  if spec.read_into_buffer:
    buffer = page_aligned_empty((n, *store.block_shape), payload.dtype)
    buffer.view(np.uint8).fill(1)

  def read_all(name: str, order_ids: list[bytes]) -> float:
    out["cache_drop"] = drop_page_cache(data_dir, FLAGS.global_drop)
    out["resident_before"].append((resident_bytes(data_dir) or (None,))[0])
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    step = FLAGS.get_blocks
    futures = [store.get_async(order_ids[lo:lo + step],
                               None if buffer is None else buffer[lo:lo + step])
               for lo in range(0, len(order_ids), step)]
    got = [b for f in futures for b in f.result()]
    seconds = time.perf_counter() - start
    cpu[name] = cpu_seconds() - cpu0
    if any(b is None for b in got):
      raise RuntimeError(f"{sum(b is None for b in got)} blocks missing on read")
    del got, futures  # drop the blocks before the next pass, as a caller would
    return seconds

  seq_s = read_all("seq_read", ids)
  rand_s = read_all("random_read", [ids[i] for i in order])
  out["cpu_s_per_gb"] = {k: v / (disk_bytes / 1e9) for k, v in cpu.items()}
  out["o_direct_read_bytes"] = store.stats()["o_direct_read_bytes"]
  out.update({
      "read_seq_seconds": seq_s, "read_random_seconds": rand_s,
      "read_seq_logical_bytes_per_s": n * logical_block / seq_s,
      "read_seq_disk_bytes_per_s": disk_bytes / seq_s,
      "read_random_logical_bytes_per_s": n * logical_block / rand_s,
      "read_random_disk_bytes_per_s": disk_bytes / rand_s,
  })
  drop_page_cache(data_dir, FLAGS.global_drop)
  lat = []
  for i in latency_samples:
    start = time.perf_counter()
    if store.get([ids[i]])[0] is None:
      raise RuntimeError("block missing in latency test")
    lat.append(time.perf_counter() - start)
  out["latency_ms_cold_single_block"] = latency_percentiles(lat)
  if spec.codec in ("raw", "zstd"):  # bit-exact codecs: check what came back
    back = store.get(ids[:1])[0]
    out["verified_bit_exact"] = bool(back.tobytes() == content[0].tobytes())
  # Rewrite: as many new blocks into the now full store, which evicts and
  # reuses slots (LRU): the steady state of a long-running cache.
  rewrite_s, cpu["rewrite"] = _put_all(store, [rng.bytes(32) for _ in range(n)], content)
  out["cpu_s_per_gb"]["rewrite"] = cpu["rewrite"] / (disk_bytes / 1e9)
  out.update({"rewrite_seconds": rewrite_s, "rewrite_disk_bytes_per_s": disk_bytes / rewrite_s,
              "rewrite_reused_slots": max(0, n - (store.num_slots - n))})
  store.close()
  shutil.rmtree(root)
  return out


def bench_pair(directory: str, spec: StoreSpec, model, cache: CacheConfig,
               payload: np.ndarray, n: int, request: int, round_: int) -> dict:
  """One round of one config: raw disk and store back to back (order alternates)."""
  rng = np.random.default_rng(100 + round_)
  order = [int(i) for i in rng.permutation(n)]
  samples = [int(i) for i in rng.choice(n, size=min(n, FLAGS.latency_samples), replace=False)]
  sides = ["raw", "store"] if round_ % 2 == 0 else ["store", "raw"]
  pair = {"round": round_, "order": sides, "memory": bench_memory(),
          "load_average_1_5_15_start": list(os.getloadavg())}
  for side in sides:
    if side == "raw":
      logging.info("round %d %s: raw disk ...", round_, spec.name)
      pair["raw"] = bench_raw(directory, n, request, FLAGS.queue_depth, order, samples)
      if FLAGS.raw_files:
        logging.info("round %d %s: file floor ...", round_, spec.name)
        pair["file_floor"] = bench_file_floor(directory, n, _chunk_file_bytes(payload),
                                              FLAGS.queue_depth, order, FLAGS.global_drop)
    elif spec.driver == "raw":  # A/A: the disk against itself
      logging.info("round %d %s: raw disk (A/A) ...", round_, spec.name)
      pair["store"] = _raw_as_store(
          bench_raw(directory, n, request, FLAGS.queue_depth, order, samples), spec, payload)
    else:
      logging.info("round %d %s: store ...", round_, spec.name)
      pair["store"] = bench_store(directory, spec, model, cache, payload, n, order, samples)
  s, r = pair["store"], pair["raw"]
  got = {"write": s["write_disk_bytes_per_s"], "seq_read": s["read_seq_disk_bytes_per_s"],
         "random_read": s["read_random_disk_bytes_per_s"]}
  pair["ratio"] = {k: got[k] / r[k] for k in FIGURES}
  if "file_floor" in pair:
    pair["ratio_to_file_floor"] = {k: got[k] / pair["file_floor"][k] for k in FIGURES}
  pair["met"] = {k: pair["ratio"][k] >= TARGETS[k] for k in FIGURES}
  if "rewrite_disk_bytes_per_s" in s:
    pair["ratio_rewrite"] = s["rewrite_disk_bytes_per_s"] / r["write"]
  pair["load_average_1_5_15_end"] = list(os.getloadavg())
  return pair


def _raw_as_store(raw: dict, spec: StoreSpec, payload: np.ndarray) -> dict:
  """A raw-disk run under the keys of a store run (the A/A config)."""
  logical = raw["requests"] * payload[0].nbytes
  seconds = {k: raw["bytes"] / raw[k] for k in FIGURES}
  return {"config": spec.name, "driver": "raw", "codec": "-", "file_io_mode": "O_DIRECT",
          "blocks": raw["requests"], "disk_bytes": raw["bytes"], "logical_bytes": logical,
          "write_disk_bytes_per_s": raw["write"], "read_seq_disk_bytes_per_s": raw["seq_read"],
          "read_random_disk_bytes_per_s": raw["random_read"],
          "write_logical_bytes_per_s": logical / seconds["write"],
          "read_seq_logical_bytes_per_s": logical / seconds["seq_read"],
          "read_random_logical_bytes_per_s": logical / seconds["random_read"],
          "latency_ms_cold_single_block": raw["latency_ms_single_block"],
          "cpu_s_per_gb": raw["cpu_s_per_gb"],
          "resident_before": [raw["resident_before"] or 0]}


def _chunk_file_bytes(payload: np.ndarray) -> int:
  """Bytes of one raw-codec chunk file: the block and its 4-byte CRC32C."""
  return payload[0].nbytes + 4


def _check_flags() -> tuple[list[StoreSpec], str]:
  """(the store configurations, the JSON path) of the flags; ValueError
  saying what is wrong, before any file is written or timed."""
  if FLAGS.model not in MODEL_PRESETS:
    raise ValueError(f"--model: unknown preset {FLAGS.model!r}; known: "
                     f"{sorted(MODEL_PRESETS)}")
  if FLAGS.recompute == "model" and FLAGS.model != "smollm2-135m-instruct":
    raise ValueError("--recompute=model needs --model=smollm2-135m-instruct")
  if FLAGS.recompute not in ("model", "none"):
    try:
      if float(FLAGS.recompute) <= 0:
        raise ValueError
    except ValueError:
      raise ValueError("--recompute: 'model', 'none' or a prefill tokens/s "
                       f"figure > 0; got {FLAGS.recompute!r}") from None
  if FLAGS.recompute == "model" and not all(
      x.isdigit() and int(x) >= 1 for x in FLAGS.prefill_lengths):
    raise ValueError("--prefill_lengths: give token counts >= 1, e.g. 512; "
                     f"got {','.join(FLAGS.prefill_lengths)!r}")
  if FLAGS.dir is not None:
    if not os.path.isdir(FLAGS.dir):
      raise ValueError(f"--dir: {FLAGS.dir} is not a directory")
    outputs.check_output_dir(FLAGS.dir, "--dir")
  CacheConfig(block_size=FLAGS.block_size, dtype=FLAGS.dtype)  # raises
  specs = [StoreSpec.parse(c) for c in FLAGS.configs]
  path = FLAGS.json or os.path.join(
      "docs", "results", f"storage_{datetime.date.today().isoformat()}.json")
  return specs, outputs.check_output_path(path, "--json")


def main(argv):
  del argv
  try:
    specs, path = _check_flags()
  except ValueError as e:
    sys.exit(f"bench_storage: {e}")
  model = MODEL_PRESETS[FLAGS.model]
  cache = CacheConfig(block_size=FLAGS.block_size, dtype=FLAGS.dtype)
  directory = tempfile.mkdtemp(prefix="bench_storage_", dir=FLAGS.dir)
  report: dict = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "git_commit": git_commit(), "command": list(sys.argv),
      "method": "paired rounds v4: raw O_DIRECT and store back to back per round and "
                "config, same requests, depth and order; ratios per round",
      "load_average_1_5_15_start": list(os.getloadavg()),
      "host": platform.node(), "cpus": os.cpu_count(), "dir": directory,
      "model": model.name, "block_size": FLAGS.block_size, "dtype": FLAGS.dtype,
      "block_bytes": cache.bytes_per_block(model),
      "bytes_per_token": cache.bytes_per_block(model) / FLAGS.block_size,
      "rounds": FLAGS.repeats, "targets": TARGETS,
      "flags": {k: FLAGS[k].value for k in ("store_bytes", "queue_depth", "put_blocks",
                                             "get_blocks", "io_threads", "repeats",
                                             "latency_samples", "raw_files", "configs")},
  }
  if FLAGS.disk_bytes is not None:
    logging.warning("--disk_bytes is ignored: the raw side moves the same bytes as the store")
  interrupted = False
  try:
    payload = None
    if FLAGS.recompute == "model":
      logging.info("model ...")
      m = bench_model(FLAGS.block_size, [int(x) for x in FLAGS.prefill_lengths])
      payload = m.pop("kv_blocks").astype(FLAGS.dtype if FLAGS.dtype != "bfloat16"
                                          else ml_dtypes.bfloat16)
      report.update(m)
      report["payload"] = "real SmolLM2 KV of a prefill of the repo's own source"
    elif FLAGS.recompute != "none":
      report["prefill"] = [{"tokens": None, "tokens_per_s": float(FLAGS.recompute),
                            "seconds": None, "given": True}]
    if payload is None:
      from storage.codecs import numpy_dtype
      rng = np.random.default_rng(0)
      shape = (32, model.num_layers, 2, model.num_kv_heads, FLAGS.block_size, model.head_dim)
      payload = rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(FLAGS.dtype))
      report["payload"] = "random normal (incompressible: zstd figures not meaningful)"
    logical_block = payload[0].nbytes
    n = max(FLAGS.get_blocks, FLAGS.store_bytes // logical_block)
    request = -(-_chunk_file_bytes(payload) // 4096) * 4096
    pairs: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    try:
      for round_ in range(FLAGS.repeats):
        for spec in specs:
          pair = bench_pair(directory, spec, model, cache, payload, n, request, round_)
          pairs[spec.name].append(pair)
          logging.info("round %d %s: store/raw %s", round_, spec.name,
                       {k: round(v, 3) for k, v in pair["ratio"].items()})
    except KeyboardInterrupt:  # Ctrl-C: report the finished rounds, exit 130
      interrupted = True
      done = min(len(v) for v in pairs.values())  # whole rounds only
      pairs = {name: v[:done] for name, v in pairs.items()}
      if not done:
        print("bench_storage: interrupted before the first round ended: "
              "nothing to report", file=sys.stderr)
        sys.exit(130)
    report["rounds"] = len(next(iter(pairs.values())))  # --repeats if complete
    report["complete"] = not interrupted
    report["load_average_1_5_15_end"] = list(os.getloadavg())
    every = [p for spec in specs for p in pairs[spec.name]]
    raw = median_dict([p["raw"] for p in every])
    # The pre-v4 "disk" keys: seq_write is now the block-sized write.
    report["disk"] = raw | {"seq_write": raw["write"], "random_request": request}
    report["disk_runs"] = [p["raw"] for p in every]
    if FLAGS.raw_files:
      report["file_floor"] = median_dict([p["file_floor"] for p in every])
    report["memory"] = median_dict([p["memory"] for p in every])
    report["pairs"] = [{k: v for k, v in p.items()} for p in every]
    report["stores"] = [summarize(pairs[spec.name], report["bytes_per_token"])
                        for spec in specs]
    report["store_runs"] = {spec.name: [p["store"] for p in pairs[spec.name]] for spec in specs}
    if report.get("prefill"):
      best_prefill = max(p["tokens_per_s"] for p in report["prefill"])
      best_load = max(s["load_tokens_per_s"] for s in report["stores"])
      report["break_even_ratio"] = best_load / best_prefill
      report["break_even"] = (
          f"break-even: loading from the cold tier gives {best_load:,.0f} tokens/s of KV vs "
          f"{best_prefill:,.0f} tokens/s of prefill recompute (x{best_load / best_prefill:.1f}); "
          f"loading wins while the load rate exceeds the prefill rate")
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  table = format_table(report)
  print(table)
  report["table"] = table
  outputs.write_json(report, path)
  print(f"wrote {path}")
  if interrupted:
    print(f"interrupted after {report['rounds']} of {FLAGS.repeats} rounds: "
          "the report holds those (complete: false)", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "bench_storage"))
