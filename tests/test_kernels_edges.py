"""Edges every implementation must honour, through the API and on CPU
(interpret mode for the Pallas kernels): a caller's `sm_scale`, lengths past
the block table's capacity (only the table's pages are attended to, as in
the reference), and padding rows (`q_lens == 0`) that come back as zeros.

One case per implementation and query length carries all three edges, so
that a kernel which ignores any of them disagrees with the reference. The
per-kernel test modules cover the shape space; these edges were reached by
only some kernels' tests before (found by mutating each kernel).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from kernels import testing
from kernels.paged_attention import paged_attention

SM_SCALE = 0.3  # not head_dim ** -0.5 (0.125 at head_dim 64)


@pytest.mark.parametrize("q_len", [1, 9])
@pytest.mark.parametrize("implementation", [
    "xla_chunked", "pallas_triton", "pallas_mosaic_tpu", "pallas_mosaic_gpu"])
def test_sm_scale_lengths_past_the_table_and_padding_rows(implementation,
                                                          q_len):
  # Sequence 0: 50 + 30 tokens over a 4-page (64-token) table; sequence 1:
  # a padding row (no new tokens); sequence 2: 20 tokens, within its pages.
  case = testing.make_case(
      61 + q_len, kv_lens=[50, 33, 20], q_lens=[q_len, 0, min(q_len, 20)],
      q_len=q_len, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
      pages_per_seq=4, dtype="bfloat16")
  case = dataclasses.replace(
      case, kv_lens=case.kv_lens + np.asarray([30, 0, 0], np.int32))
  # Under jit: called eagerly, the API refuses a length past the table
  # (tests/test_kernels_api.py); the kernels' semantics for it stand.
  out = jax.jit(lambda *args: paged_attention(
      *args, sm_scale=SM_SCALE, implementation=implementation))(*case.args())
  testing.assert_matches(out, case, testing.reference(case, SM_SCALE))


@pytest.mark.parametrize("implementation", [
    "xla_chunked", "auto", "pallas_triton", "pallas_mosaic_tpu"])
@pytest.mark.parametrize("q_len,pages", [(1, 5), (4, 5), (16, 10), (1, 40)])
def test_kernel_padding_never_reads_page_0(implementation, q_len, pages):
  """Kernels that walk whole chunks of pages widen the table themselves.
  They padded it with page 0, which belongs to another sequence: a NaN
  there (an overflowed turn) made every output NaN (masked probability 0
  times NaN). The table here never names page 0; the output must equal the
  reference's, which reads only the table."""
  rng = np.random.default_rng(q_len * 100 + pages)
  P, D, H = 16, 16, 2
  pool = rng.standard_normal((pages + 2, 2, H, P, D)).astype(np.float32)
  pool[0] = np.nan
  tables = np.arange(1, pages + 1, dtype=np.int32)[None]
  q = rng.standard_normal((1, q_len, H, D)).astype(np.float32)
  kv_lens = np.array([pages * P - 3], np.int32)
  q_lens = np.array([q_len], np.int32)
  want = paged_attention(q, pool, tables, kv_lens, q_lens,
                        implementation="xla")
  got = paged_attention(q, pool, tables, kv_lens, q_lens,
                       implementation=implementation)
  assert not np.isnan(np.asarray(got)).any()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5,
                             rtol=2e-5)


@pytest.mark.parametrize("dtype", ["uint32", "uint8", "int16", "int64"])
def test_any_integer_lengths_work_on_every_cpu_path(dtype):
  """Unsigned or narrow lengths failed deep in `xla_chunked` (fori_loop
  bounds int32 vs uint32), the CPU default; they are cast at the API."""
  rng = np.random.default_rng(3)
  pool = rng.standard_normal((6, 2, 2, 4, 8)).astype(np.float32)
  q = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
  tables = np.array([[1, 2], [3, 4]], np.int32)
  kv_lens = np.array([5, 7], dtype)
  q_lens = np.array([1, 1], dtype)
  want = paged_attention(q, pool, tables, kv_lens.astype(np.int32),
                         q_lens.astype(np.int32), implementation="xla")
  for implementation in ("xla", "xla_chunked", "auto"):
    got = paged_attention(q, pool, tables, kv_lens, q_lens,
                          implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_write_kv_refuses_an_int8_pool():
  """It cast float K/V to int8 with no scale (0.7 stored as 0)."""
  import jax.numpy as jnp
  from kernels.kv_write import write_kv
  pool = jnp.zeros((4, 2, 1, 4, 4), jnp.int8)
  k = jnp.full((1, 1, 1, 4), 0.7, jnp.float32)
  with pytest.raises(ValueError, match="write_kv writes float pools"):
    write_kv(pool, k, k, jnp.array([[5]], jnp.int32))
