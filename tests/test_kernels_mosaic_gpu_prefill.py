"""The Mosaic GPU prefill kernel: interpret mode on CPU, and its CUDA lowering.

Mosaic GPU's interpret mode simulates SMEM, the TMA page copies and the
barriers on CPU and fills outputs and scratch with NaN first, so
`assert_matches` (finite everywhere, padding rows zero, within tolerance of
the reference) also proves every output element was written. The matmuls
run as dots on the SMEM tiles there (kernels/mosaic_gpu_ring.py); the
lowering tests lower the real `wgmma` kernel for CUDA on this CPU.
"""

from __future__ import annotations

import jax
from jax import export
import jax.numpy as jnp
import pytest

from kernels import prefill_mosaic_gpu
from kernels import testing
from kernels import tuning
from kernels.paged_attention import paged_attention
from kernels.paged_attention import resolve_implementation

S = jax.ShapeDtypeStruct


def _tiling(params):
  return testing.mosaic_tiling(params)


@pytest.mark.parametrize("params", testing.MOSAIC_PREFILL_CASES, ids=str)
def test_prefill_matches_reference(params):
  case = testing.prefill_case(params)
  out = prefill_mosaic_gpu.paged_prefill(
      *case.args(), case.kv_scales, tiling=_tiling(params), interpret=True)
  assert out.dtype == case.q.dtype and out.shape == case.q.shape
  testing.assert_matches(out, case)


def test_unmasked_steps_end_where_the_first_row_starts():
  """Query tiles whose first position lies one or two keys before a step
  boundary (62 and 63, with 64-key steps): the steps run without a mask
  must end exactly where the tile's first row starts. A step too many sees
  one or two future keys in a few rows, an error (9e-3) the 16-bit pools'
  general tolerance (2e-2) would pass, so this float16 case is held to the
  kernel's own error (~3e-4) with room: 3e-3."""
  case = testing.make_case(5, kv_lens=[102, 103], q_lens=[40, 40], q_len=40,
                           num_heads=8, num_kv_heads=2, head_dim=64,
                           block_size=16, dtype="float16", pages_per_seq=8)
  out = prefill_mosaic_gpu.paged_prefill(
      *case.args(), tiling=tuning.MosaicDecodeTiling(4, 1, 2), interpret=True)
  testing.assert_matches(out, case, rtol=3e-3)


def test_through_the_api_with_the_default_tiling_and_sm_scale():
  """implementation="pallas_mosaic_gpu" routes q_len > 1 here."""
  case = testing.make_case(81, kv_lens=[90, 40], q_lens=[30, 7], q_len=30,
                           num_heads=8, num_kv_heads=2, head_dim=64,
                           block_size=16, dtype="bfloat16")
  out = paged_attention(*case.args(), sm_scale=0.2,
                        implementation="pallas_mosaic_gpu")
  testing.assert_matches(out, case, testing.reference(case, sm_scale=0.2))


def test_one_token_per_block_for_a_64_head_group():
  case = testing.make_case(82, kv_lens=[20, 5], q_lens=[3, 2], q_len=3,
                           num_heads=64, num_kv_heads=1, head_dim=64,
                           block_size=16, dtype="bfloat16")
  out = prefill_mosaic_gpu.paged_prefill(
      *case.args(), tiling=tuning.MosaicDecodeTiling(4, 1, 2), interpret=True)
  testing.assert_matches(out, case)


def test_bad_tiling_and_unsupported_calls_raise():
  case = testing.make_case(83, kv_lens=[20], q_len=4, num_heads=4,
                           num_kv_heads=2, dtype="bfloat16")
  with pytest.raises(ValueError, match="num_splits"):
    prefill_mosaic_gpu.paged_prefill(
        *case.args(), tiling=tuning.MosaicDecodeTiling(4, 2), interpret=True)
  f32 = testing.make_case(84, kv_lens=[20], q_len=4, num_heads=4,
                          num_kv_heads=2, dtype="float32")
  with pytest.raises(ValueError, match="float32"):
    prefill_mosaic_gpu.paged_prefill(*f32.args(), interpret=True)
  int8 = testing.make_case(85, kv_lens=[20], q_len=4, num_heads=4,
                           num_kv_heads=2, dtype="int8")
  with pytest.raises(ValueError, match="consumers"):  # int8: one warpgroup
    prefill_mosaic_gpu.paged_prefill(
        *int8.args(), int8.kv_scales, interpret=True,
        tiling=tuning.MosaicDecodeTiling(4, 1, 2, consumers=2))
  with pytest.raises(ValueError, match="consumers"):
    prefill_mosaic_gpu.paged_prefill(
        *case.args(), interpret=True,
        tiling=tuning.MosaicDecodeTiling(4, 1, 2, consumers=3))
  big = testing.make_case(86, kv_lens=[20], q_len=4, num_heads=4,
                          num_kv_heads=2, head_dim=128, block_size=16,
                          dtype="bfloat16")
  with pytest.raises(ValueError, match="SMEM"):  # 2 x 16 KB + 4 x 64 KB
    prefill_mosaic_gpu.paged_prefill(
        *big.args(), interpret=True,
        tiling=tuning.MosaicDecodeTiling(8, 1, 4, consumers=2))


