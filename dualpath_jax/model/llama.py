"""A Flax NNX Llama-family decoder that reads and appends a paged KV cache.

Architecture (as in Llama 2/3, SmolLM2, Qwen2 minus biases): token embedding,
`num_layers` pre-norm decoder layers (RMSNorm -> grouped-query attention with
rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual), a
final RMSNorm and a tied or untied LM head.

Why it is shaped this way:

* The decoder layers are STACKED: every layer weight carries a leading
  `num_layers` axis (built with `nnx.vmap`) and the forward pass is a
  `jax.lax.scan` over that axis, so XLA compiles one layer body, not thirty.
  The engine compiles a dozen input shapes; on CPU that is the difference
  between seconds and minutes.
* The whole-model KV pool `[num_layers, num_blocks, 2, num_kv_heads,
  block_size, head_dim]` is the scan CARRY. Inside the body the pool is seen
  as one flat page array `[num_layers * num_blocks, ...]` (a free reshape):
  layer `l`'s page `n` is flat page `l * num_blocks + n`. Offsetting the slot
  mapping and the block table by `l * num_blocks` lets the unmodified
  `kernels.write_kv` scatter and `kernels.paged_attention` gather touch only
  the pages they need, with no per-layer copy of the pool (slicing a layer out
  and writing it back would copy the pool every step; so would scanning it as
  xs/ys).
* Weights use the HF layout (q/k rows in "rotate-half" RoPE order); the GGUF
  loader undoes llama.cpp's row permutation.

Shapes use B = batch, T = new tokens per row, L = layers, N = pages per layer,
P = page size (block_size), D = head_dim, H = hidden size, V = vocab size.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from dualpath_jax.config import ModelConfig


def _normal_init(std: float, dtype: jnp.dtype):
  """Initializer drawing N(0, std^2) in float32, stored in `dtype`."""
  def init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  return init


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32, scaled by a learned weight."""

  def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., dim]
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True)
                            + self.eps)
    return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
  """Bias-free projection `x @ kernel` with `kernel` stored `[in, out]`."""

  def __init__(self, in_features: int, out_features: int, dtype: jnp.dtype,
               *, rngs: nnx.Rngs):
    init = _normal_init(1.0 / math.sqrt(in_features), dtype)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., in] -> [..., out]
    return jnp.einsum("...i,io->...o", x, self.kernel[...])


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """`theta ** (-2i / head_dim)` for `i < head_dim / 2`, float32."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta ** exponents)


def apply_rope(
    x: jax.Array,  # [B, T, heads, D]
    positions: jax.Array,  # [B, T] int32
    theta: float,
) -> jax.Array:  # [B, T, heads, D]
  """Rotary embedding, "rotate-half" pairing: dim i rotates with i + D/2."""
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  angles = (positions.astype(jnp.float32)[..., None]
            * rope_inverse_frequencies(head_dim, theta))  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :head_dim // 2], xf[..., head_dim // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention over the paged cache."""

  def __init__(self, config: ModelConfig, dtype: jnp.dtype, *,
               rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    h, d = config.hidden_size, config.head_dim
    self.q_proj = Linear(h, config.num_heads * d, dtype, rngs=rngs)
    self.k_proj = Linear(h, config.num_kv_heads * d, dtype, rngs=rngs)
    self.v_proj = Linear(h, config.num_kv_heads * d, dtype, rngs=rngs)
    self.o_proj = Linear(config.num_heads * d, h, dtype, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,  # [B, T, H]
      kv_flat: jax.Array,  # [L * N, 2, Hkv, P, D]: the whole pool, flat
      page_offset: jax.Array,  # [] int32: this layer's first flat page
      positions: jax.Array,  # [B, T] int32
      block_tables: jax.Array,  # [B, S] int32, pages of this layer's pool
      kv_lens: jax.Array,  # [B] int32
      q_lens: jax.Array,  # [B] int32
      slot_mapping: jax.Array,  # [B, T] int32, -1 = padding
      attention_impl: str,
  ) -> tuple[jax.Array, jax.Array]:  # ([B, T, H], [L * N, 2, Hkv, P, D])
    block_size = kv_flat.shape[3]
    q, k, v = self.project(x, positions)
    flat_slots = jnp.where(slot_mapping < 0, -1,
                           slot_mapping + page_offset * block_size)
    kv_flat = kernels.write_kv(kv_flat, k, v, flat_slots)
    out = kernels.paged_attention(
        q, kv_flat, block_tables + page_offset, kv_lens, q_lens,
        implementation=attention_impl)
    return self.output(out, x.dtype), kv_flat

  def project(
      self,
      x: jax.Array,  # [B, T, H]
      positions: jax.Array,  # [B, T] int32
  ) -> tuple[jax.Array, jax.Array, jax.Array]:  # q [B, T, Hq, D]; k, v [B, T, Hkv, D]
    """Queries, keys (both rotated to `positions`) and values of `x`."""
    batch, q_len, _ = x.shape
    q = self.q_proj(x).reshape(batch, q_len, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, q_len, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, q_len, self.num_kv_heads, self.head_dim)
    return (apply_rope(q, positions, self.rope_theta),
            apply_rope(k, positions, self.rope_theta), v)

  def output(self, out: jax.Array,  # [B, T, Hq, D]: attention's output
             dtype: jnp.dtype) -> jax.Array:  # [B, T, H]
    """The heads' outputs through the output projection, in `dtype`."""
    batch, q_len = out.shape[:2]
    out = out.reshape(batch, q_len, self.num_heads * self.head_dim)
    return self.o_proj(out.astype(dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: ModelConfig, dtype: jnp.dtype, *,
               rngs: nnx.Rngs):
    h, i = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(h, i, dtype, rngs=rngs)
    self.up_proj = Linear(h, i, dtype, rngs=rngs)
    self.down_proj = Linear(i, h, dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., H] -> [..., H]
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """One pre-norm block: attention and MLP, each with a residual."""

  def __init__(self, config: ModelConfig, dtype: jnp.dtype, *,
               rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.attn = Attention(config, dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, dtype, rngs=rngs)

  def __call__(
      self,
      h: jax.Array,  # [B, T, H]: the residual stream
      kv_flat: jax.Array,  # [L * N, 2, Hkv, P, D]: the whole pool, flat
      page_offset: jax.Array,  # [] int32: this layer's first flat page
      positions: jax.Array,  # [B, T] int32
      block_tables: jax.Array,  # [B, S] int32, pages of this layer's pool
      kv_lens: jax.Array,  # [B] int32
      q_lens: jax.Array,  # [B] int32
      slot_mapping: jax.Array,  # [B, T] int32, -1 = padding
      attention_impl: str,
  ) -> tuple[jax.Array, jax.Array]:  # ([B, T, H], [L * N, 2, Hkv, P, D])
    """Attention then MLP, each pre-normed with its residual; the arguments
    are `Attention.__call__`'s, `h` being the residual stream."""
    attn_out, kv_flat = self.attn(
        self.attn_norm(h), kv_flat, page_offset, positions, block_tables,
        kv_lens, q_lens, slot_mapping, attention_impl)
    return self.feed_forward(h + attn_out), kv_flat

  def feed_forward(self, h: jax.Array  # [B, T, H]: after attention's residual
                   ) -> jax.Array:  # [B, T, H]
    """The MLP half of the layer, with its norm and residual."""
    return h + self.mlp(self.mlp_norm(h))


class Llama(nnx.Module):
  """Llama-family decoder with stacked layers and a paged KV cache.

  Random initialisation (normal, std 1/sqrt(fan_in), unit norm weights) in
  `config.dtype`; loaders overwrite every parameter.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.embed_tokens = nnx.Param(_normal_init(1.0, dtype)(
        rngs.params(), (config.vocab_size, config.hidden_size)))

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(config, dtype, rngs=layer_rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    if config.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Param(_normal_init(
          1.0 / math.sqrt(config.hidden_size), dtype)(
              rngs.params(), (config.hidden_size, config.vocab_size)))

  def __call__(
      self,
      tokens: jax.Array,  # [B, T] int32
      kv_cache: jax.Array,  # [L, N, 2, Hkv, P, D]
      block_tables: jax.Array,  # [B, S] int32
      kv_lens: jax.Array,  # [B] int32: context length incl. the new tokens
      q_lens: jax.Array,  # [B] int32: valid new tokens per row
      slot_mapping: jax.Array,  # [B, T] int32: block*P+offset, -1 = padding
      *,
      attention_impl: str = "auto",
  ) -> tuple[jax.Array, jax.Array]:  # ([B, T, H], [L, N, 2, Hkv, P, D])
    """Runs the new tokens through every layer, appending their K/V.

    Row `i` of sequence `b` sits at position `kv_lens[b] - q_lens[b] + i` and
    is valid iff `i < q_lens[b]`; hidden states of padding rows are garbage.
    Block-table entries past a sequence's pages may hold any value (they are
    clamped into range and masked by `kv_lens`).
    """
    cfg = self.config
    self._check_inputs(tokens, kv_cache, block_tables, kv_lens, q_lens,
                       slot_mapping)
    num_layers, num_blocks = kv_cache.shape[:2]
    inputs = self.prepare_inputs(tokens, kv_cache, block_tables, kv_lens,
                                 q_lens, slot_mapping)
    h = self.embed(tokens)  # [B, T, H]
    kv_flat = kv_cache.reshape((num_layers * num_blocks,) + kv_cache.shape[2:])
    layers_def, layers_state = nnx.split(self.layers)

    def body(carry, xs):
      h, kv_flat = carry
      layer_state, layer_index = xs
      layer = nnx.merge(layers_def, layer_state)
      h, kv_flat = layer(h, kv_flat, layer_index * num_blocks, *inputs,
                         attention_impl)
      return (h, kv_flat), None

    (h, kv_flat), _ = jax.lax.scan(
        body, (h, kv_flat),
        (layers_state, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    return self.final_norm(h), kv_flat.reshape(kv_cache.shape)

  # ---------------------------------------------------- layer-wise forward
  # The same forward, one layer per call, for callers that interleave other
  # work between layers (the DualPath prefill engine moves layer l + 1 of a
  # loaded prefix into the pool while layer l computes). Composed as
  #   h = embed(tokens); for l: h, kv = layer_step(l, h, kv, *inputs)
  #   hidden = final_norm(h)
  # it runs the very operations of `__call__` (same layer body, same order).

  def embed(self, tokens: jax.Array  # [B, T] int32
            ) -> jax.Array:  # [B, T, H]
    """Token embeddings: the residual stream entering layer 0."""
    return jnp.take(self.embed_tokens[...], tokens.astype(jnp.int32), axis=0)

  def prepare_inputs(
      self,
      tokens: jax.Array,  # [B, T] int32
      kv_cache: jax.Array,  # [L, N, 2, Hkv, P, D]
      block_tables: jax.Array,  # [B, S] int32
      kv_lens: jax.Array,  # [B] int32
      q_lens: jax.Array,  # [B] int32
      slot_mapping: jax.Array,  # [B, T] int32
  ) -> tuple[jax.Array, ...]:
    """(positions, block_tables, kv_lens, q_lens, slot_mapping) as layers take them."""
    num_blocks = kv_cache.shape[1]
    kv_lens = kv_lens.astype(jnp.int32)
    q_lens = q_lens.astype(jnp.int32)
    positions = ((kv_lens - q_lens)[:, None]
                 + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :])
    block_tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1)
    return (positions, block_tables, kv_lens, q_lens,
            slot_mapping.astype(jnp.int32))

  def layer_step(
      self,
      layer_index: jax.Array,  # [] int32
      h: jax.Array,  # [B, T, H]
      kv_cache: jax.Array,  # [L, N, 2, Hkv, P, D]
      positions: jax.Array,  # [B, T] int32
      block_tables: jax.Array,  # [B, S] int32, clipped (prepare_inputs)
      kv_lens: jax.Array,  # [B] int32
      q_lens: jax.Array,  # [B] int32
      slot_mapping: jax.Array,  # [B, T] int32
      *,
      attention_impl: str = "auto",
  ) -> tuple[jax.Array, jax.Array]:  # ([B, T, H], [L, N, 2, Hkv, P, D])
    """Decoder layer `layer_index` (traced) on `h`, appending its K/V."""
    num_layers, num_blocks = kv_cache.shape[:2]
    layers_def, layers_state = nnx.split(self.layers)
    layer_state = jax.tree.map(
        lambda w: jax.lax.dynamic_index_in_dim(w, layer_index, keepdims=False),
        layers_state)
    layer = nnx.merge(layers_def, layer_state)
    kv_flat = kv_cache.reshape((num_layers * num_blocks,) + kv_cache.shape[2:])
    h, kv_flat = layer(h, kv_flat, layer_index * num_blocks, positions,
                       block_tables, kv_lens, q_lens, slot_mapping,
                       attention_impl)
    return h, kv_flat.reshape(kv_cache.shape)

  def logits(self, hidden: jax.Array) -> jax.Array:  # [..., H] -> [..., V]
    """LM head in float32 (tied to the embedding when configured)."""
    if self.lm_head is None:
      return jnp.einsum("...h,vh->...v", hidden, self.embed_tokens[...],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", hidden, self.lm_head[...],
                      preferred_element_type=jnp.float32)

  def _check_inputs(self, tokens, kv_cache, block_tables, kv_lens, q_lens,
                    slot_mapping) -> None:
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, q_len], got {tokens.shape}")
    batch, q_len = tokens.shape
    expected_tail = (2, cfg.num_kv_heads)
    if (kv_cache.ndim != 6 or kv_cache.shape[0] != cfg.num_layers
        or kv_cache.shape[2:4] != expected_tail
        or kv_cache.shape[5] != cfg.head_dim):
      raise ValueError(
          f"kv_cache must be [{cfg.num_layers}, num_blocks, 2, "
          f"{cfg.num_kv_heads}, block_size, {cfg.head_dim}], got "
          f"{kv_cache.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
      raise ValueError(f"block_tables must be [{batch}, pages_per_seq], got "
                       f"{block_tables.shape}")
    if kv_lens.shape != (batch,) or q_lens.shape != (batch,):
      raise ValueError(f"kv_lens {kv_lens.shape} and q_lens {q_lens.shape} "
                       f"must both be [{batch}]")
    if slot_mapping.shape != (batch, q_len):
      raise ValueError(f"slot_mapping must be [{batch}, {q_len}], got "
                       f"{slot_mapping.shape}")


def random_llama(config: ModelConfig, seed: int) -> Llama:
  """A `Llama` of `config` with random weights drawn from `seed`, made by
  one compiled program.

  Built eagerly (`Llama(config, rngs=nnx.Rngs(seed))`), every parameter's
  initializer is a handful of op-by-op dispatches, each traced, lowered and
  compiled, or read back from the compilation cache, on its own: the tiny
  test model took 1.8-2.0 s in a fresh process whose cache held every op.
  One jitted initializer per config, taking the seed as an argument, took
  0.6-0.8 s there, and a second model of the config in one process costs
  only its run. Its weights are the eager ones' up to float rounding (XLA
  fuses the initializers' arithmetic): `load_model`'s weights id says
  which way a `random:` model was made.
  """
  graphdef, init = _jitted_initializer(config)
  return nnx.merge(graphdef, init(jnp.uint32(seed)))


@functools.lru_cache(maxsize=8)
def _jitted_initializer(config: ModelConfig):
  """(graphdef, jitted seed -> state) of `config`'s random `Llama`."""
  graphdef, _ = nnx.split(
      nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  return graphdef, jax.jit(lambda seed: nnx.state(
      Llama(config, rngs=nnx.Rngs(jax.random.key(seed)))))
