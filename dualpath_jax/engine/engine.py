"""The multi-turn engine: continuous batching over a paged KV cache.

Data flow of one turn (a `TurnRequest` holding the session's whole context):

1. *Admission* (`_admit`): the cache manager hashes the context's full blocks
   and acquires the longest cached prefix; with a hot or cold tier, the
   blocks after it that the tiers hold are loaded (`cold_tier.py`). Prefill
   starts after them. A cold read runs on a reader thread while the engine
   serves its other turns (`EngineConfig.async_cold_loads`): the turn keeps
   the head of the queue meanwhile, and the engine waits for the read only
   when it has nothing else to run (`EngineStats.load_wait_s`). A free
   batch slot does not stay empty for that read: the turns behind it that
   need no cold read are admitted meanwhile
   (`EngineConfig.admit_while_reading`). With a
   prefetcher (`engine_prefetch.py`), the reader reads ahead when it has no
   turn's read to make: the prefixes of the turns behind the head and of
   the sessions away between turns, into the hot tier.
2. *Prefill* (`_prefill_step`): the missing tokens are computed in chunks of
   at most `max_prefill_chunk`, each chunk attending to the paged prefix;
   the last chunk's logits give the first token (TTFT is taken here). Turns
   are prefilled one after another, and before each chunk a turn takes the
   blocks of its prompt that the turns ahead of it registered meanwhile, so
   turns admitted together with one prefix (n samples of a prompt, agents
   forked from one history) compute it once.
3. *Decode* (`_decode_step`): every running sequence advances one token per
   step in one batched call, until EOS or `max_new_tokens`.
4. *Finish*: full blocks the cold tier lacks are queued for writing to it;
   the sequence's blocks are released; full blocks keep their
   identity in the pool, so the session's next turn (or another session of
   the same tenant) hits them until they are evicted.

Each `step()` runs at most one prefill chunk and one decode batch, so decode
latency stays bounded while long prompts are prefilled. When the pool runs
out of free pages, the youngest running sequence is preempted (its blocks
released, re-queued to recompute from its cached prefix), and that may be
the one asking: an older turn is never sent back for a younger one.

Front ends (the HTTP server) stream through `TurnRequest.on_token`, called
with every sampled token and able to finish the turn early (stop strings),
and cancel turns with `abort(request_id)`, which releases their blocks (also
from inside the turn's own `on_token`). A hook that raises fails its own
turn only: it finishes with `finish_reason="error"` and the exception in
`TurnOutput.error`; the rest of the batch is unaffected.
Sampling settings and seeds may be set per request. The engine is not
thread-safe: one thread calls `submit`, `abort` and `step`; `validate`
reads configuration only and may be called from any thread.

The engine holds no JAX code of its own: it pads host arrays to a few shape
buckets (`dualpath_jax/buckets.py`) and calls `ModelRunner.step`, which owns
the jitted model; the engine keeps the KV pool and hands it to each step
(donated, returned updated).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import numpy as np

from dualpath_jax.cache.block_hash import loadable_chain
from dualpath_jax.cache.block_pool import OutOfBlocksError
from dualpath_jax.cache.kv_cache_manager import KVCacheManager, RequestTooLargeError
from dualpath_jax.config import EngineConfig
from dualpath_jax import buckets
from dualpath_jax.engine import step_parts
from dualpath_jax.engine.step_parts import MIN_PAGE_BUCKET
from dualpath_jax.engine.request import (TurnOutput, TurnRequest,
                                          validate_request)

if TYPE_CHECKING:  # cold_tier.py imports the transfer layer: only for types
  from dualpath_jax.engine.cold_tier import PendingLoad
  from dualpath_jax.engine.engine_prefetch import EnginePrefetcher


@dataclasses.dataclass
class _Sequence:
  """Engine-side state of one admitted turn."""

  req: TurnRequest
  arrival_s: float
  tokens: list[int]  # prompt + generated so far
  generated: list[int] = dataclasses.field(default_factory=list)
  cached_prompt_tokens: int = -1  # set at first admission
  first_token_s: float | None = None
  rng: np.random.Generator | None = None  # own generator when req.seed is set
  order: int = 0  # submission order: breaks ties of arrival_s
  # Tokens the storage tiers loaded for it before its first admission.
  tier_loaded: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"hot": 0, "cold": 0})
  hook_error: BaseException | None = None  # what its `on_token` raised
  logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob
  preempted: bool = False  # sent back to the queue at least once
  # While it heads the queue: the cached tokens `begin` found (None: not
  # begun) and the cold read started for it (`ColdTierConnector.start_load`).
  begun_cached: int | None = None
  load: PendingLoad | None = None
  # Ids of its loadable blocks, for the prefetcher, and the prefill target
  # they were hashed for (a preempted turn's grows).
  chain: tuple[int, list[bytes]] | None = None

  @property
  def rid(self) -> str:
    return self.req.request_id

  @property
  def prefill_target(self) -> int:
    """Tokens whose KV must exist before decoding: all but a pending token."""
    return len(self.tokens) - (1 if self.generated else 0)


@dataclasses.dataclass
class EngineStats:
  """Counters of what the engine did; times are wall seconds of model calls."""

  prefill_steps: int = 0
  prefill_tokens: int = 0
  prefill_s: float = 0.0
  decode_steps: int = 0
  decode_tokens: int = 0
  decode_s: float = 0.0
  preemptions: int = 0
  # Prompt tokens a turn found computed by another turn admitted with it
  # (the same prefix, e.g. n samples of one prompt), picked up before its
  # prefill chunks; also counted in cached_tokens_by_tier["device"].
  shared_prefill_tokens: int = 0
  warmup_s: float = 0.0
  compiled_shapes: int = 0
  # Seconds the engine waited for a cold read with nothing else to run
  # (asynchronous loads); with them off, every load's read is a wait.
  load_wait_s: float = 0.0
  # Turns admitted ahead of the turn heading the queue while it waited for
  # its cold read (they needed none: `EngineConfig.admit_while_reading`).
  admitted_while_reading: int = 0
  # Prompt tokens found cached at each turn's first admission, by the tier
  # that held them (a turn retried or preempted is counted once).
  cached_tokens_by_tier: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"device": 0, "hot": 0, "cold": 0})

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["prefill_tok_s"] = (self.prefill_tokens / self.prefill_s
                          if self.prefill_s else None)
    d["decode_tok_s"] = (self.decode_tokens / self.decode_s
                         if self.decode_s else None)
    return d


class Engine:
  """Serves `TurnRequest`s with continuous batching; see the module docstring."""

  def __init__(self, runner, manager: KVCacheManager, config: EngineConfig,
               *, eos_ids: Sequence[int], block_size: int,
               clock: Callable[[], float] = time.perf_counter,
               cold_tier=None, prefetcher: EnginePrefetcher | None = None):
    self.runner = runner
    self.manager = manager
    self.config = config
    self.eos_ids = frozenset(eos_ids)
    self.block_size = block_size
    self.clock = clock
    self.cold_tier = cold_tier  # a `ColdTierConnector` (hot and/or cold), or None
    self.prefetcher = prefetcher  # over `cold_tier`'s tiers, or None
    self.max_pages = math.ceil(config.max_context / block_size)
    self._one_page_bucket = step_parts.table_width_free(
        config, runner.config, block_size, runner.cache.dtype)
    self.stats = EngineStats()
    self._kv = runner.new_kv_cache()
    self._rng = np.random.default_rng(config.seed)
    self._waiting: collections.deque[_Sequence] = collections.deque()
    self._prefilling: list[_Sequence] = []
    self._decoding: list[_Sequence] = []
    self._shapes: set[tuple[int, int, int]] = set()
    self._submitted = 0

  # ------------------------------------------------------------------ API
  def validate(self, req: TurnRequest) -> None:
    """Raises ValueError if `req` can never run (see `validate_request`).
    Configuration only: any thread may call it."""
    validate_request(req, max_context=self.config.max_context,
                     block_size=self.block_size,
                     pool_blocks=self.manager.pool.num_blocks,
                     vocab_size=self.runner.config.vocab_size)
    limit = self.manager.max_blocks_per_seq
    blocks = math.ceil((len(req.prompt_tokens) + req.max_new_tokens) /
                       self.block_size)
    if blocks > limit:
      raise RequestTooLargeError(
          f"{req.request_id}: needs {blocks} blocks but a sequence may hold "
          f"at most {limit} (the cache manager's max_blocks_per_seq)")

  def submit(self, req: TurnRequest) -> None:
    """Queues a turn; raises `RequestTooLargeError` if it can never fit, and
    ValueError for a bad request or an id queued or running already."""
    self.validate(req)
    if req.request_id in self.manager or any(
        seq.rid == req.request_id for queue in (
            self._waiting, self._prefilling, self._decoding) for seq in queue):
      raise ValueError(f"{req.request_id}: a turn of this id is queued or "
                       "running already")
    arrival = self.clock() if req.arrival_s is None else req.arrival_s
    rng = None if req.seed is None else np.random.default_rng(req.seed)
    self._submitted += 1
    self._waiting.append(_Sequence(req=req, arrival_s=arrival,
                                   tokens=list(req.prompt_tokens), rng=rng,
                                   order=self._submitted))
    if self.prefetcher is not None:
      self.prefetcher.turn_arrived(req, arrival)

  def abort(self, request_id: str) -> bool:
    """Drops a waiting or running turn and releases its blocks.

    Its full computed blocks stay cached (like a finished turn's). Returns
    False if no such turn is queued or running (e.g. it already finished).
    """
    for queue in (self._waiting, self._prefilling, self._decoding):
      for seq in queue:
        if seq.rid == request_id:
          queue.remove(seq)
          if seq.load is not None:
            self.cold_tier.cancel(seq.load)
            seq.load = None
          seq.begun_cached = None
          if seq.rid in self.manager:
            self.manager.end(seq.rid)
          return True
    if request_id in self.manager:  # between queues: its own `on_token` hook
      self.manager.end(request_id)
      return True
    return False

  def forget_blocks(self, ids: Sequence[bytes]) -> dict[str, int | None]:
    """Drops blocks by identity from the memory tiers: the hot tier's
    copies and the pool's cached, unreferenced pages (e.g. a deleted
    session's, `storage.BlockStore.session_block_ids`). Returns how many
    of each (`hot_tier_blocks` None without a hot tier). A block a running
    turn holds stays until that turn ends."""
    ids = list(ids)
    if self.prefetcher is not None:  # its reads out must not put them back
      self.prefetcher.forget(ids)
    hot = getattr(self.cold_tier, "hot", None)
    return {"hot_tier_blocks": None if hot is None else hot.discard(ids),
            "pool_blocks": self.manager.pool.forget_cached(ids)}

  def close(self) -> None:
    """Waits for queued cold-tier writes and closes the store, if any."""
    if self.prefetcher is not None:
      self.prefetcher.close()
    if self.cold_tier is not None:
      self.cold_tier.close()

  def prefetch_pending(self) -> bool:
    """Whether `step` with no turn to run may still prefetch: reads in
    flight, the last step started one, or a turn ended since. A driver
    with nothing to submit (every session away) steps instead of sleeping
    while this holds; it turns False once a step finds nothing to read."""
    return self.prefetcher is not None and self.prefetcher.pending()

  def metrics_snapshot(self) -> dict:
    """For /metrics, with a prefetcher: its blocks read, used by their
    turn and evicted unused (`prefetch_blocks`); else nothing."""
    if self.prefetcher is None:
      return {}
    return {"prefetch_blocks": self.prefetcher.counts()}

  def has_work(self) -> bool:
    return bool(self._waiting or self._prefilling or self._decoding)

  @property
  def num_waiting(self) -> int:
    """Turns queued and not admitted (preempted ones included)."""
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._prefilling) + len(self._decoding)

  def step(self) -> list[TurnOutput]:
    """Admits waiting turns, runs one prefill chunk and one decode batch.

    With a prefetcher: its finished reads go into the hot tier before
    admission looks there, and it starts a read if the reader is idle;
    with no turn to run, the step waits for a read (at most 50 ms)
    instead of returning at once to a driver that would spin.
    """
    if self.prefetcher is not None:
      self.prefetcher.install_done()
    self._admit()
    if self.prefetcher is not None:
      self._prefetch()
    done: list[TurnOutput] = []
    ran = bool(self._prefilling or self._decoding)
    if self._prefilling:
      done += self._prefill_step()
    if self._decoding:
      done += self._decode_step()
    if not ran and self.prefetcher is not None and self.prefetcher.in_flight():
      cf.wait(self.prefetcher.in_flight(), timeout=0.05,
              return_when=cf.FIRST_COMPLETED)
    return done

  def warmup(self, max_context: int | None = None) -> None:
    """Compiles every shape bucket a context up to `max_context` can hit."""
    t0 = time.perf_counter()
    for _, batch, q_len, pages in step_parts.warmup_shapes(
        self.config, self.block_size, self.max_pages, max_context,
        self._one_page_bucket):
      # Compiled, not run: running an all-padding batch cost as much as a
      # real step (2.3 s CPU for a 512-token chunk on the 2-core CPU).
      self.runner.compile_step(self._kv, *step_parts.pack_step(
          self.manager, batch, q_len, pages, None))
      self._count_shape(batch, q_len, pages)
    self.stats.warmup_s += time.perf_counter() - t0

  # ------------------------------------------------------------ internals
  def _admit(self) -> None:
    while self._waiting and self.num_running < self.config.max_batch_size:
      seq = self._waiting[0]
      tokens = seq.tokens[:seq.prefill_target]
      if seq.begun_cached is None:
        seq.begun_cached = self.manager.begin(seq.rid, tokens, seq.req.tenant)
      if (seq.load is None and self.cold_tier is not None
          and self.config.async_cold_loads):
        seq.load = self.cold_tier.start_load(seq.rid, tokens, seq.req.tenant)
      if seq.load is not None and not seq.load.done():
        if self._prefilling or self._decoding:
          # Serve them while it reads; it keeps its place.
          if self.config.admit_while_reading:
            self._admit_past_reading_head()
          return
        t0 = time.perf_counter()
        seq.load.wait()
        self.stats.load_wait_s += time.perf_counter() - t0
      if not self._place(seq, tokens, seq.load):
        return

  def _admit_past_reading_head(self) -> None:
    """While the turn heading the queue waits for its cold read, admits the
    turns behind it (up to `max_batch_size` of them, in order) that need
    no cold read: their prefix is in the pool or the hot tier, so they
    take a free batch slot at once instead of leaving it empty for the
    read. A turn that would read is left where it is (its `begin` undone,
    not counted as a prefix lookup: it is only looked at). The head keeps
    its claim on the pool: a turn goes ahead only if its whole prefill
    (the hot blocks and every chunk after them, computed while the head
    reads) fits beside the blocks the head's load will fill and its own
    first chunk, so that the head is admitted as its read lands, with all
    of it, as in strict order; the first turn that does not fit ends the
    scan."""
    reserved = self._head_claim()
    for seq in list(self._waiting)[1:1 + self.config.max_batch_size]:
      if self.num_running >= self.config.max_batch_size:
        return
      tokens = seq.tokens[:seq.prefill_target]
      seq.begun_cached = self.manager.begin(seq.rid, tokens, seq.req.tenant,
                                            count=False)
      hit = seq.begun_cached
      load = self.cold_tier.plan_hot_load(seq.rid, tokens, seq.req.tenant)
      if load is None:
        seq.begun_cached = None
        self.manager.end(seq.rid)
        continue
      needed = self.manager.blocks_needed(seq.rid, seq.prefill_target - hit)
      if (needed + reserved > self.manager.pool.num_free or
          not self._place(seq, tokens, load)):
        seq.begun_cached = None
        if seq.rid in self.manager:
          self.manager.end(seq.rid)
        return
      self.manager.count_lookup(len(tokens), hit)
      self.stats.admitted_while_reading += 1

  def _head_claim(self) -> int:
    """Pool blocks the turn heading the queue (begun, its read out) takes
    when its load lands: the blocks the load fills and its first prefill
    chunk after them."""
    head = self._waiting[0]
    plan = head.load.plan
    loaded = (plan.have + head.load.blocks()) * self.block_size
    upto = min(head.prefill_target, loaded + self.config.max_prefill_chunk)
    return self.manager.blocks_needed(
        head.rid, upto - self.manager.num_computed(head.rid))

  def _place(self, seq: _Sequence, tokens: list[int],
             load: PendingLoad | None) -> bool:
    """Loads the prefix of `seq` (`begin`-ed with `tokens`) from the tiers
    (`load`: its started load; None: read it here) and admits it if the
    pool can take its first chunk; else ends its `begin` and returns
    False."""
    cached, seq.begun_cached = seq.begun_cached, None
    if self.cold_tier is not None:
      read_s = self.cold_tier.stats.read_s
      self._kv, hot, cold = self.cold_tier.load_prefix(
          self._kv, seq.rid, tokens, seq.req.tenant, pending=load)
      if load is None:  # read here, stalling everything
        self.stats.load_wait_s += self.cold_tier.stats.read_s - read_s
      seq.load = None
      cached += hot + cold
      # A load of an attempt that cannot be admitted stays in the pool as
      # cached blocks: the next attempt finds them there, so the tier
      # that first gave them keeps the credit.
      seq.tier_loaded["hot"] += hot
      seq.tier_loaded["cold"] += cold
    first = min(self.config.max_prefill_chunk, seq.prefill_target - cached)
    if not self.manager.can_allocate(seq.rid, first):
      self.manager.end(seq.rid)
      if self.num_running == 0:
        raise OutOfBlocksError(
            f"{seq.rid}: the KV pool ({self.manager.pool.num_blocks} blocks) "
            f"cannot hold even one prefill chunk with nothing else running")
      return False
    self._waiting.remove(seq)
    if seq.cached_prompt_tokens < 0:
      seq.cached_prompt_tokens = min(cached, len(seq.req.prompt_tokens))
      hot = min(seq.tier_loaded["hot"], seq.cached_prompt_tokens)
      cold = min(seq.tier_loaded["cold"], seq.cached_prompt_tokens - hot)
      by_tier = self.stats.cached_tokens_by_tier
      by_tier["device"] += seq.cached_prompt_tokens - hot - cold
      by_tier["hot"] += hot
      by_tier["cold"] += cold
    self._prefilling.append(seq)
    return True

  def _prefetch(self) -> None:
    """One prefetcher step over the waiting turns, first come first, but
    the head whose load has started (its read is on the reader already)."""
    waiting = []
    for seq in self._waiting:
      if len(waiting) == self.prefetcher.max_candidates:
        break
      if seq.load is None:
        waiting.append((seq.req, self._chain(seq)))
    self.prefetcher.step(waiting, self.clock())

  def _chain(self, seq: _Sequence) -> list[bytes]:
    """Ids of the turn's loadable blocks, as a load would look them up: its
    full blocks before the prefill target, leaving a token to compute."""
    target = seq.prefill_target
    if seq.chain is None or seq.chain[0] != target:
      seq.chain = (target, loadable_chain(
          seq.tokens, target, self.block_size,
          self.manager.model_fingerprint, seq.req.tenant))
    return seq.chain[1]

  def _prefill_step(self) -> list[TurnOutput]:
    seq = self._prefilling[0]
    self._pick_up_shared_prefix(seq)
    start = self.manager.num_computed(seq.rid)
    n = min(self.config.max_prefill_chunk, seq.prefill_target - start)
    if not self._allocate_or_preempt(seq, n):
      return []  # it yielded its blocks to older turns
    chunk = seq.tokens[start:start + n]
    t_bucket = step_parts.q_bucket(n, self.config.max_prefill_chunk)
    logits = self._run(1, t_bucket, self._page_bucket([seq]), [(seq, chunk, start)],
                     "prefill")
    self.manager.append_tokens(seq.rid, chunk)
    self.stats.prefill_steps += 1
    self.stats.prefill_tokens += n
    if start + n < seq.prefill_target:
      return []
    if seq.generated:  # resumed after preemption: its next token is pending
      self._prefilling.remove(seq)
      self._decoding.append(seq)
      return []
    token = step_parts.sample_tokens([seq], logits, self.config, self._rng)[0]
    self._prefilling.remove(seq)
    seq.first_token_s = self.clock()
    return self._accept([seq], [token])

  def _pick_up_shared_prefix(self, seq: _Sequence) -> None:
    """Takes the blocks of `seq`'s prompt that turns admitted with it have
    computed since its admission (`extend_cached_prefix`), so a prefix
    shared by turns that arrive together is prefilled once. The tokens
    count as cached for the turn, as a prefix found at admission would, but
    not after a preemption (the turn may have computed them itself)."""
    if not self.config.share_prefill:
      return
    gained = self.manager.extend_cached_prefix(seq.rid)
    if gained and not seq.preempted:
      seq.cached_prompt_tokens += gained
      self.stats.shared_prefill_tokens += gained
      self.stats.cached_tokens_by_tier["device"] += gained

  def _decode_step(self) -> list[TurnOutput]:
    seqs = list(self._decoding[:self.config.max_batch_size])
    for seq in list(seqs):
      if seq not in self._decoding:  # preempted by an earlier allocation
        seqs.remove(seq)
        continue
      self._allocate_or_preempt(seq, 1)
    seqs = [s for s in seqs if s in self._decoding]
    if not seqs:
      return []
    b_bucket = buckets.bucket(len(seqs), 1, self.config.max_batch_size)
    work = [(s, [s.tokens[-1]], self.manager.num_computed(s.rid)) for s in seqs]
    logits = self._run(b_bucket, 1, self._page_bucket(seqs), work, "decode")
    for s in seqs:
      self.manager.append_tokens(s.rid, [s.tokens[-1]])
    self.stats.decode_steps += 1
    self.stats.decode_tokens += len(seqs)
    return self._accept(seqs, step_parts.sample_tokens(
        seqs, logits, self.config, self._rng))

  def _accept(self, seqs: list[_Sequence], tokens: list[int]) -> list[TurnOutput]:
    """Appends each sequence's new token; finishes those that are done."""
    now = self.clock()
    done = []
    for seq, tok in zip(seqs, tokens):
      if seq.rid not in self.manager:  # aborted by an earlier turn's hook
        continue
      reason = step_parts.accept_token(seq, tok, self.eos_ids)
      if seq.rid not in self.manager:  # its own hook aborted it
        continue
      if reason is None:
        if seq not in self._decoding:
          self._decoding.append(seq)
        continue
      if seq in self._decoding:
        self._decoding.remove(seq)
      if reason == "error":  # its hook raised: fail it, write nothing back
        self.manager.end(seq.rid)
        done.append(step_parts.turn_output(seq, now, reason))
        continue
      try:
        if self.cold_tier is not None:
          self.cold_tier.write_back(self._kv, seq.rid, seq.req.tenant,
                                    seq.req.session_id)
        if self.prefetcher is not None:
          self.prefetcher.turn_finished(seq.req, now,
                                        self.manager.block_hashes(seq.rid))
      finally:  # whatever the write-back did, the turn releases its blocks
        self.manager.end(seq.rid)
      done.append(step_parts.turn_output(seq, now, reason))
    return done

  def _allocate_or_preempt(self, seq: _Sequence, n: int) -> bool:
    """Makes room for `n` more tokens of `seq`, preempting younger turns.

    A preempted turn releases its blocks and goes back to the head of the
    queue; its full blocks stay cached, so re-admission recomputes little.
    When only older turns hold the pool, `seq` itself is the youngest and
    yields: it is preempted and False is returned (older turns go first).
    """
    def age(s: _Sequence) -> tuple[float, int]:
      return (s.arrival_s, s.order)  # larger: younger

    while not self.manager.can_allocate(seq.rid, n):
      if self._release_waiting_head():
        continue  # its device hit may be what `seq` needs
      others = [s for s in self._decoding + self._prefilling if s is not seq]
      if not others:
        raise OutOfBlocksError(
            f"{seq.rid}: KV pool exhausted ({self.manager.pool.num_blocks} "
            f"blocks) with no other sequence to preempt")
      victim = max(others + [seq], key=age)
      self._preempt(victim)
      if victim is seq:
        return False
    self.manager.allocate(seq.rid, n)
    return True

  def _release_waiting_head(self) -> bool:
    """Ends the `begin` of the turn heading the queue while its cold read
    is out (False if none is begun): the blocks of its device hit, which it
    holds meanwhile, become cached ones the running turns may take, as an
    admitted turn's would by preemption. Its read is dropped; both are
    made again when it next heads the queue (a turn pushed back may go
    ahead of it)."""
    if not self._waiting or self._waiting[0].begun_cached is None:
      return False
    head = self._waiting[0]
    if head.load is not None:
      self.cold_tier.cancel(head.load)
      head.load = None
    head.begun_cached = None
    self.manager.end(head.rid)
    return True

  def _preempt(self, victim: _Sequence) -> None:
    # The victim goes ahead of the turn whose read is in flight: that turn
    # gives back what it holds (and it must: it no longer heads the queue).
    self._release_waiting_head()
    for queue in (self._decoding, self._prefilling):
      if victim in queue:
        queue.remove(victim)
    self.manager.end(victim.rid)
    victim.preempted = True
    self._waiting.appendleft(victim)
    self.stats.preemptions += 1

  def _page_bucket(self, seqs: list[_Sequence]) -> int:
    if self._one_page_bucket:
      return self.max_pages
    pages = max(len(self.manager.block_table(s.rid)) for s in seqs)
    return buckets.bucket(pages, MIN_PAGE_BUCKET, self.max_pages)

  def _count_shape(self, batch: int, q_len: int, pages: int) -> None:
    """Counts a step shape the first time it is compiled or run."""
    shape = (batch, q_len, pages)
    if shape not in self._shapes:
      self._shapes.add(shape)
      self.stats.compiled_shapes += 1

  def _run(self, batch: int, q_len: int, pages: int,
           work: list[tuple[_Sequence, list[int], int]],
           kind: str | None = None) -> jax.Array:
    """Pads `work` (sequence, new tokens, start position) into one model call.

    Returns the logits `[batch, vocab]` of each row's last new token, on
    the device, computed (`step_parts.sample_tokens` moves to the host what
    it needs).
    """
    arrays = step_parts.pack_step(
        self.manager, batch, q_len, pages,
        [(s.rid, new, start) for s, new, start in work])
    self._count_shape(batch, q_len, pages)
    t0 = time.perf_counter()
    logits, self._kv = self.runner.step(self._kv, *arrays)
    logits.block_until_ready()  # the step's time, not its dispatch's
    elapsed = time.perf_counter() - t0
    if kind == "prefill":
      self.stats.prefill_s += elapsed
    elif kind == "decode":
      self.stats.decode_s += elapsed
    return logits
