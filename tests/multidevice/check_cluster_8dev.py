"""`PDCluster` with each engine on its own CPU device (8 forced devices).

Not collected by the main suite (the file name does not start with test_):
tests/test_cluster_multidevice.py runs it in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because the flag must be
set before JAX creates its CPU backend.

A single `Engine` (device 0) serves turn 1 and turn 2 of two sessions; a
1P2D dualpath cluster (P0 on device 0, D0 on 1, D1 on 2) starts from the
blocks the engine stored after turn 1 and must generate turn 2's tokens
exactly, with its pools on their own devices and blocks read through both a
prefill and a decode engine's NIC.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses

import jax
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
CACHE = CacheConfig(block_size=BS, num_blocks=64)
ENGINE = EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=128)


def _run(engine, reqs):
  for r in reqs:
    engine.submit(r)
  outs = {}
  while engine.has_work():
    for out in engine.step():
      outs[out.request.request_id] = out
  return outs


def _turn(session, index, prompt):
  return TurnRequest(f"{session}#{index}", prompt, 4, tenant="t",
                     session_id=session, turn_index=index, stop_on_eos=False)


def test_eight_devices():
  assert jax.device_count() == 8, "XLA_FLAGS did not reach the CPU backend"


@pytest.fixture(scope="module")
def turn_two(tmp_path_factory):
  """What every cluster case must reproduce, computed once: a single engine
  serves turn 1 and turn 2 of two sessions. Returns the model, turn 2's
  requests, the engine's outputs for them, and per session the block ids
  and blocks it stored after turn 1."""
  tiny = load_model("random:tiny-test")
  rng = np.random.default_rng(99)
  prompts = {"a": rng.integers(3, 256, size=26).tolist(),
             "b": rng.integers(3, 256, size=19).tolist()}
  ref = make_engine(tiny, CACHE, ENGINE, cold_tier=ColdTierConfig(
      root=str(tmp_path_factory.mktemp("ref")), file_io_mode="default"))
  first = _run(ref, [_turn(s, 0, p) for s, p in prompts.items()])
  ref.cold_tier.store.flush()
  second_reqs = [_turn(s, 1, p + first[f"{s}#0"].generated_tokens +
                       rng.integers(3, 256, size=7).tolist())
                 for s, p in prompts.items()]
  stored = {}
  for s, p in prompts.items():
    context = p + first[f"{s}#0"].generated_tokens
    ids = hash_chain(context[:(len(context) - 1) // BS * BS], BS,
                     model_fingerprint(tiny), "t")
    stored[s] = (ids, np.stack(ref.cold_tier.store.get(ids)))
  want = _run(ref, second_reqs)
  ref.close()
  return tiny, second_reqs, want, stored


@pytest.mark.parametrize("mesh,tp,handoff", [
    ("1P2D", "1", "device_put"), ("1P2D", "1", "ppermute"),
    ("1P2D", "2", "ppermute"), ("2P4D", "1", "device_put")])
def test_cluster_on_separate_devices(tmp_path, turn_two, mesh, tp, handoff):
  tiny, second_reqs, want, stored = turn_two
  cluster = make_cluster(
      tiny, CACHE, ENGINE, ColdTierConfig(root=str(tmp_path / "c"),
                                          file_io_mode="default"),
      MeshConfig.parse(mesh, tp),
      DualPathConfig(policy="dualpath", storage_nic_gbps=100.0,
                     handoff=handoff))
  try:
    assert not cluster.cluster_mesh.shared
    devices = {name: {d.id for d in w.kv.devices()}
               for name, w in cluster.workers.items()}
    width = int(tp)
    order = [e.name for e in cluster.cluster_mesh.engines]  # P first, then D
    assert devices == {name: set(range(i * width, (i + 1) * width))
                       for i, name in enumerate(order)}
    for s, (ids, blocks) in stored.items():
      cluster.store.put(ids, blocks, tenant="t", session=s)
    got = _run(cluster, second_reqs)
    for rid, out in want.items():
      assert got[rid].generated_tokens == out.generated_tokens, rid
      assert got[rid].cached_prompt_tokens > 0
    stats = cluster.stats
    assert stats.path_blocks["path1"] > 0 and stats.path_blocks["path2"] > 0
    pe_bytes = sum(stats.nic_bytes.get(w.name, 0)
                   for w in cluster.prefill_workers)
    de_bytes = sum(stats.nic_bytes.get(w.name, 0)
                   for w in cluster.decode_workers)
    assert pe_bytes > 0 and de_bytes > 0
    assert stats.moved_blocks > 0 and stats.kept_on_decode_blocks > 0
    for name, w in cluster.workers.items():  # pools stayed on their devices
      assert {d.id for d in w.kv.devices()} == devices[name]
  finally:
    cluster.close()


def _run_again_from_the_hot_tier(cluster, second_reqs, first, want):
  """Turn 2 again under new ids (its prefix now in the PE's hot tier):
  both runs generate the single engine's tokens."""
  again = [dataclasses.replace(r, request_id=r.request_id + "'")
           for r in second_reqs]
  got = _run(cluster, again)
  for r in second_reqs:
    assert first[r.request_id].generated_tokens == \
        want[r.request_id].generated_tokens
    assert got[r.request_id + "'"].generated_tokens == \
        want[r.request_id].generated_tokens


def test_hot_tier_on_a_tensor_parallel_prefill_engine(tmp_path, turn_two):
  """1P1D, each engine on 2 devices (heads sharded), the PE keeping nothing
  in HBM: turn 2 again (new ids) reads its prompt blocks back from the PE's
  hot tier into the sharded pool, which stays on its devices, and
  generates the same tokens."""
  tiny, second_reqs, want, stored = turn_two
  block_bytes = CACHE.bytes_per_block(tiny.config)
  cluster = make_cluster(
      tiny, CACHE, ENGINE, ColdTierConfig(root=str(tmp_path / "c"),
                                          file_io_mode="default"),
      MeshConfig.parse("1P1D", "2"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=100.0,
                     prefill_keeps_prefix=False),
      hot_tier_bytes=64 * block_bytes)
  try:
    pe = cluster.prefill_workers[0]
    sharding = pe.kv.sharding
    for s, (ids, blocks) in stored.items():
      cluster.store.put(ids, blocks, tenant="t", session=s)
    first = _run(cluster, second_reqs)
    assert cluster.stats.path_blocks["hot"] == 0
    _run_again_from_the_hot_tier(cluster, second_reqs, first, want)
    assert cluster.stats.path_blocks["hot"] == sum(
        len(r.prompt_tokens) // BS for r in second_reqs)
    assert pe.kv.sharding == sharding and len(pe.kv.devices()) == 2
  finally:
    cluster.close()


def test_pinned_host_hot_tier_with_engines_on_separate_devices(tmp_path,
                                                              turn_two):
  """1P2D, one device each, the PE keeping nothing in HBM and its hot tier
  in pinned_host memory of its device: the PE puts a prompt's blocks from
  its own pool (device -> pinned host), each DE the blocks with generated
  tokens from its pool on another device (through the host); turn 2 again
  (new ids) reads its whole prefix from the tier into the PE's pool and
  generates the same tokens. A tensor-parallel PE is refused."""
  tiny, second_reqs, want, stored = turn_two
  block_bytes = CACHE.bytes_per_block(tiny.config)
  cluster = make_cluster(
      tiny, CACHE, ENGINE, ColdTierConfig(root=str(tmp_path / "c"),
                                          file_io_mode="default"),
      MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=100.0,
                     prefill_keeps_prefix=False),
      hot_tier_bytes=64 * block_bytes, hot_tier_memory="pinned_host")
  try:
    pe = cluster.prefill_workers[0]
    (pe_device,) = pe.kv.devices()
    assert pe.hot_tier._blocks.device == pe_device
    assert all(w.kv.devices() != {pe_device} for w in cluster.decode_workers)
    for s, (ids, blocks) in stored.items():
      cluster.store.put(ids, blocks, tenant="t", session=s)
    first = _run(cluster, second_reqs)
    assert cluster.stats.path_blocks["hot"] == 0
    cluster.flush()
    for r in second_reqs:  # the DEs' puts: every block of turn 2's context,
      # generated tokens included, in the PE's tier with the bytes the DE
      # wrote to the store from its own host copy
      context = r.prompt_tokens + first[r.request_id].generated_tokens
      ids = hash_chain(context[:len(context) // BS * BS], BS,
                       model_fingerprint(tiny), "t")
      assert len(ids) > len(r.prompt_tokens) // BS
      hot = np.empty((len(ids), *pe.hot_tier.block_shape), np.float32)
      assert pe.hot_tier.read_run(ids, hot) == len(ids)
      np.testing.assert_array_equal(hot, np.stack(cluster.store.get(ids)))
    _run_again_from_the_hot_tier(cluster, second_reqs, first, want)
    assert cluster.stats.path_blocks["hot"] == sum(
        (len(r.prompt_tokens) - 1) // BS for r in second_reqs)
    assert pe.hot_tier._blocks._data.sharding.memory_kind == "pinned_host"
  finally:
    cluster.close()
  with pytest.raises(ValueError, match="pool on one device"):
    make_cluster(tiny, CACHE, ENGINE,
                 ColdTierConfig(root=str(tmp_path / "tp"),
                                file_io_mode="default"),
                 MeshConfig.parse("1P1D", "2"), DualPathConfig(),
                 hot_tier_bytes=64 * block_bytes,
                 hot_tier_memory="pinned_host")
  assert os.listdir(tmp_path / "tp" / "owners") == []


def test_pinned_blocks_and_a_pool_on_another_device():
  """The tier's gather reads into its own device's pool only; a pool on
  another device (a DE's) is put into it through the host, exactly."""
  from dualpath_jax.cache.hot_tier_memory import PinnedBlocks
  rng = np.random.default_rng(3)
  shape = (2, 2, 1, 4, 8)
  store = PinnedBlocks(4, shape, np.float32, jax.devices()[0])
  pool = jax.device_put(
      rng.standard_normal((2, 6, 2, 1, 4, 8)).astype(np.float32),
      jax.devices()[1])
  with pytest.raises(ValueError, match="moves blocks into a pool on that"):
    store.to_pool(pool, [0], [0])
  store.from_pool(pool, [5, 2], [3, 0])
  out = np.empty((2, *shape), np.float32)
  store.read([3, 0], out)
  np.testing.assert_array_equal(out, np.asarray(pool)[:, [5, 2]].swapaxes(0, 1))


@pytest.mark.parametrize("mesh,tp,handoff,match", [
    ("1P1D", "4", "auto", r"tp=4 does not divide the model's 2 KV heads"),
    ("1P1D", "2,1", "ppermute", "equal tp for a ppermute hand-off")])
def test_clusters_that_would_fail_serving_are_refused_when_built(
    tmp_path, turn_two, mesh, tp, handoff, match):
  """They used to be built, then fail at the first step (tp: a sharding
  error naming no flag; ppermute: after the first prefill, its pages held on
  both engines)."""
  tiny = turn_two[0]
  with pytest.raises(ValueError, match=match):
    make_cluster(tiny, CACHE, ENGINE,
                 ColdTierConfig(root=str(tmp_path / "c"),
                                file_io_mode="default"),
                 MeshConfig.parse(mesh, tp), DualPathConfig(handoff=handoff))
  # the store make_cluster opened was closed: its lease is gone
  assert os.listdir(tmp_path / "c" / "owners") == []
