"""A model checkpoint's directory (`checkpoint.py` writes and restores
it) as far as it can be known without JAX: the metadata file's name and
format, reading it, and whether a checkpoint may be written at a path. So a
launcher refuses a bad checkpoint source, a request its model cannot take
or an output directory that would fail, before JAX's ~3 s import and long
before any weights load."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from dualpath_jax import outputs
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


def check_output_directory(directory: str | os.PathLike,
                           overwrite: bool = False) -> None:
  """Raises unless a checkpoint may be written at `directory` (see
  `save_checkpoint`): a launcher calls it before the slow conversion."""
  if not str(directory):
    raise ValueError("the checkpoint directory is an empty path")
  path = pathlib.Path(directory)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path} exists and is not a directory")
  if not path.is_dir() or not any(path.iterdir()):
    # new or empty: files must be makeable there (a probe, removed at once)
    outputs.check_output_dir(str(path), "the checkpoint directory")
    return
  if not (path / METADATA_FILE).is_file():
    raise ValueError(f"{path} is a directory of other files, not a "
                     "checkpoint: give a new or empty directory")
  if not overwrite:
    raise FileExistsError(f"{path} holds a checkpoint already (pass "
                          "overwrite=True, or --overwrite, to replace it)")
