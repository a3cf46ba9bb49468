"""Random paged-attention problems shared by the CPU and GPU kernel tests.

A case is a pool of random pages, block tables that name distinct pages in a
random order (unused table slots hold junk ids that kernels must never
dereference unmasked), ragged lengths and random queries. Nothing is zero:
unwritten outputs and wrong indexing cannot hide behind zeros.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from kernels import quantize

# Small cases the CPU tests run in interpret mode and the GPU tests rerun.
DECODE_CASES = [
    # (heads, kv_heads, head_dim, block_size, dtype, kv_lens, chunk, splits)
    (9, 3, 64, 16, "float32", [1, 37, 128], 2, 3),  # SmolLM2 9:3, 3 splits
    (8, 2, 128, 16, "bfloat16", [16, 100], 1, 4),  # splits > pages used
    (16, 1, 64, 64, "bfloat16", [200, 63], 1, 2),  # MQA, 16 rows
    (4, 2, 128, 256, "float32", [300, 1], 1, 2),  # big pages
    (9, 3, 64, 16, "int8", [77, 5], 2, 2),  # int8 with scales
    (8, 8, 128, 32, "int8", [130, 0], 1, 1),  # MHA, int8, empty, no split
]

# The Mosaic GPU decode kernel's cases (bf16/f16 and int8 pools; steps of
# 64-256 tokens). Each split of the ones with num_splits == 1 takes more
# steps than the ring has stages, so slots are refilled.
MOSAIC_DECODE_CASES = [
    # (heads, kv_heads, head_dim, block_size, dtype, kv_lens,
    #  pages_per_chunk, num_splits, num_stages, page_parts[, ids_first,
    #  consumers, copy_warpgroup, pad_query, one_reduce_merge])
    # The query rows (query_rows.DecodeQueryBlocks): groups of 3 are padded
    # before the launch; 4:1 and 2:1 groups copied by 8-row blocks of 2 and
    # 4 KV heads, 1:1 of 8; groups of 16 copied whole.
    (9, 3, 64, 16, "bfloat16", [1, 37, 200], 4, 2, 2, 1),  # 3:1, 1 token
    (8, 2, 128, 32, "bfloat16", [100, 16, 250], 2, 1, 2, 1),  # 4:1, refills
    (8, 2, 128, 32, "bfloat16", [100, 16, 250], 2, 1, 2, 1, False, 1, False,
     True),  # the same, queries padded by XLA
    (8, 8, 64, 16, "float16", [77, 1], 4, 3, 3, 1),  # MHA, splits > used
    # 2:1 in two blocks; splits merged by one variadic reduction, two of
    # them empty for the first sequence.
    (16, 8, 64, 16, "bfloat16", [45, 70], 4, 3, 2, 1, False, 1, False, False,
     True),
    (9, 3, 128, 64, "bfloat16", [130, 64, 5], 1, 2, 2, 1),  # 64-token pages
    (6, 2, 64, 128, "bfloat16", [300, 129], 1, 1, 2, 2),  # pages in parts
    (16, 1, 64, 32, "bfloat16", [190, 0], 2, 1, 3, 1),  # MQA, empty seq
    # Page ids read before a step's copies: 8 and 4 pages a step.
    (8, 2, 128, 16, "bfloat16", [250, 129, 3], 8, 2, 2, 1, True),
    # int8 pools: per-page scales within a step, one page a step, parts.
    (9, 3, 64, 16, "int8", [1, 37, 200], 4, 2, 2, 1),
    (8, 2, 128, 64, "int8", [130, 64, 5], 1, 2, 3, 1),
    (6, 2, 128, 128, "int8", [300, 129], 1, 1, 2, 2),
    (4, 1, 64, 32, "int8", [190, 0], 2, 1, 4, 1),  # MQA, empty seq
    (9, 3, 64, 16, "int8", [1, 37, 200], 4, 2, 2, 1, True),
    # A copying warpgroup beside the computing one: refills, splits past
    # the sequences, an empty sequence; int8: the copier converts the tiles
    # and hands over their scales (the last case: 11 steps, so each of the
    # two converted tile pairs is reused and every ring slot refilled).
    (8, 2, 128, 32, "bfloat16", [100, 16, 250], 2, 2, 2, 1, False, 1, True),
    (16, 1, 64, 32, "bfloat16", [190, 0], 2, 1, 3, 1, False, 1, True),
    (9, 3, 64, 16, "int8", [1, 37, 200], 4, 2, 2, 1, False, 1, True),
    (6, 2, 128, 128, "int8", [300, 129], 1, 1, 2, 2, False, 1, True),
    (8, 2, 128, 16, "int8", [700, 129, 3], 4, 1, 3, 1, False, 1, True),
]

MOSAIC_PREFILL_CASES = [
    # (heads, kv_heads, head_dim, block_size, dtype, q_len, kv_lens, q_lens,
    #  pages_per_chunk, num_stages, page_parts[, ids_first[, consumers]])
    (9, 3, 64, 16, "bfloat16", 20, [5, 37, 96], [5, 20, 0], 4, 2, 1),  # 3:1
    (4, 2, 128, 32, "bfloat16", 40, [40, 150], [40, 33], 2, 2, 1),
    (8, 1, 64, 64, "float16", 70, [300, 70], [70, 9], 1, 3, 1),  # refills
    (4, 4, 128, 128, "bfloat16", 33, [200, 33], [33, 2], 1, 2, 2),  # parts
    (6, 2, 64, 16, "int8", 24, [24, 70, 0], [24, 1, 0], 4, 2, 1),
    (16, 1, 128, 64, "int8", 10, [130, 10], [10, 3], 1, 2, 1),  # MQA 16:1
    (4, 2, 128, 16, "bfloat16", 40, [40, 300], [40, 33], 8, 2, 1, True),
    # Two computing warpgroups and a copying one (prefill_mosaic_gpu_ws):
    # tiles with no rows, a later tile needing more steps, refills, MQA,
    # pages in parts.
    (9, 3, 64, 16, "bfloat16", 20, [5, 37, 96], [5, 20, 0], 4, 2, 1, False,
     2),
    (4, 2, 128, 32, "bfloat16", 70, [40, 300], [40, 70], 2, 3, 1, True, 2),
    (8, 1, 64, 64, "float16", 70, [300, 70], [70, 9], 1, 3, 1, False, 2),
    (4, 4, 128, 128, "bfloat16", 33, [200, 33], [33, 2], 1, 2, 2, False, 2),
]

PREFILL_CASES = [
    # (heads, kv_heads, head_dim, block_size, dtype, q_len, kv_lens, q_lens)
    (9, 3, 64, 16, "float32", 20, [5, 37, 96], [5, 20, 0]),
    (4, 2, 128, 32, "bfloat16", 40, [40, 150], [40, 33]),  # 2 query blocks
    (4, 1, 64, 64, "int8", 24, [24, 70, 0], [24, 1, 0]),  # + empty seq
]


@dataclasses.dataclass(frozen=True)
class Case:
  """One paged-attention problem (arrays on the default device)."""

  q: jax.Array  # [batch, q_len, num_heads, head_dim]
  kv_pages: jax.Array  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
  block_tables: jax.Array  # [batch, pages_per_seq] int32
  kv_lens: jax.Array  # [batch] int32
  q_lens: jax.Array  # [batch] int32
  kv_scales: jax.Array | None  # [num_blocks, 2, num_kv_heads] f32 (int8)

  def args(self):
    return (self.q, self.kv_pages, self.block_tables, self.kv_lens,
            self.q_lens)


# One compiled program per pool shape, as `_compiled_reference` below.
_compiled_quantize = jax.jit(quantize.quantize_pages)


def make_case(
    seed: int,
    *,
    kv_lens: list[int],
    q_lens: list[int] | None = None,
    q_len: int = 1,
    num_heads: int = 9,
    num_kv_heads: int = 3,
    head_dim: int = 64,
    block_size: int = 16,
    pages_per_seq: int | None = None,
    spare_blocks: int = 5,
    dtype: str = "float32",
) -> Case:
  """Builds a random case; `dtype="int8"` quantizes the pool (bf16 q)."""
  rng = np.random.default_rng(seed)
  batch = len(kv_lens)
  if q_lens is None:
    q_lens = [min(q_len, n) for n in kv_lens]
  need = max(1, max(-(-n // block_size) for n in kv_lens))
  pages_per_seq = pages_per_seq or need
  if pages_per_seq < need:
    raise ValueError(f"pages_per_seq={pages_per_seq} < {need} needed")
  num_blocks = batch * pages_per_seq + spare_blocks
  pool = rng.standard_normal(
      (num_blocks, 2, num_kv_heads, block_size, head_dim)).astype(np.float32)
  perm = rng.permutation(num_blocks)[:batch * pages_per_seq]
  tables = perm.reshape(batch, pages_per_seq).astype(np.int32)
  for b, n in enumerate(kv_lens):  # junk past the used pages
    used = -(-n // block_size)
    junk = rng.choice([-1, num_blocks + 7, 2**30], size=pages_per_seq - used)
    tables[b, used:] = junk
  q = rng.standard_normal((batch, q_len, num_heads, head_dim)).astype(
      np.float32)
  kv_scales = None
  if dtype == "int8":
    kv_pages, kv_scales = _compiled_quantize(pool)
    q_arr = jnp.asarray(q, jnp.bfloat16)
  else:
    kv_pages = jnp.asarray(pool, dtype)
    q_arr = jnp.asarray(q, dtype)
  return Case(q=q_arr, kv_pages=kv_pages,
              block_tables=jnp.asarray(tables),
              kv_lens=jnp.asarray(kv_lens, jnp.int32),
              q_lens=jnp.asarray(q_lens, jnp.int32), kv_scales=kv_scales)


# The reference as one compiled program per shape: run op by op, each of its
# ~25 ops compiled on its own, and that took ~4 s a case on a 2-core CPU.
_compiled_reference = jax.jit(quantize.ref_paged_attention_any,
                              static_argnames=("sm_scale",))


def reference(case: Case, sm_scale: float | None = None) -> np.ndarray:
  """The float64-free XLA reference of `case`, as float32 numpy.

  Its matmuls run at full float32 precision: XLA's default on a GPU rounds
  float32 dot operands to TF32 (~1e-3 relative), looser than the kernels'
  float32 path it checks.
  """
  with jax.default_matmul_precision("highest"):
    out = _compiled_reference(
        case.q.astype(jnp.float32), case.kv_pages, case.block_tables,
        case.kv_lens, case.q_lens, sm_scale=sm_scale,
        kv_scales=case.kv_scales)
  return np.asarray(out, np.float32)


def tolerance(case: Case) -> float:
  """Relative-error bound of a whole output: float32 math vs 16-bit operands.

  16-bit: 1e-2. Measured 2026-11-27, the largest error of the 16-bit cases
  the CPU tests check here was 3.3e-3 (interpret mode); on the H100 (2026-11-26)
  the benchmark's 16-bit and int8 rows, checked the same way, reached
  3.5e-3 at most (docs/results/bench_kernels_h100_2026-11-26_stop11.json).
  float32: 2e-5 (measured: 4.3e-7 at most).
  """
  return 2e-5 if case.q.dtype == jnp.float32 else 1e-2


# Each output row (one token, one head) is held to this multiple of the whole
# output's bound: a bug confined to a few rows (a tile's first or last row,
# one head of a GQA group) moves the whole output's error little. Measured
# 2026-11-27 on the CPU tests: the worst row's error reached 4.5e-3 for
# 16-bit and 1.1e-6 for float32 (bounds: 1.5e-2 and 3e-5).
ROW_TOLERANCE_FACTOR = 1.5


def worst_row_error(out: np.typing.ArrayLike,  # [..., head_dim]
                    ref: np.typing.ArrayLike,  # [..., head_dim], out's shape
                    ) -> float:
  """The largest ||out - ref|| / ||ref|| over the last axis's rows (a token
  and head's output vector), over rows whose reference is nonzero; 0.0 if
  there is none."""
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  ref_norm = np.linalg.norm(ref, axis=-1)
  err_norm = np.linalg.norm(out - ref, axis=-1)
  nonzero = ref_norm > 0
  if not nonzero.any():
    return 0.0
  return float(np.max(err_norm[nonzero] / ref_norm[nonzero]))


def relative_error(out: np.typing.ArrayLike,  # any shape
                   ref: np.typing.ArrayLike,  # out's shape
                   ) -> float:
  """||out - ref|| / ||ref|| in float64 (NaN if out has any NaN)."""
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("nan")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def poison_device_memory(nbytes: int) -> None:
  """Fills and frees `nbytes` of device memory with NaN, so that an output
  buffer the allocator hands out next starts as NaN, not as zeros (GPU tests;
  interpret mode poisons outputs by itself)."""
  n = max(1, nbytes // 4)
  jax.block_until_ready(jnp.full((n,), jnp.nan, jnp.float32)).delete()


def assert_matches(
    out: np.typing.ArrayLike,  # [batch, q_len, num_heads, head_dim]
    case: Case,
    ref: np.ndarray | None = None,  # out's shape; None: reference(case)
    rtol: float | None = None,
) -> None:
  """Asserts `out` is finite everywhere and within tolerance of the ref, as
  a whole and row by row."""
  ref = reference(case) if ref is None else ref
  rtol = tolerance(case) if rtol is None else rtol
  out = np.asarray(out, np.float32)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  assert np.all(np.isfinite(out)), "unwritten (NaN-poisoned) or NaN outputs"
  err = relative_error(out, ref)
  assert err < rtol, f"relative error {err:.3g}"
  row_err = worst_row_error(out, ref)
  assert row_err < ROW_TOLERANCE_FACTOR * rtol, (
      f"one row's relative error {row_err:.3g} (whole output: {err:.3g})")
  # Padding rows and empty sequences must be exact zeros.
  q_lens = np.asarray(case.q_lens)
  kv_lens = np.asarray(case.kv_lens)
  for b in range(out.shape[0]):
    if kv_lens[b] == 0:
      assert not np.any(out[b]), f"sequence {b} has no context: expected 0"
    else:
      assert not np.any(out[b, q_lens[b]:]), f"padding rows of {b} not 0"


def seed_of(params) -> int:
  """A stable seed from a case's parameters (fresh data per case)."""
  return zlib.crc32(repr(params).encode())


