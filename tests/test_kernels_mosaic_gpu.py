"""The Mosaic GPU decode kernel: interpret mode on CPU, and its CUDA lowering.

Mosaic GPU's interpret mode (kernels.decode_mosaic_gpu.interpret_params)
simulates SMEM, the TMA page copies and the barriers on CPU, and fills
outputs and scratch buffers with NaN first, so the finiteness check of
`assert_matches` also proves every output element was written and no
un-copied SMEM was read. It checks the barrier arrival counts (a ring slot
whose copies do not match its barrier's arrivals raises). In interpret mode
the two matmuls are `lax.dot_general` on the SMEM tiles instead of `wgmma`
(see the kernel's docstring); the lowering tests below lower the real
`wgmma` kernel to Mosaic GPU for CUDA, on this CPU. The GPU module
tests/gpu/test_kernels_gpu.py reruns these cases compiled.
"""

from __future__ import annotations

import dataclasses

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import decode_mosaic_gpu
from kernels import paged_attention_mosaic_gpu
from kernels import testing
from kernels import tuning
from kernels.paged_attention import paged_attention
from kernels.paged_attention import resolve_implementation

S = jax.ShapeDtypeStruct


def _tiling(params):
  return testing.mosaic_tiling(params)


@pytest.mark.parametrize("params", testing.MOSAIC_DECODE_CASES, ids=str)
def test_decode_matches_reference(params):
  case = testing.decode_case(params)
  out = decode_mosaic_gpu.paged_decode(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      case.kv_scales, tiling=_tiling(params), interpret=True)
  assert out.dtype == case.q.dtype
  testing.assert_matches(out[:, None], case)


def test_int8_scales_are_per_page_and_head():
  """Scaling one page of one head by 4 scales only the logits of its tokens
  (K) or their values (V): the kernel must read each page's own scale."""
  case = testing.make_case(74, kv_lens=[100, 70], num_heads=4, num_kv_heads=2,
                           head_dim=64, block_size=16, dtype="int8")
  page = int(case.block_tables[0, 2])
  for kv in (0, 1):
    scales = case.kv_scales.at[page, kv, 1].multiply(4.0)
    changed = dataclasses.replace(case, kv_scales=scales)
    out = decode_mosaic_gpu.paged_decode(
        case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens, scales,
        tiling=tuning.MosaicDecodeTiling(4, 1), interpret=True)
    testing.assert_matches(out[:, None], changed)
    # The change is visible: heads 2-3 (KV head 1) of sequence 0 move far
    # beyond the tolerance (the rest are held to the changed reference, which
    # equals the unchanged one there, by the check above).
    ref = testing.reference(case)
    moved = testing.relative_error(out[0, 2:], ref[0, 0, 2:])
    assert moved > 10 * testing.tolerance(case), moved


def test_api_default_tiling_sm_scale_and_padding_rows():
  """Through `paged_attention`: the default tiling, an explicit sm_scale, a
  padding row (q_lens == 0 gives zeros)."""
  case = testing.make_case(71, kv_lens=[90, 33, 7], num_heads=8,
                           num_kv_heads=2, head_dim=128, block_size=32,
                           dtype="bfloat16")
  case = dataclasses.replace(case, q_lens=jnp.asarray([1, 0, 1], jnp.int32))
  out = paged_attention(*case.args(), sm_scale=0.3,
                        implementation="pallas_mosaic_gpu")
  testing.assert_matches(out, case, testing.reference(case, sm_scale=0.3))


def test_lengths_beyond_the_table_see_only_the_table():
  case = testing.make_case(72, kv_lens=[50, 64], num_heads=4, num_kv_heads=2,
                           block_size=16, dtype="bfloat16", pages_per_seq=4)
  case = dataclasses.replace(case, kv_lens=case.kv_lens + 30)
  out = decode_mosaic_gpu.paged_decode(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      tiling=tuning.MosaicDecodeTiling(4, 1), interpret=True)
  testing.assert_matches(out[:, None], case)


@pytest.mark.parametrize("what", ["float32", "int8", "head_dim",
                                  "tiling"])  # int8: without its scales
def test_unsupported_calls_raise(what):
  kw = dict(kv_lens=[10], num_heads=2, num_kv_heads=1, dtype="bfloat16")
  if what in ("float32", "int8"):
    kw["dtype"] = what
  if what == "head_dim":
    kw["head_dim"] = 96
  case = testing.make_case(73, **kw)
  match = {"float32": "float32", "int8": "int8", "head_dim": "head_dim",
           "tiling": "tiling"}[what]
  with pytest.raises(ValueError, match=match):
    tiling = (tuning.MosaicDecodeTiling(1, 1) if what == "tiling"
              else None)  # 16-token steps: below wgmma's 64
    decode_mosaic_gpu.paged_decode(
        case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
        None, tiling=tiling, interpret=True)


