"""Path 1 / path 2 loads and the PE -> DE hand-off, in process.

Here every engine shares the process's first device (how one GPU or a CPU
runs 1P2D); the same checks on 8 separate CPU devices, with the ppermute
collective, run in tests/multidevice/ (spawned by test_transfer_multidevice).
Exactness is bitwise: the bytes in the prefill pool equal the source blocks.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dualpath_jax.scheduler import ManualClock, ReadPath
from dualpath_jax.transfer import (DualPathConfig, DualPathLoader,
                                   InMemoryBlockSource, LoadRequest,
                                   MeshConfig, StorageNic, build_cluster_mesh)

PE, DE = ReadPath.PE_READ, ReadPath.DE_READ


def _setup(rng, shape, dtype, num_blocks, config=None, nics=None):
  cluster = build_cluster_mesh(MeshConfig.parse("1P2D"), jax.devices()[:1])
  config = config or DualPathConfig()
  source = InMemoryBlockSource({
      f"b{i}".encode(): rng.standard_normal(shape).astype(dtype)
      for i in range(num_blocks)})
  nics = nics or {e.name: StorageNic(e.name, config.nic_bytes_per_s,
                                    config.nic_burst_bytes)
                  for e in cluster.engines}
  return cluster, source, DualPathLoader(cluster, source, nics, config, shape,
                                         dtype)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


@pytest.mark.parametrize("shape", [(2, 2, 2, 4, 8), (3, 2, 4, 16, 16)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("paths", [
    [PE] * 6, [DE] * 6, [PE, DE, DE, PE, ReadPath.FREE, DE],
    [ReadPath.RESIDENT, ReadPath.RESIDENT, DE, PE, DE, PE]])
def test_blocks_arrive_bit_exact_whatever_the_path(np_rng, shape, dtype, paths):
  _, source, loader = _setup(np_rng, shape, dtype, 6)
  ids = [f"b{i}".encode() for i in range(6)]
  pages = list(np_rng.permutation(20)[:6])
  pool = jnp.asarray(np_rng.standard_normal((shape[0], 20) + shape[1:])
                     .astype(dtype))
  before = np.asarray(pool)
  pool, report = loader.load(pool, LoadRequest(ids, pages, paths, "P0", "D1"))
  after = np.asarray(pool)
  for i, (page, path) in enumerate(zip(pages, paths)):
    want = before[:, page] if path == ReadPath.RESIDENT else source.get([ids[i]])[0]
    np.testing.assert_array_equal(_bits(after[:, page]), _bits(want))
  untouched = sorted(set(range(20)) - set(pages))
  np.testing.assert_array_equal(_bits(after[:, untouched]),
                                _bits(before[:, untouched]))
  assert report.path1_blocks == sum(p in (PE, ReadPath.FREE) for p in paths)
  assert report.path2_blocks == paths.count(DE)
  assert report.missing == []
  bb = loader.block_bytes
  assert report.nic_bytes.get("P0", 0) == paths.count(PE) * bb
  assert report.nic_bytes.get("D1", 0) == paths.count(DE) * bb
  loader.close()


def test_missing_blocks_are_reported_and_left_unwritten(np_rng):
  shape = (2, 2, 2, 4, 8)
  _, source, loader = _setup(np_rng, shape, np.float32, 3)
  ids = [b"b0", b"gone", b"b2", b"also-gone"]
  pool = jnp.asarray(np_rng.standard_normal((2, 8) + shape[1:]), jnp.float32)
  before = np.asarray(pool)
  pool, report = loader.load(
      pool, LoadRequest(ids, [1, 2, 3, 4], [PE, DE, DE, PE], "P0", "D0"))
  assert report.missing == [1, 3]
  after = np.asarray(pool)
  np.testing.assert_array_equal(after[:, [2, 4]], before[:, [2, 4]])
  np.testing.assert_array_equal(after[:, 1], source.get([b"b0"])[0])
  np.testing.assert_array_equal(after[:, 3], source.get([b"b2"])[0])
  loader.close()


@pytest.mark.parametrize("layers_in_flight", [1, 3])
def test_layers_arrive_one_by_one(np_rng, layers_in_flight):
  shape = (4, 2, 2, 4, 8)
  _, source, loader = _setup(
      np_rng, shape, np.float32, 4,
      DualPathConfig(layers_in_flight=layers_in_flight))
  ids = [f"b{i}".encode() for i in range(4)]
  req = LoadRequest(ids, [0, 1, 2, 3], [PE, DE, PE, DE], "P0", "D0")
  blocks = np.stack(source.get(ids), axis=1)  # [L, 4, ...]
  pool = jnp.full((4, 6) + shape[1:], -1.0, jnp.float32)
  stage = loader.read_to_host(req)
  seen = []
  for layer, pool in loader.iter_layers(pool, req, stage):
    now = np.asarray(pool)
    np.testing.assert_array_equal(now[:layer + 1, :4], blocks[:layer + 1])
    assert (now[layer + 1:] == -1.0).all()  # later layers not yet written
    seen.append(layer)
  assert seen == [0, 1, 2, 3]
  loader.close()


def test_each_path_reads_through_its_own_nic(np_rng):
  shape = (2, 2, 2, 4, 8)
  clock = ManualClock()
  waits = {}
  nics = {n: StorageNic(n, 1000.0, 1, clock=clock.now,
                        sleep=lambda s, n=n: waits.setdefault(n, []).append(s))
          for n in ("P0", "D0", "D1")}
  _, _, loader = _setup(np_rng, shape, np.float32, 5, nics=nics)
  bb = loader.block_bytes
  ids = [f"b{i}".encode() for i in range(5)]
  pool = jnp.zeros((2, 8) + shape[1:], jnp.float32)
  loader.load(pool, LoadRequest(ids, range(5), [PE, DE, DE, ReadPath.FREE, DE],
                                "P0", "D1"))
  assert nics["P0"].total_bytes == bb
  assert nics["D1"].total_bytes == 3 * bb
  assert nics["D0"].total_bytes == 0
  assert sum(waits["D1"]) == pytest.approx((3 * bb - 1) / 1000.0)
  loader.close()


def test_paths_read_concurrently():
  rng = np.random.default_rng(0)
  shape = (2, 2, 2, 16, 64)  # 32 KiB blocks
  bb = int(np.prod(shape)) * 4
  config = DualPathConfig(storage_nic_gbps=8 * bb / 0.1 / 1e9, nic_burst_bytes=1)
  _, _, loader = _setup(rng, shape, np.float32, 6, config)
  ids = [f"b{i}".encode() for i in range(6)]
  req = LoadRequest(ids, range(6), [PE, DE] * 3, "P0", "D0")
  t0 = time.monotonic()
  loader.read_to_host(req)
  elapsed = time.monotonic() - t0
  # 3 blocks per NIC at 10 blocks/s: 0.3 s in parallel, 0.6 s one after
  # other (the margin: another pytest worker may hold the other core).
  assert 0.28 <= elapsed < 0.55
  loader.close()


def test_move_blocks_pe_to_de_is_exact(np_rng):
  shape = (3, 2, 2, 4, 8)
  _, _, loader = _setup(np_rng, shape, np.float32, 0)
  src = jnp.asarray(np_rng.standard_normal((3, 10) + shape[1:]), jnp.float32)
  dst = jnp.asarray(np_rng.standard_normal((3, 12) + shape[1:]), jnp.float32)
  dst_before = np.asarray(dst)
  out = loader.move_blocks(src, [7, 2, 5], "P0", dst, [0, 11, 4], "D1")
  got = np.asarray(out)
  np.testing.assert_array_equal(got[:, [0, 11, 4]], np.asarray(src)[:, [7, 2, 5]])
  keep = [i for i in range(12) if i not in (0, 11, 4)]
  np.testing.assert_array_equal(got[:, keep], dst_before[:, keep])
  loader.close()


def test_bad_requests(np_rng):
  shape = (2, 2, 2, 4, 8)
  _, _, loader = _setup(np_rng, shape, np.float32, 4,
                        DualPathConfig(host_buffer_bytes=2 * 2 * 2 * 2 * 4 * 8 * 4))
  with pytest.raises(ValueError, match="equal length"):
    LoadRequest([b"b0"], [0, 1], [PE], "P0", "D0")
  with pytest.raises(ValueError, match="distinct"):
    LoadRequest([b"b0", b"b1"], [3, 3], [PE, PE], "P0", "D0")
  ids = [b"b0", b"b1", b"b2"]
  with pytest.raises(ValueError, match="host buffer"):
    loader.read_to_host(LoadRequest(ids, [0, 1, 2], [DE] * 3, "P0", "D0"))
  with pytest.raises(ValueError, match="no engine"):
    loader.load(jnp.zeros((2, 4) + shape[1:]),
                LoadRequest(ids[:1], [0], [PE], "P9", "D0"))
  with pytest.raises(ValueError, match="does not hold"):
    loader.load(jnp.zeros((3, 4) + shape[1:]),
                LoadRequest(ids[:1], [0], [PE], "P0", "D0"))
  with pytest.raises(ValueError, match="out of range"):
    loader.load(jnp.zeros((2, 4) + shape[1:]),
                LoadRequest(ids[:1], [9], [PE], "P0", "D0"))
  with pytest.raises(ValueError, match="StorageNic"):
    DualPathLoader(loader.cluster, loader.source, {}, DualPathConfig(), shape,
                   np.float32)
  loader.close()


def test_stager_scatters_layers_in_order_and_never_writes_padding(np_rng):
  """3 path-1 + 2 path-2 blocks (padded to 16-block buffers) into a pool of 40."""
  shape = (3, 2, 2, 4, 8)
  _, source, loader = _setup(np_rng, shape, np.float32, 5)
  ids = [f"b{i}".encode() for i in range(5)]
  pages = [7, 3, 39, 0, 21]
  req = LoadRequest(ids, pages, [PE, DE, PE, DE, PE], "P0", "D1")
  stage = loader.read_to_host_async(req).result()
  assert stage.path1.shape[1] == stage.path2.shape[1] == 16  # one bucket
  pool = jnp.asarray(np_rng.standard_normal((3, 40) + shape[1:]), jnp.float32)
  before = np.asarray(pool)
  stager = loader.stager(req, stage, pool.shape)
  with pytest.raises(ValueError, match="in order"):
    stager(1, pool)
  for layer in range(3):
    pool = stager(layer, pool)
  after = np.asarray(pool)
  for i, page in enumerate(pages):
    np.testing.assert_array_equal(after[:, page], source.get([ids[i]])[0])
  others = sorted(set(range(40)) - set(pages))
  np.testing.assert_array_equal(after[:, others], before[:, others])
  for nic in loader.nics.values():
    assert nic.planned_bytes() == 0
  loader.close()


def test_async_loads_on_one_nic_are_served_first_come_first_served(np_rng):
  """Two loads on P0's NIC: the first submitted finishes first."""
  shape = (2, 2, 2, 4, 8)
  config = DualPathConfig(storage_nic_gbps=8 * 1024 * 40 / 1e9,  # 40 blocks/s
                          nic_burst_bytes=1)
  _, source, loader = _setup(np_rng, shape, np.float32, 8, config)
  first = LoadRequest([f"b{i}".encode() for i in range(4)], [0, 1, 2, 3],
                      [PE] * 4, "P0", "D0")
  second = LoadRequest([f"b{i}".encode() for i in range(4, 8)], [4, 5, 6, 7],
                       [PE] * 4, "P0", "D0")
  done = []
  f1 = loader.read_to_host_async(first)
  f2 = loader.read_to_host_async(second)
  assert loader.nics["P0"].backlog_bytes() > 0  # planned at once
  f1.add_done_callback(lambda _: done.append(1))
  f2.add_done_callback(lambda _: done.append(2))
  f1.result(), f2.result()
  assert done == [1, 2]
  assert loader.nics["P0"].planned_bytes() == 0
  loader.close()


