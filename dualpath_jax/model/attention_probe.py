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

Its free-running rows (`start_free_rows`, `decode_free`) each feed their
own tokens instead, from the prompt's cache on: a row's generated tokens
keep their own K/V, made under that row's sparse reads, so its errors
build up as in a server that reads only its hot blocks. `score` gives the
exact model's log-probability of each token of a continuation.

The attention here is a plain softmax over a dense cache, independent of
`kernels/`; tests/test_attention_probe.py checks the logits against the
paged model (`ModelRunner`) and the attention against numpy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualpath_jax.model.llama import Llama


class Attention(NamedTuple):
  """What `attend` returns: the output and where its probability went."""

  out: jax.Array  # [R, T, Hq, D]
  cache_probs: jax.Array  # [R, T, Hq, C]: over the shared cache
  self_probs: jax.Array  # [R, T, Hq]: on the row's own key; zeros without one
  row_probs: jax.Array  # [R, T, Hq, S]: over the row's own keys; S = 0 without


def attend(
    q: jax.Array,  # [R, T, Hq, D]
    k_cache: jax.Array,  # [C, Hkv, D]: shared by every row
    v_cache: jax.Array,  # [C, Hkv, D]
    allowed: jax.Array,  # [R, T, C] bool: the cached keys each query reads
    k_self: jax.Array | None = None,  # [R, Hkv, D]: read by all of row r's queries
    v_self: jax.Array | None = None,  # [R, Hkv, D]
    k_rows: jax.Array | None = None,  # [R, S, Hkv, D]: row r's own keys, S >= 1
    v_rows: jax.Array | None = None,  # [R, S, Hkv, D]
    rows_allowed: jax.Array | None = None,  # [R, T, S] bool
) -> Attention:
  """Softmax attention (scale 1/sqrt(D), GQA: query head h reads KV head
  h // (Hq / Hkv)), in float32, over up to three sets of keys: a cache
  every row shares, keys of each row's own (a free-running row's
  generated tokens), and each row's own token. A query with nothing to
  read gives zeros."""
  r, t, hq, d = q.shape
  hkv = k_cache.shape[1]
  group = hq // hkv
  qg = q.astype(jnp.float32).reshape(r, t, hkv, group, d) / np.sqrt(d)
  neg = jnp.float32(-jnp.inf)
  mask = allowed[:, :, None, None, :]
  scores = jnp.where(mask, jnp.einsum("rtkgd,ckd->rtkgc", qg,
                                      k_cache.astype(jnp.float32)), neg)
  top = scores.max(-1)
  if k_rows is not None:
    row_mask = rows_allowed[:, :, None, None, :]
    row_scores = jnp.where(row_mask, jnp.einsum(
        "rtkgd,rskd->rtkgs", qg, k_rows.astype(jnp.float32)), neg)
    top = jnp.maximum(top, row_scores.max(-1))
  if k_self is not None:
    self_score = jnp.einsum("rtkgd,rkd->rtkg", qg, k_self.astype(jnp.float32))
    top = jnp.maximum(top, self_score)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.where(mask, jnp.exp(scores - top[..., None]), 0.0)
  total = p.sum(-1)
  if k_rows is not None:
    p_rows = jnp.where(row_mask, jnp.exp(row_scores - top[..., None]), 0.0)
    total = total + p_rows.sum(-1)
  if k_self is not None:
    p_self = jnp.exp(self_score - top)
    total = total + p_self
  total = jnp.where(total > 0, total, 1.0)
  p = p / total[..., None]
  out = jnp.einsum("rtkgc,ckd->rtkgd", p, v_cache.astype(jnp.float32))
  if k_rows is not None:
    p_rows = p_rows / total[..., None]
    out = out + jnp.einsum("rtkgs,rskd->rtkgd", p_rows,
                           v_rows.astype(jnp.float32))
  else:
    p_rows = jnp.zeros(total.shape + (0,), jnp.float32)
  if k_self is not None:
    p_self = p_self / total
    out = out + p_self[..., None] * v_self.astype(jnp.float32)[:, None, :, None, :]
  else:
    p_self = jnp.zeros(total.shape, jnp.float32)
  return Attention(out.reshape(r, t, hq, d), p.reshape(r, t, hq, -1),
                   p_self.reshape(r, t, hq),
                   p_rows.reshape(r, t, hq, p_rows.shape[-1]))


