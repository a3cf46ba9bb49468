"""Shapes, random inputs, timing and error measure shared by the kernel
benchmarks (`launch.bench_kernels`, `launch.bench_tiling`).

Kept free of flags so that each launcher defines only its own; the
launchers' shared report plumbing (run metadata, one-line errors, Ctrl-C
seen through JAX's wrapping) is here too; output paths are checked up
front (`dualpath_jax.outputs.check_output_path`) and reports written with
`dualpath_jax.outputs.write_json` (atomic), as every launcher's are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shlex
import statistics
import sys
import time
from typing import Any, Callable

from dualpath_jax import metrics

# The pool dtypes the kernels and the references take.
DTYPES = ("bfloat16", "float16", "float32", "int8")


INT32_MAX = (1 << 31) - 1


def _check_tokens(batch: int, tokens_per_sequence: int) -> None:
  """ValueError unless the case's pool tokens fit the kernels' int32 slots
  (block tables, lengths): `batch * tokens_per_sequence` < 2^31."""
  if batch * tokens_per_sequence > INT32_MAX:
    raise ValueError(f"{batch} x {tokens_per_sequence} tokens is past the "
                     f"kernels' int32 token slots ({INT32_MAX})")


def _check_sizes(shape, positive: tuple[str, ...],
                 non_negative: tuple[str, ...] = ()) -> None:
  """ValueError unless each field of `positive` is an int >= 1, each of
  `non_negative` an int >= 0, and the dtype one of `DTYPES`."""
  for name in positive + non_negative:
    v = getattr(shape, name)
    low = 1 if name in positive else 0
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
  if shape.dtype not in DTYPES:
    raise ValueError(f"unknown dtype {shape.dtype!r}; choose from "
                     f"{', '.join(DTYPES)}")


def _check_attention(shape) -> None:
  """ValueError unless query heads group evenly over the K/V heads and the
  page size is a power of two."""
  if shape.heads % shape.kv_heads:
    raise ValueError(f"heads ({shape.heads}) must be a multiple of kv_heads "
                     f"({shape.kv_heads})")
  if shape.page & (shape.page - 1):
    raise ValueError(f"page must be a power of two; got {shape.page}")


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  page: int
  ctx: int
  dtype: str  # float32 | bfloat16 | float16 | int8 (q in bf16)

  def __post_init__(self):
    _check_sizes(self, ("batch", "heads", "kv_heads", "head_dim", "page",
                        "ctx"))
    _check_tokens(self.batch, self.ctx)
    _check_attention(self)


@dataclasses.dataclass(frozen=True)
class PrefillShape:
  batch: int
  heads: int
  kv_heads: int
  head_dim: int
  page: int
  prefix: int  # cached tokens before the chunk
  new: int  # tokens in the chunk
  dtype: str

  def __post_init__(self):
    _check_sizes(self, ("batch", "heads", "kv_heads", "head_dim", "page",
                        "new"), ("prefix",))
    _check_tokens(self.batch, self.prefix + self.new)
    _check_attention(self)


@dataclasses.dataclass(frozen=True)
class CopyShape:
  layers: int  # layers in the group moved by one call
  blocks: int  # blocks moved
  pool_blocks: int
  host_slots: int
  kv_heads: int
  page: int
  head_dim: int
  dtype: str
  # Gathers also timed with the blocks in runs of this many consecutive
  # hot-tier slots, one transfer each (`block_copy`'s `run_length`).
  run_lengths: tuple[int, ...] = ()

  def __post_init__(self):
    _check_sizes(self, ("layers", "blocks", "pool_blocks", "host_slots",
                        "kv_heads", "page", "head_dim"))
    if self.blocks > min(self.pool_blocks, self.host_slots):
      raise ValueError(f"blocks ({self.blocks}) must fit both the pool "
                       f"({self.pool_blocks}) and the tier "
                       f"({self.host_slots})")
    for r in self.run_lengths:
      if r < 1 or self.blocks % r:
        raise ValueError(f"{self}: each run length must divide the blocks "
                         "moved")


# --- Report plumbing shared by the launchers ---------------------------------


def resolve_run(flags, list_flag: str, choices) -> tuple[str, str]:
  """The common start of the kernel benchmark launchers' `main`: checks
  the list flag `list_flag` (non-empty, every entry in `choices`), resolves
  `--preset` (default: "gpu" on a GPU backend, else "smoke"; "gpu" refused
  elsewhere) and on the smoke preset makes `--reps`, `--inner` and
  `--warmup_s` one timed call unless given. Returns (backend, preset);
  a bad choice is an `app.UsageError`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  chosen = flags[list_flag].value
  if not chosen:
    raise app.UsageError(f"--{list_flag}: empty; choose from {list(choices)}")
  unknown = set(chosen) - set(choices)
  if unknown:
    raise app.UsageError(f"--{list_flag}: unknown {sorted(unknown)}; choose "
                         f"from {list(choices)}")
  backend = jax.default_backend()
  preset = flags.preset or ("gpu" if backend == "gpu" else "smoke")
  if preset == "gpu" and backend != "gpu":
    raise app.UsageError(f"--preset=gpu needs a GPU backend (this one is "
                         f"{backend}); use --preset=smoke")
  if preset == "smoke":  # one timed call per configuration unless asked
    for name, value in (("reps", 1), ("inner", 1), ("warmup_s", 0.0)):
      if not flags[name].present:
        flags[name].value = value
  return backend, preset


