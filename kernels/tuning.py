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
* The Mosaic GPU decode kernel (`decode_mosaic_gpu.py`) streams pages
  through a ring of `num_stages` SMEM slots by TMA: steps of ~16 KB of K
  (64 tokens at head_dim 128 in bf16) on 2 slots, so that two programs
  share an SM, and a grid of one wave. `mosaic_decode_tiling` says what
  was measured.
* Prefill is bound by matmuls: 128 query rows by 64 keys (or one page when
  pages are larger) per step, as FlashAttention-2 kernels on Hopper use.

Defaults revised from the H200 runs of 2026-11-27 (docs/benchmarks.md,
"GPU: 2026-11-27"; jax 0.11.2): the Triton decode kernel runs unpipelined
on int8 pools, split for 8 programs a core; the Mosaic GPU decode kernel
runs one warpgroup on a 2-slot ring in one wave (the second and third
runs' sweeps; the first had given 16-token pages and int8 pools a copying warpgroup);
the Mosaic GPU prefill kernel runs on two computing warpgroups (bf16/f16
pools).
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
# Programs per core that split-K aims for in the Triton decode on int8 pools
# (unpipelined, three programs fit an SM by registers: more make full waves).
QUANTIZED_PROGRAMS_PER_CORE = 8


@dataclasses.dataclass(frozen=True)
class DecodeTiling:
  """Static tiling of the decode kernel."""

  pages_per_chunk: int  # pages gathered per inner-loop step
  num_splits: int  # split-K partitions of the block table
  num_warps: int = 4
  num_stages: int = 2
  page_parts: int = 1  # > 1: a step reads 1/page_parts of one (large) page
  # int8 pools only: the queries rounded to int8 (one scale per query head,
  # `quantize.quantize_rows`), so that q @ K^T is an int8 matmul with int32
  # sums on K as stored, not widened (about a fifth of the int8 loop's
  # instructions, `launch.kernel_sass`). A different numerical contract:
  # the query's rounding adds to K's. Not the default: unmeasured on a GPU.
  int8_query: bool = False


@dataclasses.dataclass(frozen=True)
class MosaicDecodeTiling:
  """Static tiling of the Mosaic GPU decode kernel."""

  pages_per_chunk: int  # pages gathered (one TMA copy each) per step
  num_splits: int  # split-K partitions of the block table
  num_stages: int = 2  # SMEM ring slots (steps in flight + the one reduced)
  page_parts: int = 1  # > 1: a step reads 1/page_parts of one (large) page
  # True: a step reads all its page ids from the table before starting any
  # of its copies, so the ids' global-memory loads overlap instead of each
  # waiting behind the previous page's copies (a hypothesis for the 16-token
  # pages' lower rates, to be measured by launch.bench_tiling).
  ids_first: bool = False
  # Prefill only: warpgroups computing per program, each its own 64-row query
  # tile over the shared ring; 2 adds a third warpgroup that only issues the
  # copies (`prefill_mosaic_gpu_ws.py`; bf16/f16 pools).
  # 2 is the default for bf16/f16 pools (`mosaic_prefill_tiling`).
  consumers: int = 1
  # Decode only: a second warpgroup that issues the ring's copies, so that
  # the computing one never waits on a page id; for int8 pools it also reads
  # the page scales and converts each step's int8 tiles to bf16 (into two
  # alternating tiles), so that the conversion overlaps the computing
  # warpgroup's matmuls and softmax. Not the default since the H200's second
  # session (`mosaic_decode_tiling`: one warpgroup on a 2-slot ring ran
  # faster); `mosaic_deep_ring_tiling` gives it the deep ring it needs.
  copy_warpgroup: bool = False
  # Decode only: True pads each GQA group's query rows to the 64-row tile
  # with an XLA op before the launch (the form measured until 2026-11-28;
  # ~3 us on an H100, a sixteenth of a 1 x 32k decode). False: programs copy
  # their rows from the unpadded queries where the group allows it
  # (`query_rows.DecodeQueryBlocks`), and pad otherwise.
  pad_query: bool = False
  # Decode only: True merges the split-K partial results in one variadic
  # XLA reduction (`common.merge_splits_one_reduce`) instead of three (each
  # its own launch on a GPU). Not the default until measured on a GPU.
  one_reduce_merge: bool = False


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


def step_split(block_size: int, target_tokens: int) -> tuple[int, int]:
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
    quantized: bool = False,
    num_cores: int = DEFAULT_NUM_CORES,
) -> DecodeTiling:
  """Picks the decode kernel's tile and split count for a static shape.

  A step reads ~32 KB of K (and as much V): 128 tokens at head_dim 128 in
  bf16 (`itemsize`: the dtype the kernel computes in, bf16 for int8 pools),
  so two pipeline stages of K and V stay near 128 KB of shared memory.
  int8 pools (`quantized`) run unpipelined (`num_stages=1`): pipelined, the
  kernel needs 254 registers a thread there (two programs an SM), 160
  without (`launch.kernel_sass`), and on an H200 it ran 1.23x and 1.39x
  faster so at both int8 shapes of the benchmark (docs/results/
  tiling_h200_2026-11-27.log). They split for `QUANTIZED_PROGRAMS_PER_CORE`
  programs a core: on the H200's second run (docs/results/
  tiling_h200_2026-11-27_run2.log) 36 splits ran 1.22x the 9 of two a core
  at 4 x 32k (64-token pages), 2-4 splits 1.20-1.23x one at 64 x 4k.
  """
  target_tokens = max(16, _pow2_floor(32768 // (head_dim * itemsize)))
  pages_per_chunk, page_parts = step_split(block_size, target_tokens)
  pages_per_chunk = min(pages_per_chunk, _pow2_floor(pages_per_seq))
  programs = batch * num_kv_heads
  per_core = QUANTIZED_PROGRAMS_PER_CORE if quantized else PROGRAMS_PER_CORE
  want = -(-per_core * num_cores // max(1, programs))
  max_by_len = max(1, (pages_per_seq * block_size) // MIN_TOKENS_PER_SPLIT)
  num_splits = max(1, min(want, max_by_len, MAX_SPLITS))
  return DecodeTiling(pages_per_chunk=pages_per_chunk, num_splits=num_splits,
                      num_warps=4, num_stages=1 if quantized else 2,
                      page_parts=page_parts)


# Mosaic GPU decode: shared memory a program may fill, and its ring depth.
MOSAIC_SMEM_BUDGET = 200 * 1024
MOSAIC_MAX_STAGES = 4


def mosaic_smem_bytes(tokens: int, head_dim: int, num_stages: int,
                      itemsize: int = 2, quantized: bool = False,
                      copy_warpgroup: bool = False) -> int:
  """Shared memory of one Mosaic GPU decode program: the larger of its two
  scopes, one after the other. The loop's: the 64-row query tile and the K/V
  ring, and for an int8 pool (`quantized`) an int8 ring with one step's K and
  V converted to bf16 for `wgmma` beside it (two steps' with a converting
  `copy_warpgroup`) and each slot's page scales (at most one page per 16
  tokens). The output's: the float32 output tile with its max and sum
  rows."""
  compute = 2 if quantized else itemsize
  ring = 1 if quantized else itemsize
  converted_steps = 2 if copy_warpgroup else 1
  scale_rows = num_stages + (2 if copy_warpgroup else 0)
  work = (converted_steps * 2 * tokens * head_dim * compute
          + scale_rows * 2 * max(1, tokens // 16) * 4) if quantized else 0
  loop = 64 * head_dim * compute + 2 * num_stages * tokens * head_dim * ring
  return max(loop + work, 64 * head_dim * 4 + 2 * 64 * 4)


def with_copy_warpgroup(tiling: MosaicDecodeTiling, *, block_size: int,
                        head_dim: int,
                        quantized: bool = False) -> MosaicDecodeTiling:
  """`tiling` with a copying warpgroup (decode). For an int8 pool its ring
  loses slots (never below 2) until the second pair of converted tiles fits
  `MOSAIC_SMEM_BUDGET` beside it; 16-bit pools keep their ring."""
  tokens = tiling.pages_per_chunk * block_size // tiling.page_parts
  stages = tiling.num_stages
  while stages > 2 and mosaic_smem_bytes(
      tokens, head_dim, stages, quantized=quantized,
      copy_warpgroup=True) > MOSAIC_SMEM_BUDGET:
    stages -= 1
  return dataclasses.replace(tiling, copy_warpgroup=True, num_stages=stages)


def _mosaic_step_split(*, pages_per_seq: int, block_size: int, head_dim: int,
                       quantized: bool, itemsize: int) -> tuple[int, int]:
  """(pages_per_chunk, page_parts) of a Mosaic decode step: ~16 KB of K
  (~8 KB of int8 K, so that the bf16 tiles it is dequantized into stay as
  large), 64 to 256 tokens, never under 64 (the contraction of p @ V in
  the kernel's wgmma) nor past the table (padded)."""
  step_bytes = 8192 if quantized else 16384
  ring_itemsize = 1 if quantized else itemsize
  tokens = min(256, max(64, _pow2_floor(
      step_bytes // (head_dim * ring_itemsize))))
  tokens = max(64, min(tokens, _pow2_floor(pages_per_seq * block_size)))
  return step_split(block_size, tokens)


def mosaic_deep_ring_tiling(*, batch: int, num_kv_heads: int,
                            pages_per_seq: int, block_size: int,
                            head_dim: int, itemsize: int, quantized: bool,
                            num_cores: int) -> MosaicDecodeTiling:
  """The Mosaic decode tiling before 2026-11-27's second H200 run: 64-token
  steps, as many ring slots as fit `MOSAIC_SMEM_BUDGET` (3-4), the Triton
  kernel's split rule. One program an SM; what the copying warpgroup
  needs (on 2 slots it ran 0.50x, 0.88x, 0.89x its 4-slot self)."""
  pages_per_chunk, page_parts = _mosaic_step_split(
      pages_per_seq=pages_per_seq, block_size=block_size, head_dim=head_dim,
      quantized=quantized, itemsize=itemsize)
  tokens = pages_per_chunk * block_size // page_parts
  per_stage = 2 * tokens * head_dim * (1 if quantized else itemsize)
  fixed = mosaic_smem_bytes(tokens, head_dim, 0, itemsize, quantized)
  num_stages = max(2, min(MOSAIC_MAX_STAGES,
                          (MOSAIC_SMEM_BUDGET - fixed) // per_stage))
  split = decode_tiling(batch=batch, num_kv_heads=num_kv_heads,
                        pages_per_seq=pages_per_seq, block_size=block_size,
                        head_dim=head_dim, itemsize=itemsize,
                        num_cores=num_cores).num_splits
  return MosaicDecodeTiling(pages_per_chunk=pages_per_chunk,
                            num_splits=split, num_stages=num_stages,
                            page_parts=page_parts)


# Mosaic GPU decode (one warpgroup): ring slots, and programs an SM they let
# share it (2 slots of 64-token bf16 steps at head_dim 128: ~80 KB each).
MOSAIC_RING_SLOTS = 2
MOSAIC_PROGRAMS_PER_CORE = 2


def mosaic_decode_tiling(
    *,
    batch: int,
    num_kv_heads: int,
    pages_per_seq: int,
    block_size: int,
    head_dim: int,
    itemsize: int = 2,
    quantized: bool = False,
    copy_warpgroup: bool | None = None,
    num_cores: int = DEFAULT_NUM_CORES,
) -> MosaicDecodeTiling:
  """Picks the Mosaic GPU decode kernel's step, ring depth and splits.

  Default (one warpgroup): a 2-slot ring of ~16 KB steps of K (64 tokens
  at head_dim 128 in bf16; ~8 KB of int8 K), ~80 KB of shared memory, so
  that two programs share an SM, and a grid of one wave: `batch *
  num_kv_heads * num_splits` at most two programs a core (the split count
  rounded down, not up).

  Measured on an H200 (docs/results/tiling_h200_2026-11-27_run2.log and
  _run3.log, jax 0.11.2; 32 / 8 heads, d 128), against the earlier
  default (a copying warpgroup, 3-4 slots, splits rounded up): 16 x 16k
  271-277 against 283-286 us (2 splits; 3, a second wave, 329 us on 2
  slots), 64 x 4k 282-287 against 296-300 us, 4 x 32k (64-token pages)
  149 against 179 us, 1 x 32k 50.0-53.8 against 54.2-55.0 us, int8 64 x 4k
  390-398 against 595-607 us. Double steps with one program an SM (1 x
  32k: 128-token steps, 16 splits) ran 51.5 and 55.0 us in two runs: no
  better within the runs' spread, so not a rule. The copying warpgroup on
  2 slots ran 0.50-0.89x its deep-ring self, so `copy_warpgroup=True`
  keeps the deep ring (`mosaic_deep_ring_tiling`, `with_copy_warpgroup`).
  """
  shape = dict(batch=batch, num_kv_heads=num_kv_heads,
               pages_per_seq=pages_per_seq, block_size=block_size,
               head_dim=head_dim, itemsize=itemsize, quantized=quantized)
  if copy_warpgroup:
    return with_copy_warpgroup(
        mosaic_deep_ring_tiling(**shape, num_cores=num_cores),
        block_size=block_size, head_dim=head_dim, quantized=quantized)
  pages_per_chunk, page_parts = _mosaic_step_split(
      pages_per_seq=pages_per_seq, block_size=block_size, head_dim=head_dim,
      quantized=quantized, itemsize=itemsize)
  programs = max(1, batch * num_kv_heads)
  max_by_len = max(1, (pages_per_seq * block_size) // MIN_TOKENS_PER_SPLIT)
  num_splits = max(1, min(MOSAIC_PROGRAMS_PER_CORE * num_cores // programs,
                          max_by_len, MAX_SPLITS))
  return MosaicDecodeTiling(pages_per_chunk=pages_per_chunk,
                            num_splits=num_splits,
                            num_stages=MOSAIC_RING_SLOTS,
                            page_parts=page_parts)


# Mosaic GPU prefill: keys per ring step and ring depth (measured, below).
MOSAIC_PREFILL_STEP_TOKENS = 128
MOSAIC_PREFILL_STAGES = 2


def mosaic_prefill_tiling(*, block_size: int, head_dim: int,
                          itemsize: int = 2, quantized: bool = False,
                          consumers: int | None = None) -> MosaicDecodeTiling:
  """The Mosaic GPU prefill kernel's page ring (steps of 128 keys, 2
  slots) and its computing warpgroups.

  `consumers` (None: 2 for bf16/f16 pools, 1 for int8): two computing
  warpgroups, each its own 64-row query tile, and a copying one
  (`prefill_mosaic_gpu_ws.py`, FlashAttention-3's split), so that one
  warpgroup's softmax runs beside the other's matmuls. On an H200 it ran
  1.89x, 1.45x and 1.48x the one-warpgroup kernel (16-token pages, 1 x
  (16,384 + 512) tokens: 309 against 585 us; 64-token pages, 1 x (32,256 +
  512) and 4 x (16,384 + 256); docs/results/bench_kernels_h200_2026-11-27
  .log), 74-88% of cuDNN's dense attention on the same lengths over that day's
  two runs. Its int8
  path does not exist (the one-warpgroup kernel dequantizes).

  Each step meets 64 query rows, so prefill is bound by its matmuls and
  softmax, not by the ring: a deeper ring buys nothing and a longer step
  halves the per-step softmax rescaling and barrier waits. Measured on an
  H100 (1 x (16,384 + 512) tokens, 16-token bf16 pages; docs/results/
  tiling_h100_2026-11-26_stop11.log): 128-key steps with 2 slots 556 us;
  64-key steps with 2, 3, 4 slots 624, 632, 985 us. The ring's bytes stay
  within the decode kernel's budget for head_dim <= 128 (144 KB at 128,
  int8 included: `mosaic_smem_bytes(128, 128, 2)`).
  """
  del head_dim, itemsize  # the same step for every pool
  if consumers is None:
    consumers = 1 if quantized else 2
  pages_per_chunk, page_parts = step_split(block_size, MOSAIC_PREFILL_STEP_TOKENS)
  return MosaicDecodeTiling(pages_per_chunk=pages_per_chunk, num_splits=1,
                            num_stages=MOSAIC_PREFILL_STAGES,
                            page_parts=page_parts, consumers=consumers)


def prefill_tiling(*, block_size: int, head_dim: int,
                   itemsize: int = 2) -> PrefillTiling:
  """Picks the prefill kernel's tile sizes for a static shape.

  128 query rows by 64 keys in bf16 (float32: 64 rows, 2 stages, to stay
  within shared memory).
  """
  pages_per_chunk, page_parts = step_split(block_size, 64)
  num_warps = 4 if head_dim <= 64 else 8
  if itemsize >= 4:
    return PrefillTiling(block_q=64, pages_per_chunk=pages_per_chunk,
                         num_warps=num_warps, num_stages=2,
                         page_parts=page_parts)
  return PrefillTiling(block_q=128, pages_per_chunk=pages_per_chunk,
                       num_warps=num_warps, num_stages=3,
                       page_parts=page_parts)


@dataclasses.dataclass(frozen=True)
class TpuPrefillTiling:
  """Static tiling of the Mosaic TPU prefill kernel."""

  block_tokens: int  # new tokens per program (x the GQA group = rows)
  pages_per_chunk: int  # pages DMA'd into one VMEM ring slot per step


# Mosaic TPU prefill: rows (tokens x GQA group) per program, keys per step.
TPU_PREFILL_ROWS = 256
TPU_PREFILL_CHUNK_TOKENS = 256


def tpu_prefill_tiling(*, q_len: int, group: int, pages_per_seq: int,
                       block_size: int) -> TpuPrefillTiling:
  """Picks the Mosaic TPU prefill kernel's tiles for a static shape.

  Reasoned, not measured (no TPU has run it): ~256 query rows (the group's
  heads times a power of 2 >= 16 of tokens, no more than the chunk needs)
  against ~256 keys per step, so a step is two MXU-sized matmuls while the
  next step's pages are in flight; the f32 logits tile is 256 KB of VMEM.
  """
  block_tokens = max(16, _pow2_floor(TPU_PREFILL_ROWS // max(1, group)))
  block_tokens = min(block_tokens, max(16, 1 << (q_len - 1).bit_length()))
  pages_per_chunk = max(1, TPU_PREFILL_CHUNK_TOKENS // block_size)
  pages_per_chunk = min(pages_per_chunk, _pow2_floor(pages_per_seq))
  return TpuPrefillTiling(block_tokens=block_tokens,
                          pages_per_chunk=pages_per_chunk)
