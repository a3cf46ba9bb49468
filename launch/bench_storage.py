r"""Cold-tier benchmark: raw disk vs the block store, and loading vs recomputing KV.

    python -m launch.bench_storage                     # all sections, ~3-5 min on 2 cores
    python -m launch.bench_storage --recompute=none --store_bytes=536870912

In one run on one disk (a temporary directory under `--dir`):

1. raw disk: O_DIRECT sequential (4 MiB requests) and random (block-sized
   requests) reads and writes, with `--queue_depth` threads in parallel;
2. the model (`--recompute=model`): prefill tokens/s of the embedded
   SmolLM2-135M at each `--prefill_lengths` (the recompute side of the
   break-even), the real KV blocks it produced (used as the store's payload,
   so zstd and int8 see real data), and the effect of the int8 codec on logits
   (next-chunk logits with the exact prefix vs the int8 round-tripped prefix);
3. for each store configuration (`--configs`, `driver:codec`): block write
   bandwidth (put_async of `--put_blocks` blocks per put, all queued, until
   durable and committed), cold sequential and cold random block reads
   (page cache dropped for the store's files first), and the latency
   percentiles of single-block cold reads;
4. the break-even: tokens/s of KV loadable from the store vs prefill tokens/s.

Prints a table and writes JSON (`--json`, default docs/results/storage_<date>.json).
"""

from __future__ import annotations

import datetime
import json
import mmap
import os
import platform
import shutil
import tempfile
import threading
import time

import ml_dtypes
import numpy as np
from absl import app, flags, logging

from dualpath_jax.config import MODEL_PRESETS, CacheConfig
from storage import BlockStore, ColdTierConfig
from storage.page_cache import drop_page_cache

FLAGS = flags.FLAGS
flags.DEFINE_string("dir", None, "where to put the test files (default: a temp dir)")
flags.DEFINE_string("model", "smollm2-135m-instruct", f"block shape preset: {list(MODEL_PRESETS)}")
flags.DEFINE_integer("block_size", 64, "tokens per block")
flags.DEFINE_string("dtype", "bfloat16", "stored KV dtype")
flags.DEFINE_integer("disk_bytes", 2 << 30, "raw disk test file size")
flags.DEFINE_integer("store_bytes", 2 << 30, "bytes written per store configuration")
flags.DEFINE_integer("queue_depth", 8, "raw disk: parallel O_DIRECT requests")
flags.DEFINE_list("configs", ["file:raw", "file:raw:default", "ocdbt:raw", "file:zstd",
                              "file:int8"],
                  "store configurations, driver:codec[:file_io_mode]")
flags.DEFINE_integer("repeats", 1, "runs of each store configuration, interleaved; the "
                     "table shows the median of each figure (all runs are in the JSON)")
flags.DEFINE_integer("put_blocks", 16, "blocks per put (one turn's write-back)")
flags.DEFINE_integer("get_blocks", 64, "blocks per get")
flags.DEFINE_integer("io_threads", 4, "store batches in flight")
flags.DEFINE_integer("latency_samples", 200, "single-block cold reads for percentiles")
flags.DEFINE_string("recompute", "model", "'model' (time a prefill), 'none', or a "
                    "prefill tokens/s figure to use")
flags.DEFINE_list("prefill_lengths", ["512"], "prefill lengths to time")
flags.DEFINE_bool("global_drop", False, "drop the whole page cache (root) instead of "
                  "fadvise on the store's files")
flags.DEFINE_string("json", None, "JSON output (default docs/results/storage_<date>.json)")

MiB = 1 << 20


# -- raw disk -----------------------------------------------------------------


