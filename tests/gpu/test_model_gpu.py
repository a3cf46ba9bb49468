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
included, which the kernel tests alone do not cover (tests/model_steps.py
drives the steps; tests/test_model_kernels_interpret.py runs the same on CPU
in interpret mode). Run by scripts/gpu_check.sh.
"""

from __future__ import annotations

import functools

import jax
import pytest

from dualpath_jax.model import load_model
from model_steps import assert_steps_match, run_steps

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a CUDA GPU; on CPU tests/test_model_kernels_interpret.py "
    "runs these steps with the kernels interpreted")

DECODE_STEPS = 4


@functools.lru_cache(maxsize=None)
def _reference(source: str):
  """The model and its XLA run (computed once per model)."""
  loaded = load_model(source, dtype="bfloat16")
  return loaded, run_steps(loaded, "xla", None, decode_steps=DECODE_STEPS)


@pytest.mark.parametrize("source", [
    "random:smollm2-135m-instruct:layers=2",
    "random:llama3-8b-shape:layers=2"])
@pytest.mark.parametrize("impl", ["auto", "pallas_triton"])
def test_model_steps_match_xla(source, impl):
  """`"auto"` on Hopper runs the Mosaic GPU decode and prefill kernels; by
  name, Triton runs both."""
  loaded, (ref_logits, ref_tokens) = _reference(source)
  logits, _ = run_steps(loaded, impl, ref_tokens, decode_steps=DECODE_STEPS)
  assert len(logits) == 1 + DECODE_STEPS
  assert_steps_match(logits, ref_logits)
