"""The JSON metadata file of a model checkpoint (`checkpoint.py`), read
without JAX: what `describe_model` needs to refuse a bad request before
the weights, or JAX itself, load."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from dualpath_jax.config import ModelConfig

METADATA_FILE = "dualpath_model.json"
FORMAT_VERSION = 1


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The metadata dict of a checkpoint directory."""
  path = pathlib.Path(directory) / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} is not a dualpath model checkpoint "
                            f"(no {METADATA_FILE}); write one with "
                            "`python -m launch.convert`")
  try:
    metadata = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is damaged: not JSON ({e}); write the "
                     "checkpoint again with `python -m launch.convert "
                     "--overwrite`") from None
  if not isinstance(metadata, dict):
    raise ValueError(f"{path} is damaged: not a JSON object")
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: unsupported format_version "
                     f"{metadata.get('format_version')!r}")
  return metadata


def config_from_metadata(metadata: dict[str, Any]) -> ModelConfig:
  """The ModelConfig a checkpoint's metadata records (ValueError if it does
  not record a whole one)."""
  try:
    fields = dict(metadata["config"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelConfig(**fields)
  except (KeyError, TypeError) as e:
    raise ValueError(f"the checkpoint's {METADATA_FILE} holds no whole model "
                     f"config ({type(e).__name__}: {e})") from None
