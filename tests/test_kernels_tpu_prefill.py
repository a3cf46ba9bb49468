"""The Mosaic TPU prefill kernel: TPU interpret mode on CPU, dispatch, and
its lowering to Mosaic with a lent v5e chip description.

TPU interpret mode simulates the DMAs and semaphores and fills uninitialised
buffers (outputs included) with NaN, so a missed wait or an unwritten output
row shows up as NaN; `testing.assert_matches` also wants exact zeros in the
padding rows and empty sequences.
"""

from __future__ import annotations

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import prefill_mosaic_tpu
from kernels import testing
from kernels import tuning
from kernels.paged_attention import paged_attention
from kernels.paged_attention import resolve_implementation

T = tuning.TpuPrefillTiling

CASES = [
    # (heads, kv_heads, head_dim, block_size, dtype, q_len, kv_lens, q_lens,
    #  tiling): junk table tails, shuffled tables in every case.
    # 3:1; a 1-token chunk; a chunk over a 2-page prefix; an empty chunk.
    (9, 3, 64, 16, "float32", 20, [5, 37, 96, 40], [5, 20, 1, 0], T(16, 2)),
    # 4:1, 3 query blocks, chunks of 33 and 17 (not page multiples).
    (8, 2, 128, 32, "bfloat16", 40, [40, 150, 33], [40, 33, 17], T(16, 1)),
    # MHA, both chunks start mid-page, 2-page ring slots.
    (4, 4, 64, 32, "bfloat16", 24, [70, 24], [23, 24], T(16, 2)),
    # 3:1 at head_dim 128, an empty sequence, the default tiling.
    (6, 2, 128, 16, "float32", 33, [100, 0], [33, 0], None),
    # 4:1, 16-key steps: blocks' first positions 30, 46, 62 end one key
    # before a step boundary (the unmasked/masked split's edge); 16, 32 on it.
    (8, 2, 64, 16, "bfloat16", 36, [66, 36], [36, 20], T(16, 1)),
    # 4:1 at head_dim 64, 32-token pages, unmasked prefix chunks then tail.
    (4, 1, 64, 32, "float32", 17, [150, 17], [17, 9], T(16, 1)),
]


def _case(params):
  heads, kv_heads, head_dim, block_size, dtype, q_len, kv_lens, q_lens = (
      params[:8])
  return testing.make_case(
      testing.seed_of(params), kv_lens=kv_lens, q_lens=q_lens, q_len=q_len,
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      block_size=block_size, dtype=dtype,
      pages_per_seq=max(-(-n // block_size) for n in kv_lens) + 1)


@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(
    str(x) for x in p[:6]))
def test_tpu_prefill_matches_reference(params):
  case = _case(params)
  out = prefill_mosaic_tpu.paged_prefill_tpu(*case.args(), tiling=params[8],
                                             interpret=True)
  testing.assert_matches(out, case)


def test_tpu_prefill_through_api():
  case = _case(CASES[0])
  out = paged_attention(*case.args(), implementation="pallas_mosaic_tpu")
  ref = paged_attention(*case.args(), implementation="xla")
  testing.assert_matches(out, case, np.asarray(ref))


def test_tpu_prefill_rejects_int8():
  case = testing.make_case(41, kv_lens=[20], q_len=4, num_heads=2,
                           num_kv_heads=1, dtype="int8")
  with pytest.raises(ValueError, match="int8"):
    paged_attention(*case.args(), implementation="pallas_mosaic_tpu",
                    kv_scales=case.kv_scales)


@pytest.mark.parametrize("q_len,quantized,dtype,want", [
    (5, False, "bfloat16", "pallas_mosaic_tpu"),
    (5, False, "float32", "pallas_mosaic_tpu"),
    (5, True, "int8", "xla_chunked"),
    (5, False, None, "xla_chunked"),  # unknown pool dtype: not picked
    (1, True, "int8", "pallas_mosaic_tpu"),
])
def test_auto_on_tpu_picks_the_prefill_kernel(monkeypatch, q_len, quantized,
                                              dtype, want):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert resolve_implementation("auto", q_len=q_len, quantized=quantized,
                                dtype=dtype) == want


def test_default_tiling():
  # 3:1 -> 64 tokens (192 rows); short chunks take 16; 256 keys per step.
  assert tuning.tpu_prefill_tiling(q_len=500, group=3, pages_per_seq=100,
                                   block_size=16) == T(64, 16)
  assert tuning.tpu_prefill_tiling(q_len=5, group=1, pages_per_seq=3,
                                   block_size=32) == T(16, 2)
  assert tuning.tpu_prefill_tiling(q_len=300, group=16, pages_per_seq=9,
                                   block_size=512) == T(16, 1)
  with pytest.raises(ValueError, match="power of 2"):
    prefill_mosaic_tpu.check_tiling(T(24, 1))


@pytest.mark.parametrize("dtype,block_size,head_dim,group", [
    ("bfloat16", 16, 128, 4), ("float32", 32, 64, 3), ("bfloat16", 64, 128, 1)])
def test_tpu_prefill_lowers_to_mosaic(monkeypatch, dtype, block_size,
                                      head_dim, group):
  try:  # Mosaic needs a chip description; CPU has none. Lend it a v5e's.
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top
    chip = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
  except (ImportError, AttributeError) as e:
    pytest.skip(reason=f"this JAX has no private tpu_info registry to fake a "
                f"chip: {e}")
  monkeypatch.setitem(tpu_info.registry, "cpu", lambda: chip)
  s = jax.ShapeDtypeStruct
  args = (s((2, 300, 2 * group, head_dim), dtype),
          s((80, 2, 2, block_size, head_dim), dtype), s((2, 37), jnp.int32),
          s((2,), jnp.int32), s((2,), jnp.int32))
  exported = export.export(
      jax.jit(prefill_mosaic_tpu.paged_prefill_tpu), platforms=["tpu"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "tpu_custom_call")])(*args)
  assert "tpu_custom_call" in exported.mlir_module()
