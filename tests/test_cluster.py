"""`PDCluster` (1P2D on one CPU device): exact tokens whichever path loads.

A single `Engine` with a cold tier serves turn 1 of three sessions (its full
blocks land in the store) and then turns 2 and 3 (the reference tokens).
Each policy's cluster starts with empty pools (of NaN junk) and a fresh store holding the
blocks the engine stored after turn 1 (copied block by block), so
turn 2's prefixes come back from the cold tier by the policy's paths, and
turn 3's generated-token blocks come back from what the cluster's decode
engines wrote. The cluster must generate exactly the reference tokens, and
only `dualpath` may read through the decode engines' NICs.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading

import numpy as np
import pytest

from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.factory import make_engine, model_fingerprint
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from dualpath_jax.transfer import DualPathConfig, MeshConfig
from storage.config import ColdTierConfig

BS = 4
TINY_KV_HEADS, TINY_HEAD_DIM = 2, 16  # config.TINY
CACHE = CacheConfig(block_size=BS, num_blocks=96)
ENGINE = EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=128)
NEW_TOKENS = 5


def _cold(root):
  return ColdTierConfig(root=str(root), file_io_mode="default")


def _run(engine, reqs):
  for r in reqs:
    engine.submit(r)
  outs = {}
  while engine.has_work():
    for out in engine.step():
      outs[out.request.request_id] = out
  assert set(outs) == {r.request_id for r in reqs}
  return outs


def _turn(session, index, prompt):
  return TurnRequest(f"{session}#{index}", prompt, NEW_TOKENS, tenant="t",
                     session_id=session, turn_index=index, stop_on_eos=False)


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
  """(stored blocks after turn 1, [(turn 2/3 requests, reference outputs)])."""
  root = tmp_path_factory.mktemp("ref_store")
  rng = np.random.default_rng(1234)
  sessions = ["a", "b", "c"]
  prompts = {s: rng.integers(3, 256, size=n).tolist()
             for s, n in zip(sessions, (23, 30, 17))}
  engine = make_engine(tiny, CACHE, ENGINE, cold_tier=_cold(root))
  first = _run(engine, [_turn(s, 0, prompts[s]) for s in sessions])
  engine.cold_tier.store.flush()
  snapshot = {}  # session -> (block ids, blocks) the store holds after turn 1
  for s in sessions:
    context = prompts[s] + first[f"{s}#0"].generated_tokens
    ids = hash_chain(context[:(len(context) - 1) // BS * BS], BS,
                     model_fingerprint(tiny), "t")
    blocks = engine.cold_tier.store.get(ids)
    assert all(b is not None for b in blocks)
    snapshot[s] = (ids, np.stack(blocks))
  turns, outs, history = [], {}, dict(prompts)
  for index in (1, 2):
    prev = first if index == 1 else outs
    reqs = []
    for s in sessions:
      history[s] = (history[s] + prev[f"{s}#{index - 1}"].generated_tokens +
                    rng.integers(3, 256, size=6 + index).tolist())
      reqs.append(_turn(s, index, list(history[s])))
    turns.append(reqs)
    outs = _run(engine, reqs)
    engine.cold_tier.store.flush()
    turns[-1] = (reqs, outs)
  engine.close()
  return snapshot, turns


def _fill_pools_with_nan(cluster):
  """Every engine's pool as NaN junk, as if freed by sequences whose
  activations overflowed: slots a turn does not write must never reach it
  (`write_kv` zeroes the pages it starts, tables are padded with the row's
  own pages), whichever path brought its prefix."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  for worker in cluster.workers.values():
    worker.kv = jax.device_put(
        jnp.full(worker.kv.shape, jnp.nan, worker.kv.dtype), worker.kv.sharding)


@pytest.mark.parametrize("policy,keep", [
    ("single_path", True), ("dualpath", True), ("dualpath", False),
    ("oracle", True)])
