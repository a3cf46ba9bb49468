"""Reads the GGUF container: its metadata and memory-mapped tensor bytes.

Why our own reader: `gguf.GGUFReader` builds a numpy view for every part of
every metadata value, so opening a file with a 49k-token vocabulary and 49k
merges (SmolLM2's) takes ~6 s, paid by every launcher and server start-up
before anything else. Here the header is parsed with `struct` straight from
an `mmap` (~0.1 s for the same file) and tensors are plain views into the
map, dequantized by `gguf_loader`. The `gguf` package gives the table of
ggml types and their block sizes, and is the independent reference the
tests compare both with.

The format (little-endian; versions 2 and 3):

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata: key (string) | value type u32 | value
    tensor infos: name (string) | n_dims u32 | dims u64[n_dims] (ggml order,
                  fastest axis first) | ggml type u32 | offset u64
    padding to `general.alignment` (default 32) | tensor data

A string is a u64 byte length and UTF-8 bytes; an array is an element type
u32, a u64 count and the elements. A malformed or truncated file raises
ValueError naming what and where (byte offset); nothing is read past the end.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
import struct
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Tensors of more dimensions than ggml allows (GGML_MAX_DIMS) are malformed.
_MAX_DIMS = 4

# GGUF metadata value types: id -> (name, struct format or None).
_STRING, _ARRAY = 8, 9
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"),
    3: ("int16", "<h"), 4: ("uint32", "<I"), 5: ("int32", "<i"),
    6: ("float32", "<f"), 7: ("bool", "<?"), _STRING: ("string", None),
    _ARRAY: ("array", None), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_NUMPY_OF_FORMAT = {"<B": "<u1", "<b": "<i1", "<H": "<u2", "<h": "<i2",
                    "<I": "<u4", "<i": "<i4", "<f": "<f4", "<?": "?",
                    "<Q": "<u8", "<q": "<i8", "<d": "<f8"}


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFTensor:
  """One tensor of a GGUF file, its bytes still in the file.

  `shape` is in numpy (row-major) order, the reverse of the ggml order the
  file lists. `data` is a read-only uint8 view `[*shape[:-1], row_bytes]`:
  each row's `shape[-1]` values in the type's storage (quantized blocks for
  Q-types), which `gguf_loader.dequantize_tensor` (and `gguf.quants.
  dequantize`) take.
  """
  name: str
  ggml_type: str  # e.g. "Q4_1", "F32" (`gguf.GGMLQuantizationType` name)
  type_id: int
  shape: tuple[int, ...]
  offset: int  # of the first byte, from the start of the file
  data: np.ndarray  # uint8 [*shape[:-1], row_bytes]

  @property
  def num_bytes(self) -> int:
    return int(self.data.size)


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFFile:
  """A parsed GGUF file: `metadata` (key -> str, int, float, bool or list, in
  file order) and `tensors` (name -> GGUFTensor, in file order). Read-only;
  the tensors keep the file's memory map open. Hashed by identity (caches
  key on an open file)."""
  path: pathlib.Path
  version: int
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensor]
  alignment: int
  data_offset: int


class _Cursor:
  """Bounds-checked little-endian reads from a buffer, with an offset."""

  def __init__(self, buffer: mmap.mmap, path: pathlib.Path):
    self.buffer, self.path, self.offset = buffer, path, 0
    self.size = len(buffer)

  def fail(self, what: str, at: int | None = None) -> ValueError:
    at = self.offset if at is None else at
    return ValueError(f"{self.path}: malformed GGUF file: {what} (at byte "
                      f"{at} of {self.size})")

  def need(self, n: int, what: str) -> None:
    if n < 0 or self.offset + n > self.size:
      raise self.fail(f"{what} needs {n} bytes, the file ends first "
                      "(truncated?)")

  def scalar(self, fmt: str, what: str) -> Any:
    n = struct.calcsize(fmt)
    self.need(n, what)
    (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
    self.offset += n
    return value

  def string(self, what: str) -> str:
    start = self.offset
    length = self.scalar("<Q", f"{what}'s length")
    self.need(length, what)
    raw = self.buffer[self.offset:self.offset + length]
    self.offset += length
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise self.fail(f"{what} is not UTF-8 ({e.reason})", start) from None

  def value(self, type_id: int, what: str, depth: int = 0) -> Any:
    if type_id not in _VALUE_TYPES:
      raise self.fail(f"{what} has unknown value type {type_id}")
    fmt = _VALUE_TYPES[type_id][1]
    if fmt is not None:
      return self.scalar(fmt, what)
    if type_id == _STRING:
      return self.string(what)
    if depth > 0:
      raise self.fail(f"{what} nests arrays, which we do not read")
    item_type = self.scalar("<I", f"{what}'s element type")
    count = self.scalar("<Q", f"{what}'s length")
    if item_type not in _VALUE_TYPES:
      raise self.fail(f"{what} has elements of unknown type {item_type}")
    item_fmt = _VALUE_TYPES[item_type][1]
    if item_fmt is not None:  # numbers: one numpy read
      n = count * struct.calcsize(item_fmt)
      self.need(n, what)
      items = np.frombuffer(self.buffer, _NUMPY_OF_FORMAT[item_fmt], count,
                            self.offset)
      self.offset += n
      return items.tolist()
    # Each element takes at least 8 bytes (a string's length): a count the
    # file cannot hold is refused before the loop.
    self.need(8 * count, what)
    if item_type == _STRING:
      return self.strings(count, what)
    return [self.value(item_type, f"{what}[{i}]", depth + 1)
            for i in range(count)]

  def strings(self, count: int, what: str) -> list[str]:
    """`count` strings: `string` unrolled (vocabularies hold ~10^5)."""
    buffer, offset, size = self.buffer, self.offset, self.size
    unpack = struct.Struct("<Q").unpack_from
    items = []
    for i in range(count):
      if offset + 8 > size:
        self.offset = offset
        self.need(8, f"{what}[{i}]'s length")
      (length,) = unpack(buffer, offset)
      if offset + 8 + length > size:
        self.offset = offset + 8
        self.need(length, f"{what}[{i}]")
      raw = buffer[offset + 8:offset + 8 + length]
      try:
        items.append(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise self.fail(f"{what}[{i}] is not UTF-8 ({e.reason})",
                        offset) from None
      offset += 8 + length
    self.offset = offset
    return items


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Parses the GGUF file at `path` (FileNotFoundError, or ValueError for a
  file that is not a well-formed little-endian GGUF v2/v3)."""
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  with path.open("rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      raise ValueError(f"{path}: not a GGUF file (empty)")
    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  cur = _Cursor(buffer, path)
  if buffer[:4] != GGUF_MAGIC:
    raise ValueError(f"{path}: not a GGUF file (starts with "
                     f"{bytes(buffer[:4])!r}, not {GGUF_MAGIC!r})")
  cur.offset = 4
  version = cur.scalar("<I", "the version")
  if version & 0xFFFF == 0 and version:
    raise ValueError(f"{path}: a big-endian GGUF file; only little-endian "
                     "files are read")
  if version not in SUPPORTED_VERSIONS:
    raise ValueError(f"{path}: GGUF version {version} is not supported "
                     f"(only {', '.join(map(str, SUPPORTED_VERSIONS))})")
  tensor_count = cur.scalar("<Q", "the tensor count")
  kv_count = cur.scalar("<Q", "the metadata count")

  metadata: dict[str, Any] = {}
  for i in range(kv_count):
    start = cur.offset
    key = cur.string(f"metadata key {i}")
    if key in metadata:
      raise cur.fail(f"metadata key {key!r} appears twice", start)
    type_id = cur.scalar("<I", f"metadata {key!r}'s type")
    metadata[key] = cur.value(type_id, f"metadata {key!r}")

  infos = []
  for i in range(tensor_count):
    start = cur.offset
    name = cur.string(f"tensor {i}'s name")
    n_dims = cur.scalar("<I", f"tensor {name!r}'s dimension count")
    if not 1 <= n_dims <= _MAX_DIMS:
      raise cur.fail(f"tensor {name!r} has {n_dims} dimensions", start)
    dims = [cur.scalar("<Q", f"tensor {name!r}'s dimensions")
            for _ in range(n_dims)]
    type_id = cur.scalar("<I", f"tensor {name!r}'s type")
    offset = cur.scalar("<Q", f"tensor {name!r}'s offset")
    infos.append((start, name, tuple(reversed(dims)), type_id, offset))

  alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
  if (not isinstance(alignment, int) or isinstance(alignment, bool)
      or alignment <= 0 or alignment & (alignment - 1)):
    raise ValueError(f"{path}: general.alignment must be a power of two, got "
                     f"{alignment!r}")
  data_offset = -(-cur.offset // alignment) * alignment

  tensors: dict[str, GGUFTensor] = {}
  expected = 0  # as llama.cpp: tensors tile the data section in table order
  for start, name, shape, type_id, offset in infos:
    if name in tensors:
      raise cur.fail(f"tensor {name!r} appears twice", start)
    try:
      ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
      raise cur.fail(f"tensor {name!r} has unknown ggml type {type_id}",
                     start) from None
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
      raise cur.fail(f"tensor {name!r}: rows of {shape[-1]} values are not "
                     f"whole {ggml_type.name} blocks of {block}", start)
    row_bytes = shape[-1] // block * block_bytes
    # A zero dimension makes a tensor empty whatever the others are, so it
    # passes the end-of-file check below; numpy then failed to shape the
    # view, with no file or tensor in its message. llama.cpp refuses such
    # counts too (they overflow int64).
    if math.prod(max(d, 1) for d in (*shape[:-1], row_bytes)) >= 2**63:
      raise cur.fail(f"tensor {name!r}: dimensions {list(reversed(shape))} "
                     "are too large (2**63 bytes or more)", start)
    num_bytes = math.prod(shape[:-1]) * row_bytes
    first = data_offset + offset
    if offset % alignment or first + num_bytes > cur.size:
      raise cur.fail(f"tensor {name!r}: {num_bytes} bytes at offset {offset} "
                     f"{'are not aligned' if offset % alignment else 'run past the end of the file'}",
                     start)
    if offset != expected:  # a wrong type, shape or offset in the table
      raise cur.fail(
          f"tensor {name!r} is at data offset {offset}, expected {expected} "
          "(the end of the tensor before it): the tensor table is damaged "
          "(a type, shape or offset)", start)
    expected = -(-(offset + num_bytes) // alignment) * alignment
    data = np.frombuffer(buffer, np.uint8, num_bytes, first)
    tensors[name] = GGUFTensor(name, ggml_type.name, type_id, shape, first,
                               data.reshape(*shape[:-1], row_bytes))
  return GGUFFile(path, version, metadata, tensors, alignment, data_offset)
