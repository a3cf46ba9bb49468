"""Block gather/scatter between the pinned-host tier and the device pool.

CPU has the `pinned_host` and `device` memory kinds, so the same code paths
run here as on a GPU; only the bandwidth is not representative.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_copy

SHAPE_TAIL = (2, 2, 16, 8)  # [2, kv_heads, block_size, head_dim]
# The gather's two paths: XLA transfers, and the one Pallas kernel that is
# its path on GPUs (interpret mode here).
GATHER_PATHS = block_copy.GATHER_IMPLEMENTATIONS


def _device_array(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _host_array(rng, shape, dtype):
  host = block_copy.allocate_host_tier(shape, dtype)
  data = _device_array(rng, shape, dtype)
  return jax.device_put(data, host.sharding)


@pytest.mark.parametrize("implementation", GATHER_PATHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layer_start,num_layers", [(0, 3), (1, 2)])
def test_gather_to_device_moves_named_blocks(dtype, layer_start, num_layers,
                                             implementation):
  rng = np.random.default_rng(11)
  pool = _device_array(rng, (3, 10) + SHAPE_TAIL, dtype)
  host = _host_array(rng, (7, 3) + SHAPE_TAIL, dtype)
  assert host.sharding.memory_kind == "pinned_host"
  src = jnp.asarray([5, 0, 3, 6], jnp.int32)
  dst = jnp.asarray([9, 2, -1, 4], jnp.int32)  # -1: padding, skipped
  want = np.asarray(pool, np.float32).copy()
  host_np = np.asarray(jax.device_get(host), np.float32)
  layers = slice(layer_start, layer_start + num_layers)
  for s, d in zip(np.asarray(src), np.asarray(dst)):
    if d >= 0:
      want[layers, d] = host_np[s, layers]
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    out = block_copy.gather_to_device(pool, host, src, dst,
                                      layer_start=layer_start,
                                      num_layers=num_layers,
                                      implementation=implementation)
  assert out.sharding.memory_kind == "device"
  np.testing.assert_array_equal(np.asarray(out, np.float32), want)


@pytest.mark.parametrize("implementation", GATHER_PATHS)
@pytest.mark.parametrize("run_length", [2, 3])
def test_gather_in_runs_moves_each_run_to_its_pages(run_length,
                                                    implementation):
  """Entry i names slots src[i] .. src[i] + R - 1, going to pages
  dst[i * R:(i + 1) * R]; skipped pages (< 0) inside a run, e.g. a
  session's last, partly filled run, leave the pool as it was. A run
  named past the tier's end is moved back to end there."""
  rng = np.random.default_rng(17 + run_length)
  layers, slots, pages = 3, 11, 14
  pool = _device_array(rng, (layers, pages) + SHAPE_TAIL, jnp.bfloat16)
  host = _host_array(rng, (slots, layers) + SHAPE_TAIL, jnp.bfloat16)
  starts = rng.choice(slots - run_length + 1, size=3, replace=False)
  starts[1] = slots - 1  # passes the end: moved back to slots - run_length
  dst = rng.permutation(pages)[:3 * run_length].astype(np.int32)
  dst[-1] = -1  # the last run's tail is not needed
  want = np.asarray(pool, np.float32).copy()
  host_np = np.asarray(jax.device_get(host), np.float32)
  for i, s in enumerate(np.minimum(starts, slots - run_length)):
    for j in range(run_length):
      if dst[i * run_length + j] >= 0:
        want[:, dst[i * run_length + j]] = host_np[s + j]
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    out = block_copy.gather_to_device(
        pool, host, jnp.asarray(starts, jnp.int32), jnp.asarray(dst),
        run_length=run_length, implementation=implementation)
  np.testing.assert_array_equal(np.asarray(out, np.float32), want)


def test_auto_gathers_with_the_kernel_on_gpus_only(monkeypatch):
  """"auto" is the one-kernel gather on a CUDA GPU where its tiles fit,
  the transfers elsewhere; an unknown name is refused."""
  tier = (9, 3) + SHAPE_TAIL
  assert block_copy.resolve_gather("auto", tier) == "transfers"  # CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert block_copy.resolve_gather("auto", tier) == "pallas_triton"
  assert block_copy.resolve_gather("auto", (9, 3, 2, 2, 12, 8)) == (
      "transfers")  # 12-token pages: no power-of-2 tile
  assert block_copy.resolve_gather("transfers", tier) == "transfers"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert block_copy.resolve_gather("auto", tier) == "transfers"
  with pytest.raises(ValueError, match="unknown gather implementation"):
    block_copy.resolve_gather("dma", tier)