def test_cluster_tokens_equal_single_engine(tiny, reference, tmp_path, policy,
                                            keep):
  snapshot, turns = reference
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P2D"),
      DualPathConfig(policy=policy, storage_nic_gbps=100.0,
                     prefill_keeps_prefix=keep))
  for session, (ids, blocks) in snapshot.items():  # turn 1, as the engine left it
    cluster.store.put(ids, blocks, tenant="t", session=session)
  _fill_pools_with_nan(cluster)
  try:
    for index, (reqs, want) in enumerate(turns):
      got = _run(cluster, [TurnRequest(**{**r.__dict__}) for r in reqs])
      for rid, out in want.items():
        assert got[rid].generated_tokens == out.generated_tokens, (policy, rid)
        assert got[rid].finish_reason == "length"
      loaded = cluster.cold_tier.stats.loaded_blocks
      if index == 0:  # pools empty: every hit came from the cold tier
        assert loaded >= sum((len(r.prompt_tokens) - 1) // BS - 2 for r in reqs)
        assert all(got[r.request_id].cached_prompt_tokens > 0 for r in reqs)
        after_first = loaded
      elif not keep:  # the PE kept nothing: turn 3's prefixes came back too
        assert loaded - after_first >= sum(
            (len(r.prompt_tokens) - 1) // BS - 2 for r in reqs)
        assert cluster.prefill_workers[0].manager.pool.num_cached == 0
      cluster.flush()
    stats = cluster.stats
    assert cluster.cold_tier.stats.missed_blocks == 0
    assert cluster.cold_tier.stats.written_blocks > 0
    assert stats.moved_blocks > 0 and stats.preemptions == 0
    de_bytes = sum(stats.nic_bytes.get(n, 0) for n in ("D0", "D1"))
    pe_bytes = stats.nic_bytes.get("P0", 0)
    nic = cluster.nic_stats()
    # path-2 blocks stay on the DE they passed through (not moved back)
    assert (stats.kept_on_decode_blocks > 0) == (policy == "dualpath")
    if policy == "single_path":
      assert stats.path_blocks["path2"] == 0 and de_bytes == 0
      assert stats.path_blocks["path1"] > 0 and pe_bytes > 0
      assert nic["D0"]["bytes"] == nic["D1"]["bytes"] == 0
    elif policy == "dualpath":
      assert stats.path_blocks["path2"] > 0 and de_bytes > 0
      assert stats.path_blocks["path1"] > 0 and pe_bytes > 0
      assert nic["D0"]["bytes"] + nic["D1"]["bytes"] == de_bytes
    else:  # oracle: loads free, no NIC charged
      assert stats.path_blocks["free"] > 0
      assert not stats.nic_bytes
      assert all(v["bytes"] == 0 for v in nic.values())
  finally:
    cluster.close()


def _seeded_cluster(tiny, reference, root, **dualpath):
  snapshot, turns = reference
  cluster = make_cluster(tiny, CACHE, ENGINE, _cold(root),
                         MeshConfig.parse("1P2D"), DualPathConfig(**dualpath))
  for session, (ids, blocks) in snapshot.items():
    cluster.store.put(ids, blocks, tenant="t", session=session)
  cluster.flush()
  cluster.warmup(64)
  return cluster, turns


def test_cluster_loads_of_many_turns_run_at_once_on_every_nic(
    tiny, reference, tmp_path):
  """Slow NICs: the three turns' loads are in flight together, all NICs busy."""
  block_bytes = 2 * 2 * TINY_KV_HEADS * BS * TINY_HEAD_DIM * 4  # 2 layers, f32
  cluster, turns = _seeded_cluster(
      tiny, reference, tmp_path, policy="dualpath",
      storage_nic_gbps=40 * block_bytes * 8 / 1e9,  # 40 blocks/s per NIC
      nic_burst_bytes=block_bytes)
  try:
    reqs, want = turns[0]
    got = _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
    for rid, out in want.items():
      assert got[rid].generated_tokens == out.generated_tokens
    stats = cluster.stats
    assert stats.max_loads_in_flight == 3
    assert set(stats.nic_bytes) == {"P0", "D0", "D1"}
    assert stats.load_wait_s > 0  # the engines had to wait for the NICs
    for nic in cluster.nic_stats().values():
      assert nic["planned_bytes"] == 0 and nic["queued_bytes"] == 0
    # Per-tier cached tokens (what /metrics reports) add up to the turns'.
    by_tier = stats.cached_tokens_by_tier
    assert by_tier["cold"] > 0 and by_tier["hot"] == 0
    assert sum(by_tier.values()) == sum(o.cached_prompt_tokens
                                        for o in got.values())
  finally:
    cluster.close()


def test_a_ready_turn_is_prefilled_before_one_still_loading(
    tiny, reference, tmp_path):
  """A turn placed later with nothing to load overtakes a loading one."""
  block_bytes = 2 * 2 * TINY_KV_HEADS * BS * TINY_HEAD_DIM * 4
  cluster, turns = _seeded_cluster(
      tiny, reference, tmp_path, policy="single_path",
      storage_nic_gbps=5 * block_bytes * 8 / 1e9,  # 5 blocks/s: ~2 s a turn
      nic_burst_bytes=block_bytes)
  try:
    loading = TurnRequest(**turns[0][0][0].__dict__)  # session a, turn 2
    fresh = _turn("z", 0, list(range(40, 60)))  # nothing stored
    cluster.submit(loading)
    cluster.step()  # places it: its load starts
    cluster.submit(fresh)
    outs = {}
    while cluster.has_work():
      for out in cluster.step():
        outs[out.request.request_id] = out
    assert outs[fresh.request_id].first_token_s < \
        outs[loading.request_id].first_token_s
    assert outs[loading.request_id].generated_tokens == \
        turns[0][1][loading.request_id].generated_tokens
  finally:
    cluster.close()


def test_cluster_interface_and_validation(tiny, tmp_path):
  cluster = make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path),
                         MeshConfig.parse("2P1D"),
                         DualPathConfig(policy="dualpath"))
  try:
    assert cluster.config.max_context == 128
    assert not cluster.has_work()
    with pytest.raises(ValueError, match="max_context"):
      cluster.submit(TurnRequest("x", [5] * 120, 20))
    with pytest.raises(ValueError, match="empty"):
      cluster.submit(TurnRequest("y", [], 2))
    prompt = np.random.default_rng(7).integers(3, 256, size=13).tolist()
    out = _run(cluster, [TurnRequest("z", prompt, 3, stop_on_eos=False)])["z"]
    assert len(out.generated_tokens) == 3
    assert out.first_token_s <= out.finish_s
    # the prefix cache is the prefill engines': one lookup for one turn (its
    # reservation on the DE is not another); pools summed over 1P2D
    stats = cluster.manager.stats
    assert stats["lookups"] == 1 and stats["query_tokens"] == len(prompt)
    assert cluster.manager.pool.num_blocks == 3 * CACHE.num_blocks
    assert stats["blocks_free"] == 3 * CACHE.num_blocks  # nothing referenced
    assert set(cluster.stats.as_dict()) >= {"prefill_tokens", "decode_tokens",
                                            "nic_bytes", "path_blocks"}
  finally:
    cluster.close()
  with pytest.raises(ValueError, match="cold tier"):
    from dualpath_jax.engine.cluster import PDCluster
    PDCluster(tiny, CACHE, ENGINE, None)


