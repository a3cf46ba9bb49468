"""The `"pallas_mosaic_tpu"` implementation of `kernels.paged_attention`.

Routes a batch of single-token queries (`q_len == 1`) to the Mosaic TPU
decode kernel (`decode_mosaic_tpu.py`; float32, bfloat16 and int8 pools)
and anything longer to the prefill kernel (`prefill_mosaic_tpu.py`; float32
and bfloat16 pools). On a CPU backend both run in TPU interpret mode.
"""

from __future__ import annotations

import jax

from kernels import decode_mosaic_tpu
from kernels import prefill_mosaic_tpu
from kernels.common import decode_output


def supports(*, q_len: int, head_dim: int, block_size: int, quantized: bool,
             dtype: str | None, group: int | None = None) -> bool:
  """Whether the kernel this call routes to handles it: decode takes any
  pool, prefill float32 and bfloat16 pools (`dtype` None: unknown, so no).
  head_dim and page size are not limited here: the limits of a real TPU's
  tiling are unmeasured."""
  del head_dim, block_size, group
  return q_len == 1 or (not quantized and dtype in ("float32", "bfloat16"))


def paged_attention_mosaic_tpu(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    sm_scale: float | None = None,
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
    interpret: bool | None = None,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Paged attention with the Mosaic TPU kernels."""
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if q.shape[1] != 1:
    if kv_scales is not None:
      raise ValueError("the Mosaic TPU prefill kernel takes no int8 pools; "
                       "use implementation='xla' or 'xla_chunked'")
    return prefill_mosaic_tpu.paged_prefill_tpu(
        q, kv_pages, block_tables, kv_lens, q_lens, sm_scale=sm_scale,
        interpret=interpret)
  out = decode_mosaic_tpu.paged_decode_tpu(
      q[:, 0], kv_pages, block_tables, kv_lens, kv_scales,
      sm_scale=sm_scale, interpret=interpret)
  return decode_output(out, q_lens, q.dtype)