def test_scatter_to_host_reuses_pinned_tier():
  rng = np.random.default_rng(12)
  pool = _device_array(rng, (2, 6) + SHAPE_TAIL, jnp.float32)
  host = _host_array(rng, (9, 2) + SHAPE_TAIL, jnp.float32)
  want = np.asarray(jax.device_get(host)).copy()
  pool_np = np.asarray(pool)
  # Padding (-1) before and after the valid entries: a padding entry must
  # write nothing, whatever source it is paired with.
  src = jnp.asarray([2, 1, 4, 5], jnp.int32)
  dst = jnp.asarray([-1, 8, 0, -1], jnp.int32)
  for s, d in zip(np.asarray(src), np.asarray(dst)):
    if d >= 0:
      want[d] = pool_np[:, s]
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    out = block_copy.scatter_to_host(host, pool, src, dst)
  assert out.sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(np.asarray(jax.device_get(out)), want)


def test_round_trip_inside_one_jit():
  """The traceable cores compose inside a caller's jitted step."""
  rng = np.random.default_rng(13)
  pool = _device_array(rng, (2, 5) + SHAPE_TAIL, jnp.float32)
  host = _host_array(rng, (4, 2) + SHAPE_TAIL, jnp.float32)
  pages = jnp.asarray([3, 1], jnp.int32)
  slots = jnp.asarray([2, 0], jnp.int32)

  @jax.jit
  def step(pool, host):
    host = block_copy.scatter_to_host_core(host, pool, pages, slots)
    scrambled = pool.at[:, pages].multiply(-3.0)
    return block_copy.gather_to_device_core(scrambled, host, slots, pages)

  out = step(pool, host)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(pool))


def test_bad_arguments_raise():
  rng = np.random.default_rng(14)
  pool = _device_array(rng, (2, 5) + SHAPE_TAIL, jnp.float32)
  host = _host_array(rng, (4, 2) + SHAPE_TAIL, jnp.float32)
  ids = jnp.asarray([0, 1], jnp.int32)
  with pytest.raises(ValueError, match="equal length"):
    block_copy.gather_to_device_core(pool, host, ids, ids[:1])
  with pytest.raises(ValueError, match="2 pool pages per hot-tier run"):
    block_copy.gather_to_device_core(pool, host, ids, ids, run_length=2)
  with pytest.raises(ValueError, match="run_length must be in"):
    block_copy.gather_to_device_core(pool, host, ids[:1],
                                     jnp.arange(5, dtype=jnp.int32),
                                     run_length=5)
  with pytest.raises(ValueError, match="layers"):
    block_copy.gather_to_device_core(pool, host, ids, ids, layer_start=1,
                                     num_layers=2)
  with pytest.raises(ValueError, match="dtype"):
    block_copy.gather_to_device_core(pool.astype(jnp.bfloat16), host, ids,
                                     ids)
  with pytest.raises(ValueError, match="differ in layers"):
    block_copy.gather_to_device_core(pool, _host_array(rng, (4, 3) + SHAPE_TAIL,
                                                       jnp.float32), ids, ids)
  with pytest.raises(ValueError, match="host tier shape"):
    block_copy.allocate_host_tier((2, 4, 3, 2, 16, 8), jnp.float32)


