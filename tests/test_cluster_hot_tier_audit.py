"""Audit of the P/D cluster's prefill-engine hot tiers: what its counters
and /metrics report.

Each test runs a session's turn 1 (its prompt and generated blocks end up in
the PE's hot tier, the PE keeping nothing in HBM) and then turn 2, whose
prefix the hot tier serves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.cluster import OutOfBlocksError, make_cluster
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from dualpath_jax.server import LocalEngineHandle
from dualpath_jax.transfer import DualPathConfig, MeshConfig
from storage.config import ColdTierConfig

BS = 4
CACHE = CacheConfig(block_size=BS, num_blocks=96)
ENGINE = EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=128)
HOT_BYTES = 1 << 20  # every block of these turns


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _cluster(tiny, tmp_path, mesh="1P2D"):
  return make_cluster(
      tiny, CACHE, ENGINE,
      ColdTierConfig(root=str(tmp_path), file_io_mode="default"),
      MeshConfig.parse(mesh), DualPathConfig(prefill_keeps_prefix=False),
      hot_tier_bytes=HOT_BYTES)


def _run(cluster, reqs):
  for r in reqs:
    cluster.submit(r)
  outs = {}
  while cluster.has_work():
    for out in cluster.step():
      outs[out.request.request_id] = out
  return outs


def _two_turns(cluster):
  """Turn 1 of session s; returns turn 2's request (its prefix hot)."""
  prompt = np.random.default_rng(0).integers(3, 256, size=21).tolist()
  first = _run(cluster, [TurnRequest("s#0", prompt, 5, session_id="s",
                                     stop_on_eos=False)])
  return TurnRequest("s#1", prompt + first["s#0"].generated_tokens + [7, 8, 9],
                     5, session_id="s", stop_on_eos=False)


def test_metrics_snapshot_reports_a_clusters_hot_hits(tiny, tmp_path):
  """/metrics' `prefix_cache_hit_tokens` had no "hot" key on a cluster: the
  server looked for one engine's `cold_tier.hot`, which the cluster's
  `ClusterColdTier` (with `hot_tiers`) does not have."""
  cluster = _cluster(tiny, tmp_path)
  try:
    _run(cluster, [_two_turns(cluster)])
    hot = cluster.stats.cached_tokens_by_tier["hot"]
    assert hot > 0
    snap = LocalEngineHandle(cluster).snapshot()
    assert snap["prefix_cache_hit_tokens"]["hot"] == hot
  finally:
    cluster.close()


def test_a_refused_write_back_is_counted_on_the_cluster(tiny, tmp_path):
  """A store refusing a decode engine's write-back was counted in that
  writer's own stats only: the cluster's `store_errors` stayed 0."""
  cluster = _cluster(tiny, tmp_path)

  def full(*_args, **_kwargs):
    raise OSError(28, "No space left on device")
  cluster.store.put_async = full
  try:
    out = _run(cluster, [TurnRequest("a", list(range(3, 24)), 5,
                                     stop_on_eos=False)])
    assert out["a"].finish_reason == "length"
    assert cluster.cold_tier.stats.store_errors == 1
    assert cluster.cold_tier.report()["store_errors"] == 1
    assert cluster.cold_tier.stats.written_blocks == 0
  finally:
    cluster.close()


def test_a_write_back_that_raises_still_releases_the_turns_blocks(
    tiny, tmp_path):
  """The decode engine's write-back raising (a device -> host copy or a
  hot-tier put failing) propagated out of the step with the finished turn
  already off the engine's running list and its blocks still held: no
  later abort could find them. The step still raises; the blocks are
  released, as one engine does."""
  cluster = _cluster(tiny, tmp_path)

  def broken(*_args, **_kwargs):
    raise RuntimeError("device -> host copy failed")
  for writer in cluster._writers.values():
    writer.write_back = broken
  try:
    cluster.submit(TurnRequest("a", list(range(3, 24)), 3, stop_on_eos=False))
    with pytest.raises(RuntimeError, match="copy failed"):
      while cluster.has_work():
        cluster.step()
    for w in cluster.decode_workers:
      assert "a" not in w.manager
      assert w.manager.pool.num_referenced == 0
  finally:
    cluster.close()


def _fail_decode_once(cluster, rid):
  """Makes the DE reservation of turn `rid` fail once, after its PE's
  (the placement's count off), while other turns run."""
  reserve = cluster._reserve_on_decode
  failed = []

  def flaky(turn, pe, de):
    if turn.rid == rid and not failed:
      failed.append(pe.name)
      pe.manager.end(turn.rid)
      raise OutOfBlocksError("forced")
    return reserve(turn, pe, de)
  cluster._reserve_on_decode = flaky
  return failed


def _other():
  return TurnRequest("other", list(range(30, 39)), 8, stop_on_eos=False)


def test_a_turn_retried_after_its_hot_load_counts_its_tiers_once(
    tiny, tmp_path):
  """A turn whose hot load happened, then retried: its hot tokens were
  counted at both attempts (twice its cached prompt), and its hot-loaded
  blocks again as resident at the retry."""
  cluster = _cluster(tiny, tmp_path)
  try:
    second = _two_turns(cluster)
    before = dict(cluster.stats.cached_tokens_by_tier)
    paths = dict(cluster.stats.path_blocks)
    failed = _fail_decode_once(cluster, second.request_id)
    out = _run(cluster, [_other(), second])[second.request_id]
    assert failed == ["P0"]
    cached = out.cached_prompt_tokens
    assert cached > 0
    by_tier = cluster.stats.cached_tokens_by_tier
    assert by_tier["hot"] - before["hot"] == cached
    assert sum(by_tier.values()) - sum(before.values()) == cached
    blocks = {k: v - paths[k] for k, v in cluster.stats.path_blocks.items()}
    assert blocks["hot"] == cached // BS and blocks["resident"] == 0
  finally:
    cluster.close()


def test_a_retry_on_another_prefill_engine_keeps_no_hot_credit(
    tiny, tmp_path):
  """On 2P1D a turn hot-loaded on P0, failed, then was placed on P1: P0's
  hot tokens were credited to P1's placement, which loaded none."""
  cluster = _cluster(tiny, tmp_path, "2P1D")
  try:
    second = _two_turns(cluster)
    owner = cluster.stats.placements.popitem()[0].split("->")[0]
    other_pe = next(n for n in ("P0", "P1") if n != owner)
    policy = cluster.policy
    failed = _fail_decode_once(cluster, second.request_id)

    def steer(demand, snap):  # to the hot PE first, the retry to the other
      placement = policy(demand, snap)
      if demand.turn_id == second.request_id:
        placement = dataclasses.replace(
            placement, prefill_engine=other_pe if failed else owner)
      return placement
    cluster.policy = steer
    before = dict(cluster.stats.cached_tokens_by_tier)
    out = _run(cluster, [_other(), second])[second.request_id]
    assert failed == [owner]
    assert cluster.prefill_workers[int(owner[1])].hot_io.stats.hot_loaded_tokens
    assert cluster.stats.placements[f"{other_pe}->D0"] == 1
    by_tier = cluster.stats.cached_tokens_by_tier
    assert by_tier["hot"] == before["hot"]  # P1 loaded nothing hot
    assert (sum(by_tier.values()) - sum(before.values()) ==
            out.cached_prompt_tokens)
  finally:
    cluster.close()