def test_a_block_missing_at_its_read_is_recomputed_with_those_after_it(
    tiny, reference, tmp_path):
  """A block the store lists at placement but does not serve when the load
  reads it (corrupt, or evicted by then: `get` gives None) ends the loaded
  run: it and the blocks after it are computed on the prefill engine, and
  the pages it would have filled (NaN junk here) are never read. Each
  session's third block is lost; the tokens are the single engine's."""
  snapshot, turns = reference
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=100.0))
  for session, (ids, blocks) in snapshot.items():
    cluster.store.put(ids, blocks, tenant="t", session=session)
  lost = {ids[2] for ids, _ in snapshot.values()}
  get = cluster.store.get

  def get_losing(ids, out=None):
    return [None if i in lost else b for i, b in zip(ids, get(ids, out=out))]

  cluster.store.get = get_losing
  _fill_pools_with_nan(cluster)
  try:
    reqs, want = turns[0]
    got = _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
    for rid, out in want.items():
      assert got[rid].generated_tokens == out.generated_tokens, rid
      assert got[rid].cached_prompt_tokens == 2 * BS, rid
    stats = cluster.cold_tier.stats
    assert stats.loaded_blocks == 2 * len(reqs)
    assert stats.missed_blocks == sum(len(ids) - 2
                                      for ids, _ in snapshot.values())
  finally:
    cluster.close()


