"""The Triton-lowering Pallas kernels, run in interpret mode on CPU.

Interpret mode fills kernel outputs with NaN before the kernel runs, so the
finiteness check in `assert_matches` also proves every element was written.
Shapes are small: interpret mode costs a pool slice per grid step. The GPU
module tests/gpu/test_kernels_gpu.py reruns these cases compiled.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import decode_triton
from kernels import prefill_triton
from kernels import quantize
from kernels import testing
from kernels import tuning

# int8 pools with `int8_query`: (heads, kv_heads, head_dim, block_size,
# query dtype, kv_lens, chunk, splits, page_parts): SmolLM2's 9:3 over
# splits, MHA with an empty sequence, large pages read in parts, f32
# queries (p @ V in f32).
INT8_QUERY_CASES = [
    (9, 3, 64, 16, "bfloat16", [77, 5, 1], 2, 2, 1),
    (8, 8, 128, 32, "bfloat16", [130, 0], 1, 1, 1),
    (4, 2, 128, 256, "bfloat16", [300, 40], 1, 2, 2),
    (8, 2, 64, 16, "float32", [90, 33], 4, 1, 1),
]


@pytest.mark.parametrize("params", testing.DECODE_CASES, ids=str)
def test_decode_matches_reference(params):
  chunk, splits = params[-2:]
  case = testing.decode_case(params)
  out = decode_triton.paged_decode(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      case.kv_scales, tiling=tuning.DecodeTiling(chunk, splits),
      interpret=True)
  assert out.dtype == case.q.dtype
  testing.assert_matches(out[:, None], case)


def _rounded_queries(case: testing.Case) -> testing.Case:
  """`case` with its queries rounded as `int8_query` rounds them."""
  q_int8, scales = quantize.quantize_rows(case.q)
  rounded = q_int8.astype(jnp.float32) * scales[..., None]
  return dataclasses.replace(case, q=rounded.astype(case.q.dtype))


@pytest.mark.parametrize("params", INT8_QUERY_CASES, ids=str)
def test_int8_queries_match_the_reference_of_rounded_queries(params):
  """`int8_query`: q @ K^T as an int8 matmul. Against the reference on the
  queries it rounds, within half the bound of the kernel without the
  option (float32 queries: float32's); against the queries as given,
  within 16-bit's bound."""
  heads, kv_heads, head_dim, block_size, q_dtype, kv_lens, chunk, splits, \
      parts = params
  case = testing.make_case(testing.seed_of(params), kv_lens=kv_lens,
                           num_heads=heads, num_kv_heads=kv_heads,
                           head_dim=head_dim, block_size=block_size,
                           dtype="int8")
  case = dataclasses.replace(case, q=case.q.astype(q_dtype))
  tiling = tuning.DecodeTiling(chunk, splits, page_parts=parts,
                               int8_query=True)
  out = decode_triton.paged_decode(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      case.kv_scales, tiling=tiling, interpret=True)
  assert out.dtype == case.q.dtype
  rounded = _rounded_queries(case)
  testing.assert_matches(out[:, None], rounded,
                         rtol=testing.tolerance(case) / 2)
  # The rounding of the queries (as of K's pages): 16-bit's bound, also for
  # float32 queries (measured here: 5.9e-3 and 6.5e-3 at most).
  testing.assert_matches(out[:, None], case, rtol=1e-2)


# Pools with V pages stored transposed (`v_transposed`): (heads, kv_heads,
# head_dim, block_size, dtype, kv_lens, chunk, splits, page_parts,
# int8_query): several pages a step (the per-element gather), one page a
# step, a large page read in parts, with int8 queries; ragged lengths
# ending inside pages.
V_TRANSPOSED_CASES = [
    (9, 3, 64, 16, "int8", [77, 5, 1], 4, 2, 1, False),
    (8, 2, 128, 16, "int8", [100, 33], 8, 1, 1, True),
    (4, 2, 64, 32, "bfloat16", [70, 31], 1, 2, 1, False),
    (4, 4, 64, 128, "float32", [200, 7], 1, 1, 2, False),
    (8, 2, 128, 128, "int8", [300, 129], 1, 2, 4, True),
]


@pytest.mark.parametrize("params", V_TRANSPOSED_CASES, ids=str)
def test_transposed_v_pages_match_the_reference(params):
  """`v_transposed`: the kernel on the pool with its V pages transposed
  (`quantize.transpose_v_pages`) against the reference on the pool as it
  was; the same kernel reading the untransposed pool as transposed does
  not match (the option changes what is read)."""
  heads, kv_heads, head_dim, block_size, dtype, kv_lens, chunk, splits, \
      parts, int8_query = params
  case = testing.make_case(testing.seed_of(params), kv_lens=kv_lens,
                           num_heads=heads, num_kv_heads=kv_heads,
                           head_dim=head_dim, block_size=block_size,
                           dtype=dtype)
  tiling = tuning.DecodeTiling(chunk, splits, page_parts=parts,
                               int8_query=int8_query)
  def run(pool):
    return decode_triton.paged_decode(
        case.q[:, 0], pool, case.block_tables, case.kv_lens, case.kv_scales,
        tiling=tiling, v_transposed=True, interpret=True)
  out = run(quantize.transpose_v_pages(case.kv_pages))
  testing.assert_matches(out[:, None], case,
                         rtol=1e-2 if int8_query else None)
  with pytest.raises(AssertionError):
    testing.assert_matches(run(case.kv_pages)[:, None], case,
                           rtol=1e-2 if int8_query else None)


def test_transpose_v_pages_moves_only_v_and_inverts():
  rng = np.random.default_rng(5)
  pool = rng.standard_normal((3, 2, 2, 16, 8)).astype(np.float32)
  out = np.asarray(quantize.transpose_v_pages(jnp.asarray(pool)))
  assert out.shape == pool.shape
  np.testing.assert_array_equal(out[:, 0], pool[:, 0])
  for b in range(3):
    for h in range(2):
      np.testing.assert_array_equal(out[b, 1, h].reshape(8, 16),
                                    pool[b, 1, h].T)
  np.testing.assert_array_equal(
      np.asarray(quantize.untranspose_v_pages(jnp.asarray(out))), pool)
  with pytest.raises(ValueError, match="expected kv_pages"):
    quantize.transpose_v_pages(jnp.asarray(pool[:, 0]))


def test_int8_queries_need_an_int8_pool():
  case = testing.make_case(8, kv_lens=[20], num_heads=2, num_kv_heads=1)
  with pytest.raises(ValueError, match="int8_query needs an int8 pool"):
    decode_triton.paged_decode(
        case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
        tiling=tuning.DecodeTiling(1, 1, int8_query=True), interpret=True)


def test_decode_default_tiling_and_sm_scale():
  case = testing.make_case(7, kv_lens=[50, 33], num_heads=4, num_kv_heads=2,
                           block_size=16)
  out = decode_triton.paged_decode(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      sm_scale=0.3, interpret=True)
  ref = testing.reference(case, sm_scale=0.3)
  testing.assert_matches(out[:, None], case, ref)


@pytest.mark.parametrize("params", testing.PREFILL_CASES, ids=str)
def test_prefill_matches_reference(params):
  case = testing.prefill_case(params)
  out = prefill_triton.paged_prefill(
      *case.args(), case.kv_scales,
      tiling=tuning.PrefillTiling(block_q=16, pages_per_chunk=2),
      interpret=True)
  testing.assert_matches(out, case)


def test_kernels_reject_unsupported_head_dim():
  case = testing.make_case(3, kv_lens=[10], num_heads=2, num_kv_heads=1,
                           head_dim=48)
  with pytest.raises(ValueError, match="head_dim"):
    decode_triton.paged_decode(case.q[:, 0], case.kv_pages,
                               case.block_tables, case.kv_lens,
                               interpret=True)
  with pytest.raises(ValueError, match="head_dim"):
    prefill_triton.paged_prefill(*case.args(), interpret=True)


def test_decode_rejects_float_pool_with_scales():
  case = testing.make_case(4, kv_lens=[10], num_heads=2, num_kv_heads=1)
  scales = jnp.ones(case.kv_pages.shape[:3], jnp.float32)
  with pytest.raises(ValueError, match="int8"):
    decode_triton.paged_decode(case.q[:, 0], case.kv_pages,
                               case.block_tables, case.kv_lens, scales,
                               interpret=True)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_large_pages_read_in_parts(kind):
  """Pages larger than a step: each step reads a slice of one page."""
  if kind == "decode":
    case = testing.make_case(41, kv_lens=[150, 64, 1], num_heads=6,
                             num_kv_heads=2, block_size=64, dtype="int8",
                             pages_per_seq=4)
    out = decode_triton.paged_decode(
        case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
        case.kv_scales,
        tiling=tuning.DecodeTiling(1, 2, page_parts=4), interpret=True)[:, None]
  else:
    case = testing.make_case(42, kv_lens=[90, 40], q_lens=[20, 17], q_len=20,
                             num_heads=4, num_kv_heads=2, block_size=64,
                             dtype="bfloat16")
    out = prefill_triton.paged_prefill(
        *case.args(),
        tiling=tuning.PrefillTiling(16, 1, page_parts=2), interpret=True)
  testing.assert_matches(out, case)


def test_bad_tiling_raises():
  case = testing.make_case(43, kv_lens=[10], num_heads=2, num_kv_heads=1)
  with pytest.raises(ValueError, match="tiling"):
    decode_triton.paged_decode(
        case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
        tiling=tuning.DecodeTiling(2, 1, page_parts=2), interpret=True)


@pytest.mark.parametrize("q_len", [1, 9])
def test_lengths_beyond_the_table_see_only_the_table(q_len):
  """kv_lens past the table's capacity: like the reference, only the
  table's pages are attended to (the padding of the table is never read)."""
  case = testing.make_case(44 + q_len, kv_lens=[40, 48], q_len=q_len,
                           num_heads=4, num_kv_heads=2, block_size=16,
                           pages_per_seq=3)
  case = dataclasses.replace(case, kv_lens=case.kv_lens + 30)
  if q_len == 1:
    out = decode_triton.paged_decode(
        case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
        tiling=tuning.DecodeTiling(2, 2), interpret=True)[:, None]
  else:
    out = prefill_triton.paged_prefill(
        *case.args(), tiling=tuning.PrefillTiling(16, 2), interpret=True)
  testing.assert_matches(out, case)
