"""The Mosaic TPU decode kernel, in TPU interpret mode on CPU.

TPU interpret mode simulates the DMAs and semaphores and fills uninitialised
buffers with NaN, so a missed wait or an unwritten output shows up as NaN.
"""

from __future__ import annotations

import pytest

from kernels import decode_mosaic_tpu
from kernels import testing


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size,dtype,kv_lens,chunk", [
        (9, 3, 64, 16, "float32", [1, 37, 128, 0], 2),  # 3 chunks, 2 slots
        (8, 2, 128, 32, "bfloat16", [100, 33], 1),
        (4, 2, 64, 16, "int8", [50, 7], 2),  # per-page scales via SMEM
    ])
def test_tpu_decode_matches_reference(heads, kv_heads, head_dim, block_size,
                                      dtype, kv_lens, chunk):
  case = testing.make_case(31 + heads, kv_lens=kv_lens, num_heads=heads,
                           num_kv_heads=kv_heads, head_dim=head_dim,
                           block_size=block_size, dtype=dtype,
                           pages_per_seq=max(-(-n // block_size)
                                             for n in kv_lens) + 1)
  out = decode_mosaic_tpu.paged_decode_tpu(
      case.q[:, 0], case.kv_pages, case.block_tables, case.kv_lens,
      case.kv_scales, pages_per_chunk=chunk, interpret=True)
  testing.assert_matches(out[:, None], case)

