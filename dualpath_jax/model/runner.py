"""`ModelRunner`: the engine's only handle on the model.

It owns the split NNX model (graph definition + weights state, split once) and
calls jitted step functions, shared by every runner of an equal model
structure in the process (`_step_functions`). Each is compiled once per input
shape, with the KV pool DONATED so that XLA updates it in place: callers must
use the returned pool and never touch the one they passed in.

The weights are captured when the runner is built: later in-place changes to
the `Llama` object (e.g. `nnx.update`) are not seen; build a new runner.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualpath_jax.config import CacheConfig, ModelConfig
from dualpath_jax.model.llama import Llama
from kernels.paged_attention import resolve_implementation

ArrayLike = Any  # jax.Array or numpy array


class ModelRunner:
  """Runs paged prefill / decode steps of a `Llama` on a KV pool."""

  def __init__(self, model: Llama, cache: CacheConfig,
               attention_impl: str = "auto"):
    # An unknown name fails here, not inside the first jitted step.
    resolve_implementation(attention_impl)
    self.config: ModelConfig = model.config
    self.cache = cache
    self.attention_impl = attention_impl
    self._graphdef, self._state = nnx.split(model)
    self._fns = _step_functions(self._graphdef, attention_impl)

  @property
  def kv_cache_shape(self) -> tuple[int, ...]:
    c = self.config
    return (c.num_layers, self.cache.num_blocks, 2, c.num_kv_heads,
            self.cache.block_size, c.head_dim)

  def new_kv_cache(self) -> jax.Array:  # [L, N, 2, Hkv, P, D]
    """A zeroed KV pool in `cache.dtype`."""
    return jnp.zeros(self.kv_cache_shape, jnp.dtype(self.cache.dtype))

  def step(
      self,
      kv_cache: jax.Array,  # [L, N, 2, Hkv, P, D], donated
      tokens: ArrayLike,  # [B, T] int32
      block_tables: ArrayLike,  # [B, S] int32
      kv_lens: ArrayLike,  # [B] int32, context incl. the new tokens
      q_lens: ArrayLike,  # [B] int32, valid new tokens per row
      slot_mapping: ArrayLike,  # [B, T] int32, -1 = padding
  ) -> tuple[jax.Array, jax.Array]:  # ([B, V] f32, [L, N, 2, Hkv, P, D])
    """Appends the new tokens' K/V; logits of each row's last valid token.

    Rows with `q_lens[b] == 0` (batch padding) give meaningless logits.
    """
    return self._run(self._fns.last_logits, kv_cache, tokens, block_tables,
                     kv_lens, q_lens, slot_mapping)

  def compile_step(self, kv_cache: jax.Array, tokens, block_tables, kv_lens,
                   q_lens, slot_mapping) -> None:
    """Compiles `step` for these argument shapes without running it (the
    pool is not donated): the next `step` of the shapes finds the
    executable in jit's cache."""
    self._check_pool(kv_cache)
    self._fns.last_logits.lower(self._state, kv_cache, *self._ints(
        tokens, block_tables, kv_lens, q_lens, slot_mapping)).compile()

  def step_all_logits(
      self,
      kv_cache: jax.Array,  # [L, N, 2, Hkv, P, D], donated
      tokens: ArrayLike,  # [B, T] int32
      block_tables: ArrayLike,  # [B, S] int32
      kv_lens: ArrayLike,  # [B] int32
      q_lens: ArrayLike,  # [B] int32
      slot_mapping: ArrayLike,  # [B, T] int32
  ) -> tuple[jax.Array, jax.Array]:  # ([B, T, V] f32, [L, N, 2, Hkv, P, D])
    """Like `step`, with the logits of every row (padding rows garbage)."""
    return self._run(self._fns.all_logits, kv_cache, tokens, block_tables,
                     kv_lens, q_lens, slot_mapping)

  def step_layerwise(
      self,
      kv_cache: jax.Array,  # [L, N, 2, Hkv, P, D], donated
      tokens: ArrayLike,  # [B, T] int32
      block_tables: ArrayLike,  # [B, S] int32
      kv_lens: ArrayLike,  # [B] int32
      q_lens: ArrayLike,  # [B] int32
      slot_mapping: ArrayLike,  # [B, T] int32
      before_layer: Callable[[int, jax.Array], jax.Array] | None = None,
  ) -> tuple[jax.Array, jax.Array]:  # ([B, V] f32, [L, N, 2, Hkv, P, D])
    """`step`, one jitted call per layer; `before_layer(l, pool) -> pool` runs first.

    The hook lets a caller put layer l's part of a loaded prefix into the
    pool just before layer l reads it (and start moving layer l + 1 while
    layer l computes: every call here is dispatched asynchronously). The
    pool it gets is donated to the next call: it must return the pool to use.
    Same operations as `step`, so the same logits up to XLA's fusion choices
    (tests/test_model_mechanics.py bounds the difference).
    """
    self._check_pool(kv_cache)
    ints = self._ints(tokens, block_tables, kv_lens, q_lens, slot_mapping)
    h, inputs = self._fns.layerwise_begin(self._state, kv_cache, *ints)
    for layer in range(self.config.num_layers):
      if before_layer is not None:
        kv_cache = before_layer(layer, kv_cache)
      h, kv_cache = self._fns.layerwise_layer(
          self._state, kv_cache, np.int32(layer), h, inputs)
    return self._fns.layerwise_end(self._state, h, inputs[3]), kv_cache

  def _check_pool(self, kv_cache: jax.Array) -> None:
    if tuple(kv_cache.shape) != self.kv_cache_shape:
      raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} != "
                       f"{self.kv_cache_shape} (see new_kv_cache)")
    if kv_cache.dtype != jnp.dtype(self.cache.dtype):
      raise ValueError(f"kv_cache dtype {kv_cache.dtype} != cache.dtype "
                       f"{self.cache.dtype}")

  @staticmethod
  def _ints(tokens, block_tables, kv_lens, q_lens, slot_mapping):
    return [_as_int32(name, x) for name, x in (
        ("tokens", tokens), ("block_tables", block_tables),
        ("kv_lens", kv_lens), ("q_lens", q_lens),
        ("slot_mapping", slot_mapping))]

  def _run(self, fn: Callable, kv_cache, tokens, block_tables, kv_lens,
           q_lens, slot_mapping):
    self._check_pool(kv_cache)
    return fn(self._state, kv_cache, *self._ints(
        tokens, block_tables, kv_lens, q_lens, slot_mapping))


