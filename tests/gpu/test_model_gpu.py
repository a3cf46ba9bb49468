"""The model's paged steps on a CUDA GPU with each attention kernel.

A random-weight model of SmolLM2's and of Llama-3-8B's attention geometry
(9:3 heads at head_dim 64; 32:8 at 128; two layers), bfloat16 weights and KV,
pages of 16 tokens: a batch of two prompts of different lengths is
prefilled in chunks and decoded for a few steps, once per implementation
(`"auto"`, which picks the Mosaic GPU kernels on Hopper: decode with a
copying warpgroup, prefill on two computing warpgroups; and Triton by
name), always with the same tokens (the XLA run's
greedy ones). Every step's logits must match the XLA reference run's.
This is the kernels inside the real model, KV writes and block tables
included, which the kernel tests alone do not cover. Run by
scripts/gpu_check.sh.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from dualpath_jax.config import CacheConfig
from dualpath_jax.model import load_model
from dualpath_jax.model.runner import ModelRunner
pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a CUDA GPU; on CPU the engine tests run the model with "
    "'auto' (xla_chunked) against an XLA-reference runner (tests/test_engine.py)")

BS = 16
CHUNK = 64  # prefill chunk (tokens per step)
PROMPTS = (150, 37)  # two sequences, off page boundaries
DECODE_STEPS = 4


def _run(loaded, impl: str, feed: list[list[int]] | None):
  """Chunked prefill of both prompts, then decode steps; returns the logits
  of every step and the greedy tokens (fed from `feed` when given)."""
  cfg = loaded.config
  pages = -(-(max(PROMPTS) + DECODE_STEPS) // BS) + 1
  cache = CacheConfig(block_size=BS, num_blocks=2 * pages + 1,
                      dtype="bfloat16")
  runner = ModelRunner(loaded.model, cache, attention_impl=impl)
  kv = runner.new_kv_cache()
  rng = np.random.default_rng(7)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in PROMPTS]
  tables = np.arange(2 * pages, dtype=np.int32).reshape(2, pages) + 1
  done = [0, 0]
  logits_log = []
  tokens_out = [[], []]
  while any(d < len(p) for d, p in zip(done, prompts)):  # prefill, chunked
    q_lens = [min(CHUNK, len(p) - d) for d, p in zip(done, prompts)]
    toks = np.zeros((2, CHUNK), np.int32)
    slots = np.full((2, CHUNK), -1, np.int32)
    for b in range(2):
      for i in range(q_lens[b]):
        pos = done[b] + i
        toks[b, i] = prompts[b][pos]
        slots[b, i] = tables[b, pos // BS] * BS + pos % BS
    kv_lens = np.array([d + q for d, q in zip(done, q_lens)], np.int32)
    logits, kv = runner.step(kv, toks, tables, kv_lens,
                             np.array(q_lens, np.int32), slots)
    done = list(kv_lens)
  logits_log.append(np.asarray(logits, np.float32))
  for step in range(DECODE_STEPS):
    toks = np.zeros((2, 1), np.int32)
    slots = np.zeros((2, 1), np.int32)
    for b in range(2):
      nxt = (feed[b][step] if feed else
             int(np.argmax(logits_log[-1][b])))
      tokens_out[b].append(nxt)
      pos = done[b]
      toks[b, 0] = nxt
      slots[b, 0] = tables[b, pos // BS] * BS + pos % BS
    done = [d + 1 for d in done]
    logits, kv = runner.step(kv, toks, tables, np.array(done, np.int32),
                             np.ones(2, np.int32), slots)
    logits_log.append(np.asarray(logits, np.float32))
  return logits_log, tokens_out


@functools.lru_cache(maxsize=None)
def _reference(source: str):
  """The model and its XLA run (computed once per model)."""
  loaded = load_model(source, dtype="bfloat16")
  return loaded, _run(loaded, "xla", None)


@pytest.mark.parametrize("source", [
    "random:smollm2-135m-instruct:layers=2",
    "random:llama3-8b-shape:layers=2"])
@pytest.mark.parametrize("impl", ["auto", "pallas_triton"])
def test_model_steps_match_xla(source, impl):
  """`"auto"` on Hopper runs the Mosaic GPU decode and prefill kernels; by
  name, Triton runs both."""
  loaded, (ref_logits, ref_tokens) = _reference(source)
  logits, _ = _run(loaded, impl, ref_tokens)
  assert len(logits) == len(ref_logits) == 1 + DECODE_STEPS
  for step, (got, want) in enumerate(zip(logits, ref_logits)):
    assert np.all(np.isfinite(got)), step
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 3e-2, (step, err)