def _engine_and_cluster_tokens(tiny, tmp_path, turns, *, engine_blocks,
                               cluster_blocks, **dualpath):
  """Runs `turns` (lists of requests, one list after the other) on a single
  engine and on a 1P2D cluster; returns both outputs and the cluster, whose
  every pool must be back to all-free."""
  cache = CacheConfig(block_size=BS, num_blocks=engine_blocks)
  engine = make_engine(tiny, cache, ENGINE, cold_tier=_cold(tmp_path / "e"))
  cluster = make_cluster(
      tiny, CacheConfig(block_size=BS, num_blocks=cluster_blocks), ENGINE,
      _cold(tmp_path / "c"), MeshConfig.parse("1P2D"),
      DualPathConfig(**dualpath))
  want, got = {}, {}
  try:
    for reqs in turns:
      want |= _run(engine, [TurnRequest(**r.__dict__) for r in reqs])
      engine.cold_tier.store.flush()
      got |= _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
      cluster.flush()
    for w in cluster.workers.values():
      assert w.manager.pool.num_free == cluster_blocks, w.name
      assert not w.manager.active_sequences, w.name
  finally:
    engine.close()
  return want, got, cluster


def test_a_turns_own_cached_prefix_is_not_counted_free_for_it(
    tiny, tmp_path, monkeypatch):
  """A turn's resident prefix, cached and unreferenced, counts as free on
  its PE, and the placement counted it again as needing no page: the turn
  was placed on a PE short of pages, and `step()` raised and lost it. Here
  P0 (14 pages) holds s#0's 4 blocks cached while C takes 5: 9 "free" for
  s#1's 10 blocks, 4 of them resident, leaves 5 for 6 new pages.

  A start that finds its pages gone now puts the turn back to wait, so the
  tokens alone no longer tell the miscount (they came out the same with
  `_snapshot`'s `taken` dropped): no start may find its pages gone."""
  from dualpath_jax.cache.block_pool import OutOfBlocksError
  from dualpath_jax.engine.cluster import PDCluster
  lost = []
  start = PDCluster._start_on_prefill  # pylint: disable=protected-access

  def recording_start(self, turn, *args, **kwargs):
    try:
      return start(self, turn, *args, **kwargs)
    except OutOfBlocksError:
      lost.append(turn.rid)
      raise

  monkeypatch.setattr(PDCluster, "_start_on_prefill", recording_start)
  rng = np.random.default_rng(0)
  p0 = rng.integers(3, 256, size=17).tolist()
  first = [TurnRequest("s#0", p0, 3, session_id="s", stop_on_eos=False)]
  engine = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=32),
                       ENGINE)
  p1 = p0 + _run(engine, first)["s#0"].generated_tokens
  p1 += rng.integers(3, 256, size=40 - len(p1)).tolist()
  second = [TurnRequest("C", rng.integers(3, 256, size=20).tolist(), 20,
                        session_id="c", stop_on_eos=False),
            TurnRequest("s#1", p1, 3, session_id="s", stop_on_eos=False)]
  want, got, cluster = _engine_and_cluster_tokens(
      tiny, tmp_path, [first, second], engine_blocks=32, cluster_blocks=14,
      policy="single_path")
  try:
    assert {k: v.generated_tokens for k, v in got.items()} == {
        k: v.generated_tokens for k, v in want.items()}
    assert lost == []  # every placement's page count held at its start
  finally:
    cluster.close()


