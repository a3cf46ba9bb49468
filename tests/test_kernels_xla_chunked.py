"""`"xla_chunked"`: online-softmax paged attention vs the reference.

Fresh random inputs per case: ragged lengths that are not multiples of the
page size, junk ids in unused table columns, padding rows and empty
sequences, GQA ratios 1..9, chunk sizes that force many loop iterations,
and int8 pools.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import testing
from kernels.paged_attention import paged_attention
from kernels.paged_attention_xla import xla_chunked_paged_attention


@pytest.mark.parametrize("params", testing.DECODE_CASES, ids=str)
def test_decode_cases(params):
  case = testing.decode_case(params)
  out = paged_attention(*case.args(), implementation="xla_chunked",
                        kv_scales=case.kv_scales)
  testing.assert_matches(out, case)


@pytest.mark.parametrize("params", testing.PREFILL_CASES, ids=str)
def test_prefill_cases(params):
  case = testing.prefill_case(params)
  out = paged_attention(*case.args(), implementation="xla_chunked",
                        kv_scales=case.kv_scales)
  testing.assert_matches(out, case)


@pytest.mark.parametrize("chunk_pages", [1, 2, 3, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
def test_many_chunks_ragged_prefill(chunk_pages, heads, kv_heads):
  rng = np.random.default_rng(chunk_pages * 100 + heads)
  kv_lens = [int(x) for x in rng.integers(1, 90, size=3)] + [0]
  q_lens = [int(rng.integers(1, min(n, 12) + 1)) if n else 0 for n in kv_lens]
  case = testing.make_case(int(rng.integers(1 << 30)), kv_lens=kv_lens,
                           q_lens=q_lens, q_len=12, num_heads=heads,
                           num_kv_heads=kv_heads, head_dim=32, block_size=8,
                           pages_per_seq=14)
  out = xla_chunked_paged_attention(*case.args(), chunk_pages=chunk_pages)
  testing.assert_matches(out, case)


@pytest.mark.parametrize("chunk_pages,items", [(1, 1), (2, 3), (3, 8), (64, 2)])
@pytest.mark.parametrize("q_len", [1, 5])
def test_decode_work_items_ragged(chunk_pages, items, q_len):
  """Decode rows of very different lengths (padding rows among them): each
  row walks its own chunks, several of one row may share an iteration."""
  rng = np.random.default_rng(chunk_pages * 10 + items + q_len)
  kv_lens = [70, 0, 3, 111, 9, 0, 40]
  q_lens = [min(n, int(rng.integers(1, q_len + 1))) if n else 0
            for n in kv_lens]
  case = testing.make_case(int(rng.integers(1 << 30)), kv_lens=kv_lens,
                           q_lens=q_lens, q_len=q_len, num_heads=6,
                           num_kv_heads=2, head_dim=16, block_size=8,
                           pages_per_seq=15)
  out = xla_chunked_paged_attention(*case.args(), chunk_pages=chunk_pages,
                                    decode_items=items)
  testing.assert_matches(out, case)


def test_against_numpy_dense():
  """An independent float64 dense reference, not the repo's XLA reference."""
  rng = np.random.default_rng(7)
  # q_len 6: both sequences have padding rows, which must stay zero.
  case = testing.make_case(11, kv_lens=[29, 5], q_lens=[4, 5], q_len=6,
                           num_heads=6, num_kv_heads=2, head_dim=16,
                           block_size=4, pages_per_seq=9)
  out = np.asarray(xla_chunked_paged_attention(*case.args(), chunk_pages=2))
  q = np.asarray(case.q, np.float64)
  pool = np.asarray(case.kv_pages, np.float64)
  tables = np.asarray(case.block_tables)
  for b, (n, ql) in enumerate(zip([29, 5], [4, 5])):
    pages = tables[b, :-(-n // 4)]
    k = pool[pages, 0].transpose(1, 0, 2, 3).reshape(2, -1, 16)[:, :n]
    v = pool[pages, 1].transpose(1, 0, 2, 3).reshape(2, -1, 16)[:, :n]
    for i in range(ql):
      pos = n - ql + i
      for h in range(6):
        s = k[h // 3, :pos + 1] @ q[b, i, h] / 4.0
        p = np.exp(s - s.max())
        want = (p / p.sum()) @ v[h // 3, :pos + 1]
        np.testing.assert_allclose(out[b, i, h], want, rtol=1e-5, atol=1e-5)
    assert out[b, ql:].size and not out[b, ql:].any()
  del rng


def test_auto_picks_chunked_on_cpu():
  from kernels.paged_attention import resolve_implementation
  assert resolve_implementation("auto") == "xla_chunked"
