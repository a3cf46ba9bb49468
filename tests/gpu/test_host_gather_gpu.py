"""The one-kernel block gather (kernels/host_gather_triton.py) compiled on a
CUDA GPU, reading the pinned tier over the bus.

Its own file, which scripts/gpu_check.sh runs in its own pytest process
after the other GPU tests: how XLA hands a `pinned_host` operand to a Pallas
kernel is undocumented, and should it crash the process, nothing else is
lost. Pools and tiers are random and every page is compared, so a page the
kernel skips, misplaces or reads from the wrong slot shows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import host_gather_triton
from kernels import testing

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a CUDA GPU; tests/test_kernels_host_gather.py runs the "
    "same cases in interpret mode on CPU")


@pytest.mark.parametrize(
    "params", testing.HOST_GATHER_CASES
    + [("bfloat16", 8, 16, 128, 8, 0, 8)], ids=str)  # 512 KiB blocks
def test_moves_named_blocks_on_gpu(params):
  case = testing.host_gather_case(params, num_blocks=64, num_slots=40)
  out = host_gather_triton.gather_to_device(
      case.pool, case.host_tier, case.src_slots, case.dst_pages,
      layer_start=case.layer_start, num_layers=case.num_layers)
  assert out.sharding.memory_kind == "device"
  np.testing.assert_array_equal(np.asarray(out), case.want)


def test_many_blocks_in_one_call():
  """Hundreds of scattered blocks (a returning session's prefix)."""
  params = ("bfloat16", 8, 16, 128, 4, 0, 4)
  case = testing.host_gather_case(params, num_blocks=1024, num_slots=1024)
  rng = np.random.default_rng(5)
  src = jnp.asarray(rng.permutation(1024)[:700], jnp.int32)
  dst = jnp.asarray(rng.permutation(1024)[:700], jnp.int32)
  tier = np.asarray(jax.device_get(case.host_tier))
  want = np.asarray(case.pool).copy()
  want[:, np.asarray(dst)] = np.swapaxes(tier[np.asarray(src)], 0, 1)
  out = host_gather_triton.gather_to_device(case.pool, case.host_tier, src,
                                            dst)
  np.testing.assert_array_equal(np.asarray(out), want)