def test_path2_blocks_also_land_on_the_decode_engine(np_rng):
  """A `DecodeSink` writes path-2 blocks into DE pages on the way (-1: skip)."""
  from dualpath_jax.transfer.loader import DecodeSink
  shape = (3, 2, 2, 4, 8)
  _, source, loader = _setup(np_rng, shape, np.float32, 4)
  ids = [f"b{i}".encode() for i in range(4)]
  req = LoadRequest(ids, [5, 6, 7, 8], [DE, PE, DE, DE], "P0", "D0")
  stage = loader.read_to_host(req)
  pe_pool = jnp.zeros((3, 12) + shape[1:], jnp.float32)
  de_before = np_rng.standard_normal((3, 10) + shape[1:]).astype(np.float32)
  holder = {"kv": jnp.asarray(de_before)}
  # path-2 blocks in stage order are b0, b2, b3 (PE pages 5, 7, 8)
  assert list(stage.path2_pages) == [5, 7, 8]
  sink = DecodeSink(np.array([9, -1, 2], np.int32), lambda: holder["kv"],
                    lambda pool: holder.__setitem__("kv", pool))
  stager = loader.stager(req, stage, pe_pool.shape, sink)
  for layer in range(3):
    pe_pool = stager(layer, pe_pool)
  de_after, pe_after = np.asarray(holder["kv"]), np.asarray(pe_pool)
  want = {i: source.get([ids[i]])[0] for i in range(4)}
  np.testing.assert_array_equal(de_after[:, 9], want[0])
  np.testing.assert_array_equal(de_after[:, 2], want[3])
  untouched = [p for p in range(10) if p not in (9, 2)]
  np.testing.assert_array_equal(de_after[:, untouched], de_before[:, untouched])
  for i, page in enumerate([5, 6, 7, 8]):  # the PE got all four as usual
    np.testing.assert_array_equal(pe_after[:, page], want[i])
  loader.close()


def test_staging_rows_grow_to_a_power_of_two_and_are_reused():
  from dualpath_jax.transfer.source import StagingRows
  staging = StagingRows((2, 3), np.float32, min_rows=4)
  a = staging.rows(3)
  assert a.shape == (3, 2, 3) and a.dtype == np.float32
  a[:] = 7
  b = staging.rows(4)  # fits: the same memory, content kept
  assert np.shares_memory(a, b) and (b[:3] == 7).all()
  c = staging.rows(5)  # grows to 8 rows
  assert c.shape == (5, 2, 3) and not np.shares_memory(a, c)
  c[:] = 5
  d = staging.rows(8)  # fits: the same memory
  assert np.shares_memory(c, d) and (d[:5] == 5).all()
  assert not np.shares_memory(d, staging.rows(9))  # grows again
