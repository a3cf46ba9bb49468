"""The kernels lower for the hardware we lack: Triton IR for CUDA, Mosaic
for TPU, exported from this CPU with `jax.export`.

This catches what interpret mode cannot (Triton's power-of-2 shapes,
unsupported primitives, block-spec rules) before a GPU or TPU is at hand.
It stops short of the device compilers (Triton -> PTX, Mosaic -> TPU code);
`launch.kernel_sass` takes the Triton IR on to Hopper machine code where the
`triton` package is installed.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest

from kernels import decode_mosaic_tpu
from kernels import decode_triton
from kernels import lowering
from kernels import prefill_triton

S = jax.ShapeDtypeStruct
_CUSTOM_CALLS = lowering.CUSTOM_CALLS
_export = lowering.export_mlir


@pytest.mark.parametrize("dtype,block_size,head_dim", [
    ("bfloat16", 16, 64), ("float32", 256, 128), ("int8", 64, 128),
    ("int8", 256, 128)])
def test_decode_lowers_to_triton(dtype, block_size, head_dim):
  q_dtype = "bfloat16" if dtype == "int8" else dtype
  scales = S((50, 2, 3), jnp.float32) if dtype == "int8" else None
  args = (S((4, 9, head_dim), q_dtype), S((50, 2, 3, block_size, head_dim),
                                          dtype),
          S((4, 33), jnp.int32), S((4,), jnp.int32), scales)
  text = _export(lambda *a: decode_triton.paged_decode(*a), args, "cuda")
  assert "xla.gpu.triton" in text


def test_triton_ir_of_an_int8_decode_widens_the_pages_in_the_kernel():
  """The Triton IR `launch.kernel_sass` compiles: the int8 pages enter the
  kernel as int8 and are widened to bf16 there, ahead of the two dots; the
  lowering's hook is gone afterwards."""
  from jax._src.pallas.triton import lowering as triton_lowering
  hook = triton_lowering.lower_jaxpr_to_triton_module
  args = (S((4, 8, 128), jnp.bfloat16), S((50, 2, 2, 16, 128), jnp.int8),
          S((4, 33), jnp.int32), S((4,), jnp.int32),
          S((50, 2, 2), jnp.float32))
  for _ in range(2):  # a second export lowers (and captures) again
    modules = lowering.triton_modules(
        lambda *a: decode_triton.paged_decode(*a), args)
    assert len(modules) == 1
    ir = modules[0]
    assert "tt.func" in ir and ir.count("tt.dot") == 2
    assert ir.count("arith.sitofp") == 2 and "xi8> to tensor<" in ir
  assert triton_lowering.lower_jaxpr_to_triton_module is hook
  with pytest.raises(ValueError, match="no Pallas Triton kernel"):
    lowering.triton_modules(lambda x: x * 2, (S((4,), jnp.float32),))


def test_triton_ir_of_int8_queries_multiplies_int8_keys_as_stored():
  """`int8_query`: the first dot takes the int8 queries and the int8 K
  tile (no widening) and sums in int32; only V is widened, for the
  second."""
  args = (S((4, 8, 128), jnp.bfloat16), S((50, 2, 2, 16, 128), jnp.int8),
          S((4, 33), jnp.int32), S((4,), jnp.int32),
          S((50, 2, 2), jnp.float32))
  tiling = decode_triton.tuning.DecodeTiling(8, 2, num_stages=1,
                                             int8_query=True)
  ir, = lowering.triton_modules(
      lambda *a: decode_triton.paged_decode(*a, tiling=tiling), args)
  dots = [line for line in ir.splitlines() if "tt.dot" in line]
  assert len(dots) == 2, dots
  assert "xi8>" in dots[0] and "xi32>" in dots[0], dots[0]
  widened = [line for line in ir.splitlines() if "arith.sitofp" in line]
  # V's tile to bf16, and the int32 logits to float32; nothing else.
  assert len(widened) == 2 and sum("xi8> to" in w for w in widened) == 1, (
      widened)


