"""The paged-attention API: dispatch, "auto", int8 pools, input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import quantize
from kernels import testing
from kernels.paged_attention import paged_attention
from kernels.paged_attention import resolve_implementation


@pytest.mark.parametrize("q_len,q_lens", [(1, [1, 0, 1]), (3, [3, 2, 0])])
def test_pallas_triton_through_api_matches_xla(q_len, q_lens):
  case = testing.make_case(21 + q_len, kv_lens=[19, 40, 7], q_lens=q_lens,
                           q_len=q_len, num_heads=4, num_kv_heads=2)
  out = paged_attention(*case.args(), implementation="pallas_triton")
  ref = paged_attention(*case.args(), implementation="xla")
  testing.assert_matches(out, case, np.asarray(ref))


def test_int8_through_api_close_to_float_pool():
  case = testing.make_case(22, kv_lens=[33, 64], num_heads=4,
                           num_kv_heads=2, dtype="int8")
  out = paged_attention(*case.args(), implementation="xla",
                            kv_scales=case.kv_scales)
  testing.assert_matches(out, case)
  # Against the unquantized pool: only the int8 rounding separates them.
  pool = quantize.dequantize_pages(case.kv_pages, case.kv_scales)
  q32 = case.q.astype(jnp.float32)
  exact = paged_attention(q32, pool, *case.args()[2:])
  assert testing.relative_error(out, exact) < 2e-2


def test_quantize_round_trip_within_half_a_step():
  rng = np.random.default_rng(23)
  pages = jnp.asarray(rng.standard_normal((5, 2, 3, 16, 64)) * 4.0,
                      jnp.float32)
  q, scales = quantize.quantize_pages(pages)
  assert q.dtype == jnp.int8 and scales.shape == (5, 2, 3)
  back = quantize.dequantize_pages(q, scales)
  err = np.abs(np.asarray(back) - np.asarray(pages))
  assert np.all(err <= np.asarray(scales)[..., None, None] * 0.5 + 1e-6)
  assert np.abs(np.asarray(q)).max() == 127


@pytest.mark.parametrize("backend,q_len,head_dim,quantized,want", [
    ("cpu", 1, 64, False, "xla_chunked"),
    ("gpu", 1, 64, False, "pallas_triton"),
    ("gpu", 7, 128, True, "pallas_triton"),
    ("gpu", 1, 80, False, "xla_chunked"),  # not a power of 2
    ("tpu", 1, 128, False, "pallas_mosaic_tpu"),
    ("tpu", 5, 128, False, "xla_chunked"),  # TPU prefill: dtype unknown
    ("tpu", 1, 128, True, "pallas_mosaic_tpu"),
])
def test_auto_picks_a_supporting_implementation(monkeypatch, backend, q_len,
                                                head_dim, quantized, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  got = resolve_implementation("auto", q_len=q_len, head_dim=head_dim,
                                   quantized=quantized)
  assert got == want


def test_bad_inputs_raise():
  case = testing.make_case(24, kv_lens=[10], num_heads=2, num_kv_heads=1)
  with pytest.raises(ValueError, match="unknown"):
    paged_attention(*case.args(), implementation="cuda_magic")
  with pytest.raises(ValueError, match="kv_scales"):
    paged_attention(case.q, case.kv_pages.astype(jnp.int8),
                        *case.args()[2:])
  scales = jnp.ones((1, 2, 1), jnp.float32)
  with pytest.raises(ValueError, match="kv_scales must be"):
    paged_attention(case.q, case.kv_pages.astype(jnp.int8),
                        *case.args()[2:], kv_scales=scales)