class _StepFunctions(NamedTuple):
  """The jitted steps of one model structure and attention implementation
  (each takes the weights `state` first; the pool is donated where it is
  an argument and returned)."""

  last_logits: Callable
  all_logits: Callable
  layerwise_begin: Callable
  layerwise_layer: Callable
  layerwise_end: Callable


@functools.lru_cache(maxsize=16)
def _step_functions(graphdef: nnx.GraphDef, attention_impl: str
                    ) -> _StepFunctions:
  """The jitted steps for models of `graphdef` (equal for every model of one
  config, whatever its weights), shared by all their runners in the process.

  JAX keeps compiled executables per jitted function and input shapes, so
  runners that share the functions trace, lower and compile each step
  shape once: the engines of a cluster on one device, and the engines a
  process builds one after another (a test suite, a benchmark's warm-up
  and timed runs), instead of once per engine.
  """

  def forward(state, kv_cache, tokens, block_tables, kv_lens, q_lens,
              slot_mapping):
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(tokens, kv_cache, block_tables, kv_lens,
                             q_lens, slot_mapping,
                             attention_impl=attention_impl)
    return model, hidden, kv_cache

  def last_token_logits(model, hidden, q_lens):  # [B, T, H] -> [B, V]
    last = jnp.clip(q_lens.astype(jnp.int32) - 1, 0, hidden.shape[1] - 1)
    return model.logits(hidden[jnp.arange(hidden.shape[0]), last])

  def last_logits(state, kv_cache, tokens, block_tables, kv_lens, q_lens,
                  slot_mapping):
    model, hidden, kv_cache = forward(state, kv_cache, tokens, block_tables,
                                      kv_lens, q_lens, slot_mapping)
    return last_token_logits(model, hidden, q_lens), kv_cache

  def all_logits(state, kv_cache, tokens, block_tables, kv_lens, q_lens,
                 slot_mapping):
    model, hidden, kv_cache = forward(state, kv_cache, tokens, block_tables,
                                      kv_lens, q_lens, slot_mapping)
    return model.logits(hidden), kv_cache

  def lw_begin(state, kv_cache, tokens, block_tables, kv_lens, q_lens,
               slot_mapping):
    model = nnx.merge(graphdef, state)
    model._check_inputs(tokens, kv_cache, block_tables, kv_lens, q_lens,
                        slot_mapping)
    return model.embed(tokens), model.prepare_inputs(
        tokens, kv_cache, block_tables, kv_lens, q_lens, slot_mapping)

  def lw_layer(state, kv_cache, layer_index, h, inputs):
    model = nnx.merge(graphdef, state)
    return model.layer_step(layer_index, h, kv_cache, *inputs,
                            attention_impl=attention_impl)

  def lw_end(state, h, q_lens):
    model = nnx.merge(graphdef, state)
    return last_token_logits(model, model.final_norm(h), q_lens)

  return _StepFunctions(
      last_logits=jax.jit(last_logits, donate_argnums=(1,)),
      all_logits=jax.jit(all_logits, donate_argnums=(1,)),
      layerwise_begin=jax.jit(lw_begin),
      layerwise_layer=jax.jit(lw_layer, donate_argnums=(1,)),
      layerwise_end=jax.jit(lw_end))


def _as_int32(name: str, x: ArrayLike) -> jax.Array:
  dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else None
  if dtype is not None and not np.issubdtype(dtype, np.integer):
    raise ValueError(f"{name} must be an integer array, got {dtype}")
  return jnp.asarray(x, dtype=jnp.int32)
