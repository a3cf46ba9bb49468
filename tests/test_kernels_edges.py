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
  out = paged_attention(*case.args(), sm_scale=SM_SCALE,
                        implementation=implementation)
  testing.assert_matches(out, case, testing.reference(case, SM_SCALE))