def run_metadata(module: str, interpret: bool) -> dict:
  """What a kernel report records of its run: `metrics.run_environment()`
  (device, versions, UTC date, git commit), the command and interpret
  mode."""
  return dict(metrics.run_environment(),
              command=f"python -m {module} " + shlex.join(sys.argv[1:]),
              interpret=interpret)


def error_line(e: BaseException, limit: int = 200) -> str:
  """A report row's one-line error: the type and the first line, cut to
  `limit` characters."""
  first = (str(e).splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:limit]}"


def reraise_if_interrupted(e: BaseException) -> None:
  """Raises KeyboardInterrupt if `e` came of a Ctrl-C (JAX wraps one raised
  in a host callback in its own error): a row's error must not swallow it."""
  if interrupted(e):
    raise KeyboardInterrupt from e


def interrupted(e: BaseException) -> bool:
  """Whether `e` is, or was caused by, a Ctrl-C: a KeyboardInterrupt in its
  cause/context chain, or a JAX runtime error wrapping one raised inside a
  host callback (interpret mode runs kernels through them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, KeyboardInterrupt):
      return True
    if "RuntimeError" in type(e).__name__ and "KeyboardInterrupt" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


# A timed repetition lasts at least this long (seconds): the host's wait
# for the device and the next repetition's first launch then cost the
# timed calls a few percent at most.
MIN_REP_S = 0.005
# No more back-to-back calls per repetition than this.
MAX_INNER = 1000


def timeit(fn: Callable[[], Any], reps: int, inner: int, *,
           wait: Callable[[Any], Any] | None = None,
           warmup_s: float = 0.2, min_rep_s: float = MIN_REP_S,
           compiled: bool = False) -> float:
  """Median seconds per call of `fn` over `reps` repetitions of back-to-back
  calls, after one warm-up call (compilation; skipped with `compiled=True`,
  when the caller has already called `fn`, e.g. to check its result) and
  then calls for `warmup_s` seconds.

  Warm-up: a GPU left idle while the host compiles drops to a low clock
  (the H100 reported 345 MHz idle) and needs some milliseconds of work to
  return to its boost clock, which can be longer than all the timed calls
  of a short kernel; the H100 run of 2026-11-26 timed one kernel and tiling
  at 84 us in the sweep and 107 us in the benchmark with a single warm-up
  call.

  Calls per repetition: at least `inner`, and as many as the warm-up's
  per-call time says fill `min_rep_s` (at most `MAX_INNER`). Each
  repetition ends in a wait for the device, and the next one's first call
  starts on an idle device: tens of microseconds that five calls of an
  80 us kernel would each carry a tenth of. `wait(out)` blocks until `out`
  is computed (default: JAX's `block_until_ready`).
  """
  if wait is None:
    import jax
    wait = jax.block_until_ready
  if not compiled:
    wait(fn())
  calls, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < warmup_s:
    wait(fn())
    calls += 1
  inner = calls_per_rep(inner, elapsed / calls if calls else None, min_rep_s)
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    wait(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples)


def calls_per_rep(inner: int, per_call_s: float | None,
                  min_rep_s: float = MIN_REP_S) -> int:
  """Back-to-back calls in one timed repetition: `inner`, or enough calls
  of `per_call_s` (an over-estimate: measured with a wait after each call)
  to fill `min_rep_s`, at most `MAX_INNER`; `inner` when unknown."""
  if not per_call_s or per_call_s <= 0:
    return inner
  return max(inner, min(MAX_INNER, math.ceil(min_rep_s / per_call_s)))


def random_case(shape, batch_pages: int, seed: int,
                q_shape: tuple[int, ...]):
  """Random pool (bf16/f32 normal, or int8 with scales), block tables
  and queries `q_shape` (bf16 for an int8 pool), made by one compiled
  program from `data_key(seed)`."""
  return _random_case_fn()(
      data_key(seed), dtype=shape.dtype, batch=shape.batch,
      batch_pages=batch_pages,
      pool_shape=(shape.batch * batch_pages + 8, 2, shape.kv_heads,
                  shape.page, shape.head_dim), q_shape=tuple(q_shape))


def data_key(seed: int):
  """The PRNG key of a benchmark's random data: XLA's RngBitGenerator
  ("rbg"), whose programs compile ~5x faster than the default threefry's
  (a pool's normal draw: 0.6 s against 3.1 s on a 2-core CPU; the CPU smoke
  run made ~15 such programs)."""
  import jax
  return jax.random.key(seed, impl="rbg")


@functools.cache
def _random_case_fn():
  """`random_case`'s arrays as a jitted function of a key and static
  shapes (built on first use: this module imports JAX lazily)."""
  import jax
  import jax.numpy as jnp

  def make(key, *, dtype, batch, batch_pages, pool_shape, q_shape):
    k_pool, k_perm, k_q, k_s = jax.random.split(key, 4)
    scales = None
    if dtype == "int8":
      pool = jax.random.randint(k_pool, pool_shape, -127, 128, jnp.int8)
      scales = jax.random.uniform(k_s, pool_shape[:3], jnp.float32, 0.5,
                                  2.0) / 127.0
    else:
      pool = jax.random.normal(k_pool, pool_shape, dtype)
    perm = jax.random.permutation(k_perm, pool_shape[0])[:batch * batch_pages]
    tables = perm.reshape(batch, batch_pages).astype(jnp.int32)
    q_dtype = jnp.bfloat16 if dtype == "int8" else jnp.dtype(dtype)
    q = jax.random.normal(k_q, q_shape, q_dtype)
    return pool, scales, tables, q

  return jax.jit(make, static_argnames=("dtype", "batch", "batch_pages",
                                        "pool_shape", "q_shape"))


def rel_err(out, ref) -> float:
  """||out - ref|| / ||ref|| (NaN if `out` is not finite): the kernel tests'
  measure (`kernels.testing.relative_error`), so that a benchmark row and a
  test judge a kernel alike."""
  from kernels import testing
  return testing.relative_error(out, ref)


def _kv_bytes(s, ctx: int, pages: int) -> int:
  """K/V bytes a call reads once (int8: with its per-page scales)."""
  if s.dtype == "int8":
    return s.batch * (ctx * s.kv_heads * s.head_dim * 2
                      + pages * s.kv_heads * 2 * 4)
  import jax.numpy as jnp
  itemsize = jnp.dtype(s.dtype).itemsize
  return s.batch * ctx * s.kv_heads * s.head_dim * 2 * itemsize


def decode_inputs(s: DecodeShape, key: int):
  """(args (q, pool, scales, tables, lens), K/V bytes, FLOPs) of one decode
  shape: random pool and queries, shuffled tables, full contexts."""
  import jax.numpy as jnp
  pages = -(-s.ctx // s.page)
  pool, scales, tables, q = random_case(s, pages, key,
                                        (s.batch, s.heads, s.head_dim))
  lens = jnp.full((s.batch,), s.ctx, jnp.int32)
  flops = 4 * s.batch * s.heads * s.ctx * s.head_dim
  return (q, pool, scales, tables, lens), _kv_bytes(s, s.ctx, pages), flops


def prefill_inputs(s: PrefillShape, key: int):
  """(args (q, pool, scales, tables, kv_lens, q_lens), K/V bytes, FLOPs) of
  one prefill shape; FLOPs count the keys each new token sees (causal over
  the chunk, full over the prefix)."""
  import jax.numpy as jnp
  ctx = s.prefix + s.new
  pages = -(-ctx // s.page)
  pool, scales, tables, q = random_case(
      s, pages, key, (s.batch, s.new, s.heads, s.head_dim))
  kv_lens = jnp.full((s.batch,), ctx, jnp.int32)
  q_lens = jnp.full((s.batch,), s.new, jnp.int32)
  keys = s.new * s.prefix + s.new * (s.new + 1) / 2
  flops = 4 * s.batch * s.heads * s.head_dim * keys
  return ((q, pool, scales, tables, kv_lens, q_lens),
          _kv_bytes(s, ctx, pages), flops)


def reference_fn(kind: str) -> Callable[..., Any]:
  """The jitted XLA reference taking a "decode" or "prefill" problem's
  args (at whatever matmul precision the caller sets)."""
  import jax
  import jax.numpy as jnp
  from kernels import quantize
  if kind == "decode":
    return jax.jit(lambda q, p, sc, t, l: quantize.ref_paged_attention_any(
        q[:, None], p, t, l, jnp.ones_like(l), kv_scales=sc)[:, 0])
  return jax.jit(lambda q, p, sc, t, kl, ql: quantize.ref_paged_attention_any(
      q, p, t, kl, ql, kv_scales=sc))


def reference(kind: str, args) -> Any:
  """The reference output at full float32 precision (a GPU's default for
  float32 matmuls is TF32, looser than the kernels it checks)."""
  import jax
  with jax.default_matmul_precision("highest"):
    return reference_fn(kind)(*args)


def decode_problem(s: DecodeShape, key: int):
  """(args, reference output, K/V bytes, FLOPs) of one decode shape."""
  args, nbytes, flops = decode_inputs(s, key)
  return args, reference("decode", args), nbytes, flops


def prefill_problem(s: PrefillShape, key: int):
  """(args, reference output, K/V bytes, FLOPs) of one prefill shape."""
  args, nbytes, flops = prefill_inputs(s, key)
  return args, reference("prefill", args), nbytes, flops


# The kernels `kernel_fn` calls by name; the prefill ones take prefill shapes.
KERNELS = ("mosaic_decode", "triton_decode", "triton_prefill",
           "mosaic_prefill", "triton_decode_vt")
PREFILL_KERNELS = ("triton_prefill", "mosaic_prefill")


def parse_shape(kernel: str, fields: list[str], dtype: str | None = None):
  """The DecodeShape / PrefillShape that `fields` name for `kernel`
  (ValueError if it does not fit the kernel): the integers parsed first,
  then the shape built (which checks the sizes). The last field is the
  dtype, unless `dtype` is given."""
  if kernel not in KERNELS:
    raise ValueError(f"unknown kernel {kernel!r}; choose from "
                     f"{', '.join(KERNELS)}")
  cls = PrefillShape if kernel in PREFILL_KERNELS else DecodeShape
  names = list(cls.__dataclass_fields__)
  if dtype is not None:
    names = names[:-1]
  if len(fields) != len(names):
    raise ValueError(f"the shape takes {len(names)} fields "
                     f"({','.join(names)}); got {len(fields)}")
  texts = [f.strip() for f in fields]
  if dtype is None:
    *texts, dtype = texts
  ints = []
  for name, text in zip(names, texts):
    try:
      ints.append(int(text))
    except ValueError:
      raise ValueError(f"{name} must be an integer; got "
                       f"{text!r}") from None
  return cls(*ints, dtype)


def default_tiling(kernel: str, s, warp_specialized: bool | None = None):
  """The tiling `kernel` picks by itself for shape `s` (the decode kernels'
  `default_tiling`, which their wrappers call; for prefill what the wrapper
  passes to `kernels.tuning`): the Triton kernels size their tiles by the
  dtype they compute in (the queries', bf16 here, for int8 pools), the
  Mosaic ones by the pool's. `warp_specialized` (Mosaic kernels; None: as
  the default picks) forces the variant: a copying warpgroup (decode), two
  computing warpgroups and a copying one (prefill), or neither."""
  import jax.numpy as jnp
  from kernels import tuning
  quantized = s.dtype == "int8"
  pool_itemsize = jnp.dtype(s.dtype).itemsize
  compute_itemsize = 2 if quantized else pool_itemsize
  if kernel == "mosaic_prefill":
    return tuning.mosaic_prefill_tiling(
        block_size=s.page, head_dim=s.head_dim, itemsize=pool_itemsize,
        quantized=quantized, consumers=(
            None if warp_specialized is None else 1 + warp_specialized))
  if kernel == "triton_prefill":
    return tuning.prefill_tiling(block_size=s.page, head_dim=s.head_dim,
                                 itemsize=compute_itemsize)
  # The decode kernels' own choice, from the call's static shapes: a pool
  # of one block (its size does not matter), the queries random_case makes.
  import jax
  from kernels import decode_mosaic_gpu, decode_triton
  sds = jax.ShapeDtypeStruct
  q_dtype = jnp.bfloat16 if quantized else jnp.dtype(s.dtype)
  args = (sds((s.batch, s.heads, s.head_dim), q_dtype),
          sds((1, 2, s.kv_heads, s.page, s.head_dim), jnp.dtype(s.dtype)),
          sds((s.batch, -(-s.ctx // s.page)), jnp.int32),
          sds((1, 2, s.kv_heads), jnp.float32) if quantized else None)
  if kernel == "mosaic_decode":
    return decode_mosaic_gpu.default_tiling(*args,
                                            copy_warpgroup=warp_specialized)
  return decode_triton.default_tiling(*args)


def problem(kernel: str, shape, key: int):
  """`prefill_problem` or `decode_problem` of `shape`, as `kernel` takes
  (for "triton_decode_vt", its pool with V pages transposed; the reference
  is of the pool as made)."""
  if kernel in PREFILL_KERNELS:
    return prefill_problem(shape, key)
  args, ref, nbytes, flops = decode_problem(shape, key)
  if kernel == "triton_decode_vt":
    args = with_v_transposed(args)
  return args, ref, nbytes, flops


def with_v_transposed(args):
  """A decode problem's args with its pool's V pages stored transposed
  (`kernels.quantize.transpose_v_pages`: a copy of the pool, made now,
  before any timed call)."""
  from kernels import quantize
  q, pool, scales, tables, lens = args
  pool = quantize.transpose_v_pages(pool)
  pool.block_until_ready()
  return q, pool, scales, tables, lens


def kernel_fn(kernel: str, tiling, interpret: bool) -> Callable[..., Any]:
  """One jitted kernel call taking a problem's args: "mosaic_decode",
  "triton_decode", "triton_decode_vt" (the Triton decode of a pool whose V
  pages are stored transposed: `problem` gives it one), "triton_prefill"
  or "mosaic_prefill" (tiling None: the default)."""
  import jax
  from kernels import decode_mosaic_gpu
  from kernels import decode_triton
  from kernels import prefill_mosaic_gpu
  from kernels import prefill_triton
  if kernel == "mosaic_decode":
    return jax.jit(lambda q, p, sc, t, l: decode_mosaic_gpu.paged_decode(
        q, p, t, l, sc, tiling=tiling, interpret=interpret))
  if kernel in ("triton_decode", "triton_decode_vt"):
    transposed = kernel == "triton_decode_vt"
    return jax.jit(lambda q, p, sc, t, l: decode_triton.paged_decode(
        q, p, t, l, sc, tiling=tiling, v_transposed=transposed,
        interpret=interpret))
  if kernel == "mosaic_prefill":
    return jax.jit(lambda q, p, sc, t, kl, ql: prefill_mosaic_gpu.paged_prefill(
        q, p, t, kl, ql, sc, tiling=tiling, interpret=interpret))
  return jax.jit(lambda q, p, sc, t, kl, ql: prefill_triton.paged_prefill(
      q, p, t, kl, ql, sc, tiling=tiling, interpret=interpret))
