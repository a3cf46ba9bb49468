"""Static SASS of the int8 decode loop in four forms: queries in bf16 or int8,
V pages stored as the pool stores them ([block, head_dim]) or transposed
([head_dim, block]). An experiment for docs/benchmarks.md ("CPU: int8 queries
in the Triton decode"), not a kernel of the library: a stripped copy of
`decode_triton`'s loop (one 128-token page a step, no splits) on arrays whose
V half may be transposed, compiled for sm_90 as `launch.kernel_sass` does.
Nothing runs. Needs the `triton` package (pip install -e '.[sass]'):

    python scripts/sass_int8_layouts.py > docs/results/sass_int8_layouts_2026-11-28.txt
"""
import functools
import tempfile

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from kernels import decode_triton as dt, lowering
from kernels.common import LOG2E, MASK_VALUE, SQUEEZED
from launch import sass_report, sass_analysis

def kernel(lens_ref, tables_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, qs_ref, o_ref, m_ref, l_ref, *, vt, q8):
  num_blocks, block_size, head_dim = k_ref.shape
  kv_len = lens_ref[0]
  num_steps = (kv_len + block_size - 1) // block_size
  q = q_ref[...]
  rows = q.shape[0]
  scale = LOG2E * head_dim ** -0.5
  rs = (qs_ref[...] * scale)[:, None]
  def body(i, carry):
    o, m, l = carry
    page = jnp.clip(tables_ref[i], 0, num_blocks - 1)
    k = k_ref[page]
    if q8:
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32).astype(jnp.float32) * rs
    else:
      s = dt.dot_nt(q, k.astype(jnp.bfloat16)) * scale
    s = s * ks_ref[page]
    valid = i * block_size + jnp.arange(block_size, dtype=jnp.int32) < kv_len
    s = jnp.where(valid[None, :], s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_new = l * alpha + jnp.sum(p, axis=1)
    p = (p * vs_ref[page]).astype(jnp.bfloat16)
    v = v_ref[page].astype(jnp.bfloat16)
    if vt:   # v: [D, T]
      pv = dt.dot_nt(p, v)
    else:    # v: [T, D]
      pv = dt.dot_nn(p, v)
    return o * alpha[:, None] + pv, m_new, l_new
  init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
  o, m, l = lax.fori_loop(0, num_steps, body, init)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l

def call(q, kp, vp, tables, lens, ks, vs, qs, *, vt, q8, warps, stages):
  B, Hkv, rows, D = q.shape
  nb, bs = kp.shape[0], kp.shape[2]
  sq = SQUEEZED
  vshape = (nb, sq, D, bs) if vt else (nb, sq, bs, D)
  return pl.pallas_call(
      functools.partial(kernel, vt=vt, q8=q8),
      grid=(B, Hkv),
      in_specs=[pl.BlockSpec((sq, 1), lambda b, h: (b, 0)),
                pl.BlockSpec((sq, tables.shape[1]), lambda b, h: (b, 0)),
                pl.BlockSpec((sq, sq, rows, D), lambda b, h: (b, h, 0, 0)),
                pl.BlockSpec((nb, sq, bs, D), lambda b, h: (0, h, 0, 0)),
                pl.BlockSpec(vshape, lambda b, h: (0, h, 0, 0)),
                pl.BlockSpec((nb, sq), lambda b, h: (0, h)),
                pl.BlockSpec((nb, sq), lambda b, h: (0, h)),
                pl.BlockSpec((sq, sq, rows), lambda b, h: (b, h, 0))],
      out_specs=[pl.BlockSpec((sq, sq, rows, D), lambda b, h: (b, h, 0, 0)),
                 pl.BlockSpec((sq, sq, rows), lambda b, h: (b, h, 0)),
                 pl.BlockSpec((sq, sq, rows), lambda b, h: (b, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, Hkv, rows, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, rows), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, rows), jnp.float32)],
      compiler_params=dt.compiler_params(warps, stages))(lens, tables, q, kp, vp, ks, vs, qs)

S = jax.ShapeDtypeStruct
B, Hkv, rows, D, bs, nb = 64, 8, 16, 128, 128, 3000
for q8 in (False, True):
  for vt in (False, True):
    for warps, stages in ((4, 1), (8, 1), (4, 2)):
      args = (S((B, Hkv, rows, D), jnp.int8 if q8 else jnp.bfloat16), S((nb, Hkv, bs, D), jnp.int8),
              S((nb, Hkv, D, bs) if vt else (nb, Hkv, bs, D), jnp.int8), S((B, 32), jnp.int32), S((B, 1), jnp.int32),
              S((nb, Hkv), jnp.float32), S((nb, Hkv), jnp.float32), S((B, Hkv, rows), jnp.float32))
      fn = lambda *a: call(*a, vt=vt, q8=q8, warps=warps, stages=stages)
      (ttir,) = lowering.triton_modules(fn, args)
      with tempfile.TemporaryDirectory() as wd:
        c = sass_report.compile_for_hopper(ttir, warps, stages, wd)
      used = sass_analysis.resources(c.resource_usage)
      loops = sass_analysis.matmul_loops(c.sass)
      lp = max(loops, key=lambda l: len(l.instructions))
      n = len(lp.instructions)
      kb = bs * D * 2 / 1024
      mix = lp.mix()
      print(f"q8={q8!s:5} vt={vt!s:5} w={warps} s={stages} regs={used.registers:3} spill={used.spilled:4} loop={n:5} wi/KB={n*warps/kb:6.1f} ", dict(mix.most_common(6)), flush=True)
