"""A model checkpoint's directory (`checkpoint.py` writes and restores
it) as far as it can be known without JAX: the metadata file's name and
format, reading it, and whether a checkpoint may be written at a path. So a
launcher refuses a bad checkpoint source, a request its model cannot take
or an output directory that would fail, before JAX's ~3 s import and long
before any weights load."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
from typing import Any, Iterator

from dualpath_jax import outputs
from dualpath_jax.config import ModelConfig

METADATA_FILE = "dualpath_model.json"
FORMAT_VERSION = 1


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The metadata dict of a checkpoint directory (first putting back a
  checkpoint a killed replacement left aside: `recover_interrupted_replace`)."""
  recover_interrupted_replace(directory)
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
  `save_checkpoint`): a launcher calls it before the slow conversion. A
  checkpoint a killed replacement left aside is put back first
  (`recover_interrupted_replace`), so it counts as there."""
  if not str(directory):
    raise ValueError("the checkpoint directory is an empty path")
  recover_interrupted_replace(directory)
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


def sibling(directory: pathlib.Path, kind: str, pid: int) -> pathlib.Path:
  """The hidden sibling `.NAME.KIND-PID` of `directory` that process `pid`
  stages a checkpoint in ("partial") or moves a replaced one to ("old")."""
  return directory.parent / f".{directory.name}.{kind}-{pid}"


def dead_siblings(directory: pathlib.Path,
                  kind: str) -> Iterator[tuple[int, pathlib.Path]]:
  """(pid, path) of each `sibling` of `kind` whose process has ended."""
  prefix = f".{directory.name}.{kind}-"
  for path in directory.parent.glob(glob.escape(prefix) + "*"):
    pid = path.name[len(prefix):]
    if pid.isdigit() and not alive(int(pid)):
      yield int(pid), path


def alive(pid: int) -> bool:
  """Whether process `pid` exists (someone else's counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def recover_interrupted_replace(directory: str | os.PathLike) -> bool:
  """Undoes what a process killed while replacing the checkpoint at
  `directory` left (`checkpoint._publish`); returns whether it put a
  checkpoint back.

  A replacement renames the old checkpoint aside (`.NAME.old-PID`), renames
  the new one in from its staging directory (`.NAME.partial-PID`) and
  removes the old one. Killed (kill -9, power loss) between the renames,
  it leaves no `directory`, the old checkpoint whole aside and the new one
  staged: the old one is renamed back and the staged one removed, as an
  interrupted write leaves the path as it was. Killed while removing the old one, it leaves the new
  checkpoint in place and part of the old aside: that part is removed.
  Siblings of live processes are theirs and left alone.
  """
  path = pathlib.Path(directory).absolute()
  restored = False
  for pid, old in dead_siblings(path, "old"):
    staged = sibling(path, "partial", pid)
    between_renames = (staged.is_dir() and not path.exists()
                       and (old / METADATA_FILE).is_file())
    if between_renames and not restored:
      os.rename(old, path)
      shutil.rmtree(staged, ignore_errors=True)  # the unpublished new one
      restored = True
    else:
      shutil.rmtree(old, ignore_errors=True)
  return restored