def test_a_load_past_the_host_buffer_loads_what_fits(tiny, tmp_path):
  """A load of more blocks than an engine's host buffer holds raised out of
  `step()`, lost the turn and kept its PE pages. Now the blocks that fit are
  loaded and the rest recomputed: same tokens, every page back."""
  block_bytes = CACHE.bytes_per_block(tiny.config)
  p0 = np.random.default_rng(1).integers(3, 256, size=33).tolist()
  first = [_turn("s", 0, p0)]
  engine = make_engine(tiny, CACHE, ENGINE)
  p1 = p0 + _run(engine, first)["s#0"].generated_tokens + [5, 6, 7]
  want, got, cluster = _engine_and_cluster_tokens(
      tiny, tmp_path, [first, [_turn("s", 1, p1)]], engine_blocks=96,
      cluster_blocks=96, policy="single_path", prefill_keeps_prefix=False,
      host_buffer_bytes=3 * block_bytes)
  try:
    assert got["s#1"].generated_tokens == want["s#1"].generated_tokens
    assert cluster.cold_tier.stats.loaded_blocks == 3  # of 8 stored
    assert got["s#1"].cached_prompt_tokens == 3 * BS
  finally:
    cluster.close()


def test_a_host_buffer_holding_no_block_is_refused(tiny, tmp_path):
  with pytest.raises(ValueError, match="holds no block"):
    make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P1D"),
                 DualPathConfig(host_buffer_bytes=100))
  assert os.listdir(tmp_path / "owners") == []  # its store was closed


@pytest.mark.parametrize("failing", ["contains", "get"])
def test_a_failing_store_is_a_miss_and_the_cluster_serves_on(
    tiny, reference, tmp_path, monkeypatch, failing):
  """A store call that raises (a full disk, a damaged index) used to raise
  out of `step()` (the lookup at placement, or the load's read at install).
  Now the turn is recomputed: the reference's tokens, the error counted."""
  cluster, turns = _seeded_cluster(tiny, reference, tmp_path,
                                   policy="dualpath", storage_nic_gbps=100.0)

  def broken(*_args, **_kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(cluster.store, failing, broken)
  try:
    reqs, want = turns[0]
    got = _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
    for rid, out in want.items():
      assert got[rid].generated_tokens == out.generated_tokens, rid
    stats = cluster.cold_tier.stats
    assert stats.loaded_blocks == 0 and stats.store_errors >= len(reqs)
    monkeypatch.undo()
  finally:
    cluster.close()


def test_a_raising_hook_fails_its_turn_only_on_the_cluster(tiny, tmp_path):
  """A client's `on_token` that raises ends its own turn ("error", the
  exception attached); the other turn's tokens equal a single engine's;
  every pool is whole again. An abort from inside a hook sticks too."""
  rng = np.random.default_rng(7)
  pa, pb, pc = (rng.integers(3, 256, size=n).tolist() for n in (13, 18, 9))
  cluster = make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path),
                         MeshConfig.parse("1P2D"), DualPathConfig(policy="dualpath"))

  def boom(token):
    raise RuntimeError("client gone")
  calls = []

  def aborting(token):
    calls.append(token)
    if len(calls) == 2:
      assert cluster.abort("c")
  cluster.submit(TurnRequest("a", pa, NEW_TOKENS, stop_on_eos=False,
                             on_token=boom))
  cluster.submit(TurnRequest("b", pb, NEW_TOKENS, stop_on_eos=False))
  cluster.submit(TurnRequest("c", pc, NEW_TOKENS, stop_on_eos=False,
                             on_token=aborting))
  outs = {}
  while cluster.has_work():
    for out in cluster.step():
      outs[out.request.request_id] = out
  assert set(outs) == {"a", "b"} and len(calls) == 2
  assert outs["a"].finish_reason == "error"
  assert isinstance(outs["a"].error, RuntimeError)
  single = make_engine(tiny, CACHE, ENGINE)
  want = _run(single, [TurnRequest("b", pb, NEW_TOKENS, stop_on_eos=False)])
  assert outs["b"].generated_tokens == want["b"].generated_tokens
  for worker in cluster.workers.values():
    assert worker.manager.pool.num_referenced == 0
  cluster.close()


