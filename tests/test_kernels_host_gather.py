"""The one-kernel block gather (kernels/host_gather_triton.py) in Pallas
interpret mode on CPU, against numpy and against the per-block XLA gather.

CPU has the `pinned_host` memory kind, so the tier is where it would be on a
GPU; interpret mode checks the indexing, the skipped entries and that the
pool's other pages survive the in-place write, not the bus
(tests/gpu/test_host_gather_gpu.py reruns the cases compiled).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_copy
from kernels import host_gather_triton
from kernels import testing


def _gather(case: testing.GatherCase, **kw) -> np.ndarray:
  with warnings.catch_warnings():  # CPU cannot donate into a custom call
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    out = host_gather_triton.gather_to_device(
        case.pool, case.host_tier, case.src_slots, case.dst_pages,
        layer_start=case.layer_start, num_layers=case.num_layers, **kw)
  assert out.sharding.memory_kind == "device"
  return np.asarray(out)


@pytest.mark.parametrize("params", testing.HOST_GATHER_CASES, ids=str)
def test_moves_named_blocks_and_keeps_the_rest(params):
  case = testing.host_gather_case(params)
  assert case.host_tier.sharding.memory_kind == "pinned_host"
  got = _gather(case, interpret=True)
  np.testing.assert_array_equal(got, case.want)


def test_agrees_with_the_per_block_xla_gather():
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[1])
  ours = _gather(case, interpret=True)
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[1])  # undonated
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    xla = block_copy.gather_to_device(
        case.pool, case.host_tier, case.src_slots, case.dst_pages,
        layer_start=case.layer_start, num_layers=case.num_layers)
  np.testing.assert_array_equal(ours, np.asarray(xla))


def test_an_empty_list_leaves_the_pool():
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[0])
  before = np.asarray(case.pool)
  none = jnp.zeros((0,), jnp.int32)
  out = host_gather_triton.gather_to_device_core(
      case.pool, case.host_tier, none, none, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), before)


def test_bad_arguments_raise():
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[0])
  with pytest.raises(ValueError, match="equal length"):
    host_gather_triton.gather_to_device(
        case.pool, case.host_tier, case.src_slots, case.dst_pages[:2],
        interpret=True)
  with pytest.raises(ValueError, match="outside"):
    host_gather_triton.gather_to_device(
        case.pool, case.host_tier, case.src_slots, case.dst_pages,
        layer_start=2, num_layers=2, interpret=True)
  odd = jnp.zeros((2, 4, 2, 1, 12, 16), jnp.float32)  # 12-token pages
  tier = block_copy.allocate_host_tier((3, 2, 2, 1, 12, 16), jnp.float32)
  ids = jnp.asarray([0, 1], jnp.int32)
  with pytest.raises(ValueError, match="block_size to be a power of 2"):
    host_gather_triton.gather_to_device(odd, tier, ids, ids, interpret=True)
