"""kernels.query_rows.DecodeQueryBlocks: which query rows a Mosaic GPU decode
program copies from the unpadded queries, and which output rows it keeps.

A stand-in for the kernel plays each program's part the way the kernel
does (its block of the operand into the first rows of a 64-row tile whose
other rows are NaN, a row-wise function of its KV head, `rows_out` rows
written out); the result must equal a plain loop over query heads.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.query_rows import DecodeQueryBlocks

TILE, ALIGN = 64, 8


def _choose(heads, kv_heads, pad=False):
  return DecodeQueryBlocks.choose(heads, kv_heads, tile_rows=TILE,
                                  align=ALIGN, pad=pad)


@pytest.mark.parametrize("heads,kv_heads,expected", [
    (32, 8, DecodeQueryBlocks(rows=8, heads_per_block=2, padded=False)),
    (16, 8, DecodeQueryBlocks(rows=8, heads_per_block=4, padded=False)),
    (8, 8, DecodeQueryBlocks(rows=8, heads_per_block=8, padded=False)),
    (16, 2, DecodeQueryBlocks(rows=8, heads_per_block=1, padded=False)),
    (64, 1, DecodeQueryBlocks(rows=64, heads_per_block=1, padded=False)),
    (48, 2, DecodeQueryBlocks(rows=24, heads_per_block=1, padded=False)),
    # Padded: a group of 3 (SmolLM2), 4:1 with 4 heads (no whole 8-row
    # block), MHA with 4 heads, a group of 12.
    (9, 3, DecodeQueryBlocks(rows=64, heads_per_block=1, padded=True)),
    (4, 1, DecodeQueryBlocks(rows=64, heads_per_block=1, padded=True)),
    (4, 4, DecodeQueryBlocks(rows=64, heads_per_block=1, padded=True)),
    (24, 2, DecodeQueryBlocks(rows=64, heads_per_block=1, padded=True)),
])
def test_choice_by_head_layout(heads, kv_heads, expected):
  assert _choose(heads, kv_heads) == expected
  assert _choose(heads, kv_heads, pad=True) == DecodeQueryBlocks(
      rows=TILE, heads_per_block=1, padded=True)


def _program_outputs(blocks, operand, kv_heads, rows_out):
  """[batch, kv_heads, rows_out, dim]: program (b, h) copies block
  h // heads_per_block into a NaN tile and returns tile * (h + 1) - h,
  row by row, as the kernel's rows meet only themselves."""
  batch, _, _, dim = operand.shape
  out = np.full((batch, kv_heads, rows_out, dim), np.nan, np.float32)
  for b in range(batch):
    for h in range(kv_heads):
      tile = np.full((TILE, dim), np.nan, np.float32)
      tile[:blocks.rows] = operand[b, h // blocks.heads_per_block]
      out[b, h] = (tile * (h + 1) - h)[:rows_out]
  return out


@pytest.mark.parametrize("heads,kv_heads,pad", [
    (32, 8, False), (16, 8, False), (8, 8, False), (16, 2, False),
    (64, 1, False), (9, 3, False), (4, 1, False), (32, 8, True)])
def test_programs_keep_their_own_heads_rows(heads, kv_heads, pad):
  rng = np.random.default_rng(heads * 100 + kv_heads + pad)
  batch, dim = 3, 16
  q = rng.standard_normal((batch, heads, dim)).astype(np.float32)
  blocks = _choose(heads, kv_heads, pad)
  operand = np.asarray(blocks.operand(q, kv_heads, np.float32))
  group = heads // kv_heads
  rows_out = -(-group // ALIGN) * ALIGN
  out = np.asarray(blocks.own_rows(
      _program_outputs(blocks, operand, kv_heads, rows_out), heads))
  expected = np.empty_like(q)
  for n in range(heads):  # query head n belongs to KV head n // group
    h = n // group
    expected[:, n] = q[:, n] * (h + 1) - h
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  if blocks.padded:  # the padding rows are zeros, not copies of others
    assert operand.shape == (batch, kv_heads, TILE, dim)
    assert not operand[:, :, group:].any()
  else:
    assert operand.size == q.size  # a reshape, nothing added
