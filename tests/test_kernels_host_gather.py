"""The kernel block gathers host -> device in interpret mode on CPU, against
numpy and against the per-block XLA gather (`block_copy`):
`host_gather_triton` (one GPU kernel reading the pinned tier) and
`host_gather_tpu` (one TPU kernel, a DMA from host memory per block).

CPU has the `pinned_host` memory kind, so the Triton kernel reads the tier
where it would be on a GPU; TPU interpret mode cannot take a host-memory
operand, so there `gather_to_device` moves the tier to the device first.
Interpret mode checks the indexing, the skipped entries and that the pool's
other pages survive the in-place write, not the bus; the lowering tests
(tests/test_kernels_lowering.py) check that the compiled kernels read the
tier in host memory, and tests/gpu/test_host_gather_gpu.py reruns the
Triton cases compiled.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_copy
from kernels import host_gather_tpu
from kernels import host_gather_triton
from kernels import testing

GATHERS = {"triton": host_gather_triton, "tpu": host_gather_tpu}


def _gather(module, case: testing.GatherCase) -> np.ndarray:
  with warnings.catch_warnings():  # CPU cannot donate into a custom call
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    out = module.gather_to_device(
        case.pool, case.host_tier, case.src_slots, case.dst_pages,
        layer_start=case.layer_start, num_layers=case.num_layers,
        interpret=True)
  assert out.sharding.memory_kind == "device"
  return np.asarray(out)


@pytest.mark.parametrize("kernel", GATHERS)
@pytest.mark.parametrize("params", testing.HOST_GATHER_CASES, ids=str)
def test_moves_named_blocks_and_keeps_the_rest(kernel, params):
  case = testing.host_gather_case(params)
  assert case.host_tier.sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(_gather(GATHERS[kernel], case), case.want)


@pytest.mark.parametrize("kernel", GATHERS)
def test_agrees_with_the_per_block_xla_gather(kernel):
  params = testing.HOST_GATHER_CASES[1]
  ours = _gather(GATHERS[kernel], testing.host_gather_case(params))
  case = testing.host_gather_case(params)  # the same data, not donated
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    xla = block_copy.gather_to_device(
        case.pool, case.host_tier, case.src_slots, case.dst_pages,
        layer_start=case.layer_start, num_layers=case.num_layers,
        implementation="transfers")
  np.testing.assert_array_equal(ours, np.asarray(xla))


@pytest.mark.parametrize("kernel", GATHERS)
def test_an_empty_list_leaves_the_pool(kernel):
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[0])
  before = np.asarray(case.pool)
  none = jnp.zeros((0,), jnp.int32)
  out = GATHERS[kernel].gather_to_device(case.pool, case.host_tier, none,
                                         none, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), before)


@pytest.mark.parametrize("kernel", GATHERS)
def test_bad_arguments_raise(kernel):
  gather = GATHERS[kernel].gather_to_device
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[0])
  with pytest.raises(ValueError, match="equal length"):
    gather(case.pool, case.host_tier, case.src_slots, case.dst_pages[:2],
           interpret=True)
  with pytest.raises(ValueError, match="outside"):
    gather(case.pool, case.host_tier, case.src_slots, case.dst_pages,
           layer_start=2, num_layers=2, interpret=True)


def test_triton_gather_needs_power_of_2_pages():
  odd = jnp.zeros((2, 4, 2, 1, 12, 16), jnp.float32)  # 12-token pages
  tier = block_copy.allocate_host_tier((3, 2, 2, 1, 12, 16), jnp.float32)
  ids = jnp.asarray([0, 1], jnp.int32)
  with pytest.raises(ValueError, match="block_size to be a power of 2"):
    host_gather_triton.gather_to_device(odd, tier, ids, ids, interpret=True)


def test_tpu_interpret_refuses_a_host_tier_it_cannot_read():
  """Its traceable core, given the pinned tier in interpret mode, says so
  instead of failing inside JAX's lowering."""
  case = testing.host_gather_case(testing.HOST_GATHER_CASES[0])
  with pytest.raises(ValueError, match="interpret mode cannot read"):
    host_gather_tpu.gather_to_device_core(
        case.pool, case.host_tier, case.src_slots, case.dst_pages,
        interpret=True)