@pytest.mark.parametrize("q_len,head_dim,block_size,dtype,quantized,ok", [
    (1, 128, 16, "bfloat16", False, True),
    (1, 64, 256, "float16", False, True),
    (1, 128, 16, "float32", False, False),  # no f32 wgmma path
    (1, 128, 16, "int8", True, True),  # by name; "auto" keeps Triton
    (1, 128, 16, "int8", False, False),  # int8 without scales
    (1, 256, 16, "bfloat16", False, False),
    (7, 128, 16, "bfloat16", False, False),  # prefill: its own module
    (1, 128, 16, None, False, False),  # dtype unknown
])
def test_capability_predicate_and_auto_on_gpu(
    monkeypatch, q_len, head_dim, block_size, dtype, quantized, ok):
  """The kernel says which calls it takes; on a GPU "auto" gives it those
  calls on Hopper only, and everything else to Triton."""
  call = dict(q_len=q_len, head_dim=head_dim, block_size=block_size,
              quantized=quantized, dtype=dtype, group=3)
  assert decode_mosaic_gpu.supports(**call) is ok
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for hopper in (True, False):
    monkeypatch.setattr(decode_mosaic_gpu, "is_hopper", lambda h=hopper: h)
    got = resolve_implementation("auto", **call)
    # Decode or prefill, whichever kernel the call routes to; int8 pools go
    # to Triton (faster there).
    routed = paged_attention_mosaic_gpu.supports(**call)
    assert routed is (ok or q_len > 1)  # the prefill case: its kernel's
    mosaic = routed and hopper and not quantized
    want = "pallas_mosaic_gpu" if mosaic else "pallas_triton"
    assert got == want, (hopper, call)


def test_is_hopper_reads_the_device():
  assert not decode_mosaic_gpu.is_hopper()  # the CPU device
  fake = lambda cc, kind: type("D", (), dict(
      platform="gpu", compute_capability=cc, device_kind=kind))()
  assert decode_mosaic_gpu.is_hopper(fake("9.0", "NVIDIA H100 80GB HBM3"))
  assert not decode_mosaic_gpu.is_hopper(fake("8.0", "NVIDIA A100-SXM4"))
  assert not decode_mosaic_gpu.is_hopper(fake("10.0", "NVIDIA B200"))


def test_auto_on_cpu_is_unchanged():
  assert jax.default_backend() == "cpu"
  assert resolve_implementation("auto", q_len=1, head_dim=128,
                                dtype="bfloat16") == "xla_chunked"


def test_default_tiling_is_valid_across_shapes():
  for quantized in (False, True):
    for head_dim in (64, 128):
      for block_size in (16, 32, 64, 128, 256, 512):
        for pages in (1, 3, 64, 2048):
          tiling = tuning.mosaic_decode_tiling(
              batch=2, num_kv_heads=8, pages_per_seq=pages,
              block_size=block_size, head_dim=head_dim,
              itemsize=1 if quantized else 2, quantized=quantized)
          decode_mosaic_gpu.check_tiling(tiling, block_size, head_dim,
                                         quantized=quantized)


def _lower(args, tiling=None):
  def fn(q, kv, tables, lens, scales=None):
    return decode_mosaic_gpu.paged_decode(q, kv, tables, lens, scales,
                                          tiling=tiling)
  exported = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "mosaic_gpu_v2")])(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,pages,dtype", [
    (9, 3, 64, 16, 33, "bfloat16"),  # SmolLM2 9:3
    (32, 8, 128, 16, 257, "bfloat16"),  # Llama-3-8B, 4 pages a step
    (32, 8, 128, 64, 65, "float16"),
    (8, 2, 128, 256, 5, "bfloat16"),  # pages read in parts
    (64, 1, 64, 32, 3, "bfloat16"),  # a 64-row group, short table
    (4, 4, 128, 128, 9, "bfloat16"),  # MHA
    (9, 3, 64, 16, 33, "int8"),  # int8: scales per page, 8 pages a step
    (32, 8, 128, 16, 257, "int8"),
    (8, 2, 128, 256, 5, "int8"),  # pages read in parts
])
def test_decode_lowers_to_mosaic_gpu(heads, kv_heads, head_dim, block_size,
                                     pages, dtype):
  """The wgmma kernel (not the interpret variant) through Mosaic GPU's
  lowering, layout checks included, for CUDA; stops short of ptxas."""
  q_dtype = "bfloat16" if dtype == "int8" else dtype
  args = (S((4, heads, head_dim), q_dtype),
          S((50, 2, kv_heads, block_size, head_dim), dtype),
          S((4, pages), jnp.int32), S((4,), jnp.int32))
  if dtype == "int8":
    args += (S((50, 2, kv_heads), jnp.float32),)
  text = _lower(args)
  assert "mosaic_gpu" in text