def test_prefill_rate_reaches_the_scheduler(tiny, tmp_path):
  """`prefill_tokens_per_s` is what the placement policies turn prefill
  queues into seconds with (decode engines keep an unlimited rate: their
  queue is tokens to generate, which the policies do not time)."""
  import math
  cluster = make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path),
                         MeshConfig.parse("2P1D"),
                         DualPathConfig(prefill_tokens_per_s=1500.0))
  rates = {e.name: e.compute_tokens_per_s
           for e in cluster._snapshot().engines}
  cluster.close()
  assert rates == {"P0": 1500.0, "P1": 1500.0, "D0": math.inf}
  for bad in (0.0, -1.0, float("nan"), True):
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
      DualPathConfig(prefill_tokens_per_s=bad)


BLOCK_BYTES = 2 * 2 * TINY_KV_HEADS * BS * TINY_HEAD_DIM * 4  # 2 layers, f32


@pytest.mark.parametrize("policy,hot_blocks,memory", [
    ("single_path", 256, "pageable"), ("dualpath", 256, "pageable"),
    ("dualpath", 3, "pageable"), ("dualpath", 256, "pinned_host"),
    ("dualpath", 3, "pinned_host")])
def test_a_prefill_engines_hot_tier_serves_the_next_turn_exactly(
    tiny, reference, tmp_path, policy, hot_blocks, memory):
  """The PE keeps nothing in its pool (`prefill_keeps_prefix=False`), so
  turn 3's prefix is turn 2's prompt, which the PE put in its hot tier when
  it handed turn 2 to a DE, plus the blocks with turn 2's generated tokens,
  which the DE put there (and in the store) when turn 2 ended. Turn 3 then
  reads its whole prefix from the hot tier (host -> HBM, no NIC), nothing
  from the store, and generates exactly the single engine's tokens. A
  3-block tier holds a sliver of that, evicting all the time: the rest
  comes from the store, and the tokens must not change either. The same
  with the tier in pinned_host memory (moved by kernels.block_copy)."""
  snapshot, turns = reference
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P2D"),
      DualPathConfig(policy=policy, storage_nic_gbps=100.0,
                     prefill_keeps_prefix=False),
      hot_tier_bytes=hot_blocks * BLOCK_BYTES, hot_tier_memory=memory)
  assert cluster.prefill_workers[0].hot_tier.memory == memory
  for session, (ids, blocks) in snapshot.items():
    cluster.store.put(ids, blocks, tenant="t", session=session)
  _fill_pools_with_nan(cluster)
  stats, cold = cluster.stats, cluster.cold_tier.stats
  try:
    reqs, want = turns[0]  # turn 2: every prefix from the cold tier
    got = _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
    assert {k: v.generated_tokens for k, v in got.items()} == {
        k: v.generated_tokens for k, v in want.items()}
    assert stats.path_blocks["hot"] == 0 and cold.hot_loaded_blocks == 0
    # Put by the PE at hand-off and by the DE at the end, read by no one:
    # the DE's put does not count the PE's blocks as reused.
    assert cluster.cold_tier.report()["hot_tier"]["promotions"] == 0
    cluster.flush()
    loaded_before = cold.loaded_blocks
    reqs, want = turns[1]  # turn 3
    # Each turn 3's loadable prefix: the leading blocks the store holds
    # (turn 2's context, written back by the DEs).
    stored = 0
    for r in reqs:
      chain = hash_chain(r.prompt_tokens[:(len(r.prompt_tokens) - 1)
                                         // BS * BS], BS,
                         model_fingerprint(tiny), "t")
      in_store = cluster.store.contains(chain)
      stored += next((i for i, p in enumerate(in_store) if not p),
                     len(in_store))
    nic_before = sum(stats.nic_bytes.values())
    got = _run(cluster, [TurnRequest(**r.__dict__) for r in reqs])
    assert {k: v.generated_tokens for k, v in got.items()} == {
        k: v.generated_tokens for k, v in want.items()}
    from_cold = cold.loaded_blocks - loaded_before
    report = cluster.cold_tier.report()["hot_tier"]
    assert report["engines"] == 1
    assert report["capacity_blocks"] == hot_blocks
    turn2_blocks = sum(len(r.prompt_tokens) // BS for r in turns[0][0])
    if hot_blocks == 256:  # every block of turn 2's contexts is hot
      assert stored > turn2_blocks  # more than the prompts: generated ones
      assert stats.path_blocks["hot"] == stored
      assert from_cold == 0 and sum(stats.nic_bytes.values()) == nic_before
      assert report["held_blocks"] > stored  # and turn 3's, now
    else:
      assert 0 < stats.path_blocks["hot"] <= hot_blocks * len(reqs)
      assert stats.path_blocks["hot"] + from_cold == stored
      assert report["evictions"] > 0
    assert cold.hot_loaded_blocks == stats.path_blocks["hot"]
    assert cold.hot_loaded_tokens == stats.path_blocks["hot"] * BS
    by_tier = stats.cached_tokens_by_tier
    assert by_tier["hot"] == cold.hot_loaded_tokens
    assert by_tier["device"] == 0  # the PE kept nothing in HBM
    # The hot blocks took no NIC: the NICs moved the cold blocks only.
    assert sum(stats.nic_bytes.values()) == cold.loaded_blocks * BLOCK_BYTES
    assert cluster.metrics_snapshot()["path_bytes"]["hot"] == (
        stats.path_blocks["hot"] * BLOCK_BYTES)
  finally:
    cluster.close()


def test_the_scheduler_sees_each_prefill_engines_hot_blocks(tiny, reference,
                                                            tmp_path):
  """On 2P1D only P1's hot tier holds a turn's prefix: its `TurnDemand`
  says so (resident blocks first, then hot), and the policy places the turn
  on P1, whose hot tier then serves it."""
  snapshot, turns = reference
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("2P1D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=1.0),
      hot_tier_bytes=64 * BLOCK_BYTES)
  try:
    ids, blocks = snapshot["a"]
    cluster.store.put(ids, blocks, tenant="t", session="a")
    cluster.flush()
    p1 = cluster.workers["P1"]
    p1.hot_tier.put(ids[:4], blocks[:4])
    req = TurnRequest(**turns[0][0][0].__dict__)  # session a, turn 2
    cluster.submit(req)
    demand, _, _ = cluster._demand(cluster._waiting[0])
    assert demand.hot_blocks == {"P0": 0, "P1": 4}
    assert demand.hit_blocks == len(ids)
    got = {}
    while cluster.has_work():
      got |= {o.request.request_id: o for o in cluster.step()}
  finally:
    cluster.close()
  assert got[req.request_id].generated_tokens == \
      turns[0][1][req.request_id].generated_tokens
  assert cluster.stats.placements == {"P1->D0": 1}
  assert cluster.stats.path_blocks["hot"] == 4
  assert cluster.stats.nic_bytes.get("P0", 0) == 0


@pytest.mark.parametrize("mesh", ["1P2D", "2P1D"])
def test_samples_of_one_prompt_are_prefilled_once_on_the_cluster(
    tiny, tmp_path, mesh):
  """Three turns of one prompt submitted together (n samples) and one of
  another: the later samples wait while the first prefills the prompt (the
  other turn goes ahead of them), then find its blocks resident on its
  prefill engine and compute only the last, partial block; greedy, every
  sample is the single engine's answer."""
  rng = np.random.default_rng(31)
  prompt = rng.integers(3, 256, size=38).tolist()
  other = rng.integers(3, 256, size=21).tolist()
  reqs = [TurnRequest(f"s{i}", prompt, 4, stop_on_eos=False)
          for i in range(3)] + [TurnRequest("o", other, 4, stop_on_eos=False)]
  engine = make_engine(tiny, CACHE, ENGINE)
  want = _run(engine, [TurnRequest(**r.__dict__) for r in reqs])
  cluster = make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path),
                         MeshConfig.parse(mesh),
                         DualPathConfig(policy="dualpath"))
  try:
    for r in reqs:
      cluster.submit(TurnRequest(**r.__dict__))
    cluster.step()  # s0 and o placed; s1 and s2 wait for s0's prefill
    assert [t.rid for t in cluster._waiting] == ["s1", "s2"]  # pylint: disable=protected-access
    got = {}
    while cluster.has_work():
      for out in cluster.step():
        got[out.request.request_id] = out
    assert {k: v.generated_tokens for k, v in got.items()} == {
        k: v.generated_tokens for k, v in want.items()}
    shared = (len(prompt) - 1) // BS * BS
    assert [got[f"s{i}"].cached_prompt_tokens for i in range(3)] == [
        0, shared, shared]
    assert cluster.stats.prefill_tokens == (
        len(prompt) + len(other) + 2 * (len(prompt) - shared))
    assert cluster.stats.shared_prefill_tokens == 2 * shared
  finally:
    cluster.close()


