r"""Prefill and decode tokens/s of the model through the paged cache.

    python -m launch.bench_model --out=docs/results/bench_model_cpu.json

Times `ModelRunner.step` directly (no scheduling): prefill of a
`--prompt_tokens` prompt in one chunk (batch 1), then decode at each batch
size in `--decode_batches` with every sequence at `--prompt_tokens` context.
Compilation is excluded (each shape runs once before timing); each figure is
the median of `--reps` timed repetitions. Prints each row as it is
measured, then a table, and writes JSON; Ctrl-C reports the rows measured
so far (`"complete": false`) and exits 130.
"""

from __future__ import annotations

import importlib
import math
import statistics
import sys
import time

from absl import app, flags

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted
from launch import input_paths, list_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model source (see launch.agent_eval)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "weights/KV dtype")
flags.DEFINE_integer("prompt_tokens", 512, "prefill length and decode context",
                     lower_bound=1)
flags.DEFINE_list("decode_batches", ["1", "8"], "decode batch sizes")
flags.DEFINE_integer("decode_steps", 32, "decode steps per repetition",
                     lower_bound=1)
flags.DEFINE_integer("reps", 3, "timed repetitions (median reported)",
                     lower_bound=1)
flags.DEFINE_integer("block_size", 16, "tokens per KV block", lower_bound=1)
flags.DEFINE_string("attention", "auto", "paged-attention implementation "
                    "(xla | xla_chunked | pallas_triton | pallas_mosaic_gpu | "
                    "pallas_mosaic_tpu | auto)")
flags.DEFINE_string("out", None, "JSON output path")
flags.DEFINE_alias("json", "out")  # every JSON-writing launcher takes --json


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import numpy as np

  from dualpath_jax import metrics
  from dualpath_jax import outputs
  from dualpath_jax.config import ATTENTION_IMPLEMENTATIONS, CacheConfig
  from dualpath_jax.buckets import next_pow2
  from dualpath_jax.model import describe_model, load_model

  try:  # before JAX and the model load: bad flags cost nothing
    batches = list_flags.positive_ints("decode_batches", FLAGS.decode_batches)
    if (FLAGS.attention != "auto"
        and FLAGS.attention not in ATTENTION_IMPLEMENTATIONS):
      raise ValueError(f"--attention: unknown {FLAGS.attention!r}; choose "
                       f"from {sorted(ATTENTION_IMPLEMENTATIONS)} or auto")
    if FLAGS.out:
      outputs.check_output_paths([("--out", FLAGS.out)],
                                 inputs=input_paths.flagged_inputs())
  except ValueError as e:
    sys.exit(f"bench_model: {e}")
  # JAX's, Flax's and Orbax's imports before the clock starts (the model
  # package imports them on first use): describe_s and load_weights_s time
  # the model's start-up, not the frameworks'.
  from dualpath_jax.model.runner import ModelRunner  # pylint: disable=g-import-not-at-top
  importlib.import_module("dualpath_jax.model.checkpoint")  # the loaders'
  try:
    # Start-up as a launcher pays it: the config and tokenizer (a GGUF's
    # header and vocabulary), then the weights (read, dequantized, placed).
    t0 = time.perf_counter()
    described, _ = describe_model(FLAGS.model, dtype=FLAGS.dtype)
    t1 = time.perf_counter()
    context = FLAGS.prompt_tokens + FLAGS.decode_steps
    if context > described.max_position:  # before the weights load
      raise ValueError(
          f"--prompt_tokens + --decode_steps = {context} tokens is past the "
          f"model's context of {described.max_position}")
    loaded = load_model(FLAGS.model, dtype=FLAGS.dtype)
    startup = {"describe_s": t1 - t0, "load_weights_s": time.perf_counter() - t1}
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"bench_model: {e}")
  cfg = loaded.config
  n, bs = FLAGS.prompt_tokens, FLAGS.block_size
  pages = next_pow2(math.ceil((n + FLAGS.decode_steps + 1) / bs), 8)
  cache = CacheConfig(block_size=bs, num_blocks=pages * max(batches) + 1,
                      dtype=FLAGS.dtype)
  runner = ModelRunner(loaded.model, cache, attention_impl=FLAGS.attention)
  kv = runner.new_kv_cache()
  rng = np.random.default_rng(0)

  def tables(b):
    return (np.arange(b * pages, dtype=np.int32).reshape(b, pages))

  def prefill(kv):
    toks = rng.integers(0, cfg.vocab_size, (1, n), dtype=np.int32)
    slots = np.arange(n, dtype=np.int32)[None]
    logits, kv = runner.step(kv, toks, tables(1), np.array([n], np.int32),
                             np.array([n], np.int32), slots)
    np.asarray(logits)
    return kv

  def decode(kv, b):
    bt = tables(b)
    for i in range(FLAGS.decode_steps):
      pos = n + i
      toks = rng.integers(0, cfg.vocab_size, (b, 1), dtype=np.int32)
      slots = (bt[:, pos // bs] * bs + pos % bs)[:, None].astype(np.int32)
      logits, kv = runner.step(kv, toks, bt, np.full((b,), pos + 1, np.int32),
                               np.ones((b,), np.int32), slots)
      np.asarray(logits)
    return kv

  def timed(fn, *args):
    times = []
    nonlocal kv
    kv = fn(kv, *args)  # compile + warm
    for _ in range(FLAGS.reps):
      t0 = time.perf_counter()
      kv = fn(kv, *args)
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  rows, interrupted = [], False

  def measured(row):  # each row as it comes: the run shows progress
    rows.append(row)
    print(f"  {row['phase']} batch {row['batch']}: {row['tok_s']:.1f} tok/s",
          flush=True)
    raise_if_interrupted()

  try:  # Ctrl-C: report the rows measured so far, exit 130
    t = timed(prefill)
    measured({"phase": "prefill", "batch": 1, "tokens": n, "context": n,
              "seconds": t, "tok_s": n / t})
    for b in batches:
      t = timed(decode, b)
      toks = b * FLAGS.decode_steps
      measured({"phase": "decode", "batch": b, "tokens": toks,
                "context": n, "seconds": t, "tok_s": toks / t,
                "ms_per_step": 1000 * t / FLAGS.decode_steps})
  except KeyboardInterrupt:
    interrupted = True
    print("interrupted: the rows measured so far", flush=True)

  print(f"start-up: config + tokenizer {startup['describe_s']:.2f} s, "
        f"weights {startup['load_weights_s']:.2f} s")
  print(f"{'phase':<8} {'batch':>5} {'context':>7} {'tok/s':>9}")
  for r in rows:
    print(f"{r['phase']:<8} {r['batch']:>5} {r['context']:>7} {r['tok_s']:>9.1f}")
  report = {
      "model": cfg.name, "dtype": FLAGS.dtype, "attention": FLAGS.attention,
      "block_size": bs, "prompt_tokens": n,
      "decode_steps": FLAGS.decode_steps, "reps": FLAGS.reps,
      "startup": startup, "rows": rows, "complete": not interrupted,
      **metrics.run_environment(),
  }
  if FLAGS.out:
    outputs.write_json(report, FLAGS.out)
    print(f"wrote {FLAGS.out}")
  if interrupted:
    sys.exit(130)


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "bench_model"))
