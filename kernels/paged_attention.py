"""The paged-attention API: one signature, several implementations.

`implementation` selects the backend:

* `"xla"`: the pure-jnp reference in `paged_attention_ref.py` (int8 pools
  dequantized first, `quantize.py`); runs anywhere.
* `"xla_chunked"`: plain XLA with an online softmax over page chunks and a
  run-time trip count (`paged_attention_xla.py`): cost follows the true
  context, not the table width; what `"auto"` picks on CPU; runs anywhere.
* `"pallas_triton"`: decode (split-K) and prefill Pallas kernels on the
  Triton lowering, for GPUs (`paged_attention_triton.py`).
* `"pallas_mosaic_tpu"`: the Mosaic TPU decode kernel (`q_len == 1`;
  `decode_mosaic_tpu.py`) and prefill kernel (`q_len > 1`, float32/bfloat16
  pools; `prefill_mosaic_tpu.py`).
* `"pallas_mosaic_gpu"`: the Mosaic GPU (Hopper) kernels, bf16/f16/int8
  pools, head_dim 64 or 128: decode (`q_len == 1`, `decode_mosaic_gpu.py`)
  and prefill (`q_len > 1`, `prefill_mosaic_gpu.py`).
* `"auto"`: the best registered implementation for the default backend that
  supports the call (query length, head_dim, page size, pool dtype, int8),
  falling back to `"xla_chunked"`, then `"xla"`. The default, here and in
  the model (`Llama`, `ModelRunner`, `EngineConfig.attention_impl`): a
  model author calling any of them gets the fast path of the device.

On a CPU backend the Pallas implementations run in interpret mode, so they
can be selected explicitly in tests.

int8 pools: pass `kv_pages` as int8 with `kv_scales [num_blocks, 2,
num_kv_heads]` float32, one symmetric scale per page, K/V and head.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kernels import checks
from kernels import quantize

# Where each implementation lives: (module, function). A backend's module is
# imported when the implementation is first looked up or asked whether it
# supports a call, so a process that only runs the XLA implementations (every
# engine on a CPU) never imports the Pallas Triton, Mosaic GPU and Mosaic TPU
# lowerings, about 0.8 s of each launcher's start on the 2-core CPU.
_MODULES: dict[str, tuple[str, str]] = {
    "xla": ("kernels.quantize", "ref_paged_attention_any"),
    "xla_chunked": ("kernels.paged_attention_xla",
                    "xla_chunked_paged_attention"),
    "pallas_triton": ("kernels.paged_attention_triton",
                      "paged_attention_triton"),
    "pallas_mosaic_tpu": ("kernels.paged_attention_mosaic_tpu",
                          "paged_attention_mosaic_tpu"),
    "pallas_mosaic_gpu": ("kernels.paged_attention_mosaic_gpu",
                          "paged_attention_mosaic_gpu"),
}


def _imported(module: str, name: str) -> Callable:
  return getattr(importlib.import_module(module), name)


class _Implementations(Mapping):
  """Name -> paged-attention function, importing its module on lookup."""

  def __getitem__(self, name: str) -> Callable[..., jax.Array]:
    return _imported(*_MODULES[name])

  def __iter__(self) -> Iterator[str]:
    return iter(_MODULES)

  def __len__(self) -> int:
    return len(_MODULES)


IMPLEMENTATIONS: Mapping[str, Callable[..., jax.Array]] = _Implementations()


def _mosaic_gpu_in_auto(*, q_len: int, block_size: int, quantized: bool,
                        **call) -> bool:
  """Whether "auto" picks Mosaic GPU: decode and prefill of bf16/f16 pools
  on Hopper. On an H200 (docs/benchmarks.md, "GPU: 2026-11-27, second
  session") its default decode read K/V at 1.14-2.32x the Triton decode
  kernel's rate (seven shapes) and its warp-specialized prefill ran
  1.78-1.87x the Triton prefill kernel, 16-token pages included. int8 pools
  stay with Triton: with its int8 rule the Triton decode ran 257 and 133 us
  at the two int8 shapes (a sweep), the Mosaic int8 path 391 and 221 us (the
  table), converting each step's tiles to bf16 in shared memory."""
  if quantized or not _imported("kernels.decode_mosaic_gpu", "is_hopper")():
    return False
  return _imported("kernels.paged_attention_mosaic_gpu", "supports")(
      q_len=q_len, block_size=block_size, quantized=False, **call)


# Whether "auto" may pick an implementation for a call: each Pallas
# backend's `supports` (its capabilities), Mosaic GPU's narrowed to where it
# measured faster. They take the call's static q_len, head_dim, block_size,
# quantized, dtype (the pool's, None if unknown) and group (query heads per
# KV head, None if unknown) by keyword; the XLA implementations take every
# call.
_SUPPORTS: dict[str, Callable[..., bool]] = {
    "pallas_triton": lambda **call: _imported(
        "kernels.paged_attention_triton", "supports")(**call),
    "pallas_mosaic_tpu": lambda **call: _imported(
        "kernels.paged_attention_mosaic_tpu", "supports")(**call),
    "pallas_mosaic_gpu": _mosaic_gpu_in_auto,
}

# Preference order of `"auto"` per JAX backend platform. On GPUs the Mosaic
# GPU kernels go first where they apply (Hopper, see `_mosaic_gpu_in_auto`);
# Triton takes the rest.
_AUTO_ORDER = {
    "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla_chunked", "xla"),
    "cuda": ("pallas_mosaic_gpu", "pallas_triton", "xla_chunked", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla_chunked", "xla"),
    "cpu": ("xla_chunked", "xla"),
}


def resolve_implementation(implementation: str, *, q_len: int = 1,
                           head_dim: int = 128, block_size: int = 16,
                           quantized: bool = False, dtype: str | None = None,
                           group: int | None = None) -> str:
  """Maps `"auto"` to a concrete registered name; validates the others.

  The keyword arguments describe the call, so that `"auto"` only picks an
  implementation that supports it; `dtype` is the pool's dtype name and
  `group` the query heads per KV head (None: unknown, and implementations
  that depend on them are skipped).
  """
  if implementation == "auto":
    order = _AUTO_ORDER.get(jax.default_backend(), ("xla",))
    call = dict(q_len=q_len, head_dim=head_dim, block_size=block_size,
                quantized=quantized, dtype=dtype, group=group)
    return next(
        name for name in order
        if name in IMPLEMENTATIONS
        and _SUPPORTS.get(name, lambda **_: True)(**call))
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
    implementation: str = "auto",
    kv_scales: jax.Array | None = None,  # [num_blocks, 2, num_kv_heads] f32
) -> jax.Array:  # [batch, q_len, num_heads, head_dim]
  """Causal attention of the last `q_lens[b]` context tokens over paged K/V.

  See `paged_attention_ref` for the exact semantics every implementation
  shares. `kv_scales` is required for, and only for, an int8 `kv_pages`.
  Numpy arrays and nested lists are taken as JAX arrays (the kernels index
  with JAX's clamping, never numpy's bounds checks). Called eagerly, the
  lengths and the table entries holding context are checked too
  (`checks.check_paged_values`; ValueError), at the cost of copying those
  small arrays to the host; under `jit` they are not.
  """
  q, kv_pages, block_tables, kv_lens, q_lens = (
      jnp.asarray(x) for x in (q, kv_pages, block_tables, kv_lens, q_lens))
  # Any integer lengths in, int32 to the kernels: an unsigned or narrow
  # dtype failed deep in `xla_chunked`'s loop bounds (int32 vs uint32).
  if (jnp.issubdtype(kv_lens.dtype, jnp.integer) and
      jnp.issubdtype(q_lens.dtype, jnp.integer)):
    kv_lens, q_lens = kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32)
  if kv_scales is not None:
    kv_scales = jnp.asarray(kv_scales)
  checks.check_paged_arguments(q, kv_pages, block_tables, kv_lens, q_lens)
  checks.check_paged_values(kv_pages.shape[0], kv_pages.shape[3], q.shape[1],
                            block_tables, kv_lens, q_lens)
  quantize.check_scales(kv_pages, kv_scales)
  name = resolve_implementation(
      implementation, q_len=q.shape[1], head_dim=q.shape[3],
      block_size=kv_pages.shape[3], quantized=kv_scales is not None,
      dtype=jnp.dtype(kv_pages.dtype).name,
      group=q.shape[2] // kv_pages.shape[2])
  sm_scale = _static_sm_scale(sm_scale, name)
  fn = IMPLEMENTATIONS[name]
  if kv_scales is None:  # keeps implementations without int8 callable
    return fn(q, kv_pages, block_tables, kv_lens, q_lens, sm_scale=sm_scale)
  return fn(q, kv_pages, block_tables, kv_lens, q_lens, sm_scale=sm_scale,
            kv_scales=kv_scales)


# Implementations that take `sm_scale` as an array operand; the Pallas
# kernels compile it into the kernel, so it must be a Python number there.
_TRACED_SCALE_OK = frozenset({"xla", "xla_chunked"})


def _static_sm_scale(sm_scale, name: str) -> float | None:
  """`sm_scale` as a Python float where it is concrete (a numpy or JAX
  scalar included); a traced one is passed on only to the implementations
  that take it as an operand, and refused by name for the Pallas kernels
  (their error was JAX's "Non-hashable static arguments", which named no
  argument)."""
  if sm_scale is None or isinstance(sm_scale, (int, float)):
    return sm_scale
  if isinstance(sm_scale, jax.core.Tracer):
    if name in _TRACED_SCALE_OK:
      return sm_scale
    raise ValueError(
        f"sm_scale must be a Python float for implementation {name!r}, which "
        "compiles it into the kernel; got a traced value (pass it to jit as a "
        "static argument, or leave it None for 1/sqrt(head_dim))")
  if np.ndim(sm_scale) != 0:
    raise ValueError(f"sm_scale must be a scalar; got shape {np.shape(sm_scale)}")
  return float(sm_scale)

