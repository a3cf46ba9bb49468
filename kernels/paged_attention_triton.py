"""The `"pallas_triton"` implementation of `kernels.paged_attention`.

Routes a batch of single-token queries (`q_len == 1`) to the split-K decode
kernel and anything longer to the prefill kernel. On a CPU backend the
kernels run in Pallas interpret mode, so the same implementation is testable
without a GPU (slowly: keep CPU shapes small).
"""

from __future__ import annotations

import jax

from kernels import decode_triton
from kernels import prefill_triton
from kernels.common import decode_output


def supports(*, q_len: int, head_dim: int, block_size: int, quantized: bool,
             dtype: str | None, group: int | None = None) -> bool:
  """Whether the kernels handle a call: head_dim and page size powers of 2,
  16 or more (`tl.dot`'s smallest operand); any pool dtype, int8 included."""
  del q_len, quantized, dtype, group
  return decode_triton.tileable(head_dim) and decode_triton.tileable(
      block_size)


def paged_attention_triton(
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
  """Paged attention with the Triton-lowered Pallas kernels."""
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if q.shape[1] == 1:
    out = decode_triton.paged_decode(
        q[:, 0], kv_pages, block_tables, kv_lens, kv_scales,
        sm_scale=sm_scale, interpret=interpret)
    return decode_output(out, q_lens, q.dtype)
  return prefill_triton.paged_prefill(
      q, kv_pages, block_tables, kv_lens, q_lens, kv_scales,
      sm_scale=sm_scale, interpret=interpret)
