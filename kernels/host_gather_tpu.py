"""Block gather host -> device on TPU: Pallas DMAs straight from host memory.

On TPU a Pallas kernel can take an operand that stays in host memory
(`memory_space=pl.HOST`) and DMA from it. This kernel moves a list of
hot-tier blocks into pool pages for one group of layers with one DMA per
block: hot-tier slot `src_slots[i]`, layers `[layer_start, layer_start +
num_layers)` (one contiguous run of host memory, the tier being
block-major), into pool page `dst_pages[i]` of those layers (a strided
destination: the pool is layer-major). All DMAs are started before the
first is waited for, so the DMA engines see the whole list at once; the
pool is aliased to the output, so pages not named keep their contents and
nothing is staged.

Same contract as `block_copy.gather_to_device` with `run_length=1`: slots
are clamped into the tier, entries with `dst_pages < 0` (padding) or past
the pool are skipped. Distinct destinations are the caller's job.

Tested on CPU in TPU interpret mode (`pltpu.InterpretParams`, which
simulates the DMAs and their semaphore), and lowered for TPU from CPU
(tests/test_kernels_lowering.py); it has not run on a TPU.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from kernels import block_copy
from kernels import interpret_callback_fix

HOST = pl.HOST
# TPU interpret mode takes no operand in host memory: jax 0.10.2 has no
# interpret rule for the HOST space (KeyError), and a jitted program with a
# pinned_host argument around an interpreted kernel fails to lower on 0.10.2
# and 0.11.2 (a `safe_zip` length mismatch over the results' memory kinds in
# `mlir.lower_jaxpr_to_fun`). So in interpret mode the tier must be in device memory
# (`gather_to_device` moves it there before its jit) and the kernel reads it
# as `pl.ANY`: interpret mode checks the DMAs, not where they read from.
INTERPRET_NEEDS_DEVICE_TIER = (
    "TPU interpret mode cannot read a host-memory tier; pass it in device "
    "memory (gather_to_device does so for interpret=True)")


def _gather_kernel(src_ref, dst_ref, host_ref, pool_in_ref, pool_ref, sem, *,
                   layer_start: int, num_layers: int):
  """Starts one DMA per listed block, then waits for each.

  src_ref, dst_ref  SMEM [n] int32 (scalar-prefetched)
  host_ref          HOST [num_slots, num_layers_all, 2, kv_heads, P, D]
  pool_ref          ANY  [num_layers_all, num_blocks, 2, kv_heads, P, D]
                    (aliased to pool_in_ref, which is never read)
  sem               one DMA semaphore, shared by all the copies
  """
  del pool_in_ref
  n = src_ref.shape[0]
  num_slots, num_blocks = host_ref.shape[0], pool_ref.shape[1]
  layers = pl.ds(layer_start, num_layers)

  def copy(i):
    slot = jnp.clip(src_ref[i], 0, num_slots - 1)
    page = jnp.clip(dst_ref[i], 0, num_blocks - 1)
    return pltpu.make_async_copy(host_ref.at[slot, layers],
                                 pool_ref.at[layers, page], sem)

  def valid(i):
    return (dst_ref[i] >= 0) & (dst_ref[i] < num_blocks)

  def start(i, carry):
    pl.when(valid(i))(lambda: copy(i).start())
    return carry

  def wait(i, carry):
    pl.when(valid(i))(lambda: copy(i).wait())
    return carry

  jax.lax.fori_loop(0, n, start, 0)
  jax.lax.fori_loop(0, n, wait, 0)


def gather_to_device_core(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32 hot-tier slots to read
    dst_pages: jax.Array,  # [n] int32 pool pages to fill (< 0: skip)
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # the updated pool
  """Traceable body of `gather_to_device`."""
  num_layers = pool.shape[0] - layer_start if num_layers is None else num_layers
  block_copy.check_arguments(pool, host_tier, dst_pages, src_slots,
                             layer_start, num_layers)
  n = src_slots.shape[0]
  if n == 0:
    return pool
  kernel = functools.partial(_gather_kernel, layer_start=layer_start,
                             num_layers=num_layers)
  if interpret and block_copy.memory_kind_of(
      host_tier, block_copy.DEVICE_MEMORY_KIND) != block_copy.DEVICE_MEMORY_KIND:
    raise ValueError(INTERPRET_NEEDS_DEVICE_TIER)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(1,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY if interpret else HOST),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.SemaphoreType.DMA(())],
      ),
      out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
      input_output_aliases={3: 0},  # operands: src, dst, host, pool
      interpret=interpret_callback_fix.tpu_interpret_arg(interpret),
      name="gather_host_blocks",
  )(src_slots.astype(jnp.int32), dst_pages.astype(jnp.int32), host_tier,
    pool)


@functools.partial(jax.jit, donate_argnums=(0,),
                   static_argnames=("layer_start", "num_layers", "interpret"))
def _gather_jit(pool, host_tier, src_slots, dst_pages, *, layer_start,
                num_layers, interpret):
  return gather_to_device_core(pool, host_tier, src_slots, dst_pages,
                               layer_start=layer_start, num_layers=num_layers,
                               interpret=interpret)


def gather_to_device(
    pool: jax.Array,  # [num_layers, num_blocks, 2, kv_heads, P, D] device
    host_tier: jax.Array,  # [num_slots, num_layers, 2, kv_heads, P, D] host
    src_slots: jax.Array,  # [n] int32
    dst_pages: jax.Array,  # [n] int32, < 0 skips
    *,
    layer_start: int = 0,
    num_layers: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # the pool, updated in place (donated)
  """Copies hot-tier blocks into pool pages for one group of layers, one
  DMA from host memory per block (jitted; the pool is donated)."""
  if interpret:  # see INTERPRET_NEEDS_DEVICE_TIER
    host_tier = jax.device_put(host_tier, jax.sharding.SingleDeviceSharding(
        list(host_tier.devices())[0], memory_kind=block_copy.DEVICE_MEMORY_KIND))
  return _gather_jit(pool, host_tier, src_slots, dst_pages,
                     layer_start=layer_start, num_layers=num_layers,
                     interpret=interpret)