def block_sums(p: jax.Array,  # [..., C]
               block_size: int) -> jax.Array:  # [..., C // block_size]
  """Probability mass per block of `block_size` consecutive positions."""
  return p.reshape(p.shape[:-1] + (-1, block_size)).sum(-1)


class Score(NamedTuple):
  """The exact model's view of a continuation (`AttentionProbe.score`)."""

  logprobs: np.ndarray  # [n - 1] float64: of tokens[1:], each in its place
  greedy: np.ndarray  # [n - 1] int: the exact model's own pick in each place


@dataclasses.dataclass
class DecodeOutput:
  logits: np.ndarray  # [R, V] float32
  block_mass: np.ndarray  # [R, L, Hq, NB] float32: row r's own attention
  self_mass: np.ndarray  # [R, L, Hq] float32: on the row's own token


class _ProbeFunctions(NamedTuple):
  """A probe's jitted steps (the weights `state` first; the caches it
  updates are donated and returned)."""

  prefill_chunk: Callable
  decode_rows: Callable
  free_rows: Callable


@functools.lru_cache(maxsize=8)
def _probe_functions(graphdef: nnx.GraphDef, capacity: int, block_size: int,
                     chunk: int) -> _ProbeFunctions:
  """The jitted steps of probes of one model structure and geometry, shared
  by all of them in the process, so that each shape is traced, lowered and
  compiled once (as `ModelRunner`'s steps are), not once per probe."""
  key_pos = jnp.arange(capacity + chunk, dtype=jnp.int32)

  # The model's own pieces around attention (`DecoderLayer`).
  def qkv(layer, h, positions):  # h [R, T, H]
    return layer.attn.project(layer.attn_norm(h), positions)

  def finish_layer(layer, h, out):  # out [R, T, Hq, D]
    return layer.feed_forward(h + layer.attn.output(out, h.dtype))

  def pad_mass(p):  # [..., C + chunk] -> [..., NB]: the capacity's blocks
    return block_sums(p[..., :capacity], block_size)

  def position_masks(block_masks):  # [R, NB] -> [R, C + chunk]
    token_mask = jnp.repeat(block_masks, block_size, axis=1)
    return jnp.pad(token_mask, ((0, 0), (0, chunk)))

  def prefill_chunk(state, k_cache, v_cache, tokens, start, length,
                    all_logits=False):
    model = nnx.merge(graphdef, state)
    layers_def, layers_state = nnx.split(model.layers)
    size = tokens.shape[0]  # `chunk`, or less for `score`
    positions = start + jnp.arange(size, dtype=jnp.int32)[None, :]
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
      att = attend(q, k_layer, v_layer, allowed)
      mass = pad_mass(att.cache_probs[0]).mean(axis=1)  # [T, NB], mean over heads
      return finish_layer(layer, h, att.out), (k_layer, v_layer, mass)

    h, (k_cache, v_cache, mass) = jax.lax.scan(
        body, model.embed(tokens[None]), (layers_state, k_cache, v_cache))
    if all_logits:  # [size, V]: every position's (`score`)
      logits = model.logits(model.final_norm(h[0]))
    else:
      last = jnp.clip(length - 1 - start, 0, size - 1)
      logits = model.logits(model.final_norm(h[0, last]))
    return k_cache, v_cache, logits, mass.mean(axis=0)

  def decode_rows(state, k_cache, v_cache, token, position, block_masks):
    model = nnx.merge(graphdef, state)
    layers_def, layers_state = nnx.split(model.layers)
    rows = block_masks.shape[0]
    positions = jnp.full((rows, 1), position, jnp.int32)
    tokens = jnp.full((rows, 1), token, jnp.int32)
    token_mask = position_masks(block_masks)
    allowed = (token_mask & (key_pos < position)[None, :])[:, None, :]

    def body(h, xs):
      layer_state, k_layer, v_layer = xs
      layer = nnx.merge(layers_def, layer_state)
      q, k, v = qkv(layer, h, positions)
      att = attend(q, k_layer, v_layer, allowed, k[:, 0], v[:, 0])
      return finish_layer(layer, h, att.out), (
          k[0, 0], v[0, 0], pad_mass(att.cache_probs[:, 0]),
          att.self_probs[:, 0])

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

  def free_rows(state, k_cache, v_cache, k_rows, v_rows, tokens, step,
                prompt_length, block_masks):
    # Row r feeds its own token at position prompt_length + step and
    # reads the prompt's cached keys and its own earlier tokens' (in
    # k_rows[:, r, :step]) where block_masks[r] allows, and itself.
    model = nnx.merge(graphdef, state)
    layers_def, layers_state = nnx.split(model.layers)
    rows, steps = block_masks.shape[0], k_rows.shape[2]
    positions = jnp.full((rows, 1), prompt_length + step, jnp.int32)
    token_mask = position_masks(block_masks)
    allowed = (token_mask & (key_pos < prompt_length)[None, :])[:, None, :]
    row_pos = prompt_length + jnp.arange(steps, dtype=jnp.int32)  # [S]
    rows_allowed = (token_mask[:, row_pos]
                    & (jnp.arange(steps) < step)[None, :])[:, None, :]

    def body(h, xs):
      layer_state, k_layer, v_layer, k_row, v_row = xs
      layer = nnx.merge(layers_def, layer_state)
      q, k, v = qkv(layer, h, positions)
      att = attend(q, k_layer, v_layer, allowed, k[:, 0], v[:, 0],
                   k_row, v_row, rows_allowed)
      k_row = jax.lax.dynamic_update_slice(
          k_row, k.astype(k_row.dtype), (0, step, 0, 0))
      v_row = jax.lax.dynamic_update_slice(
          v_row, v.astype(v_row.dtype), (0, step, 0, 0))
      # The rows' own keys sit at positions the shared part masks out.
      probs = att.cache_probs[:, 0].at[..., row_pos].add(att.row_probs[:, 0])
      return finish_layer(layer, h, att.out), (
          k_row, v_row, pad_mass(probs), att.self_probs[:, 0])

    h, (k_rows, v_rows, mass, self_mass) = jax.lax.scan(
        body, model.embed(tokens[:, None]),
        (layers_state, k_cache, v_cache, k_rows, v_rows))
    logits = model.logits(model.final_norm(h[:, 0]))
    return (k_rows, v_rows, logits, jnp.swapaxes(mass, 0, 1),
            jnp.swapaxes(self_mass, 0, 1))

  return _ProbeFunctions(
      prefill_chunk=jax.jit(prefill_chunk, donate_argnums=(1, 2),
                            static_argnames=("all_logits",)),
      decode_rows=jax.jit(decode_rows, donate_argnums=(1, 2)),
      free_rows=jax.jit(free_rows, donate_argnums=(3, 4)))