def test_a_cluster_without_prefill_sharing_prefills_each_sample(tiny,
                                                                tmp_path):
  prompt = np.random.default_rng(32).integers(3, 256, size=30).tolist()
  cluster = make_cluster(
      tiny, CACHE, EngineConfig(max_batch_size=4, max_prefill_chunk=16,
                                max_context=128, share_prefill=False),
      _cold(tmp_path), MeshConfig.parse("1P1D"),
      DualPathConfig(policy="dualpath"))
  try:
    outs = _run(cluster, [TurnRequest(f"s{i}", prompt, 3, stop_on_eos=False)
                          for i in range(2)])
    assert [o.cached_prompt_tokens for o in outs.values()] == [0, 0]
    assert cluster.stats.prefill_tokens == 2 * len(prompt)
    assert cluster.stats.shared_prefill_tokens == 0
  finally:
    cluster.close()


def test_a_sessions_next_turn_waits_for_its_previous_turns_write(tiny,
                                                                 tmp_path):
  """With the prefill engine keeping nothing (DualPath's setting) a session's
  next turn, sent as its previous one finished, was placed while that
  turn's write-back was still in flight: the store did not list the blocks
  yet and the turn computed them again. It waits for the write now and
  loads them; a second session's turn, not waiting, goes ahead meanwhile."""
  cluster = make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path),
                         MeshConfig.parse("1P2D"),
                         DualPathConfig(prefill_keeps_prefix=False))
  put = cluster.store.put_async

  timers = []

  def slow_put(*args, **kwargs):  # a write that starts 0.5 s later
    slow = cf.Future()
    timers.append(threading.Timer(
        0.5, lambda: slow.set_result(put(*args, **kwargs).result())))
    timers[-1].start()
    return slow
  cluster.store.put_async = slow_put
  try:
    prompt = np.random.default_rng(7).integers(3, 256, size=27).tolist()
    first = _run(cluster, [_turn("a", 0, prompt)])["a#0"]
    context = prompt + first.generated_tokens + [9, 10, 11]
    other = _turn("b", 0, list(range(40, 50)))
    got = _run(cluster, [_turn("a", 1, context), other])
    written = (len(prompt) + len(first.generated_tokens) - 1) // BS * BS
    assert got["a#1"].cached_prompt_tokens == written
    assert cluster.cold_tier.stats.loaded_blocks == written // BS
    assert got["b#0"].first_token_s <= got["a#1"].first_token_s
  finally:
    for timer in timers:
      timer.join()
    cluster.close()