def _parallel_io(path: str, offsets: list[int], request: int, depth: int, write: bool) -> float:
  """Seconds to read (or write) `request` bytes at each offset, O_DIRECT, `depth` threads."""
  flags_ = (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT
  fd = os.open(path, flags_)
  errors = []

  def worker(i: int) -> None:
    buf = mmap.mmap(-1, request)  # page aligned, as O_DIRECT needs
    if write:
      buf.write(os.urandom(request))
    try:
      for off in offsets[i::depth]:
        n = os.pwritev(fd, [buf], off) if write else os.preadv(fd, [buf], off)
        if n != request:
          raise OSError(f"short O_DIRECT {'write' if write else 'read'}: {n}")
    except OSError as err:
      errors.append(err)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if write:
    os.fsync(fd)
  seconds = time.perf_counter() - start
  os.close(fd)
  if errors:
    raise errors[0]
  return seconds


def bench_disk(directory: str, size: int, block_request: int, depth: int) -> dict:
  """Raw O_DIRECT bandwidth (bytes/s) of the disk under `directory`."""
  path = os.path.join(directory, "raw_disk.bin")
  seq = 4 * MiB
  size = size // seq * seq
  with open(path, "wb") as f:
    f.truncate(size)
  rng = np.random.default_rng(0)
  out = {"file_bytes": size, "queue_depth": depth, "seq_request": seq,
         "random_request": block_request}
  offsets = list(range(0, size, seq))
  out["seq_write"] = size / _parallel_io(path, offsets, seq, depth, write=True)
  out["seq_read"] = size / _parallel_io(path, offsets, seq, depth, write=False)
  out["seq_read_qd1"] = size / _parallel_io(path, offsets, seq, 1, write=False)
  slots = size // block_request
  picks = rng.choice(slots, size=min(slots, max(64, (size // 2) // block_request)),
                     replace=False)
  offsets = [int(p) * block_request for p in picks]
  volume = len(offsets) * block_request
  out["random_read"] = volume / _parallel_io(path, offsets, block_request, depth, write=False)
  out["random_write"] = volume / _parallel_io(path, offsets, block_request, depth, write=True)
  os.unlink(path)
  return out


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


def _percentiles(seconds: list[float]) -> dict:
  ms = np.asarray(seconds) * 1e3
  return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {
      "mean": float(ms.mean()), "max": float(ms.max())}


def bench_store(directory: str, driver: str, codec: str, io_mode: str, model,
                cache: CacheConfig, payload: np.ndarray, total_bytes: int) -> dict:
  """Write, cold sequential read, cold random read and latency of one store."""
  root = os.path.join(directory, f"store_{driver}_{codec.replace('+', '_')}_{io_mode}")
  logical_block = payload[0].nbytes
  n = max(FLAGS.get_blocks, total_bytes // logical_block)
  config = ColdTierConfig(root=root, driver=driver, codec=codec,
                          capacity_bytes=(n + 8) * logical_block, io_threads=FLAGS.io_threads,
                          max_batch_blocks=FLAGS.get_blocks,
                          max_pending_write_bytes=(n + 8) * logical_block,
                          file_io_mode=io_mode)
  store = BlockStore(config, model, cache)
  rng = np.random.default_rng(1)
  ids = [rng.bytes(32) for _ in range(n)]
  reps = -(-n // len(payload))
  # The payload cycled: slices are views, so queued puts hold no copies.
  content = np.concatenate([payload] * min(reps, max(1, FLAGS.put_blocks * 4 // len(payload) + 1)))
  step = FLAGS.put_blocks
  start = time.perf_counter()
  futures = []
  for lo in range(0, n, step):
    hi = min(n, lo + step)
    off = lo % (len(content) - step + 1) if len(content) > step else 0
    futures.append(store.put_async(ids[lo:hi], content[off:off + hi - lo]))
  statuses = [s for f in futures for s in f.result().statuses]
  write_s = time.perf_counter() - start
  if statuses.count("write") != n:
    raise RuntimeError(f"store wrote {statuses.count('write')} of {n} blocks")
  disk_bytes = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, fs in os.walk(os.path.join(root, "data")) for f in fs)
  out = {"driver": driver, "codec": codec, "file_io_mode": io_mode, "blocks": n, "logical_block_bytes": logical_block,
         "encoded_block_bytes": store.encoded_block_bytes, "disk_bytes": disk_bytes,
         "logical_bytes": n * logical_block,
         "write_seconds": write_s,
         "write_logical_bytes_per_s": n * logical_block / write_s,
         "write_disk_bytes_per_s": disk_bytes / write_s}

  def read_all(order: list[bytes]) -> float:
    method = drop_page_cache(root, FLAGS.global_drop)
    out["cache_drop"] = method
    start = time.perf_counter()
    step = FLAGS.get_blocks
    futures = [store.get_async(order[lo:lo + step]) for lo in range(0, len(order), step)]
    got = [b for f in futures for b in f.result()]
    seconds = time.perf_counter() - start
    if any(b is None for b in got):
      raise RuntimeError(f"{sum(b is None for b in got)} blocks missing on read")
    return seconds

  seq_s = read_all(ids)
  perm = [ids[i] for i in rng.permutation(n)]
  rand_s = read_all(perm)
  out.update({
      "read_seq_seconds": seq_s, "read_random_seconds": rand_s,
      "read_seq_logical_bytes_per_s": n * logical_block / seq_s,
      "read_seq_disk_bytes_per_s": disk_bytes / seq_s,
      "read_random_logical_bytes_per_s": n * logical_block / rand_s,
      "read_random_disk_bytes_per_s": disk_bytes / rand_s,
  })
  sample = [ids[i] for i in rng.choice(n, size=min(n, FLAGS.latency_samples), replace=False)]
  drop_page_cache(root, FLAGS.global_drop)
  lat = []
  for block_id in sample:
    start = time.perf_counter()
    if store.get([block_id])[0] is None:
      raise RuntimeError("block missing in latency test")
    lat.append(time.perf_counter() - start)
  out["latency_ms_cold_single_block"] = _percentiles(lat)
  if codec in ("raw", "zstd"):  # bit-exact codecs: check what came back
    back = store.get(ids[:step])[0]
    out["verified_bit_exact"] = bool(back.tobytes() == content[0].tobytes())
  store.close()
  shutil.rmtree(root)
  return out


def _median_run(runs: list[dict]) -> dict:
  """One run's dict with every numeric figure replaced by its median over runs."""
  out = dict(runs[0])
  for key, value in runs[0].items():
    if isinstance(value, float):
      out[key] = float(np.median([r[key] for r in runs]))
    elif isinstance(value, dict):
      out[key] = {k: float(np.median([r[key][k] for r in runs])) for k in value}
  out["runs"] = len(runs)
  return out


# -- report -------------------------------------------------------------------


def _gbs(x: float) -> str:
  return f"{x / 1e9:6.2f}"


def format_table(report: dict) -> str:
  d = report["disk"]
  lines = [
      f"raw disk (O_DIRECT, QD {d['queue_depth']}, median of {d['runs']}): seq read {_gbs(d['seq_read'])} GB/s, "
      f"seq write {_gbs(d['seq_write'])} GB/s, random {d['random_request'] / MiB:.2f} MiB "
      f"read {_gbs(d['random_read'])} GB/s, write {_gbs(d['random_write'])} GB/s",
      "load average (1 min) per raw disk run: " + ", ".join(
          f"{r['load_average_1_5_15'][0]:.1f}" for r in report["disk_runs"]),
      "",
      "Medians over repeats; each % compares a store run with the raw disk run just "
      "before it.",
      "",
      "| store | block MiB (enc) | write GB/s | % raw seq write | seq read GB/s | "
      "% raw seq read | rand read GB/s | % raw rand read | lat p50/p90/p99 ms | "
      "disk/logical | load tok/s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s in report["stores"]:
    lat = s["latency_ms_cold_single_block"]
    lines.append(
        f"| {s['driver']}:{s['codec']}"
        f":{s['file_io_mode']} | "
        f"{s['logical_block_bytes'] / MiB:.2f} "
        f"({s['encoded_block_bytes'] / MiB:.2f}) | {_gbs(s['write_disk_bytes_per_s'])} | "
        f"{100 * s['write_vs_raw_seq_write']:.0f}% | "
        f"{_gbs(s['read_seq_disk_bytes_per_s'])} | "
        f"{100 * s['seq_read_vs_raw_seq_read']:.0f}% | "
        f"{_gbs(s['read_random_disk_bytes_per_s'])} | "
        f"{100 * s['random_read_vs_raw_random_read']:.0f}% | "
        f"{lat['p50']:.1f}/{lat['p90']:.1f}/{lat['p99']:.1f} | "
        f"{s['disk_bytes'] / s['logical_bytes']:.2f} | {s['load_tokens_per_s']:,.0f} |")
  if report.get("prefill"):
    lines.append("")
    for p in report["prefill"]:
      lines.append(f"prefill recompute {p['tokens']} tokens: {p['tokens_per_s']:,.0f} tokens/s")
  for name in ("logits_bf16", "logits_int8"):
    if name in report:
      r = report[name]
      lines.append(f"{name}: max|dlogit| {r['max_abs_diff']:.4f} (logit std "
                   f"{r['logit_std']:.2f}), mean KL {r['mean_kl']:.2e}, top-1 agreement "
                   f"{100 * r['top1_agreement']:.1f}%")
  if report.get("break_even"):
    lines.append(report["break_even"])
  return "\n".join(lines)


def main(argv):
  del argv
  model = MODEL_PRESETS[FLAGS.model]
  cache = CacheConfig(block_size=FLAGS.block_size, dtype=FLAGS.dtype)
  directory = tempfile.mkdtemp(prefix="bench_storage_", dir=FLAGS.dir)
  report: dict = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "load_average_1_5_15_start": list(os.getloadavg()),
      "host": platform.node(), "cpus": os.cpu_count(), "dir": directory,
      "model": model.name, "block_size": FLAGS.block_size, "dtype": FLAGS.dtype,
      "block_bytes": cache.bytes_per_block(model),
      "bytes_per_token": cache.bytes_per_block(model) / FLAGS.block_size,
      "flags": {k: FLAGS[k].value for k in ("disk_bytes", "store_bytes", "queue_depth",
                                             "put_blocks", "get_blocks", "io_threads")},
  }
  try:
    payload = None
    if FLAGS.recompute == "model":
      if model.name != "smollm2-135m-instruct":
        raise ValueError("--recompute=model needs --model=smollm2-135m-instruct")
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
    runs: dict[str, list[dict]] = {spec: [] for spec in FLAGS.configs}
    disk_runs = []
    for repeat in range(FLAGS.repeats):
      # The disk is measured again in every repeat, right before the stores,
      # and each store figure is compared with its own repeat's disk figure.
      logging.info("raw disk (run %d) ...", repeat)
      disk = bench_disk(directory, FLAGS.disk_bytes,
                        -(-report["block_bytes"] // 4096) * 4096, FLAGS.queue_depth)
      disk["load_average_1_5_15"] = list(os.getloadavg())
      disk_runs.append(disk)
      for spec in FLAGS.configs:
        driver, codec, io_mode = (spec.split(":") + [ColdTierConfig.file_io_mode])[:3]
        logging.info("store %s (run %d) ...", spec, repeat)
        s = bench_store(directory, driver, codec, io_mode, model, cache, payload,
                        FLAGS.store_bytes)
        s["load_tokens_per_s"] = (s["read_random_logical_bytes_per_s"] /
                                  report["bytes_per_token"])
        s["write_vs_raw_seq_write"] = s["write_disk_bytes_per_s"] / disk["seq_write"]
        s["seq_read_vs_raw_seq_read"] = s["read_seq_disk_bytes_per_s"] / disk["seq_read"]
        s["random_read_vs_raw_random_read"] = (s["read_random_disk_bytes_per_s"] /
                                               disk["random_read"])
        s["load_average_1_5_15"] = list(os.getloadavg())
        runs[spec].append(s)
        logging.info("%s", {k: v for k, v in s.items() if "per_s" in k})
    report["load_average_1_5_15_end"] = list(os.getloadavg())
    report["disk"] = _median_run(disk_runs)
    report["disk_runs"] = disk_runs
    report["stores"] = [_median_run(r) for r in runs.values()]
    report["store_runs"] = runs
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
  path = FLAGS.json or os.path.join(
      "docs", "results", f"storage_{datetime.date.today().isoformat()}.json")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=float)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