def test_freshly_allocated_tier_takes_scatter():
  rng = np.random.default_rng(15)
  pool = _device_array(rng, (2, 6) + SHAPE_TAIL, jnp.bfloat16)
  host = block_copy.allocate_host_tier((3, 2) + SHAPE_TAIL, jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    host = block_copy.scatter_to_host(host, pool, jnp.asarray([5], jnp.int32),
                                      jnp.asarray([1], jnp.int32))
  got = np.asarray(jax.device_get(host), np.float32)
  np.testing.assert_array_equal(got[1], np.asarray(pool, np.float32)[:, 5])
  assert not np.any(got[[0, 2]])  # untouched slots keep their zeros


def test_scatter_with_no_valid_destination_changes_nothing():
  rng = np.random.default_rng(16)
  pool = _device_array(rng, (2, 4) + SHAPE_TAIL, jnp.float32)
  host = _host_array(rng, (3, 2) + SHAPE_TAIL, jnp.float32)
  before = np.asarray(jax.device_get(host))
  out = block_copy.scatter_to_host(host, pool, jnp.asarray([1, 2], jnp.int32),
                                   jnp.asarray([-1, -1], jnp.int32))
  np.testing.assert_array_equal(np.asarray(jax.device_get(out)), before)


def test_scatter_refuses_ids_outside_the_pool_or_the_tier():
  """Eager calls used to clamp: slot 7 of a 3-slot tier overwrote slot 2,
  and page 9 of a 4-page pool copied page 3."""
  rng = np.random.default_rng(5)
  pool = _device_array(rng, (2, 4) + SHAPE_TAIL, jnp.float32)
  host = _host_array(rng, (3, 2) + SHAPE_TAIL, jnp.float32)
  before = np.asarray(jax.device_get(host))
  for src, dst, match in (([1], [7], "destination hot-tier slots"),
                          ([9], [0], "source pool pages"),
                          ([-1], [0], "source pool pages")):
    with pytest.raises(ValueError, match=match):
      block_copy.scatter_to_host(host, pool, jnp.asarray(src, jnp.int32),
                                 jnp.asarray(dst, jnp.int32))
  np.testing.assert_array_equal(np.asarray(jax.device_get(host)), before)
  # A negative destination still means "skip".
  out = block_copy.scatter_to_host(host, pool, jnp.asarray([1], jnp.int32),
                                   jnp.asarray([-1], jnp.int32))
  np.testing.assert_array_equal(np.asarray(jax.device_get(out)), before)


def test_gather_refuses_host_ids_outside_the_tier_or_the_pool():
  """Eager gathers clamped silently: slot 7 of a 3-slot tier read slot 2
  (another block's KV) and page 9 of a 4-page pool was dropped. Ids given
  on the host are checked now; ids already in a JAX array are not read
  back (the device would be waited on every call), and clamp as in jit."""
  rng = np.random.default_rng(6)
  pool = _device_array(rng, (2, 4) + SHAPE_TAIL, jnp.float32)
  host = _host_array(rng, (3, 2) + SHAPE_TAIL, jnp.float32)
  for src, dst, run, match in (
      ([7], [3], 1, "source hot-tier slots"),
      ([-1], [3], 1, "source hot-tier slots"),
      ([2], [0, 1], 2, r"starts of runs of 2\) must be in \[0, 2\)"),
      ([1], [9], 1, "destination pool pages"),
      (np.array([1]), np.array([4]), 1, "destination pool pages")):
    with pytest.raises(ValueError, match=match):
      block_copy.gather_to_device(pool.copy(), host, src, dst,
                                  run_length=run)
  out = block_copy.gather_to_device(pool.copy(), host, [2], [3])
  np.testing.assert_array_equal(np.asarray(out)[:, 3],
                                np.asarray(jax.device_get(host))[2])
  clamped = block_copy.gather_to_device(pool.copy(), host,
                                        jnp.asarray([7], jnp.int32),
                                        jnp.asarray([3], jnp.int32))
  np.testing.assert_array_equal(np.asarray(clamped)[:, 3],
                                np.asarray(jax.device_get(host))[2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_put_to_host_writes_device_blocks_into_named_slots(dtype):
  """Blocks already on the device (not pool pages) go into the named slots,
  skipped entries (-1, at either end) writing nothing; fetch_to_device
  reads them back block-major."""
  rng = np.random.default_rng(17)
  host = _host_array(rng, (7, 2) + SHAPE_TAIL, dtype)
  want = np.asarray(jax.device_get(host)).copy()
  blocks = _device_array(rng, (4, 2) + SHAPE_TAIL, dtype)
  dst = np.asarray([-1, 6, 0, -1], np.int32)
  for k, d in enumerate(dst):
    if d >= 0:
      want[d] = np.asarray(blocks)[k]
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    out = block_copy.put_to_host(host, blocks, dst)
  assert out.sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(np.asarray(jax.device_get(out)), want)
  slots = np.asarray([6, 3, 0], np.int32)
  fetched = block_copy.fetch_to_device(out, slots)
  assert fetched.sharding.memory_kind == "device"
  np.testing.assert_array_equal(np.asarray(fetched), want[slots])


def test_put_to_host_refuses_blocks_or_slots_that_do_not_fit():
  rng = np.random.default_rng(18)
  host = _host_array(rng, (3, 2) + SHAPE_TAIL, jnp.float32)
  before = np.asarray(jax.device_get(host))
  blocks = _device_array(rng, (2, 2) + SHAPE_TAIL, jnp.float32)
  with pytest.raises(ValueError, match="destination hot-tier slots"):
    block_copy.put_to_host(host, blocks, np.asarray([0, 3], np.int32))
  with pytest.raises(ValueError, match="are not blocks of the hot tier"):
    block_copy.put_to_host(host, blocks.astype(jnp.bfloat16),
                           np.asarray([0, 1], np.int32))
  with pytest.raises(ValueError, match="need as many destination slots"):
    block_copy.put_to_host(host, blocks, np.asarray([0, 1, 2], np.int32))
  np.testing.assert_array_equal(np.asarray(jax.device_get(host)), before)
  same = block_copy.put_to_host(host, blocks, np.asarray([-1, -1], np.int32))
  np.testing.assert_array_equal(np.asarray(jax.device_get(same)), before)
