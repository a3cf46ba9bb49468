"""Every call a kernel says it supports (the `supports` that "auto"
consults) gets a default tiling the kernel accepts: "auto" never routes a
call to a kernel that then refuses its own tiling (a bad step size, a ring
past the shared-memory budget). Pure Python: tilings and checks, no kernel
runs."""

from __future__ import annotations

import functools
import itertools

from kernels import decode_mosaic_gpu
from kernels import decode_triton
from kernels import paged_attention_mosaic_gpu
from kernels import paged_attention_triton
from kernels import prefill_mosaic_gpu
from kernels import tuning

PAGES = (16, 32, 64, 128, 256, 512, 1024)
HEAD_DIMS = (16, 32, 64, 128, 256)
POOLS = (("bfloat16", 2, False), ("float16", 2, False), ("float32", 4, False),
         ("int8", 1, True))
# (batch, num_kv_heads, pages_per_seq): one page, a short table, a long one.
CALLS = ((1, 1, 1), (3, 2, 5), (64, 8, 2048))


def _calls(supports):
  for block_size, head_dim, (dtype, itemsize, quantized), q_len in (
      itertools.product(PAGES, HEAD_DIMS, POOLS, (1, 9))):
    if supports(q_len=q_len, head_dim=head_dim, block_size=block_size,
                quantized=quantized, dtype=dtype, group=3):
      yield block_size, head_dim, itemsize, quantized, q_len


def test_mosaic_gpu_defaults_fit_every_supported_call():
  seen = 0
  for block_size, head_dim, itemsize, quantized, q_len in _calls(
      paged_attention_mosaic_gpu.supports):
    if q_len > 1:
      # The default (two computing warpgroups on bf16/f16 pools, one on
      # int8) and the one-warpgroup variant.
      tilings = [tuning.mosaic_prefill_tiling(
          block_size=block_size, head_dim=head_dim, itemsize=itemsize,
          quantized=quantized, consumers=consumers)
                 for consumers in (None, 1)]
      assert tilings[0].consumers == (1 if quantized else 2)
    else:
      # The default (one warpgroup) and its variant with a copying
      # warpgroup.
      tilings = []
      for batch, kv_heads, pages in CALLS:
        shape = dict(batch=batch, num_kv_heads=kv_heads,
                     pages_per_seq=pages, block_size=block_size,
                     head_dim=head_dim, itemsize=itemsize,
                     quantized=quantized)
        variants = [tuning.mosaic_decode_tiling(**shape, copy_warpgroup=c)
                    for c in (None, False, True)]
        assert not variants[0].copy_warpgroup and variants[2].copy_warpgroup
        assert variants[0] == variants[1]
        tilings += variants
    for tiling in tilings:  # each kernel's own checks
      if q_len > 1:
        prefill_mosaic_gpu.check_tiling(tiling, block_size, head_dim,
                                        itemsize, quantized=quantized)
      else:
        decode_mosaic_gpu.check_tiling(tiling, block_size, head_dim,
                                       quantized=quantized)
      seen += 1
  # head_dim 64/128 x 7 page sizes x (bf16, f16, int8), decode and prefill.
  assert seen == 2 * 7 * 3 * (2 + 3 * len(CALLS))


def test_triton_defaults_fit_every_supported_call():
  seen = 0
  for block_size, head_dim, itemsize, quantized, q_len in _calls(
      paged_attention_triton.supports):
    if q_len > 1:
      tilings = [tuning.prefill_tiling(block_size=block_size,
                                       head_dim=head_dim, itemsize=itemsize)]
    else:
      tilings = [tuning.decode_tiling(
          batch=batch, num_kv_heads=kv_heads, pages_per_seq=pages,
          block_size=block_size, head_dim=head_dim, itemsize=itemsize,
          quantized=quantized)
                 for batch, kv_heads, pages in CALLS]
      # int8 pools run unpipelined (measured, kernels/tuning.py).
      assert {t.num_stages for t in tilings} == {1 if quantized else 2}
    for tiling in tilings:
      decode_triton.check_tiling(tiling, tiling.pages_per_chunk,
                                 tiling.page_parts, block_size)
      assert getattr(tiling, "num_splits", 1) >= 1
      seen += 1
  # head_dim 16..256 x 7 page sizes x 4 pools, decode and prefill.
  assert seen == 5 * 7 * 4 * (len(CALLS) + 1)


def test_triton_decode_takes_the_int8_rule_when_given_no_tiling(monkeypatch):
  """`paged_decode` without a tiling sizes an int8 pool's by the int8 rule
  (`quantized`: unpipelined, split for 8 programs a core). The H200 table
  of 2026-11-27 (second run) found the wrapper had not passed `quantized`,
  so its int8 rows ran the 16-bit rule that the sweep had already beaten.
  The rule at the benchmark's 64 x 4k int8 shape: 512 (sequence, KV head)
  programs, ceil(8 * 132 / 512) = 3 splits."""
  import jax
  import jax.numpy as jnp
  sds = jax.ShapeDtypeStruct
  q = sds((64, 32, 128), jnp.bfloat16)
  tables = sds((64, 256), jnp.int32)
  int8 = decode_triton.default_tiling(
      q, sds((300, 2, 8, 16, 128), jnp.int8), tables,
      sds((300, 2, 8), jnp.float32))
  bf16 = decode_triton.default_tiling(
      q, sds((300, 2, 8, 16, 128), jnp.bfloat16), tables)
  assert (int8.num_stages, int8.num_splits) == (1, 3), int8
  assert (bf16.num_stages, bf16.num_splits) == (2, 1), bf16
  # And the wrapper asks for it: a small int8 call, traced (not run; the
  # function under jit, so no cached trace of an earlier test answers).
  asked = []
  rule = tuning.decode_tiling
  monkeypatch.setattr(tuning, "decode_tiling",
                      lambda **kw: asked.append(kw) or rule(**kw))
  out = jax.eval_shape(
      functools.partial(decode_triton.paged_decode.__wrapped__,
                        interpret=True),
      sds((2, 4, 64), jnp.bfloat16), sds((6, 2, 2, 16, 64), jnp.int8),
      sds((2, 3), jnp.int32), sds((2,), jnp.int32),
      kv_scales=sds((6, 2, 2), jnp.float32))
  assert out.shape == (2, 4, 64)
  assert [kw["quantized"] for kw in asked] == [True], asked