@pytest.mark.parametrize("dtype,block_size,chunk,parts", [
    ("int8", 16, 8, 1), ("int8", 128, 1, 1), ("int8", 256, 1, 2),
    ("bfloat16", 16, 4, 1)])
def test_decode_of_transposed_v_lowers_to_triton(dtype, block_size, chunk,
                                                 parts):
  """`v_transposed` on each of the loader's three reads (several pages a
  step gathered element by element, one page, a part of one page): V's
  tile comes in as V^T, `[head_dim, tokens]`, which the pool as stored
  never produces."""
  q_dtype = "bfloat16" if dtype == "int8" else dtype
  scales = S((50, 2, 2), jnp.float32) if dtype == "int8" else None
  args = (S((4, 8, 64), q_dtype), S((50, 2, 2, block_size, 64), dtype),
          S((4, 33), jnp.int32), S((4,), jnp.int32), scales)
  tiling = decode_triton.tuning.DecodeTiling(chunk, 2, page_parts=parts)
  v_t_tile = f"64x{block_size * chunk // parts}x!tt.ptr"  # its load
  for transposed in (False, True):
    ir, = lowering.triton_modules(lambda *a: decode_triton.paged_decode(
        *a, tiling=tiling, v_transposed=transposed), args)  # pylint: disable=cell-var-from-loop
    assert ir.count("tt.dot") == 2
    assert (v_t_tile in ir) == transposed


@pytest.mark.parametrize("dtype,block_size", [
    ("bfloat16", 32), ("int8", 32), ("bfloat16", 256), ("float32", 16)])
def test_prefill_lowers_to_triton(dtype, block_size):
  q_dtype = "bfloat16" if dtype == "int8" else dtype
  scales = S((50, 2, 2), jnp.float32) if dtype == "int8" else None
  args = (S((2, 100, 8, 128), q_dtype), S((50, 2, 2, block_size, 128), dtype),
          S((2, 21), jnp.int32), S((2,), jnp.int32), S((2,), jnp.int32),
          scales)
  text = _export(lambda *a: prefill_triton.paged_prefill(*a), args, "cuda")
  assert "xla.gpu.triton" in text


@pytest.fixture
def tpu_chip(monkeypatch):
  """Mosaic TPU needs a chip description; this host's device (a CPU, or a
  GPU where scripts/gpu_check.sh runs this) has none. Lend it a v5e's."""
  try:
    from jax._src.pallas.mosaic import tpu_info
    chip = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
  except (ImportError, AttributeError) as e:
    pytest.skip(reason=f"this JAX has no private tpu_info registry to fake a "
                f"chip: {e}")
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                      lambda: chip)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_tpu_decode_lowers_to_mosaic(tpu_chip, dtype):
  del tpu_chip
  scales = S((60, 2, 8), jnp.float32) if dtype == "int8" else None
  args = (S((2, 32, 128), jnp.bfloat16), S((60, 2, 8, 16, 128), dtype),
          S((2, 37), jnp.int32), S((2,), jnp.int32), scales)
  text = _export(lambda *a: decode_mosaic_tpu.paged_decode_tpu(*a), args,
                 "tpu")
  assert "tpu_custom_call" in text


@pytest.mark.parametrize("direction", ["gather", "scatter"])
def test_block_copy_lowers_with_a_placement_per_block(direction):
  """For CUDA each moved block is annotated with its new memory space, the
  pattern XLA's host offloading turns into one DMA per block (the gather's
  `"transfers"` path, named: on a GPU `"auto"` is the one-kernel gather,
  whose lowering `test_one_kernel_gather_takes_the_pinned_tier_as_it_is`
  checks)."""
  from kernels import block_copy
  pool = jnp.zeros((4, 64, 2, 8, 16, 128), jnp.bfloat16)
  host = block_copy.allocate_host_tier((32, 4, 2, 8, 16, 128), jnp.bfloat16)
  ids = jnp.asarray([1, 2, 3], jnp.int32)
  if direction == "gather":
    fn, args = block_copy.gather_to_device_unchecked, (pool, host, ids, ids)
  else:
    fn = block_copy._scatter_fn(host.sharding, 0, None)  # pylint: disable=protected-access
    args = (host, pool, ids, ids)
  kwargs = dict(implementation="transfers") if direction == "gather" else {}
  text = fn.trace(*args, **kwargs).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("@annotate_device_placement(") >= len(ids)
  assert 'memory_kind = "pinned_host"' in text