class AttentionProbe:
  """One sequence at a time: `prefill(tokens)`, then `decode` step by step,
  and, on the same prompt, free-running rows (`start_free_rows`,
  `decode_free`) and the exact model's `score` of a continuation.

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
    self._fns = _probe_functions(graphdef, capacity, block_size, chunk)
    self._k = self._v = None
    self._k_rows = self._v_rows = None
    self.length = 0
    self.prompt_length = 0
    self.free_step = 0

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
    k, v, logits, masses = self._forward(k, v, tokens, 0, self.chunk)
    self._k, self._v, self.length, self.prompt_length = k, v, n, n
    self._k_rows = self._v_rows = None
    return np.asarray(logits[-1]), np.concatenate(masses)[:n]

  def _forward(self, k: jax.Array, v: jax.Array,  # the caches, donated
               tokens: Sequence[int], first: int, size: int,
               all_logits: bool = False) -> tuple:
    """Runs `tokens` at positions `first`... causally over the cache, in
    chunks of `size` (the last one padded). Returns the caches with their
    K/V written, each chunk's logits (its last token's, or with
    `all_logits` every position's) and each chunk's block mass."""
    ids = np.zeros(-(-len(tokens) // size) * size, np.int32)
    ids[:len(tokens)] = tokens
    end = jnp.int32(first + len(tokens))
    logits, masses = [], []
    for start in range(0, len(tokens), size):
      k, v, chunk_logits, mass = self._fns.prefill_chunk(
          self._state, k, v, jnp.asarray(ids[start:start + size]),
          jnp.int32(first + start), end, all_logits=all_logits)
      logits.append(chunk_logits)
      masses.append(np.asarray(mass))
    return k, v, logits, masses

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
    self._k, self._v, logits, mass, self_mass = self._fns.decode_rows(
        self._state, self._k, self._v, jnp.int32(token),
        jnp.int32(self.length), jnp.asarray(masks))
    self.length += 1
    return DecodeOutput(np.asarray(logits), np.asarray(mass),
                        np.asarray(self_mass))

  def start_free_rows(self, rows: int, steps: int) -> None:
    """Starts `rows` free-running rows on the prompt of the last `prefill`:
    each feeds its own tokens (`decode_free`) for up to `steps` steps and
    keeps their K/V apart from the other rows'. The shared cache's prompt
    is unchanged by `decode`, so this may follow `decode` steps."""
    if self._k is None:
      raise RuntimeError("start_free_rows before prefill")
    if rows < 1 or steps < 1:
      raise ValueError(f"rows ({rows}) and steps ({steps}) must be >= 1")
    if self.prompt_length + steps > self.capacity:
      raise ValueError(f"a prompt of {self.prompt_length} tokens and {steps} "
                       f"free steps do not fit the probe's capacity "
                       f"({self.capacity})")
    cfg = self.config
    shape = (cfg.num_layers, rows, steps, cfg.num_kv_heads, cfg.head_dim)
    self._k_rows = jnp.zeros(shape, self._dtype)
    self._v_rows = jnp.zeros(shape, self._dtype)
    self.free_step = 0

  def decode_free(self, tokens: Sequence[int],  # [R]: each row's own token
                  block_masks: np.ndarray,  # [R, NB] bool
                  ) -> DecodeOutput:
    """One step of the free-running rows: row r feeds `tokens[r]` at
    position `prompt_length + free_step` and reads the prompt's blocks and
    its own earlier tokens' blocks that `block_masks[r]` allows, and
    itself. `block_mass[r]` is row r's attention over those positions."""
    if self._k_rows is None:
      raise RuntimeError("decode_free before start_free_rows")
    rows, steps = self._k_rows.shape[1:3]
    if self.free_step >= steps:
      raise ValueError(f"the free rows' {steps} steps are used up")
    masks = np.asarray(block_masks, bool)
    ids = np.asarray(tokens)
    if masks.shape != (rows, self.num_blocks) or ids.shape != (rows,):
      raise ValueError(f"expected tokens [{rows}] and block_masks [{rows}, "
                       f"{self.num_blocks}]; got {ids.shape} and {masks.shape}")
    self._check_ids(ids)
    self._k_rows, self._v_rows, logits, mass, self_mass = self._fns.free_rows(
        self._state, self._k, self._v, self._k_rows, self._v_rows,
        jnp.asarray(ids, jnp.int32), jnp.int32(self.free_step),
        jnp.int32(self.prompt_length), jnp.asarray(masks))
    self.free_step += 1
    return DecodeOutput(np.asarray(logits), np.asarray(mass),
                        np.asarray(self_mass))

  def score(self, tokens: Sequence[int]) -> Score:
    """Log-probabilities, under exact attention, of `tokens[1:]` each
    given the prompt of the last `prefill` and the tokens before it (how
    likely the exact model finds a continuation that started with
    `tokens[0]`), and the token the exact model would have picked in each
    place. Leaves the probe's caches as they were."""
    if self._k is None:
      raise RuntimeError("score before prefill")
    n = len(tokens)
    if n < 2 or self.prompt_length + n - 1 > self.capacity:
      raise ValueError(f"score takes 2 to {self.capacity - self.prompt_length + 1} "
                       f"tokens after this prompt; got {n}")
    self._check_ids(tokens)
    fed = list(tokens[:-1])
    # A continuation is short: pad it to a power of two, not a prompt chunk
    # (one compilation per size; a 256-token chunk cost 8x a 32-token one).
    size = min(self.chunk, 1 << (len(fed) - 1).bit_length())
    _, _, logits, _ = self._forward(jnp.copy(self._k), jnp.copy(self._v),
                                    fed, self.prompt_length, size,
                                    all_logits=True)
    logits = np.concatenate([np.asarray(x, np.float64)
                             for x in logits])[:len(fed)]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return Score(logp[np.arange(len(fed)), np.asarray(tokens[1:])],
                 np.argmax(logp, axis=-1))
