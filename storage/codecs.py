"""Block codecs: how one KV block is turned into the array chunk that is stored.

A codec maps a batch of KV blocks `[n, L, 2, Hkv, P, D]` in the cache dtype to
the stored chunk array `[n, *stored_shape]` of `stored_dtype` and back. The
zarr3 byte-level codecs (zstd, the crc32c checksum) run inside TensorStore, so
a codec here only decides the array that TensorStore sees:

* `raw`: the block itself, bit-exact (bf16 stays bf16).
* `int8`: lossy. Each (layer, K/V, head) row of `P * D` values is scaled by
  its own float32 `scale = max|x| / 127` and rounded to int8; the 4 bytes of
  the scale are appended to the row, so a stored block is
  `[L, 2, Hkv, P * D + 4]` int8 and still one chunk (one read per block).

`zstd` is not a codec here but a compression flag (`compress=True`) that the
layout turns into the zarr3 `zstd` codec; `zstd` = raw + zstd, `int8+zstd` =
int8 + zstd.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np

_NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

_SCALE_BYTES = 4  # one float32 per (layer, K/V, head) row


def numpy_dtype(name: str) -> np.dtype:
  """The numpy dtype of a cache dtype name ("float32", "float16", "bfloat16")."""
  if name not in _NUMPY_DTYPES:
    raise ValueError(
        f"cache dtype {name!r} is not storable; use one of {sorted(_NUMPY_DTYPES)}")
  return _NUMPY_DTYPES[name]


class BlockCodec:
  """Base class: identity mapping (the `raw` codec)."""

  name = "raw"
  lossy = False
  identity = True  # the stored chunk array is the block itself (raw, zstd)

  def __init__(self, block_shape: tuple[int, ...], dtype: str, compress: bool):
    if len(block_shape) != 5 or block_shape[1] != 2 or min(block_shape) <= 0:
      raise ValueError(
          f"block_shape must be [L, 2, Hkv, P, D] with positive sizes, got {block_shape}")
    self.block_shape = tuple(int(s) for s in block_shape)
    self.dtype = numpy_dtype(dtype)
    self.dtype_name = dtype
    self.compress = compress

  @property
  def stored_shape(self) -> tuple[int, ...]:
    return self.block_shape

  @property
  def stored_dtype_name(self) -> str:
    return self.dtype_name

  @property
  def stored_dtype(self) -> np.dtype:
    return self.dtype

  @property
  def encoded_block_bytes(self) -> int:
    """Bytes of one stored block before byte-level compression."""
    return int(np.prod(self.stored_shape)) * self.stored_dtype.itemsize

  @property
  def full_name(self) -> str:
    """The codec's config name: raw, zstd, int8 or int8+zstd."""
    if self.name == "raw":
      return "zstd" if self.compress else "raw"
    return self.name + ("+zstd" if self.compress else "")

  def check_blocks(self, blocks: np.ndarray) -> None:
    """Raises ValueError unless `blocks` is `[n, *block_shape]` of the cache dtype."""
    if not isinstance(blocks, np.ndarray):
      raise ValueError(f"blocks must be a numpy array, got {type(blocks).__name__}")
    if blocks.ndim != 6 or tuple(blocks.shape[1:]) != self.block_shape:
      raise ValueError(
          f"blocks must have shape [n, {', '.join(map(str, self.block_shape))}], "
          f"got {list(blocks.shape)}")
    if blocks.dtype != self.dtype:
      raise ValueError(f"blocks must be {self.dtype_name}, got {blocks.dtype}")

  def encode(
      self,
      blocks: np.ndarray,  # [n, L, 2, Hkv, P, D] cache dtype
  ) -> np.ndarray:  # [n, *stored_shape] stored dtype
    return np.ascontiguousarray(blocks)

  def decode(
      self,
      stored: np.ndarray,  # [n, *stored_shape] stored dtype
  ) -> np.ndarray:  # [n, L, 2, Hkv, P, D] cache dtype
    return stored


