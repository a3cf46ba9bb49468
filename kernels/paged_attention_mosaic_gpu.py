"""The `"pallas_mosaic_gpu"` implementation of `kernels.paged_attention`.

Routes a batch of single-token queries (`q_len == 1`) to the Mosaic GPU
decode kernel (`decode_mosaic_gpu.py`) and anything longer to the prefill
kernel (`prefill_mosaic_gpu.py`). Both need Hopper's `wgmma` to run
compiled; on a CPU backend they run in Mosaic GPU's interpret mode.
"""

from __future__ import annotations

import jax

from kernels import decode_mosaic_gpu
from kernels import prefill_mosaic_gpu
from kernels.common import decode_output


def supports(*, q_len: int, head_dim: int, block_size: int, quantized: bool,
             dtype: str | None, group: int | None = None) -> bool:
  """Whether the kernel this call routes to handles it: bf16/f16 or int8
  pools, head_dim 64 or 128, power-of-2 pages of 16 tokens or more, at most
  64 query heads per KV head (`dtype`, `group`: None when unknown, so no)."""
  kernel = decode_mosaic_gpu if q_len == 1 else prefill_mosaic_gpu
  return kernel.supports(q_len=q_len, head_dim=head_dim,
                         block_size=block_size, quantized=quantized,
                         dtype=dtype, group=group)


def paged_attention_mosaic_gpu(
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
  """Paged attention with the Mosaic GPU kernels."""
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if q.shape[1] != 1:
    return prefill_mosaic_gpu.paged_prefill(
        q, kv_pages, block_tables, kv_lens, q_lens, kv_scales,
        sm_scale=sm_scale, interpret=interpret)
  out = decode_mosaic_gpu.paged_decode(
      q[:, 0], kv_pages, block_tables, kv_lens, kv_scales,
      sm_scale=sm_scale, interpret=interpret)
  return decode_output(out, q_lens, q.dtype)
