"""Tests of storage.codecs against plain numpy references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from storage.codecs import make_codec, numpy_dtype

SHAPES = [(2, 2, 2, 16, 16), (3, 2, 1, 4, 64), (1, 2, 3, 8, 8)]


def _blocks(rng, n, shape, dtype):
  x = rng.standard_normal((n, *shape), dtype=np.float32) * rng.uniform(0.1, 10.0)
  return x.astype(numpy_dtype(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_raw_is_bit_exact(shape, dtype):
  rng = np.random.default_rng(1)
  codec = make_codec("raw", shape, dtype)
  blocks = _blocks(rng, 3, shape, dtype)
  stored = codec.encode(blocks)
  assert stored.dtype == numpy_dtype(dtype)
  assert codec.encoded_block_bytes == blocks[0].nbytes
  back = codec.decode(stored)
  assert back.tobytes() == blocks.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_int8_matches_numpy_reference(shape, dtype):
  rng = np.random.default_rng(2)
  codec = make_codec("int8", shape, dtype)
  blocks = _blocks(rng, 4, shape, dtype)
  blocks[0, 0, 1, 0] = 0  # an all-zero head row must survive (scale 1)
  stored = codec.encode(blocks)
  n, num_layers, _, heads, block_size, head_dim = blocks.shape
  assert stored.shape == (n, num_layers, 2, heads, block_size * head_dim + 4)
  assert stored.dtype == np.int8
  # Independent reference: per (block, layer, K/V, head) absmax scaling.
  x = blocks.astype(np.float64).reshape(n, num_layers, 2, heads, -1)
  scale = np.abs(x).max(-1, keepdims=True) / 127.0
  scale[scale == 0] = 1.0
  ref = np.clip(np.round(x / scale), -127, 127) * scale
  back = codec.decode(stored)
  assert back.dtype == numpy_dtype(dtype)
  err = np.abs(back.astype(np.float64).reshape(ref.shape) - ref)
  # Reference and codec agree up to float32 scale rounding and the cast back.
  tol = scale * 0.51 + np.abs(ref) * (2.0**-7 if dtype == "bfloat16" else 1e-6)
  assert np.all(err <= tol)
  # And the error against the original is at most half a quantization step.
  orig_err = np.abs(back.astype(np.float64).reshape(x.shape) - x)
  assert np.all(orig_err <= scale * 0.5 + np.abs(x) * 2.0**-7 + 1e-12)
  assert np.all(back[0, 0, 1, 0] == 0)


def _int8_reference(blocks: np.ndarray, dtype: str):
  """The int8 codec written out whole-batch in float32, as the codec's
  arithmetic is defined: (stored body [n, L, 2, H, P*D] int8, scales
  [n, L, 2, H, 1] float32, decoded blocks in the cache dtype)."""
  n, num_layers, _, heads = blocks.shape[:4]
  rows = blocks.astype(np.float32).reshape(n, num_layers, 2, heads, -1)
  amax = np.abs(rows).max(-1, keepdims=True)
  scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
  q = np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)
  back = (q.astype(np.float32) * scale).astype(numpy_dtype(dtype)).reshape(blocks.shape)
  return q, scale, back


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_int8_is_bit_identical_to_the_whole_batch_formula(shape, dtype):
  """Block by block through a reused scratch, into a caller's arrays or new
  ones: the bytes of the whole-batch float32 formula."""
  rng = np.random.default_rng()
  codec = make_codec("int8", shape, dtype)
  blocks = _blocks(rng, 5, shape, dtype)
  blocks[1, 0, 0, 0] = 0  # an all-zero row: scale 1
  q, scale, back = _int8_reference(blocks, dtype)
  out = np.full((5, *codec.stored_shape), 99, np.int8)
  for stored in (codec.encode(blocks), codec.encode(blocks, out=out)):
    assert stored[..., :-4].tobytes() == q.tobytes()
    assert np.ascontiguousarray(stored[..., -4:]).view(np.float32).tobytes() == scale.tobytes()
  assert codec.encode(blocks, out=out) is out
  assert codec.decode(out).tobytes() == back.tobytes()
  dest = np.full((7, *shape), 3, numpy_dtype(dtype))  # rows 1..5 of a bigger array
  assert codec.decode(out, out=dest[1:6]) is not None
  assert dest[1:6].tobytes() == back.tobytes()
  assert np.all(dest[0] == 3) and np.all(dest[6] == 3)
  one = np.full(shape, 5, numpy_dtype(dtype))
  codec.decode_into(out[3], one)
  assert one.tobytes() == back[3].tobytes()
  wide = np.full((*shape[:4], 2 * shape[4]), 5, numpy_dtype(dtype))
  codec.decode_into(out[2], wide[..., ::2])  # a strided destination
  assert np.ascontiguousarray(wide[..., ::2]).tobytes() == back[2].tobytes()
  assert np.all(wide[..., 1::2] == 5)


def test_int8_threads_do_not_share_a_scratch():
  """The float32 scratch is per thread: concurrent encodes and decodes of
  different blocks each get their own bytes."""
  import concurrent.futures as cf
  rng = np.random.default_rng()
  shape = (3, 2, 2, 16, 32)
  codec = make_codec("int8", shape, "bfloat16")
  batches = [_blocks(rng, 3, shape, "bfloat16") for _ in range(16)]
  want = [_int8_reference(b, "bfloat16")[2].tobytes() for b in batches]
  with cf.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(lambda b: codec.decode(codec.encode(b)).tobytes(), batches * 4))
  assert got == want * 4


def test_int8_halves_bf16_bytes():
  codec = make_codec("int8", (30, 2, 3, 16, 64), "bfloat16")
  raw = make_codec("raw", (30, 2, 3, 16, 64), "bfloat16")
  assert codec.encoded_block_bytes == 30 * 2 * 3 * (16 * 64 + 4)
  assert codec.encoded_block_bytes < 0.51 * raw.encoded_block_bytes


@pytest.mark.parametrize("name,compress", [("raw", False), ("zstd", True), ("int8", False),
                                           ("int8+zstd", True)])
def test_names_and_compression(name, compress):
  codec = make_codec(name, (2, 2, 2, 4, 4), "bfloat16")
  assert codec.full_name == name
  assert codec.compress == compress


def test_bad_input_raises():
  with pytest.raises(ValueError, match="unknown codec"):
    make_codec("lz4", (2, 2, 2, 4, 4), "bfloat16")
  with pytest.raises(ValueError, match="not storable"):
    make_codec("raw", (2, 2, 2, 4, 4), "int4")
  with pytest.raises(ValueError, match="block_shape"):
    make_codec("raw", (2, 3, 2, 4, 4), "float32")
  codec = make_codec("raw", (2, 2, 2, 4, 4), "bfloat16")
  with pytest.raises(ValueError, match="shape"):
    codec.check_blocks(np.ones((1, 2, 2, 2, 4, 5), ml_dtypes.bfloat16))
  with pytest.raises(ValueError, match="bfloat16"):
    codec.check_blocks(np.ones((1, 2, 2, 2, 4, 4), np.float32))
