"""The model's paged steps with the Pallas GPU kernels, in interpret mode on
CPU: the kernels that "auto" runs on a GPU (Mosaic GPU decode with its
copying warpgroup and warp-specialized prefill on Hopper; Triton elsewhere),
inside the real model, against the XLA reference run.

A random-weight model of SmolLM2's geometry (9:3 heads at head_dim 64, one
layer), bfloat16 weights and KV on 16-token pages: two prompts of 90 and 37
tokens prefilled in 64-token chunks (the second chunk of the first prompt
over a cached prefix, the second prompt done after one), then decode steps
fed the XLA run's tokens (tests/model_steps.py). Every step's logits must match. The GPU runs
the same steps compiled (tests/gpu/test_model_gpu.py); this one catches a
break in how the model calls the kernels between GPU leases.
"""

from __future__ import annotations

import functools

import pytest

from dualpath_jax.model import load_model
from model_steps import assert_steps_match, run_steps

SOURCE = "random:smollm2-135m-instruct:layers=1"
DECODE_STEPS = 2
PROMPTS = (90, 37)


@functools.lru_cache(maxsize=None)
def _reference():
  loaded = load_model(SOURCE, dtype="bfloat16")
  return loaded, run_steps(loaded, "xla", None, decode_steps=DECODE_STEPS,
                           prompts=PROMPTS)


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic_gpu"])
def test_model_steps_match_xla_in_interpret_mode(impl):
  loaded, (ref_logits, ref_tokens) = _reference()
  logits, fed = run_steps(loaded, impl, ref_tokens,
                          decode_steps=DECODE_STEPS, prompts=PROMPTS)
  assert fed == ref_tokens
  assert len(logits) == 1 + DECODE_STEPS
  assert_steps_match(logits, ref_logits)
