"""Mesh split, hand-offs and both load paths on 8 separate CPU devices.

Not collected by the main suite (the file name does not start with test_):
tests/test_transfer_multidevice.py runs it in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, because the flag must be
set before JAX creates its CPU backend, which the main pytest process has
already done with one device.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.scheduler import ReadPath
from dualpath_jax.transfer import (DualPathConfig, DualPathLoader, Handoff,
                                   InMemoryBlockSource, LoadRequest,
                                   MeshConfig, StorageNic, build_cluster_mesh,
                                   pair_mesh)
from dualpath_jax.transfer.handoff import head_spec

PE, DE = ReadPath.PE_READ, ReadPath.DE_READ


def test_eight_devices():
  assert jax.device_count() == 8, "XLA_FLAGS did not reach the CPU backend"


def _ids(engine):
  return [d.id for d in engine.devices]


@pytest.mark.parametrize("spec,tp,expected", [
    ("1P2D", 1, [[0], [1], [2]]),
    ("1P2D", 2, [[0, 1], [2, 3], [4, 5]]),
    ("2P4D", 1, [[0], [1], [2], [3], [4], [5]]),
    ("1P1D", 4, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("1P2D", "2,3", [[0, 1], [2, 3, 4], [5, 6, 7]]),
])
def test_disjoint_split(spec, tp, expected):
  cluster = build_cluster_mesh(MeshConfig.parse(spec, tp))
  assert [_ids(e) for e in cluster.engines] == expected
  assert not cluster.shared


def test_shared_split_wraps_around():
  cluster = build_cluster_mesh(MeshConfig.parse("3P3D", tp=2))
  assert cluster.shared
  assert _ids(cluster.engine("D1")) == [0, 1]
  with pytest.raises(ValueError, match="share devices"):
    pair_mesh(cluster.engine("P0"), cluster.engine("D1"))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_handoff_methods_agree_bitwise(tp, dtype):
  cluster = build_cluster_mesh(MeshConfig(1, 1, tp, tp))
  src, dst = cluster.decode[0], cluster.prefill[0]
  rng = np.random.default_rng(tp)
  host = rng.standard_normal((5, 2, 4, 8, 16)).astype(dtype)
  x = jax.device_put(host, src.sharding(head_spec(5, 2)))
  for method in ("device_put", "ppermute"):
    y = Handoff(src, dst, method)(x)
    assert {d.id for d in y.devices()} == {d.id for d in dst.devices}
    assert y.sharding.is_equivalent_to(dst.sharding(head_spec(5, 2)), 5)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8),
                                  host.view(np.uint8))


def test_handoff_across_tp_sizes_uses_device_put():
  cluster = build_cluster_mesh(MeshConfig(1, 1, 2, 4))
  src, dst = cluster.decode[0], cluster.prefill[0]
  host = np.random.default_rng(0).standard_normal((3, 2, 4, 8, 16), np.float32)
  x = jax.device_put(host, src.sharding(head_spec(5, 2)))
  np.testing.assert_array_equal(np.asarray(Handoff(src, dst)(x)), host)
  with pytest.raises(ValueError, match="equal tp"):
    Handoff(src, dst, "ppermute")


@pytest.mark.parametrize("handoff", ["device_put", "ppermute"])
@pytest.mark.parametrize("tp", [1, 2])
def test_both_paths_deliver_exact_bytes_to_the_prefill_engine(handoff, tp):
  cluster = build_cluster_mesh(MeshConfig.parse("1P2D", tp))
  shape = (3, 2, 4, 8, 16)  # [L, 2, Hkv, P, D]
  rng = np.random.default_rng(7 + tp)
  ids = [f"b{i}".encode() for i in range(10)]
  source = InMemoryBlockSource({
      i: rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for i in ids})
  config = DualPathConfig(handoff=handoff, layers_in_flight=2)
  nics = {e.name: StorageNic(e.name, config.nic_bytes_per_s)
          for e in cluster.engines}
  loader = DualPathLoader(cluster, source, nics, config, shape,
                          ml_dtypes.bfloat16)
  pe = cluster.engine("P0")
  pool = jax.device_put(jnp.zeros((3, 16) + shape[1:], jnp.bfloat16),
                        pe.kv_pool_sharding())
  pages = list(rng.permutation(16)[:10])
  paths = [PE, DE, DE, PE, DE, DE, PE, DE, DE, DE]
  pool, report = loader.load(pool, LoadRequest(ids, pages, paths, "P0", "D1"))
  assert {d.id for d in pool.devices()} == {d.id for d in pe.devices}
  got = np.asarray(pool)
  for i, page in zip(ids, pages):
    np.testing.assert_array_equal(got[:, page].view(np.uint16),
                                  source.get([i])[0].view(np.uint16))
  assert (report.path1_blocks, report.path2_blocks) == (3, 7)
  assert report.nic_bytes == {"P0": 3 * loader.block_bytes,
                              "D1": 7 * loader.block_bytes}

  # After prefill, the KV moves PE -> DE by the same kind of collective.
  de = cluster.engine("D0")
  de_pool = jax.device_put(jnp.zeros((3, 12) + shape[1:], jnp.bfloat16),
                           de.kv_pool_sharding())
  de_pool = loader.move_blocks(pool, pages[:4], "P0", de_pool, [8, 9, 10, 11],
                               "D0")
  assert {d.id for d in de_pool.devices()} == {d.id for d in de.devices}
  np.testing.assert_array_equal(
      np.asarray(de_pool)[:, 8:12].view(np.uint16),
      got[:, pages[:4]].view(np.uint16))
  loader.close()