def decode_case(params) -> Case:
  """The `Case` of one `DECODE_CASES` or `MOSAIC_DECODE_CASES` entry (one
  query token, a spare table column of junk ids)."""
  heads, kv_heads, head_dim, block_size, dtype, kv_lens = params[:6]
  return make_case(
      seed_of(params), kv_lens=kv_lens, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
      dtype=dtype,
      pages_per_seq=max(-(-n // block_size) for n in kv_lens) + 1)


def mosaic_tiling(params):
  """The Mosaic GPU tiling of one `MOSAIC_DECODE_CASES` or
  `MOSAIC_PREFILL_CASES` entry (prefill: one split)."""
  from kernels import tuning  # pylint: disable=g-import-not-at-top
  if isinstance(params[5], int):  # a prefill case: q_len, kv_lens, q_lens
    chunk, stages, parts, *ids_first = params[8:]
    return tuning.MosaicDecodeTiling(chunk, 1, stages, parts, *ids_first)
  return tuning.MosaicDecodeTiling(*params[6:])


def prefill_case(params) -> Case:
  """The `Case` of one `PREFILL_CASES` (or `MOSAIC_PREFILL_CASES`) entry."""
  heads, kv_heads, head_dim, block_size, dtype, q_len, kv_lens, q_lens = (
      params[:8])
  return make_case(
      seed_of(params), kv_lens=kv_lens, q_lens=q_lens, q_len=q_len,
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      block_size=block_size, dtype=dtype)


# Block gathers host -> device (kernels/host_gather_triton.py and
# host_gather_tpu.py): the pool's and the hot tier's block shape, and the
# layers moved.
HOST_GATHER_CASES = [
    # (dtype, kv_heads, block_size, head_dim, num_layers, layer_start,
    #  layers_moved)
    ("float32", 2, 16, 64, 3, 0, 3),
    ("bfloat16", 3, 32, 128, 4, 1, 2),  # SmolLM2's 3 KV heads, a layer range
    ("int8", 1, 64, 16, 2, 1, 1),  # an int8 pool's pages
]


@dataclasses.dataclass
class GatherCase:
  """A pool and a pinned hot tier of random blocks, the ids to move and the
  pool the move must leave (computed here with numpy)."""

  pool: jax.Array  # [num_layers, num_blocks, 2, kv_heads, P, D] device
  host_tier: jax.Array  # [num_slots, num_layers, 2, kv_heads, P, D] host
  src_slots: jax.Array  # [n] int32
  dst_pages: jax.Array  # [n] int32
  layer_start: int
  num_layers: int
  want: np.ndarray  # the pool after the gather


def host_gather_case(params, num_blocks: int = 12,
                     num_slots: int = 9) -> GatherCase:
  """Random pool and tier (never zeros); the id lists hold a repeated slot,
  a slot past the tier (clamped to its last), a padding entry (-1) and a
  page past the pool (both skipped), in a random order."""
  from kernels import block_copy  # pylint: disable=g-import-not-at-top
  dtype, kv_heads, block_size, head_dim, layers, start, moved = params
  rng = np.random.default_rng(seed_of(params))
  shape = (2, kv_heads, block_size, head_dim)

  def random(lead):
    if dtype == "int8":
      x = rng.integers(-127, 128, lead + shape)
      return np.where(x == 0, 1, x).astype(np.int8)
    return rng.uniform(0.5, 1.5, lead + shape) * rng.choice([-1, 1],
                                                             lead + shape)
  pool = jnp.asarray(random((layers, num_blocks)), dtype)
  tier = block_copy.allocate_host_tier((num_slots, layers) + shape, dtype)
  tier = jax.device_put(jnp.asarray(random((num_slots, layers)), dtype),
                        tier.sharding)
  src = np.array([4, 4, num_slots + 5, 0, 7, 2])
  dst = np.array([3, 11, 0, -1, num_blocks, 6])
  order = rng.permutation(len(src))
  src, dst = src[order], dst[order]
  want = np.asarray(pool).copy()
  tier_np = np.asarray(jax.device_get(tier))
  for s, d in zip(src, dst):
    if 0 <= d < num_blocks:
      s = min(s, num_slots - 1)
      want[start:start + moved, d] = tier_np[s, start:start + moved]
  return GatherCase(pool, tier, jnp.asarray(src, jnp.int32),
                    jnp.asarray(dst, jnp.int32), start, moved, want)
