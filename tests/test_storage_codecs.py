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