def _lower_host_gather(gather, platform):
  """The lowered text of `gather` on a bf16 pool and a pinned tier, after
  checking that the tier (%arg1, in pinned_host memory) goes straight into
  the kernel's custom call, with no transfer before it."""
  from kernels import block_copy
  pool = jnp.zeros((4, 64, 2, 8, 16, 128), jnp.bfloat16)
  host = block_copy.allocate_host_tier((32, 4, 2, 8, 16, 128), jnp.bfloat16)
  ids = jnp.asarray([1, 2, 3], jnp.int32)
  target = (lowering.abstract_cuda_target() if platform == "cuda"
            else contextlib.nullcontext())
  with target:
    text = gather.trace(pool, host, ids, ids, layer_start=1, num_layers=2,
                        interpret=False).lower(
                            lowering_platforms=(platform,)).as_text()
  main = next(l for l in text.splitlines() if "func.func public @main" in l)
  assert 'memory_kind = "pinned_host"' in main.split("%arg2")[0]
  call = next(l for l in text.splitlines()
              if any(f"@{c}(" in l for c in _CUSTOM_CALLS))
  assert "%arg1" in call.split(")", 1)[0]  # the tier, not a moved copy
  assert "annotate_device_placement" not in text
  return call


def test_one_kernel_gather_takes_the_pinned_tier_as_it_is():
  """The Triton gather: one program per (block, layer, K/V and head)."""
  from kernels import host_gather_triton
  call = _lower_host_gather(host_gather_triton.gather_to_device, "cuda")
  assert "xla.gpu.triton" in call
  assert "grid_x = 3 : i32, grid_y = 2 : i32, grid_z = 16 : i32" in call


def test_tpu_gather_takes_the_host_tier_as_it_is(tpu_chip):
  """The TPU gather: one Mosaic kernel that DMAs from host memory."""
  del tpu_chip
  from kernels import host_gather_tpu
  call = _lower_host_gather(host_gather_tpu._gather_jit, "tpu")  # pylint: disable=protected-access
  assert "tpu_custom_call" in call
  kernel = _mosaic_tpu_module(call)
  dmas = [l for l in kernel.splitlines() if "tpu.enqueue_dma" in l]
  assert len(dmas) == 1, kernel  # in a loop over the list
  # From a host ref of one block's 2 layers into the pool (any memory).
  assert ("memref<2x2x8x16x128xbf16, #tpu.memory_space<host>>, "
          "memref<2x2x8x16x128xbf16, #tpu.memory_space<any>>") in dmas[0]


def _mosaic_tpu_module(call: str) -> str:
  """The Mosaic kernel inside a lowered `tpu_custom_call`, as MLIR text
  (the call carries it as base64 bytecode)."""
  import base64
  import re
  try:
    from jax._src.lib import tpu as tpu_dialect
    from jax._src.lib.mlir import ir
  except ImportError as e:
    pytest.skip(reason=f"this JAX has no private Mosaic TPU dialect: {e}")
  body = re.search(r"body\\22: \\22([A-Za-z0-9+/=]+)\\22", call).group(1)
  ctx = ir.Context()
  ctx.allow_unregistered_dialects = True  # its ops are "stable_mosaic.tpu.*"
  tpu_dialect.register_dialect(ctx)
  with ctx:
    return str(ir.Module.parse(base64.b64decode(body)))
