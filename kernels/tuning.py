"""Block sizes and split counts for the Pallas paged-attention kernels.

The kernels take their tile sizes as static arguments; this module picks them
from the problem's static shape so that the kernels stay free of heuristics
and the choices live in one table that benchmarks can revise.

Reasoning behind the defaults (H100/H200, to be re-measured with
`python -m launch.bench_kernels`):

* Decode is bound by reading K/V. A step of ~32 KB of K plus as much V keeps
  enough loads in flight per program; more only costs shared memory. Pages
  larger than a step are read in parts (`page_parts`).
* Split-K (flash-decoding) spreads one sequence's pages over several programs
  so that `batch * kv_heads * splits` fills the chip (~2 programs per SM),
  but no split reads fewer than `MIN_TOKENS_PER_SPLIT` tokens, because every
  split adds a partial result that has to be written and combined.
* Prefill is bound by matmuls: 128 query rows by 64 keys (or one page when
  pages are larger) per step, as FlashAttention-2 kernels on Hopper use.
"""

from __future__ import annotations

import dataclasses

# Streaming multiprocessors of the GPUs we target (H100 SXM: 132, H200: 132).
DEFAULT_NUM_CORES = 132
# Programs per core that split-K aims for.
PROGRAMS_PER_CORE = 2
# A split reads at least this many tokens of context.
MIN_TOKENS_PER_SPLIT = 512
# Upper bound on splits (the partial results grow with it).
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class DecodeTiling:
  """Static tiling of the decode kernel."""

  pages_per_chunk: int  # pages gathered per inner-loop step
  num_splits: int  # split-K partitions of the block table
  num_warps: int = 4
  num_stages: int = 2
  page_parts: int = 1  # > 1: a step reads 1/page_parts of one (large) page


@dataclasses.dataclass(frozen=True)
class PrefillTiling:
  """Static tiling of the prefill kernel."""

  block_q: int  # query rows per program
  pages_per_chunk: int  # pages gathered per inner-loop step
  num_warps: int = 4
  num_stages: int = 2
  page_parts: int = 1  # > 1: a step reads 1/page_parts of one (large) page


def _pow2_floor(x: int) -> int:
  return 1 << (max(1, x).bit_length() - 1)


def _step(block_size: int, target_tokens: int) -> tuple[int, int]:
  """(pages_per_chunk, page_parts) for steps of about `target_tokens`."""
  if block_size <= target_tokens:
    return _pow2_floor(target_tokens // block_size), 1
  return 1, block_size // target_tokens


def decode_tiling(
    *,
    batch: int,
    num_kv_heads: int,
    pages_per_seq: int,
    block_size: int,
    head_dim: int,
    itemsize: int = 2,
    num_cores: int = DEFAULT_NUM_CORES,
) -> DecodeTiling:
  """Picks the decode kernel's tile and split count for a static shape.

  A step reads ~32 KB of K (and as much V): 128 tokens at head_dim 128 in
  bf16, so two pipeline stages of K and V stay near 128 KB of shared memory.
  """
  target_tokens = max(16, _pow2_floor(32768 // (head_dim * itemsize)))
  pages_per_chunk, page_parts = _step(block_size, target_tokens)
  pages_per_chunk = min(pages_per_chunk, _pow2_floor(pages_per_seq))
  programs = batch * num_kv_heads
  want = -(-PROGRAMS_PER_CORE * num_cores // max(1, programs))
  max_by_len = max(1, (pages_per_seq * block_size) // MIN_TOKENS_PER_SPLIT)
  num_splits = max(1, min(want, max_by_len, MAX_SPLITS))
  return DecodeTiling(pages_per_chunk=pages_per_chunk, num_splits=num_splits,
                      num_warps=4, num_stages=2, page_parts=page_parts)


def prefill_tiling(*, block_size: int, head_dim: int,
                   itemsize: int = 2) -> PrefillTiling:
  """Picks the prefill kernel's tile sizes for a static shape.

  128 query rows by 64 keys in bf16 (float32: 64 rows, 2 stages, to stay
  within shared memory).
  """
  pages_per_chunk, page_parts = _step(block_size, 64)
  num_warps = 4 if head_dim <= 64 else 8
  if itemsize >= 4:
    return PrefillTiling(block_q=64, pages_per_chunk=pages_per_chunk,
                         num_warps=num_warps, num_stages=2,
                         page_parts=page_parts)
  return PrefillTiling(block_q=128, pages_per_chunk=pages_per_chunk,
                       num_warps=num_warps, num_stages=3,
                       page_parts=page_parts)
