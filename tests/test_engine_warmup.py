"""The engine's warm-up compiles its shapes without running them, and the
steps that follow find them compiled; the prefill chunk buckets."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine import step_parts
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model


def test_prefill_buckets_add_three_quarters_from_512():
  assert step_parts.q_bucket_sizes(512) == [32, 64, 128, 256, 384, 512]
  assert step_parts.q_bucket_sizes(2048) == [32, 64, 128, 256, 384, 512,
                                             768, 1024, 1536, 2048]
  assert step_parts.q_bucket_sizes(256) == [32, 64, 128, 256]
  assert [step_parts.q_bucket(n, 512) for n in (1, 33, 257, 384, 385, 512)] \
      == [32, 64, 384, 384, 512, 512]
  with pytest.raises(ValueError, match="exceeds the largest bucket 512"):
    step_parts.q_bucket(513, 512)


def test_warmup_compiles_without_running_and_steps_then_compile_nothing(
    caplog):
  """Each warm-up shape used to run an all-padding batch (as costly as a
  real step); it is compiled only now, and jit's cache has it: the turns'
  steps compile nothing of the model (only the sampler's tiny argmax)."""
  tiny = load_model("random:tiny-test")
  engine = make_engine(tiny, CacheConfig(block_size=16, num_blocks=64),
                       EngineConfig(max_batch_size=2, max_prefill_chunk=64,
                                    max_context=256))
  assert step_parts.table_width_free(engine.config, tiny.config, 16,
                                    engine.runner.cache.dtype)
  ran = []
  step = engine.runner.step
  engine.runner.step = lambda *a, **k: ran.append(1) or step(*a, **k)
  engine.warmup()
  assert not ran
  # xla_chunked: one table width (cost follows the true context), so one
  # decode shape per batch bucket and one prefill shape per chunk bucket.
  assert engine.stats.compiled_shapes == 2 + 2
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      # A new function compiles whatever this process ran before: the log
      # is seen (the engine's own functions may be compiled already).
      jax.jit(lambda x: x + 1)(np.zeros((7, 13), np.float32))
      engine.submit(TurnRequest("a", list(range(3, 90)), 4, stop_on_eos=False))
      engine.submit(TurnRequest("b", list(range(5, 40)), 4, stop_on_eos=False))
      while engine.has_work():
        engine.step()
  finally:
    jax.config.update("jax_log_compiles", False)
  assert ran
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling ")]
  assert any("<lambda>" in m for m in compiles), compiles
  assert all("<lambda>" in m or "argmax" in m for m in compiles), compiles
  assert engine.stats.compiled_shapes == 4