class Int8Codec(BlockCodec):
  """Symmetric int8 with one float32 scale per (block, layer, K/V, head)."""

  name = "int8"
  lossy = True
  identity = False

  def __init__(self, block_shape: tuple[int, ...], dtype: str, compress: bool):
    super().__init__(block_shape, dtype, compress)
    self._local = threading.local()  # each thread's float32 scratch (`_rows`)

  def check_blocks(self, blocks: np.ndarray) -> None:
    """The base checks, and every value finite: a NaN row would be scaled
    by 1.0 and come back without its NaN, an inf row as NaN throughout, so
    such a block is refused before anything is written (the raw codecs
    keep them bit for bit)."""
    super().check_blocks(blocks)
    if not np.isfinite(blocks).all():
      raise ValueError("the int8 codec cannot store NaN or inf values; these "
                       "blocks hold some")

  @property
  def stored_shape(self) -> tuple[int, ...]:
    num_layers, two, num_heads, block_size, head_dim = self.block_shape
    return (num_layers, two, num_heads, block_size * head_dim + _SCALE_BYTES)

  @property
  def stored_dtype_name(self) -> str:
    return "int8"

  @property
  def stored_dtype(self) -> np.dtype:
    return np.dtype(np.int8)

  def encode(
      self,
      blocks: np.ndarray,  # [n, L, 2, Hkv, P, D] cache dtype
      out: np.ndarray | None = None,  # [n, L, 2, Hkv, P * D + 4] int8
  ) -> np.ndarray:  # [n, L, 2, Hkv, P * D + 4] int8
    """Encodes block by block through a float32 scratch row set this thread
    reuses (one block's: no fresh temporaries, whose first touch cost more
    than the arithmetic on the benchmark VM), into `out` or a new array."""
    n = blocks.shape[0]
    if out is None:
      out = np.empty((n, *self.stored_shape), np.int8)
    rows = self._rows()  # [L, 2, Hkv, P * D] float32
    for i in range(n):
      np.copyto(rows.reshape(self.block_shape), blocks[i])
      amax = np.maximum(rows.max(-1, keepdims=True), -rows.min(-1, keepdims=True))
      scale = _scales(amax)  # [L, 2, Hkv, 1]
      np.divide(rows, scale, out=rows)
      np.clip(rows, -127, 127, out=rows)  # then rint: the same as rint, clip
      np.rint(rows, out=out[i, ..., :-_SCALE_BYTES], casting="unsafe")
      out[i, ..., -_SCALE_BYTES:] = scale.view(np.int8)
    return out

  def decode(
      self,
      stored: np.ndarray,  # [n, L, 2, Hkv, P * D + 4] int8
      out: np.ndarray | None = None,  # [n, L, 2, Hkv, P, D] cache dtype
  ) -> np.ndarray:  # [n, L, 2, Hkv, P, D] cache dtype
    """Decodes into `out` (or a new array), block by block (`decode_into`)."""
    if out is None:
      out = np.empty((stored.shape[0], *self.block_shape), self.dtype)
    for i in range(stored.shape[0]):
      self.decode_into(stored[i], out[i])
    return out

  def decode_into(
      self,
      stored: np.ndarray,  # [L, 2, Hkv, P * D + 4] int8: one block
      dest: np.ndarray,  # [L, 2, Hkv, P, D] cache dtype, written
  ) -> None:
    """Decodes one block into `dest`: each value times its row's scale in
    float32, cast to the cache dtype (round to nearest even). Into a
    C-contiguous `dest` in one pass (numpy casts each buffered stretch of
    products as it writes it: 2.5x the two-pass speed here), else through
    this thread's float32 scratch."""
    scale = np.ascontiguousarray(stored[..., -_SCALE_BYTES:]).view(np.float32)
    body = stored[..., :-_SCALE_BYTES]  # [L, 2, Hkv, P * D] int8
    if dest.flags.c_contiguous:
      np.multiply(body, scale, out=dest.reshape(body.shape), dtype=np.float32,
                  casting="unsafe")
      return
    rows = self._rows()
    np.multiply(body, scale, out=rows)
    np.copyto(dest, rows.reshape(self.block_shape), casting="unsafe")

  def _rows(self) -> np.ndarray:  # [L, 2, Hkv, P * D] float32, this thread's
    rows = getattr(self._local, "rows", None)
    if rows is None:
      rows = np.empty((*self.block_shape[:3], self.block_shape[3] * self.block_shape[4]),
                      np.float32)
      self._local.rows = rows
    return rows


def _scales(
    amax: np.ndarray,  # [..., 1] float32, max |x| of each row (finite, >= 0)
) -> np.ndarray:  # [..., 1] float32
  """The int8 scale of each row: `amax / 127`, 1 for an all-zero row, and
  kept inside float32 at both ends. A tiny row (amax below 127 times the
  smallest subnormal) underflowed to a scale of 0: its values were divided
  by zero and came back as 0 whatever they were. A row near float32's max
  had its scale rounded up so far that `127 * scale` overflowed: finite
  values came back as inf. Such scales take the smallest subnormal, or one
  step down (one step is always enough)."""
  tiny = np.finfo(np.float32).smallest_subnormal
  scale = np.where(amax > 0, np.maximum(amax / np.float32(127), tiny),
                   np.float32(1)).astype(np.float32)
  with np.errstate(over="ignore"):
    overflows = ~np.isfinite(scale * np.float32(127))
  if overflows.any():
    scale = np.where(overflows, np.nextafter(scale, np.float32(0)), scale)
  return scale


def make_codec(name: str, block_shape: tuple[int, ...], dtype: str) -> BlockCodec:
  """The codec called `name` ("raw", "zstd", "int8", "int8+zstd")."""
  if name == "raw":
    return BlockCodec(block_shape, dtype, compress=False)
  if name == "zstd":
    return BlockCodec(block_shape, dtype, compress=True)
  if name == "int8":
    return Int8Codec(block_shape, dtype, compress=False)
  if name == "int8+zstd":
    return Int8Codec(block_shape, dtype, compress=True)
  raise ValueError(f"unknown codec {name!r}; use raw, zstd, int8 or int8+zstd")
