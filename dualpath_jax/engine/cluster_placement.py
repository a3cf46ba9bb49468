"""What the scheduler sees of a `PDCluster`: a turn's demand, the engines' state.

Placement is a pure decision (`scheduler.policies`: a `TurnDemand` and a
`ClusterSnapshot` in, a `Placement` out). These functions build its inputs
from the live engines, and answer the two questions the cluster asks before
it places a turn: does the turn wait for another's prefill, and how much of
a load fits the host buffers. They read pools, hot tiers and NIC counters;
they change nothing and do no I/O (the cluster asks the store which blocks
it holds and passes the answer in).
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

from dualpath_jax.engine.cluster_worker import ClusterTurn, ClusterWorker
from dualpath_jax.scheduler import (ClusterSnapshot, EngineState, ReadPath,
                                    TurnDemand)
from dualpath_jax.scheduler.state import DECODE, PREFILL


def turn_demand(turn: ClusterTurn, chain: Sequence[bytes],
                in_store: Sequence[bool],
                prefill_workers: Sequence[ClusterWorker], *, block_size: int,
                block_bytes: int) -> tuple[TurnDemand, dict[str, int]]:
  """The turn's `TurnDemand`, and per prefill engine how many of its resident
  blocks are cached and unreferenced (counted free there, taken back by the
  turn).

  `chain`: the ids of the turn's loadable blocks; `in_store[i]`: the store
  holds `chain[i]`. Per PE, its resident run is the chain's leading blocks in
  its pool; its hot run (with a hot tier) goes on through the blocks its hot
  tier holds; its reachable run goes on through the blocks the store holds.
  The turn's hits are the longest reachable run: the rest of it is another
  PE's only.
  """
  resident, hot, reachable, hits, taken = {}, {}, {}, 0, {}
  for pe in prefill_workers:
    pool = pe.manager.pool
    r = unreferenced = 0
    while r < len(chain) and (block := pool.lookup(chain[r])) is not None:
      unreferenced += pool.ref_count(block) == 0
      r += 1
    taken[pe.name] = unreferenced
    run = r
    if pe.hot_tier is not None:  # its hot tier's run after the resident one
      run += pe.hot_tier.leading_run(chain[r:])
      hot[pe.name] = run
    while run < len(chain) and in_store[run]:
      run += 1
    resident[pe.name] = r
    reachable[pe.name] = run
    hits = max(hits, run)
  target = turn.prefill_target
  demand = TurnDemand(
      turn_id=turn.rid, new_tokens=target - hits * block_size, hit_blocks=hits,
      block_bytes=block_bytes, total_blocks=math.ceil(target / block_size),
      decode_blocks=math.ceil((target + turn.req.max_new_tokens) / block_size),
      max_new_tokens=turn.req.max_new_tokens,
      resident_blocks={k: min(v, hits) for k, v in resident.items()},
      hot_blocks=hot, reachable_blocks=reachable, block_tokens=block_size)
  return demand, taken


def cluster_snapshot(workers: Sequence[ClusterWorker],
                     prefilling: Sequence[ClusterTurn], *, now: float,
                     max_batch_size: int, prefill_tokens_per_s: float,
                     taken: dict[str, int] | None = None) -> ClusterSnapshot:
  """The engines' state as the policies weigh it.

  `prefilling`: the turns placed on a PE and not yet handed to their DE;
  their tokens to generate count on that DE's queue already, and they count
  against its batch. `taken[name]`: blocks counted free on that engine that
  the turn being placed will take back itself (its resident prefix, cached
  and unreferenced: `begin` revives it, and it is no longer free for the
  pages the turn still needs). A full decode batch takes no more turns: its
  free blocks count as none.
  """
  headed = collections.Counter(t.decode.name for t in prefilling)
  headed_tokens = collections.Counter()
  for t in prefilling:
    headed_tokens[t.decode.name] += t.req.max_new_tokens
  engines = []
  for w in workers:
    free = w.manager.pool.num_free - (taken or {}).get(w.name, 0)
    if w.role == DECODE and \
        len(w.running) + headed[w.name] >= max_batch_size:
      free = 0
    engines.append(EngineState(
        name=w.name, role=w.role, nic_bytes_per_s=w.nic.bytes_per_s,
        nic_queued_bytes=w.nic.backlog_bytes(),
        queued_tokens=w.queued_tokens() + headed_tokens[w.name],
        compute_tokens_per_s=(prefill_tokens_per_s if w.role == PREFILL
                              else math.inf),
        free_hbm_blocks=free))
  return ClusterSnapshot(now, tuple(engines))


def prefilling_the_next_block(chain: Sequence[bytes], hits: int,
                              prefill_workers: Sequence[ClusterWorker], *,
                              prefill_keeps_prefix: bool) -> bool:
  """Whether the next block a turn would compute (`chain[hits]`, after its
  `hits` cached ones) is one a turn placed on a prefill engine is computing:
  the n samples of one prompt, agents forked from one history. Placed now,
  the turn would compute the prefix again; placed once that turn has
  prefilled, it finds the blocks resident on that engine (or in its hot
  tier). A prefill engine that keeps neither (`prefill_keeps_prefix`
  False, no hot tier) frees them as the turn moves to decode: no turn waits
  for it. A block id names its whole prefix and tenant, so one comparison
  says so."""
  if hits >= len(chain):
    return False
  for pe in prefill_workers:
    if not (prefill_keeps_prefix or pe.hot_tier is not None):
      continue  # it frees the blocks at the move to decode: none to find
    for other in pe.prefill_turns():
      if other.chain is not None and len(other.chain) > hits and \
          other.chain[hits] == chain[hits]:
        return True
  return False


def host_buffer_run(paths: Sequence[ReadPath | int], run: int,
                    buffer_blocks: int) -> int:
  """How many of a load's `run` leading blocks fit the engines' host
  buffers of `buffer_blocks` blocks, path 1's and path 2's each
  (`DualPathConfig.host_buffer_bytes`); the blocks after them are
  recomputed. Blocks past `paths` go by path 1."""
  counts = {1: 0, 2: 0}
  for i in range(run):
    path = ReadPath(paths[i]) if i < len(paths) else ReadPath.PE_READ
    group = 2 if path == ReadPath.DE_READ else 1
    if counts[group] == buffer_blocks:
      return i
    counts[group] += 1
  return run
