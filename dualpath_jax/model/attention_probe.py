"""A dense forward of the Llama model that shows where attention goes.

The serving path never materialises attention probabilities: its kernels
fold them into an online softmax. To study which blocks attention reads
(`launch.study_importance`: the seeds' claim that a hot tier of 12% of the
cache serves 98% of it), this runs the same model, with the same weights
and layers (`Llama`'s modules: norms, projections, RoPE, MLP, head), over
one sequence held in a dense K/V cache, and returns, per layer and query
head, the probability mass each block of `block_size` tokens received.

Its decode step runs several rows at once on one token: row `r` attends
only to the cached blocks `block_masks[r]` allows, plus its own token.
Row 0 should be the exact one (every block): its K/V are the ones
appended, so the rows all read the exact cache of the tokens before and
differ only in this step's attention (the per-step error of a sparse
read, as evaluations of sparse attention measure it).

The attention here is a plain softmax over a dense cache, independent of
`kernels/`; tests/test_attention_probe.py checks the logits against the
paged model (`ModelRunner`) and the attention against numpy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualpath_jax.model.llama import Llama


def attend(
    q: jax.Array,  # [R, T, Hq, D]
    k_cache: jax.Array,  # [C, Hkv, D]
    v_cache: jax.Array,  # [C, Hkv, D]
    allowed: jax.Array,  # [R, T, C] bool: the cached keys each query reads
    k_self: jax.Array | None = None,  # [R, Hkv, D]: read by all of row r's queries
    v_self: jax.Array | None = None,  # [R, Hkv, D]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax attention (scale 1/sqrt(D), GQA: query head h reads KV head
  h // (Hq / Hkv)), in float32.

  Returns (out [R, T, Hq, D], probabilities over the cache [R, T, Hq, C],
  probability of the row's own key [R, T, Hq]; zeros without one). A query
  with nothing to read gives zeros.
  """
  r, t, hq, d = q.shape
  hkv = k_cache.shape[1]
  group = hq // hkv
  qg = q.astype(jnp.float32).reshape(r, t, hkv, group, d) / np.sqrt(d)
  scores = jnp.einsum("rtkgd,ckd->rtkgc", qg, k_cache.astype(jnp.float32))
  mask = allowed[:, :, None, None, :]
  neg = jnp.float32(-jnp.inf)
  scores = jnp.where(mask, scores, neg)
  if k_self is not None:
    self_score = jnp.einsum("rtkgd,rkd->rtkg", qg, k_self.astype(jnp.float32))
    top = jnp.maximum(scores.max(-1), self_score)
  else:
    top = scores.max(-1)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.where(mask, jnp.exp(scores - top[..., None]), 0.0)
  total = p.sum(-1)
  if k_self is not None:
    p_self = jnp.exp(self_score - top)
    total = total + p_self
  total = jnp.where(total > 0, total, 1.0)
  p = p / total[..., None]
  out = jnp.einsum("rtkgc,ckd->rtkgd", p, v_cache.astype(jnp.float32))
  if k_self is not None:
    p_self = p_self / total
    out = out + p_self[..., None] * v_self.astype(jnp.float32)[:, None, :, None, :]
  else:
    p_self = jnp.zeros(total.shape, jnp.float32)
  return (out.reshape(r, t, hq, d), p.reshape(r, t, hq, -1),
          p_self.reshape(r, t, hq))


def block_sums(p: jax.Array,  # [..., C]
               block_size: int) -> jax.Array:  # [..., C // block_size]
  """Probability mass per block of `block_size` consecutive positions."""
  return p.reshape(p.shape[:-1] + (-1, block_size)).sum(-1)


@dataclasses.dataclass
class DecodeOutput:
  logits: np.ndarray  # [R, V] float32
  block_mass: np.ndarray  # [R, L, Hq, NB] float32: row r's own attention
  self_mass: np.ndarray  # [R, L, Hq] float32: on the row's own token