def test_auto_sends_bf16_prefill_to_mosaic_gpu_on_hopper(monkeypatch):
  from kernels import decode_mosaic_gpu
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for hopper in (True, False):
    monkeypatch.setattr(decode_mosaic_gpu, "is_hopper", lambda h=hopper: h)
    for block_size in (16, 32, 64, 128):
      for quantized in (False, True):
        got = resolve_implementation(
            "auto", q_len=9, head_dim=128, block_size=block_size,
            quantized=quantized, dtype="int8" if quantized else "bfloat16",
            group=4)
        mosaic = hopper and not quantized
        assert got == ("pallas_mosaic_gpu" if mosaic else "pallas_triton"), (
            hopper, block_size, quantized)
  # float32 pools: the Mosaic kernels take none.
  assert resolve_implementation("auto", q_len=9, head_dim=128, block_size=64,
                                dtype="float32", group=4) == "pallas_triton"


def _lower(args, tiling=None):
  def fn(*a):
    return prefill_mosaic_gpu.paged_prefill(*a, tiling=tiling)
  exported = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "mosaic_gpu_v2")])(*args)
  return exported.mlir_module()


def test_every_case_lowers_with_its_tiling():
  for params in testing.MOSAIC_PREFILL_CASES:
    heads, kv_heads, head_dim, block_size, dtype, q_len, kv_lens, _ = (
        params[:8])
    pages = max(-(-n // block_size) for n in kv_lens) + 1
    q_dtype = "bfloat16" if dtype == "int8" else dtype
    args = [S((len(kv_lens), q_len, heads, head_dim), q_dtype),
            S((40, 2, kv_heads, block_size, head_dim), dtype),
            S((len(kv_lens), pages), jnp.int32),
            S((len(kv_lens),), jnp.int32), S((len(kv_lens),), jnp.int32)]
    if dtype == "int8":
      args.append(S((40, 2, kv_heads), jnp.float32))
    assert "mosaic_gpu" in _lower(args, _tiling(params)), params


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", [
    (32, 8, 128, 16, "bfloat16"), (9, 3, 64, 64, "bfloat16"),
    (32, 8, 128, 256, "float16"), (32, 8, 128, 16, "int8")])
def test_default_tiling_lowers(heads, kv_heads, head_dim, block_size, dtype):
  q_dtype = "bfloat16" if dtype == "int8" else dtype
  args = [S((2, 512, heads, head_dim), q_dtype),
          S((300, 2, kv_heads, block_size, head_dim), dtype),
          S((2, 8192 // block_size), jnp.int32), S((2,), jnp.int32),
          S((2,), jnp.int32)]
  if dtype == "int8":
    args.append(S((300, 2, kv_heads), jnp.float32))
  assert "mosaic_gpu" in _lower(args)


def test_output_tile_reuses_the_rings_shared_memory():
  """As in the decode kernel: a 3-slot ring of 128-key bf16 steps at
  head_dim 128 lowers only because the float32 output tile takes the ring's
  bytes after the loop (208 KB; 240 KB beside it)."""
  tiling = tuning.MosaicDecodeTiling(pages_per_chunk=8, num_splits=1,
                                     num_stages=3)
  args = [S((2, 512, 32, 128), "bfloat16"),
          S((300, 2, 8, 16, 128), "bfloat16"),
          S((2, 512), jnp.int32), S((2,), jnp.int32), S((2,), jnp.int32)]
  assert "mosaic_gpu" in _lower(args, tiling)
