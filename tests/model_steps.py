"""The model's paged steps driven by hand, for comparing attention kernels.

A batch of two prompts of different lengths (off page boundaries) is
prefilled in chunks through `ModelRunner.step`, then decoded a few steps,
with block tables, slots and lengths built here, so the kernels run inside
the real model: KV writes, block tables and ragged lengths included, which
the kernel tests alone do not cover. Shared by tests/gpu/test_model_gpu.py
(compiled, on a GPU) and tests/test_model_kernels_interpret.py (interpret
mode, on CPU).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dualpath_jax.config import CacheConfig
from dualpath_jax.model.runner import ModelRunner

BLOCK_SIZE = 16
CHUNK = 64  # prefill chunk (tokens per step)
PROMPTS = (150, 37)  # two sequences, off page boundaries


def run_steps(loaded, impl: str, feed: list[list[int]] | None, *,
              decode_steps: int, prompts: tuple[int, ...] = PROMPTS
              ) -> tuple[list[np.ndarray], list[list[int]]]:
  """Chunked prefill of the prompts, then `decode_steps` decode steps with
  attention `impl`; returns the logits of the prefill's last step and of
  every decode step ([batch, vocab] float32 each) and the tokens fed (from
  `feed` when given, else the greedy ones)."""
  cfg = loaded.config
  batch = len(prompts)
  pages = -(-(max(prompts) + decode_steps) // BLOCK_SIZE) + 1
  cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=batch * pages + 1,
                      dtype="bfloat16")
  runner = ModelRunner(loaded.model, cache, attention_impl=impl)
  rng = np.random.default_rng(7)
  # Stale finite junk in every slot, as a reused pool holds. `write_kv`
  # zeroes each page as the sequence starts it, so the tail of a sequence's
  # last page reads zeros; the pages its table names past that one keep the
  # junk, which a kernel reading past the context unmasked would see (a
  # zeroed pool would mostly hide that). The same junk for every `impl`.
  kv = jnp.asarray(rng.normal(0, 4, runner.kv_cache_shape),
                   jnp.dtype(cache.dtype))
  tokens = [rng.integers(3, cfg.vocab_size, n).tolist() for n in prompts]
  # Page 0 stays unused, so a table entry of 0 would read foreign data.
  tables = np.arange(batch * pages, dtype=np.int32).reshape(batch, pages) + 1
  done = [0] * batch
  logits_log = []
  tokens_out = [[] for _ in range(batch)]
  while any(d < len(p) for d, p in zip(done, tokens)):  # prefill, chunked
    q_lens = [min(CHUNK, len(p) - d) for d, p in zip(done, tokens)]
    toks = np.zeros((batch, CHUNK), np.int32)
    slots = np.full((batch, CHUNK), -1, np.int32)
    for b in range(batch):
      for i in range(q_lens[b]):
        pos = done[b] + i
        toks[b, i] = tokens[b][pos]
        slots[b, i] = tables[b, pos // BLOCK_SIZE] * BLOCK_SIZE + (
            pos % BLOCK_SIZE)
    kv_lens = np.array([d + q for d, q in zip(done, q_lens)], np.int32)
    logits, kv = runner.step(kv, toks, tables, kv_lens,
                             np.array(q_lens, np.int32), slots)
    done = list(kv_lens)
  logits_log.append(np.asarray(logits, np.float32))
  for step in range(decode_steps):
    toks = np.zeros((batch, 1), np.int32)
    slots = np.zeros((batch, 1), np.int32)
    for b in range(batch):
      nxt = (feed[b][step] if feed else
             int(np.argmax(logits_log[-1][b])))
      tokens_out[b].append(nxt)
      pos = done[b]
      toks[b, 0] = nxt
      slots[b, 0] = tables[b, pos // BLOCK_SIZE] * BLOCK_SIZE + (
          pos % BLOCK_SIZE)
    done = [d + 1 for d in done]
    logits, kv = runner.step(kv, toks, tables, np.array(done, np.int32),
                             np.ones(batch, np.int32), slots)
    logits_log.append(np.asarray(logits, np.float32))
  return logits_log, tokens_out


def assert_steps_match(logits: list[np.ndarray], ref: list[np.ndarray],
                       rtol: float = 1e-2) -> None:
  """Every step's logits finite and within `rtol` of the reference run's
  (relative L2 norm over the batch). Measured on CPU (interpret mode, bf16
  K/V, another summation order): 2.1e-3 to 3.4e-3; a softmax scale off by
  30% gives 5.5e-2, so the bound sits well between."""
  assert len(logits) == len(ref)
  for step, (got, want) in enumerate(zip(logits, ref)):
    assert np.all(np.isfinite(got)), step
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < rtol, (step, err)
