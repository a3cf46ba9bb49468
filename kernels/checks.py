"""Argument checks shared by every paged-attention entry point.

The API (`paged_attention`) and each public kernel (`paged_decode*`,
`paged_prefill*`, the XLA implementations) call `check_paged_arguments`
first, so that a wrong shape or dtype is a ValueError naming the argument
rather than a reshape or lowering error deep inside a kernel, or, where
broadcasting would hide it, a result of the wrong shape. Those checks are
static (shapes, dtypes): the calls are traced. `paged_attention` also
checks the lengths and the table's ids with `check_paged_values` when they
are concrete (an eager call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_pool_shape(
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
) -> None:
  """Raises ValueError unless `kv_pages` has the pool's 5-D K/V layout."""
  if kv_pages.ndim != 5 or kv_pages.shape[1] != 2:
    raise ValueError(
        "expected kv_pages [num_blocks, 2, num_kv_heads, block_size, "
        f"head_dim]; got shape {kv_pages.shape}")


def check_paged_arguments(
    q: jax.Array,  # [batch, num_heads, head_dim] or [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] integer
    kv_lens: jax.Array,  # [batch] integer
    q_lens: jax.Array | None = None,  # [batch] integer; None: decode, 3-D q
) -> None:
  """Raises ValueError unless the arguments describe one paged-attention
  call: a decode query `[batch, num_heads, head_dim]` when `q_lens` is None,
  else `[batch, q_len >= 1, num_heads, head_dim]`; a pool of K/V pages with
  the query's head_dim and a number of KV heads dividing the query heads;
  integer block tables and lengths of the query's batch."""
  decode = q_lens is None
  want = ("[batch, num_heads, head_dim]" if decode
          else "[batch, q_len, num_heads, head_dim]")
  if q.ndim != (3 if decode else 4):
    raise ValueError(f"expected q {want}; got shape {q.shape}")
  check_pool_shape(kv_pages)
  batch, num_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
  if not decode and q.shape[1] < 1:
    raise ValueError(f"q holds no query tokens (q_len 0): shape {q.shape}")
  if kv_pages.shape[4] != head_dim:
    raise ValueError(f"head_dim mismatch: q has {head_dim}, kv_pages "
                     f"{kv_pages.shape[4]}")
  if num_heads % kv_pages.shape[2]:
    raise ValueError(f"num_heads={num_heads} is not a multiple of "
                     f"num_kv_heads={kv_pages.shape[2]}")
  lengths = {"kv_lens": kv_lens} if decode else {"kv_lens": kv_lens,
                                                 "q_lens": q_lens}
  if block_tables.ndim != 2 or block_tables.shape[0] != batch or any(
      x.shape != (batch,) for x in lengths.values()):
    shapes = ", ".join(f"{name} {x.shape}" for name, x in lengths.items())
    raise ValueError(f"block_tables {block_tables.shape}, {shapes} do not "
                     f"match q's batch of {batch} (block_tables [batch, "
                     "pages_per_seq], lengths [batch])")
  for name, x in {"block_tables": block_tables, **lengths}.items():
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers (int32); got {x.dtype}")
  # An integer q came back cast to its dtype (zeros); an int32 or uint8
  # pool was taken as a float one. int8 is the quantized pool (kv_scales).
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be floating point; got {q.dtype}")
  if not (jnp.issubdtype(kv_pages.dtype, jnp.floating) or
          kv_pages.dtype == jnp.int8):
    raise ValueError("kv_pages must be floating point, or int8 with "
                     f"kv_scales; got {kv_pages.dtype}")


def check_paged_values(
    num_blocks: int,
    block_size: int,
    q_len: int,
    block_tables: jax.Array,  # [batch, pages_per_seq] integer
    kv_lens: jax.Array,  # [batch] integer
    q_lens: jax.Array,  # [batch] integer
) -> None:
  """Raises ValueError for values no call means, where they are concrete.

  Checked: `kv_lens[b] >= 0`, `0 <= q_lens[b] <= min(q_len, kv_lens[b])`,
  `kv_lens[b]` at most the table's capacity (`pages_per_seq * P`: the kernels would attend
  to the table's keys only, a silent truncation of the context), and the
  table entries that hold row `b`'s context (the first
  `ceil(kv_lens[b] / P)`) name pages of the pool: kernels clamp an id out of
  range into the pool, so a wrong one reads another page silently. Entries
  past the context may name any id (it is clamped), but the page they name
  is read, masked: it must be finite, or the row is NaN
  (`paged_attention_ref`'s module docstring: fill them with the row's last
  context page).
  Traced arguments (under `jit`) are not checked: their values are unknown
  until the call runs.
  """
  if any(isinstance(x, jax.core.Tracer) for x in (block_tables, kv_lens,
                                                   q_lens)):
    return
  tables = np.asarray(block_tables)
  kv = np.asarray(kv_lens).astype(np.int64)
  ql = np.asarray(q_lens).astype(np.int64)
  negative = np.flatnonzero(kv < 0)
  if negative.size:
    b = int(negative[0])
    raise ValueError(f"row {b}: kv_lens {kv[b]} must be >= 0")
  bad = np.flatnonzero((ql < 0) | (ql > q_len) | (ql > kv))
  if bad.size:
    b = int(bad[0])
    raise ValueError(
        f"row {b}: q_lens {ql[b]} must be in [0, min(q_len {q_len}, "
        f"kv_lens {kv[b]})]")
  capacity = tables.shape[1] * block_size
  over = np.flatnonzero(kv > capacity)
  if over.size:
    b = int(over[0])
    raise ValueError(
        f"row {b}: kv_lens {kv[b]} exceeds the block table's capacity "
        f"{capacity} ({tables.shape[1]} pages of {block_size} tokens)")
  pages = -(-kv // block_size)
  in_context = np.arange(tables.shape[1])[None, :] < pages[:, None]
  bad_ids = in_context & ((tables < 0) | (tables >= num_blocks))
  if bad_ids.any():
    b, i = (int(x) for x in np.argwhere(bad_ids)[0])
    raise ValueError(
        f"row {b}: block_tables[{b}, {i}] = {tables[b, i]} holds context "
        f"(kv_lens {kv[b]}) but names no page of the pool's {num_blocks}")


def check_slot_values(
    num_slots: int,  # num_blocks * block_size
    slot_mapping: jax.Array,  # [batch, q_len] integer
) -> None:
  """Raises ValueError for a slot past the pool, where `slot_mapping` is
  concrete: `write_kv`'s scatter drops such a write, so a wrong slot would
  lose its token's K/V without a sign. Negative slots are padding."""
  if isinstance(slot_mapping, jax.core.Tracer):
    return
  slots = np.asarray(slot_mapping)
  bad = np.argwhere(slots >= num_slots)
  if bad.size:
    b, t = (int(x) for x in bad[0])
    raise ValueError(
        f"slot_mapping[{b}, {t}] = {slots[b, t]} is past the pool's "
        f"{num_slots} slots (num_blocks * block_size); -1 marks padding")
