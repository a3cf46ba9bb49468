"""The paged-attention API: one signature, several implementations.

`implementation` selects the backend:

* `"xla"`: the pure-jnp reference in `paged_attention_ref.py`; runs anywhere.
* `"pallas_triton"`, `"pallas_mosaic_gpu"`, `"pallas_mosaic_tpu"`: Pallas
  kernels (registered by their modules when present).
* `"auto"`: the best implementation registered for the default backend,
  falling back to `"xla"`.
"""

from __future__ import annotations

from typing import Callable

import jax

from kernels.paged_attention_ref import ref_paged_attention

IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": ref_paged_attention,
}

# Preference order of `"auto"` per JAX backend platform.
_AUTO_ORDER = {
    "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "cuda": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla"),
    "cpu": ("xla",),
}


def resolve_implementation(implementation: str) -> str:
  """Maps `"auto"` to a concrete registered name; validates the others."""
  if implementation == "auto":
    order = _AUTO_ORDER.get(jax.default_backend(), ("xla",))
    return next(name for name in order if name in IMPLEMENTATIONS)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown paged-attention implementation {implementation!r}; "
        f"available: {sorted(IMPLEMENTATIONS)} or 'auto'")
  return implementation


def paged_attention(
    q: jax.Array,  # [batch, q_len, num_heads, head_dim]
    kv_pages: jax.Array,  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    block_tables: jax.Array,  # [batch, pages_per_seq] int32
    kv_lens: jax.Array,  # [batch] int32
    q_lens: jax.Array,  # [batch] int32
    *,
    sm_scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Causal attention of the last `q_lens[b]` context tokens over paged K/V.

  See `paged_attention_ref` for the exact semantics every implementation
  shares.
  """
  _check_shapes(q, kv_pages, block_tables, kv_lens, q_lens)
  fn = IMPLEMENTATIONS[resolve_implementation(implementation)]
  return fn(q, kv_pages, block_tables, kv_lens, q_lens, sm_scale=sm_scale)


def _check_shapes(q, kv_pages, block_tables, kv_lens, q_lens) -> None:
  if q.ndim != 4 or kv_pages.ndim != 5 or kv_pages.shape[1] != 2:
    raise ValueError(
        f"expected q [batch, q_len, heads, head_dim] and kv_pages "
        f"[blocks, 2, kv_heads, block_size, head_dim]; got {q.shape} and "
        f"{kv_pages.shape}")
  batch, _, num_heads, head_dim = q.shape
  if kv_pages.shape[4] != head_dim:
    raise ValueError(f"head_dim mismatch: q {head_dim}, kv {kv_pages.shape[4]}")
  if num_heads % kv_pages.shape[2]:
    raise ValueError(f"num_heads={num_heads} is not a multiple of "
                     f"num_kv_heads={kv_pages.shape[2]}")
  if (block_tables.ndim != 2 or block_tables.shape[0] != batch
      or kv_lens.shape != (batch,) or q_lens.shape != (batch,)):
    raise ValueError(
        f"block_tables {block_tables.shape}, kv_lens {kv_lens.shape}, "
        f"q_lens {q_lens.shape} do not match batch={batch}")
