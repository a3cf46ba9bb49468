"""Audit of the P/D cluster's shared prefill (a waiting turn whose next block
a placed turn is prefilling is held back, `PDCluster._waits_for_a_shared_prefill`)
and of the scheduler's reachable blocks (`TurnDemand.reachable_blocks`).

The cluster tests run the tiny model on 2P1D: two samples of one prompt
submitted together.
"""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.scheduler import TurnDemand
from dualpath_jax.transfer import DualPathConfig, MeshConfig
from tests.test_cluster import (BLOCK_BYTES, BS, CACHE, ENGINE, NEW_TOKENS,
                                _cold, reference, tiny)  # noqa: F401 (fixtures)

# pylint: disable=protected-access


def _samples(prompt, n=2, tenant=""):
  return [TurnRequest(f"s{i}", list(prompt), 3, tenant=tenant,
                      stop_on_eos=False) for i in range(n)]


@pytest.mark.parametrize("hot_blocks", [0, 64])
def test_a_sample_waits_only_where_the_prefix_stays(tiny, tmp_path,
                                                    hot_blocks):
  """`prefill_keeps_prefix=False` (DualPath's setting) without a hot tier:
  the PE frees the prompt's blocks as it hands the turn to its DE, so a
  sample held for them found nothing, recomputed the whole prompt, and got
  its first token a whole prefill later than on the idle second PE. It must
  be placed at once. With a hot tier the blocks stay there (the move puts
  them in it): the sample waits and reads them hot."""
  prompt = np.random.default_rng(41).integers(3, 256, size=38).tolist()
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("2P1D"),
      DualPathConfig(policy="dualpath", prefill_keeps_prefix=False),
      hot_tier_bytes=hot_blocks * BLOCK_BYTES)
  try:
    for r in _samples(prompt):
      cluster.submit(r)
    cluster.step()
    if not hot_blocks:
      assert cluster.num_waiting == 0  # s1 went to the idle P1 at once
      assert cluster.stats.placements == {"P0->D0": 1, "P1->D0": 1}
    else:
      assert [t.rid for t in cluster._waiting] == ["s1"]
    got = {}
    while cluster.has_work():
      for out in cluster.step():
        got[out.request.request_id] = out
    assert got["s0"].generated_tokens == got["s1"].generated_tokens
    shared = (len(prompt) - 1) // BS * BS
    if not hot_blocks:
      assert got["s1"].cached_prompt_tokens == 0
      assert cluster.stats.shared_prefill_tokens == 0
    else:
      assert got["s1"].cached_prompt_tokens == shared
      assert cluster.stats.shared_prefill_tokens == shared
      assert cluster.stats.cached_tokens_by_tier["hot"] == shared
  finally:
    cluster.close()


def test_the_prefetcher_reads_nothing_for_a_held_sample(tiny, reference,
                                                        tmp_path):
  """Two samples of session a's turn 2, whose turn-1 context is only in the
  cold tier. s0 loads it on P0 and computes the rest; s1 is held for that
  and is then placed on P0, where the whole prefix is resident. The
  prefetcher read s1's stored prefix into the idle P1's hot tier (on P1's
  NIC and a DE's), which no turn ever read: NIC time, hot-tier room and
  pins spent for nothing."""
  snapshot, turns = reference
  reqs, want = turns[0]
  a2 = next(r for r in reqs if r.session_id == "a")
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("2P1D"),
      DualPathConfig(policy="dualpath", prefetch_blocks=4,
                     storage_nic_gbps=40 * BLOCK_BYTES * 8 / 1e9,
                     nic_burst_bytes=BLOCK_BYTES),
      hot_tier_bytes=64 * BLOCK_BYTES)
  ids, blocks = snapshot["a"]
  cluster.store.put(ids, blocks, tenant="t", session="a")
  cluster.flush()
  try:
    for i in range(2):  # no session id: no away-session prefetch
      cluster.submit(TurnRequest(f"s{i}", list(a2.prompt_tokens), NEW_TOKENS,
                                 tenant="t", stop_on_eos=False))
    cluster.step()
    assert [t.rid for t in cluster._waiting] == ["s1"]
    assert cluster.prefetcher.stats.read_blocks == 0
    got = {}
    while cluster.has_work():
      for out in cluster.step():
        got[out.request.request_id] = out
    for i in range(2):
      assert got[f"s{i}"].generated_tokens == \
          want[a2.request_id].generated_tokens
    shared = (len(a2.prompt_tokens) - 1) // BS * BS
    assert got["s1"].cached_prompt_tokens == shared
    assert cluster.stats.shared_prefill_tokens == shared - len(ids) * BS
    report = cluster.cold_tier.report()["prefetch"]
    assert report["read_blocks"] == 0 and report["unused_held_blocks"] == 0
  finally:
    cluster.close()


def test_hot_blocks_beyond_the_reachable_ones_are_refused():
  """An engine's hot blocks are among those it reaches (resident, hot, then
  stored): a demand saying otherwise was accepted, and its placement read
  blocks from the hot tier while charging them as recomputed."""
  with pytest.raises(ValueError, match="hot"):
    TurnDemand("t", new_tokens=2, hit_blocks=9, block_bytes=1 << 20,
               total_blocks=10, hot_blocks={"P1": 9},
               reachable_blocks={"P1": 4}, block_tokens=BS)
  # Consistent counts still pass (hot <= reachable, either below resident).
  TurnDemand("t", new_tokens=2, hit_blocks=9, block_bytes=1 << 20,
             total_blocks=10, resident_blocks={"P1": 3}, hot_blocks={"P1": 2},
             reachable_blocks={"P1": 4}, block_tokens=BS)


def test_a_released_sample_prefills_before_turns_that_came_after_it(
    tiny, tmp_path):
  """1P1D: s0 prefills a 60-token prompt in chunks of 16 while s1, its
  second sample, is held for it; y, a turn of another prompt that arrives
  after s1, is placed on the same prefill engine meanwhile. When s0 hands
  off, s1 is placed and has one partial block left to compute. It used to
  queue behind y (the prefill engine took turns by placement time), so its
  first token waited for y's whole prefill; by arrival it goes first."""
  prompt = np.random.default_rng(43).integers(3, 256, size=60).tolist()
  other = np.random.default_rng(44).integers(3, 256, size=60).tolist()
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P1D"),
      DualPathConfig(policy="dualpath"))
  try:
    s0, s1 = _samples(prompt)
    for r in (s0, s1):
      cluster.submit(r)
    cluster.step()  # s0 placed and prefilling, s1 held
    assert [t.rid for t in cluster._waiting] == ["s1"]
    cluster.submit(TurnRequest("y", other, 3, stop_on_eos=False))
    got = {}
    while cluster.has_work():
      for out in cluster.step():
        got[out.request.request_id] = out
    assert got["s1"].cached_prompt_tokens == (len(prompt) - 1) // BS * BS
    assert got["s1"].first_token_s < got["y"].first_token_s
    assert got["s0"].generated_tokens == got["s1"].generated_tokens
  finally:
    cluster.close()
