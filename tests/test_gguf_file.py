"""`gguf_file.read_gguf` against the `gguf` package's own writer and reader.

The package is an independent implementation of the format: files it writes
must read back with every value and byte, and on the embedded SmolLM2 file
both readers must agree on everything. Malformed files (truncated anywhere,
wrong magic or version, big-endian, bad UTF-8, tensors past the end) must
raise ValueError with the reason, never another exception.
"""

import dataclasses
import pathlib
import struct

import gguf
import numpy as np
import pytest

from dualpath_jax.model import describe_model, gguf_file, gguf_loader
from dualpath_jax.model.tokenizer import Tokenizer

_METADATA = {
    # key: (value, GGUF type, array element type or None)
    "t.u8": (200, gguf.GGUFValueType.UINT8, None),
    "t.i8": (-100, gguf.GGUFValueType.INT8, None),
    "t.u16": (60000, gguf.GGUFValueType.UINT16, None),
    "t.i16": (-30000, gguf.GGUFValueType.INT16, None),
    "t.u32": (4_000_000_000, gguf.GGUFValueType.UINT32, None),
    "t.i32": (-2_000_000_000, gguf.GGUFValueType.INT32, None),
    "t.u64": (2**63 + 5, gguf.GGUFValueType.UINT64, None),
    "t.i64": (-(2**62), gguf.GGUFValueType.INT64, None),
    "t.f32": (0.15625, gguf.GGUFValueType.FLOAT32, None),
    "t.f64": (-1e-300, gguf.GGUFValueType.FLOAT64, None),
    "t.bool": (True, gguf.GGUFValueType.BOOL, None),
    "t.str": ("Ġhello wörld ☃", gguf.GGUFValueType.STRING, None),
    "t.empty_str": ("", gguf.GGUFValueType.STRING, None),
    "t.strs": (["a", "", "Ġb c", "<|im_end|>", "日本"],
               gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "t.i32s": ([3, -1, 0, 2**31 - 1], gguf.GGUFValueType.ARRAY,
               gguf.GGUFValueType.INT32),
    "t.f32s": ([0.5, -2.25], gguf.GGUFValueType.ARRAY,
               gguf.GGUFValueType.FLOAT32),
    "t.bools": ([True, False, True], gguf.GGUFValueType.ARRAY,
                gguf.GGUFValueType.BOOL),
}


def _write(path: pathlib.Path, rng: np.random.Generator, *,
           alignment: int | None = None,
           endianess=gguf.GGUFEndian.LITTLE) -> dict[str, np.ndarray]:
  """Writes a GGUF file with `_METADATA` and four tensors (F32, F16, Q8_0
  raw blocks, a 3-D F32) through the `gguf` package's writer; returns each
  tensor's expected values (float32, numpy order)."""
  writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
  if alignment is not None:
    writer.add_custom_alignment(alignment)
  for key, (value, vtype, sub_type) in _METADATA.items():
    writer.add_key_value(key, value, vtype, sub_type=sub_type)
  expected = {
      "norm": rng.standard_normal(7).astype(np.float32),
      "half": rng.standard_normal((5, 6)).astype(np.float16),
      "cube": rng.standard_normal((2, 3, 4)).astype(np.float32),
  }
  for name, array in expected.items():
    writer.add_tensor(name, array)
  # Q8_0: blocks of 32 values, a float16 scale then 32 int8s (34 bytes).
  rows, cols = 3, 64
  scales = rng.uniform(0.01, 0.1, (rows, cols // 32)).astype(np.float16)
  quants = rng.integers(-127, 128, (rows, cols // 32, 32), dtype=np.int8)
  blocks = np.concatenate([scales[..., None].view(np.uint8),
                           quants.view(np.uint8)], axis=-1)
  writer.add_tensor("q8", blocks.reshape(rows, -1),
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  expected["q8"] = (scales[..., None].astype(np.float32) * quants).reshape(
      rows, cols)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return {k: np.asarray(v, np.float32) for k, v in expected.items()}


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_the_gguf_writer_wrote(tmp_path, np_rng, alignment):
  path = tmp_path / "m.gguf"
  expected = _write(path, np_rng, alignment=alignment)
  parsed = gguf_file.read_gguf(path)
  assert parsed.version == 3
  assert parsed.alignment == (alignment or 32)
  assert parsed.data_offset % parsed.alignment == 0
  for key, (value, _, _) in _METADATA.items():
    got = parsed.metadata[key]
    if isinstance(value, float):
      assert got == pytest.approx(value, rel=1e-7), key
    else:
      assert got == value and type(got) is type(value), key
  assert parsed.metadata["general.architecture"] == "llama"
  assert list(parsed.tensors) == list(expected)
  for name, want in expected.items():
    tensor = parsed.tensors[name]
    assert tensor.shape == want.shape, name
    assert not tensor.data.flags.writeable
    got = gguf_loader.dequantize_tensor(tensor)
    np.testing.assert_array_equal(got, want, err_msg=name)
  # Where the gguf package's own reader puts each tensor.
  for theirs in gguf.GGUFReader(path).tensors:
    ours = parsed.tensors[theirs.name]
    assert ours.offset == theirs.data_offset
    assert ours.ggml_type == theirs.tensor_type.name
    assert ours.data.tobytes() == theirs.data.tobytes()


def test_embedded_file_reads_as_the_gguf_package_reads_it(smollm2_gguf_path):
  ours = gguf_file.read_gguf(smollm2_gguf_path)
  theirs = gguf.GGUFReader(smollm2_gguf_path)
  fields = {k: f for k, f in theirs.fields.items()
            if not k.startswith("GGUF.")}  # the header, not metadata
  assert list(ours.metadata) == list(fields)
  for key, field in fields.items():
    assert ours.metadata[key] == field.contents(), key
  assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
  assert [t.name for t in theirs.tensors] == list(ours.tensors)
  for t in theirs.tensors:
    mine = ours.tensors[t.name]
    assert mine.shape == tuple(reversed(t.shape.tolist()))
    assert (mine.ggml_type, mine.offset) == (t.tensor_type.name,
                                              t.data_offset)
    assert np.array_equal(mine.data.reshape(-1),
                          np.asarray(t.data).reshape(-1).view(np.uint8))
  assert ours.data_offset == theirs.data_offset
  # Our dequantization, bit for bit the gguf package's, on every tensor.
  for t in theirs.tensors:
    want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                      np.float32).reshape(ours.tensors[t.name].shape)
    got = gguf_loader.dequantize_tensor(ours.tensors[t.name])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                  err_msg=t.name)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0",
                                  "Q4_1"])
def test_dequantize_is_the_gguf_packages_bit_for_bit(np_rng, kind):
  """Random rows of each supported type (random bytes, the float16 scales
  and offsets drawn as finite floats) against `gguf.quants.dequantize`."""
  qtype = gguf.GGMLQuantizationType[kind]
  rows, cols = 3, 96
  block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  raw = np_rng.integers(0, 256, (rows, cols // block, block_bytes),
                        dtype=np.uint8)
  if kind.startswith("Q"):  # finite scales (and Q4_1 offsets)
    halves = 2 if kind == "Q4_1" else 1
    scales = np_rng.uniform(-2, 2, (rows, cols // block, halves))
    raw[..., :2 * halves] = scales.astype(np.float16).view(np.uint8)
  elif kind == "F32":
    raw = np_rng.standard_normal((rows, cols)).astype(np.float32).view(
        np.uint8).reshape(raw.shape)
  raw = raw.reshape(rows, -1)
  tensor = gguf_file.GGUFTensor("w", kind, int(qtype), (rows, cols), 0, raw)
  got = gguf_loader.dequantize_tensor(tensor)
  want = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32)
  assert got.shape == want.shape == (rows, cols)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  assert np.isfinite(got).all() or kind in ("F16", "BF16")


def _header(version=3, tensors=0, kvs=1) -> bytes:
  return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs)


def _string(text: bytes) -> bytes:
  return struct.pack("<Q", len(text)) + text


def test_reads_an_empty_array(tmp_path):
  """(The gguf package's writer refuses to write one; llama.cpp's does.)"""
  path = tmp_path / "empty.gguf"
  path.write_bytes(_header(kvs=2) + _string(b"a") + struct.pack("<IIQ", 9, 5, 0)
                   + _string(b"b") + struct.pack("<IIQ", 9, 8, 0))
  assert gguf_file.read_gguf(path).metadata == {"a": [], "b": []}


@pytest.mark.parametrize("content,reason", [
    (b"", "not a GGUF file (empty)"),
    (b"GGML" + bytes(20), "not a GGUF file (starts with b'GGML'"),
    (b"GG", "not a GGUF file"),
    (_header(version=1), "GGUF version 1 is not supported"),
    (_header(version=4), "GGUF version 4 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF file"),
    (_header(kvs=2) + _string(b"k") + struct.pack("<II", 4, 1)
     + _string(b"k") + struct.pack("<II", 4, 2),
     "metadata key 'k' appears twice"),
    (_header() + _string(b"k\xff") + struct.pack("<II", 4, 1),
     "metadata key 0 is not UTF-8"),
    (_header() + _string(b"k") + struct.pack("<I", 13) + bytes(8),
     "metadata 'k' has unknown value type 13"),
    (_header() + _string(b"k") + struct.pack("<IIQ", 9, 9, 1)
     + struct.pack("<IQ", 4, 0), "nests arrays"),
    (_header() + _string(b"k") + struct.pack("<IIQ", 9, 8, 2**40),
     "the file ends first"),
    (_header() + _string(b"k") + struct.pack("<IIQ", 9, 8, 2)
     + _string(b"ok") + _string(b"\xc3"),
     "metadata 'k'[1] is not UTF-8"),
    (_header(tensors=1, kvs=0) + _string(b"w") + struct.pack("<I", 0),
     "tensor 'w' has 0 dimensions"),
    (_header(tensors=1, kvs=0) + _string(b"w")
     + struct.pack("<IQIQ", 1, 8, 0, 0), "run past the end of the file"),
    (_header(tensors=1, kvs=0) + _string(b"w")
     + struct.pack("<IQIQ", 1, 8, 999, 0), "unknown ggml type 999"),
    (_header(tensors=1, kvs=0) + _string(b"w")
     + struct.pack("<IQIQ", 1, 33, 8, 0) + bytes(64),
     "rows of 33 values are not whole Q8_0 blocks of 32"),
    (_header(tensors=1, kvs=0) + _string(b"w")
     + struct.pack("<IQIQ", 1, 1, 0, 4) + bytes(64), "are not aligned"),
    (_header(tensors=0, kvs=1) + _string(b"general.alignment")
     + struct.pack("<II", 4, 48), "general.alignment must be a power of two"),
])
def test_malformed_files_raise_value_error_with_the_reason(tmp_path, content,
                                                           reason):
  path = tmp_path / "bad.gguf"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="^" + str(path)) as e:
    gguf_file.read_gguf(path)
  assert reason in str(e.value)


def test_every_truncation_is_a_value_error(tmp_path, np_rng):
  """Cut a valid file at every byte of its header and in its last tensor:
  always ValueError, never an IndexError, struct.error or a short tensor."""
  path = tmp_path / "m.gguf"
  _write(path, np_rng)
  whole = path.read_bytes()
  parsed = gguf_file.read_gguf(path)
  data_end = max(t.offset + t.num_bytes for t in parsed.tensors.values())
  cut_path = tmp_path / "cut.gguf"
  cuts = list(range(parsed.data_offset)) + [data_end - 1]
  for cut in cuts:
    cut_path.write_bytes(whole[:cut])
    with pytest.raises(ValueError):
      gguf_file.read_gguf(cut_path)


def test_describe_model_refuses_a_truncated_gguf(tmp_path, smollm2_gguf_path):
  """(A launcher prints the ValueError as `<launcher>: <message>` and exits
  nonzero, as for any bad --model: tests/test_engine_flags.py.)"""
  cut = tmp_path / "cut.gguf"
  with open(smollm2_gguf_path, "rb") as f:
    cut.write_bytes(f.read(1 << 20))  # the metadata ends at ~1.7 MiB
  with pytest.raises(ValueError, match=r"malformed GGUF file: metadata "
                     r"'tokenizer\.ggml\.merges' needs \d+ bytes, the file "
                     r"ends first \(truncated\?\)"):
    describe_model(str(cut))


_DELETE = object()


def _with(parsed: gguf_file.GGUFFile, key: str, value) -> gguf_file.GGUFFile:
  metadata = {k: v for k, v in parsed.metadata.items() if k != key}
  if value is not _DELETE:
    metadata[key] = value
  return dataclasses.replace(parsed, metadata=metadata)


_CONFIG, _TOKENIZER = gguf_loader.config_from_gguf, Tokenizer.from_gguf


@pytest.mark.parametrize("build,key,value,reason", [
    (_CONFIG, "llama.block_count", _DELETE,
     "GGUF metadata lacks llama.block_count"),
    (_CONFIG, "llama.block_count", "30",
     "llama.block_count must be a positive integer, got '30'"),
    (_CONFIG, "llama.attention.head_count", 0,
     "llama.attention.head_count must be a positive integer, got 0"),
    (_CONFIG, "llama.attention.head_count_kv", [3],
     "positive integer, got [3]"),
    (_CONFIG, "llama.attention.head_count_kv", 2,
     "num_heads=9 must be a multiple of num_kv_heads=2"),
    (_CONFIG, "llama.context_length", 8192.0, "positive integer, got 8192.0"),
    (_CONFIG, "llama.rope.freq_base", -1.0,
     "llama.rope.freq_base must be a positive number, got -1.0"),
    (_CONFIG, "llama.vocab_size", True, "positive integer, got True"),
    (_CONFIG, "tokenizer.ggml.eos_token_id", 49152,
     "tokenizer.ggml.eos_token_id must be a token id in [0, 49152), got 49152"),
    (_CONFIG, "tokenizer.ggml.bos_token_id", "1", "must be a token id"),
    (_CONFIG, "general.architecture", "gemma",
     "unsupported GGUF architecture 'gemma'"),
    (_TOKENIZER, "tokenizer.ggml.tokens", ["a", 1],
     "tokenizer.ggml.tokens must be a list of str"),
    (_TOKENIZER, "tokenizer.ggml.merges", "Ġ t",
     "tokenizer.ggml.merges must be a list"),
    (_TOKENIZER, "tokenizer.ggml.token_type", ["1"] * 49152,
     "token_type must be a list of int"),
    (_TOKENIZER, "tokenizer.ggml.eot_token_id", -1,
     "eot_token_id must be a token id"),
    (_TOKENIZER, "tokenizer.chat_template", 7,
     "chat_template must be a string"),
])
def test_bad_metadata_is_refused_naming_the_key(smollm2_gguf_path, build, key,
                                                value, reason):
  """The config and the tokenizer read from a GGUF's metadata."""
  parsed = _with(gguf_loader.open_gguf(smollm2_gguf_path), key, value)
  with pytest.raises(ValueError) as e:
    build(parsed)
  assert reason in str(e.value)


def test_a_damaged_tensor_table_is_refused(tmp_path, np_rng):
  """A tensor's type changed in the table (F16 -> F32: twice the bytes) used
  to read the wrong bytes silently when the data still fit the file; the
  tensors must tile the data section in table order, as llama.cpp
  requires."""
  path = tmp_path / "t.gguf"
  _write(path, np_rng)
  raw = bytearray(path.read_bytes())
  at = raw.index(b"half") + 4  # the name, then n_dims u32, 2 dims u64
  (n_dims,) = struct.unpack_from("<I", raw, at)
  type_at = at + 4 + 8 * n_dims
  assert struct.unpack_from("<I", raw, type_at) == (1,)  # F16
  struct.pack_into("<I", raw, type_at, 0)  # F32
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="tensor table is damaged"):
    gguf_file.read_gguf(path)


def _replace_tensors(parsed, **changes):
  tensors = dict(parsed.tensors)
  for name, tensor in changes.items():
    if tensor is None:
      del tensors[name.replace("__", ".")]
    else:
      tensors[name.replace("__", ".")] = tensor
  return dataclasses.replace(parsed, tensors=tensors)


def test_tensors_it_would_not_apply_or_cannot_read_are_refused(
    smollm2_gguf_path):
  """A Llama 3.1 GGUF's `rope_freqs.weight` or an attention bias used to be
  ignored (the model loaded, different from llama.cpp's); a Q5_0 tensor
  passed describe_model and failed after the JAX import."""
  parsed = gguf_file.read_gguf(smollm2_gguf_path)
  norm = parsed.tensors["output_norm.weight"]
  for extra in ("rope_freqs.weight", "blk.0.attn_q.bias"):
    bad = _replace_tensors(parsed, **{extra.replace(".", "__"): norm})
    with pytest.raises(ValueError, match=f"does not apply.*{extra}"):
      gguf_loader.config_from_gguf(bad)
  bad = _replace_tensors(parsed, blk__3__ffn_up__weight=None)
  with pytest.raises(ValueError, match="lacks tensor.*blk.3.ffn_up.weight"):
    gguf_loader.config_from_gguf(bad)
  q5 = dataclasses.replace(parsed.tensors["blk.0.ffn_up.weight"],
                           ggml_type="Q5_0")
  bad = _replace_tensors(parsed, blk__0__ffn_up__weight=q5)
  with pytest.raises(ValueError, match=r"Q5_0 is not supported \(supported:"):
    gguf_loader.config_from_gguf(bad)


def test_a_nan_block_scale_is_refused_naming_the_tensor(smollm2_gguf_path):
  """One Q4_1 block scale set to NaN made every logit NaN."""
  parsed = gguf_file.read_gguf(smollm2_gguf_path)
  tensor = parsed.tensors["blk.3.attn_q.weight"]
  assert tensor.ggml_type == "Q4_1"
  data = tensor.data.copy()
  data[0, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
  bad = _replace_tensors(parsed, blk__3__attn_q__weight=dataclasses.replace(
      tensor, data=data))
  config = gguf_loader.config_from_gguf(bad)
  with pytest.raises(ValueError, match="blk.3.attn_q.weight holds NaN"):
    gguf_loader.load_gguf_weights(bad, config, "float32")


def test_weights_id_of_a_large_file_sees_a_change_in_a_middle_tensor(
    tmp_path, np_rng, monkeypatch):
  """A KV block's identity includes the weights id, and the cold tier
  outlives the process: a fine-tune that changed only tensors in the middle
  of a large file kept the id when only the file's ends were hashed, so it
  would have been served the other model's KV. (Limits shrunk so that a
  small file takes the large-file path.)"""
  from dualpath_jax.model import gguf_loader
  monkeypatch.setattr(gguf_loader, "FULL_HASH_MAX_BYTES", 1 << 10)
  monkeypatch.setattr(gguf_loader, "END_WINDOW_BYTES", 4 << 10)
  monkeypatch.setattr(gguf_loader, "TENSOR_SAMPLE_BYTES", 1 << 10)
  writer = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
  tensors = {f"t{i}": np_rng.standard_normal(16384).astype(np.float32)
             for i in range(6)}  # 64 KiB each
  for name, array in tensors.items():
    writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  original = (tmp_path / "a.gguf").read_bytes()
  base = gguf_loader.file_weights_id(tmp_path / "a.gguf", "float32")
  assert base == gguf_loader.file_weights_id(tmp_path / "a.gguf", "float32")
  assert base != gguf_loader.file_weights_id(tmp_path / "a.gguf", "bfloat16")
  t3 = gguf_file.read_gguf(tmp_path / "a.gguf").tensors["t3"]
  tuned = bytearray(original)  # "fine-tune" t3 only: every value changes
  delta = np.frombuffer(original, np.float32, 16384, t3.offset) + 0.01
  tuned[t3.offset:t3.offset + t3.num_bytes] = delta.tobytes()
  (tmp_path / "b.gguf").write_bytes(bytes(tuned))
  assert tuned[:4 << 10] == original[:4 << 10]  # the ends are unchanged
  assert tuned[-(4 << 10):] == original[-(4 << 10):]
  assert gguf_loader.file_weights_id(tmp_path / "b.gguf", "float32") != base
