"""Pieces of one engine step shared by `Engine` and `PDCluster`.

Both pad a step's work into the runner's fixed-shape arrays, compile the
same shape buckets, sample with each request's own settings and decide when
a turn is done in the same way; only who holds the pool differs.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.config import EngineConfig
from dualpath_jax import buckets
from dualpath_jax.engine.request import TokenLogprob, TurnOutput
from dualpath_jax.engine.sampling import sample, token_logprobs

MIN_Q_BUCKET = 32
MIN_PAGE_BUCKET = 64


def pack_step(manager: KVCacheManager, batch: int, q_len: int, pages: int,
              work: Sequence[tuple[str, Sequence[int], int]] | None
              ) -> tuple[np.ndarray, ...]:
  """Pads `work` (sequence id, new tokens, start position) to one call.

  Returns `(tokens [batch, q_len], block_tables [batch, pages],
  kv_lens [batch], q_lens [batch], slot_mapping [batch, q_len])`, int32.
  Padding rows have no context and write nowhere; `work=None` gives an
  all-padding batch (used to compile a shape). A row's table holds the pages
  its context fills and then repeats the last of them, never page 0 nor a
  page allocated ahead and not yet written: implementations may read the
  entries past a row's context (masked, but `0 * NaN` is NaN), and those
  pages may hold what another sequence left there (any values).
  """
  tokens = np.zeros((batch, q_len), np.int32)
  tables = np.zeros((batch, pages), np.int32)
  kv_lens = np.zeros((batch,), np.int32)
  q_lens = np.zeros((batch,), np.int32)
  slots = np.full((batch, q_len), -1, np.int32)
  for b, (seq_id, new, start) in enumerate(work or []):
    table = manager.block_table(seq_id)
    tokens[b, :len(new)] = new
    used = -(-(start + len(new)) // manager.block_size)  # pages with context
    tables[b, :used] = table[:used]
    tables[b, used:] = table[used - 1]
    kv_lens[b] = start + len(new)
    q_lens[b] = len(new)
    slots[b, :len(new)] = manager.slot_mapping(seq_id, start, len(new))
  return tokens, tables, kv_lens, q_lens, slots


def q_bucket_sizes(max_chunk: int) -> list[int]:
  """Prefill chunk buckets: the powers of two from MIN_Q_BUCKET, and three
  quarters of each one from 512 (384, 768, ...): a chunk of 257-384 tokens
  (most turns' last chunk) no longer pays for 512 rows."""
  sizes = set(buckets.bucket_sizes(MIN_Q_BUCKET, max_chunk))
  sizes |= {b * 3 // 4 for b in sizes if b >= 512 and b * 3 // 4 < max_chunk}
  return sorted(sizes)


def q_bucket(n: int, max_chunk: int) -> int:
  """The smallest `q_bucket_sizes(max_chunk)` entry that holds `n` tokens."""
  if n > max_chunk:
    raise ValueError(f"{n} exceeds the largest bucket {max_chunk}")
  return next(b for b in q_bucket_sizes(max_chunk) if b >= n)


def table_width_free(config: EngineConfig, model_config, block_size: int,
                     dtype: str) -> bool:
  """Whether the attention every step resolves to costs what the true
  context costs whatever the block table's width (`xla_chunked`: a run-time
  trip count): then one page bucket, the widest, serves every step, and the
  engine compiles a third to a quarter of the shapes."""
  from kernels.paged_attention import resolve_implementation
  return all(resolve_implementation(
      config.attention_impl, q_len=q_len, head_dim=model_config.head_dim,
      block_size=block_size, dtype=dtype,
      group=model_config.num_heads // model_config.num_kv_heads)
      == "xla_chunked" for q_len in (1, config.max_prefill_chunk))


def warmup_shapes(config: EngineConfig, block_size: int, max_pages: int,
                  max_context: int | None, one_page_bucket: bool = False
                  ) -> Iterator[tuple[str, int, int, int]]:
  """Every `(kind, batch, q_len, pages)` a context up to `max_context` hits
  (`one_page_bucket`: the engine pads every table to `max_pages`)."""
  pages = math.ceil(min(max_context or config.max_context, config.max_context)
                    / block_size)
  for s in ([max_pages] if one_page_bucket else buckets.bucket_sizes(
      MIN_PAGE_BUCKET, buckets.bucket(pages, MIN_PAGE_BUCKET, max_pages))):
    for t in q_bucket_sizes(config.max_prefill_chunk):
      if t <= s * block_size:  # a chunk never outgrows its table
        yield "prefill", 1, t, s
    for b in buckets.bucket_sizes(1, config.max_batch_size):
      yield "decode", b, 1, s


# Greedy picks on the logits' device: [batch, vocab] -> [batch] int32. Same
# choice as `np.argmax` (the first maximum; a row with NaN, its first NaN).
_argmax_rows = jax.jit(functools.partial(jnp.argmax, axis=-1))


def _temperature(req, config: EngineConfig) -> float:
  """The request's sampling temperature, or the engine's default."""
  if req.temperature is not None:
    return req.temperature
  return 0.0 if config.greedy else config.temperature


def sample_tokens(turns: Sequence,
                  logits: jax.Array | np.ndarray,  # [>= len(turns), vocab]
                  config: EngineConfig,
                  default_rng: np.random.Generator) -> list[int]:
  """One token per turn (anything with `.req`, `.rng` and `.logprobs`),
  each with its request's sampling settings; rows go one at a time through
  the same generator (the engine's unless the request has its own seed), so
  the draws equal one batched call. A request that asks for logprobs gets
  the token's appended to `turn.logprobs` (every sampled token is then
  accepted: `accept_token`).

  When every turn is greedy and none asks for logprobs (offline evaluation,
  the default), device `logits` are reduced where they are and only the
  token ids cross to the host: `batch * vocab` floats a step less (32 MB
  for 64 rows of a 128k vocabulary) and no host argmax over them. Any
  other batch brings the logits to the host and samples there.
  """
  if all(_temperature(t.req, config) == 0 and t.req.logprobs is None
         for t in turns) and isinstance(logits, jax.Array):
    return [int(i) for i in np.asarray(_argmax_rows(logits))[:len(turns)]]
  logits = np.asarray(logits)
  out = []
  for b, turn in enumerate(turns):
    req = turn.req
    temperature = _temperature(req, config)
    top_p = config.top_p if req.top_p is None else req.top_p
    rng = default_rng if turn.rng is None else turn.rng
    out.append(int(sample(logits[b:b + 1], rng, temperature, top_p)[0]))
    if req.logprobs is not None:
      turn.logprobs.append(TokenLogprob(
          out[-1], *token_logprobs(logits[b], out[-1], req.logprobs)))
  return out


def accept_token(turn, token: int, eos_ids: frozenset[int]) -> str | None:
  """Appends `token` to `turn` (`.generated`, `.tokens`, `.req`); returns
  why the turn is finished ("eos" | "stop" | "length" | "error") or None.

  "error": the request's `on_logprob` or `on_token` hook raised; the
  exception is left in `turn.hook_error`. A client's hook fails its own
  turn only: the other turns of the batch keep their tokens.
  """
  turn.generated.append(token)
  turn.tokens.append(token)
  req = turn.req
  stop = False
  try:
    if req.on_logprob is not None and req.logprobs is not None:
      req.on_logprob(turn.logprobs[-1])
    if req.on_token is not None:
      stop = bool(req.on_token(token))
  except Exception as err:  # pylint: disable=broad-except
    turn.hook_error = err
    return "error"
  if req.stop_on_eos and token in eos_ids:
    return "eos"
  if stop:
    return "stop"
  if len(turn.generated) >= req.max_new_tokens:
    return "length"
  return None


def turn_output(turn, now: float, reason: str) -> TurnOutput:
  """The `TurnOutput` of a finished turn (anything with `.req`,
  `.generated`, `.cached_prompt_tokens`, `.arrival_s`, `.first_token_s`
  and, for reason "error", `.hook_error`): the engine's and the cluster's."""
  return TurnOutput(
      request=turn.req, generated_tokens=list(turn.generated),
      cached_prompt_tokens=turn.cached_prompt_tokens,
      arrival_s=turn.arrival_s, first_token_s=turn.first_token_s,
      finish_s=now, finish_reason=reason,
      error=turn.hook_error if reason == "error" else None,
      logprobs=(None if turn.req.logprobs is None else
                list(turn.logprobs)))