class AttentionProbe:
  """One sequence at a time: `prefill(tokens)`, then `decode` step by step.

  `capacity` tokens (a multiple of `block_size`) bound the prompt plus the
  decoded tokens; one compilation serves every sequence up to it.
  """

  def __init__(self, model: Llama, *, capacity: int, block_size: int = 16,
               chunk: int = 256):
    if block_size < 1 or capacity < 1 or capacity % block_size:
      raise ValueError(f"capacity ({capacity}) must be a positive multiple "
                       f"of block_size ({block_size})")
    if chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {chunk}")
    cfg = model.config
    self.config = cfg
    self.capacity = capacity
    self.block_size = block_size
    self.num_blocks = capacity // block_size
    self.chunk = chunk
    self._dtype = jnp.dtype(cfg.dtype)
    self._cache_shape = (cfg.num_layers, capacity + chunk, cfg.num_kv_heads,
                         cfg.head_dim)  # + chunk: a last chunk's padding rows
    graphdef, state = nnx.split(model)
    self._state = state
    key_pos = jnp.arange(capacity + chunk, dtype=jnp.int32)

    # The model's own pieces around attention (`DecoderLayer`).
    def qkv(layer, h, positions):  # h [R, T, H]
      return layer.attn.project(layer.attn_norm(h), positions)

    def finish_layer(layer, h, out):  # out [R, T, Hq, D]
      return layer.feed_forward(h + layer.attn.output(out, h.dtype))

    def pad_mass(p):  # [..., C + chunk] -> [..., NB]: the capacity's blocks
      return block_sums(p[..., :capacity], block_size)

    def prefill_chunk(state, k_cache, v_cache, tokens, start, length):
      model = nnx.merge(graphdef, state)
      layers_def, layers_state = nnx.split(model.layers)
      positions = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
      allowed = ((key_pos[None, :] <= positions[0][:, None])
                 & (key_pos[None, :] < length))[None]  # [1, T, C]

      def body(h, xs):
        layer_state, k_layer, v_layer = xs
        layer = nnx.merge(layers_def, layer_state)
        q, k, v = qkv(layer, h, positions)
        k_layer = jax.lax.dynamic_update_slice(
            k_layer, k[0].astype(k_layer.dtype), (start, 0, 0))
        v_layer = jax.lax.dynamic_update_slice(
            v_layer, v[0].astype(v_layer.dtype), (start, 0, 0))
        out, p, _ = attend(q, k_layer, v_layer, allowed)
        mass = pad_mass(p[0]).mean(axis=1)  # [T, NB], mean over heads
        return finish_layer(layer, h, out), (k_layer, v_layer, mass)

      h, (k_cache, v_cache, mass) = jax.lax.scan(
          body, model.embed(tokens[None]), (layers_state, k_cache, v_cache))
      last = jnp.clip(length - 1 - start, 0, chunk - 1)
      logits = model.logits(model.final_norm(h[0, last]))
      return k_cache, v_cache, logits, mass.mean(axis=0)

    def decode_rows(state, k_cache, v_cache, token, position, block_masks):
      model = nnx.merge(graphdef, state)
      layers_def, layers_state = nnx.split(model.layers)
      rows = block_masks.shape[0]
      positions = jnp.full((rows, 1), position, jnp.int32)
      tokens = jnp.full((rows, 1), token, jnp.int32)
      token_mask = jnp.repeat(block_masks, block_size, axis=1)  # [R, cap]
      token_mask = jnp.pad(token_mask, ((0, 0), (0, chunk)))
      allowed = (token_mask & (key_pos < position)[None, :])[:, None, :]

      def body(h, xs):
        layer_state, k_layer, v_layer = xs
        layer = nnx.merge(layers_def, layer_state)
        q, k, v = qkv(layer, h, positions)
        out, p, p_self = attend(q, k_layer, v_layer, allowed,
                                k[:, 0], v[:, 0])
        return finish_layer(layer, h, out), (
            k[0, 0], v[0, 0], pad_mass(p[:, 0]), p_self[:, 0])

      h, (k_new, v_new, mass, self_mass) = jax.lax.scan(
          body, model.embed(tokens), (layers_state, k_cache, v_cache))
      logits = model.logits(model.final_norm(h[:, 0]))
      # Row 0's K/V join the cache, after every row read it without them.
      k_cache = jax.lax.dynamic_update_slice(
          k_cache, k_new[:, None].astype(k_cache.dtype), (0, position, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(
          v_cache, v_new[:, None].astype(v_cache.dtype), (0, position, 0, 0))
      return (k_cache, v_cache, logits, jnp.swapaxes(mass, 0, 1),
              jnp.swapaxes(self_mass, 0, 1))

    self._prefill_chunk = jax.jit(prefill_chunk, donate_argnums=(1, 2))
    self._decode_rows = jax.jit(decode_rows, donate_argnums=(1, 2))
    self._k = self._v = None
    self.length = 0

  def _check_ids(self, tokens: Sequence[int]) -> None:
    """ValueError for ids outside the vocabulary (an embedding lookup
    would clamp them silently)."""
    ids = np.asarray(tokens)
    if ids.size and (not np.issubdtype(ids.dtype, np.integer)
                     or ids.min() < 0 or ids.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must be integers in [0, "
                       f"{self.config.vocab_size}), got {ids.min()} to "
                       f"{ids.max()}")

  def prefill(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Starts a sequence: runs `tokens` (exact, causal, in chunks).

    Returns (logits of the last token [V] float32, block mass per prompt
    token [len(tokens), NB] float32: each query's attention per block,
    averaged over layers and heads).
    """
    n = len(tokens)
    if not 0 < n < self.capacity:
      raise ValueError(f"a prompt of {n} tokens does not fit a probe of "
                       f"capacity {self.capacity} (1 to capacity - 1)")
    self._check_ids(tokens)
    k = jnp.zeros(self._cache_shape, self._dtype)
    v = jnp.zeros(self._cache_shape, self._dtype)
    ids = np.zeros(-(-n // self.chunk) * self.chunk, np.int32)
    ids[:n] = tokens
    masses = []
    logits = None
    for start in range(0, n, self.chunk):
      k, v, logits, mass = self._prefill_chunk(
          self._state, k, v, jnp.asarray(ids[start:start + self.chunk]),
          jnp.int32(start), jnp.int32(n))
      masses.append(np.asarray(mass))
    self._k, self._v, self.length = k, v, n
    return np.asarray(logits), np.concatenate(masses)[:n]

  def decode(self, token: int,
             block_masks: np.ndarray,  # [R, NB] bool; row 0 appended
             ) -> DecodeOutput:
    """Feeds `token` at the next position to every row; row 0's K/V join
    the cache. A row reads the cached blocks its mask allows, and itself."""
    if self._k is None:
      raise RuntimeError("decode before prefill")
    if self.length >= self.capacity:
      raise ValueError(f"the probe's capacity ({self.capacity}) is full")
    masks = np.asarray(block_masks, bool)
    if masks.ndim != 2 or masks.shape[1] != self.num_blocks or not masks.shape[0]:
      raise ValueError(f"block_masks must be [rows, {self.num_blocks}], got "
                       f"{masks.shape}")
    self._check_ids([token])
    self._k, self._v, logits, mass, self_mass = self._decode_rows(
        self._state, self._k, self._v, jnp.int32(token),
        jnp.int32(self.length), jnp.asarray(masks))
    self.length += 1
    return DecodeOutput(np.asarray(logits), np.asarray(mass),
                        np.asarray(self_mass))
