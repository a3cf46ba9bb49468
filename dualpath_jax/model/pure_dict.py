"""A `Llama` from the nested pure dict of its state, and its abstract twin.

The GGUF loader builds every model from a pure dict of arrays; the Orbax
checkpoint restores into the same abstract shapes. Kept apart from
`checkpoint.py` so that loading a GGUF (every run of the main job) does
not import Orbax, about 2 s of CPU at each start on the 2-core VM.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from dualpath_jax.config import ModelConfig
from dualpath_jax.model.llama import Llama


def abstract_model(config: ModelConfig) -> Llama:
  """A `Llama` whose parameters are shape/dtype placeholders (no memory)."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


def model_from_pure_dict(config: ModelConfig, weights: dict[str, Any]) -> Llama:
  """A `Llama` holding `weights` (the nested pure dict of its state);
  ValueError naming both trees if a shape or dtype differs."""
  graphdef, state = nnx.split(abstract_model(config))
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(state))
  got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), weights)
  if expected != got:
    raise ValueError(f"weights do not match {config.name}: expected "
                     f"{expected}, got {got}")
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, weights))
  return nnx.merge(graphdef, state)
