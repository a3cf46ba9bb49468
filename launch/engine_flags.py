"""Flags of one engine's KV pool and batching, shared by the serving launchers.

`agent_eval`, `bench_online` and `serve` each run engines built from the
same eight settings: `--block_size`, `--num_blocks`, `--max_batch`,
`--prefill_chunk`, `--max_context`, `--attention`, `--dtype` and
`--share_prefill`. They are
defined once here, with their bounds, and turned into `CacheConfig` and
`EngineConfig` here, so that a bad value is refused the same way by every
launcher, before a model is loaded. `define()` is idempotent
(`cluster_flags.define_once`).
"""

from __future__ import annotations

from absl import flags

from dualpath_jax.config import KV_DTYPES
from launch import cluster_flags

FLAGS = flags.FLAGS

ATTENTION_HELP = ("paged-attention implementation (xla | xla_chunked | "
                  "pallas_triton | pallas_mosaic_gpu | pallas_mosaic_tpu | "
                  "auto: the best for the device)")


def define(max_context_help: str = "longest context of one turn") -> None:
  """Defines the engine flags (once per process)."""
  once = cluster_flags.define_once
  once(flags.DEFINE_integer, "block_size", 16, "tokens per KV block",
       lower_bound=1)
  once(flags.DEFINE_integer, "num_blocks", 2048,
       "KV pool size in blocks (per layer, per engine)", lower_bound=1)
  once(flags.DEFINE_integer, "max_batch", 8, "sequences decoded together",
       lower_bound=1)
  once(flags.DEFINE_integer, "prefill_chunk", 512,
       "max new tokens per prefill step", lower_bound=1)
  once(flags.DEFINE_integer, "max_context", 8192, max_context_help +
       " (unset: 8192, or the model's context where that is shorter)",
       lower_bound=1)
  once(flags.DEFINE_string, "attention", "auto", ATTENTION_HELP)
  once(flags.DEFINE_enum, "dtype", "float32", list(KV_DTYPES),
       "weights, activations and KV dtype (on CPU keep float32: XLA "
       "emulates bfloat16 matmuls there, and its bfloat16 scatter copies "
       "the whole KV pool on every write)")
  once(flags.DEFINE_bool, "share_prefill", True,
       "turns admitted together with one prompt prefix (n samples of a "
       "prompt) prefill it once; --noshare_prefill: each computes it")
  once(flags.DEFINE_bool, "async_cold_loads", True,
       "one engine with --cold_tier reads a returning turn's prefix while "
       "it serves its other turns; --noasync_cold_loads: the read stalls "
       "them (a baseline)")
  once(flags.DEFINE_bool, "admit_while_reading", True,
       "while the turn heading the queue reads its prefix from the cold "
       "tier, turns behind it that need no cold read take free batch "
       "slots; --noadmit_while_reading: strict arrival order")


def configs(seed: int):
  """(CacheConfig, EngineConfig) of the flags.

  Raises:
    ValueError: an unknown --attention, or values the configs refuse.
  """
  from dualpath_jax.config import CacheConfig, EngineConfig
  cache = CacheConfig(block_size=FLAGS.block_size, num_blocks=FLAGS.num_blocks,
                      dtype=FLAGS.dtype)
  engine = EngineConfig(max_batch_size=FLAGS.max_batch,
                        max_prefill_chunk=FLAGS.prefill_chunk,
                        max_context=FLAGS.max_context,
                        attention_impl=FLAGS.attention, seed=seed,
                        share_prefill=FLAGS.share_prefill,
                        async_cold_loads=FLAGS.async_cold_loads,
                        admit_while_reading=FLAGS.admit_while_reading)
  return cache, engine


def check_pool_holds(context_tokens: int) -> None:
  """ValueError unless one sequence of `context_tokens` tokens fits in the
  pool (`--num_blocks` x `--block_size`): a smaller pool could never admit
  it, and the run would fail at that turn instead of now."""
  capacity = FLAGS.num_blocks * FLAGS.block_size
  if context_tokens > capacity:
    raise ValueError(
        f"--num_blocks: the pool holds {FLAGS.num_blocks} blocks x "
        f"{FLAGS.block_size} tokens = {capacity} tokens, but one sequence "
        f"may reach {context_tokens} tokens (raise --num_blocks or lower "
        "--max_context)")


def load_model(source: str | None):
  """`dualpath_jax.model.load_model(source, dtype=--dtype)`, with every way
  a source can be wrong (a missing file, an unknown preset, a bad
  checkpoint) raised as ValueError."""
  from dualpath_jax.model import load_model as load
  try:
    return load(source, dtype=FLAGS.dtype)
  except FileNotFoundError as e:
    raise ValueError(str(e)) from e


def describe_model(source: str | None):
  """(config, tokenizer) of `source` without its weights
  (`dualpath_jax.model.describe_model`, dtype=--dtype), for the checks
  that can fail before the load; a bad source raises ValueError.

  An unset `--max_context` becomes the model's context where that is
  shorter than its default (`random:tiny-test`'s 1024: every run of it
  needed the flag): call this before `configs`, which reads the flag."""
  from dualpath_jax.model import describe_model as describe
  try:
    config, tokenizer = describe(source, dtype=FLAGS.dtype)
  except FileNotFoundError as e:
    raise ValueError(str(e)) from e
  if (not FLAGS["max_context"].present
      and config.max_position < FLAGS.max_context):
    FLAGS.max_context = config.max_position
  return config, tokenizer


def check_model_context(config) -> None:
  """ValueError if `--max_context` is past the context of the model
  `config` describes (the engine's own check, before the weights load)."""
  from dualpath_jax.config import check_max_context
  check_max_context(FLAGS.max_context, config)