def test_every_case_lowers_with_its_tiling():
  for params in testing.MOSAIC_DECODE_CASES:
    heads, kv_heads, head_dim, block_size, dtype, kv_lens = params[:6]
    pages = max(-(-n // block_size) for n in kv_lens) + 1
    q_dtype = "bfloat16" if dtype == "int8" else dtype
    args = (S((len(kv_lens), heads, head_dim), q_dtype),
            S((40, 2, kv_heads, block_size, head_dim), dtype),
            S((len(kv_lens), pages), jnp.int32),
            S((len(kv_lens),), jnp.int32))
    if dtype == "int8":
      args += (S((40, 2, kv_heads), jnp.float32),)
    assert "mosaic_gpu" in _lower(args, _tiling(params))


@pytest.mark.parametrize("batch,block_size,pages", [(64, 16, 256),
                                                      (4, 64, 512)])
def test_converting_copier_fits_beside_its_int8_ring(batch, block_size,
                                                    pages):
  """The benchmark's int8 decode shapes (Llama-3-8B heads, 4k and 32k):
  the tiling with a converting copier (two bf16 tile pairs and their
  scales) fits the SMEM budget beside a ring of at least 2 slots, no
  deeper than its one-warpgroup twin's deep ring, and lowers with its
  barriers; the default is one warpgroup on 2 slots."""
  shape = dict(batch=batch, num_kv_heads=8, pages_per_seq=pages,
               block_size=block_size, head_dim=128, itemsize=1,
               quantized=True)
  default = tuning.mosaic_decode_tiling(**shape)
  assert not default.copy_warpgroup and default.num_stages == 2
  tiling = tuning.mosaic_decode_tiling(**shape, copy_warpgroup=True)
  deep = tuning.mosaic_deep_ring_tiling(**shape,
                                  num_cores=tuning.DEFAULT_NUM_CORES)
  assert tiling == tuning.with_copy_warpgroup(deep, block_size=block_size,
                                              head_dim=128, quantized=True)
  assert tiling.copy_warpgroup and 2 <= tiling.num_stages <= deep.num_stages
  decode_mosaic_gpu.check_tiling(tiling, block_size, 128, quantized=True)
  args = (S((batch, 32, 128), "bfloat16"),
          S((300, 2, 8, block_size, 128), "int8"),
          S((batch, pages), jnp.int32), S((batch,), jnp.int32),
          S((300, 2, 8), jnp.float32))
  assert "mosaic_gpu" in _lower(args, tiling)


def test_output_tile_reuses_the_rings_shared_memory():
  """The float32 output tile is staged in SMEM the loop's ring has left:
  a 3-slot ring of 128-token bf16 steps at head_dim 128 (208 KB with the
  query tile) lowers, which it could not beside the output tile (240 KB,
  past the H100's 227 KB per block)."""
  tiling = tuning.MosaicDecodeTiling(pages_per_chunk=8, num_splits=2,
                                     num_stages=3)
  decode_mosaic_gpu.check_tiling(tiling, block_size=16, head_dim=128)
  assert tuning.mosaic_smem_bytes(128, 128, 3) <= decode_mosaic_gpu.SMEM_BUDGET
  assert (tuning.mosaic_smem_bytes(128, 128, 3) + 64 * 128 * 4
          > decode_mosaic_gpu.SMEM_BUDGET)  # the two scopes' sum would not fit
  args = (S((4, 32, 128), "bfloat16"), S((300, 2, 8, 16, 128), "bfloat16"),
          S((4, 64), jnp.int32), S((4,), jnp.int32))
  assert "mosaic_gpu" in _lower(args, tiling)


def test_interpret_mode_poisons_outputs():
  """The premise of the finiteness checks: an output the kernel does not
  write comes back NaN in interpret mode."""
  def body(x_ref, o_ref):
    del x_ref, o_ref  # writes nothing
  out = decode_mosaic_gpu.plgpu.kernel(
      body, out_type=S((128,), jnp.float32),
      interpret=decode_mosaic_gpu.interpret_params())(
          jnp.ones((128,), jnp.float32))
  assert np.all(np.isnan(np.asarray(out)))


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_simulated_warpgroups_are_compiled_once():
  """kernels.interpret_compile_fix: interpreting a kernel with a copying
  warpgroup runs its warpgroups in threads; calling it again compiles
  nothing (jax 0.10 without the fix compiled every thread of every program
  again, 24 compiles here, which made these tests 5x slower)."""
  params = (8, 2, 128, 32, "bfloat16", [100, 16, 250], 2, 2, 2, 1, False, 1,
            True)
  assert params in testing.MOSAIC_DECODE_CASES
  case = testing.decode_case(params)
  compiles = []
  listen = lambda name, secs, **kw: compiles.append(name == _BACKEND_COMPILE)
  jax.monitoring.register_event_duration_secs_listener(listen)
  run = lambda: decode_mosaic_gpu.paged_decode(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      tiling=_tiling(params), interpret=True).block_until_ready()
  try:
    run()
    assert sum(compiles) > 0  # the listener sees compiles
    compiles.clear()
    out = run()
    assert sum(compiles) == 0
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  testing.assert_matches(out[:, None], case)
