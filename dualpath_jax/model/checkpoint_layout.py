"""A model checkpoint's directory (`checkpoint.py` writes and restores
it) as far as it can be known without JAX: the metadata file's name and
format, reading it, whether a checkpoint may be written at a path, and the
fsyncs that make a written one durable (`sync_tree`, `sync_directory`). So a
launcher refuses a bad checkpoint source, a request its model cannot take
or an output directory that would fail, before JAX's ~3 s import and long
before any weights load."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import shutil
import stat
import zlib
from typing import Any, Iterator

from absl import logging

from dualpath_jax import outputs
from dualpath_jax.config import ModelConfig
from dualpath_jax.disk_io import sync_directory
from dualpath_jax.utils import is_integer

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
  recorded = metadata.get("metadata_crc32")
  if recorded is None:  # written before the checksum was recorded
    logging.warning("%s records no checksum of itself: its config is not "
                    "checked (write it again with `python -m launch.convert "
                    "--overwrite` to add one)", path)
  elif recorded != metadata_checksum(metadata):
    raise ValueError(f"{path} is damaged: its CRC-32 differs from the one it "
                     "records (a changed config would load a different "
                     "model); write the checkpoint again with `python -m "
                     "launch.convert --overwrite`")
  _check_fields(path, metadata)
  return metadata


def metadata_checksum(metadata: dict[str, Any]) -> int:
  """CRC-32 of the metadata's fields but its own (canonical JSON): a flipped
  bit in the config (rms_norm_eps 1e-05 -> 1e-01) loaded a different model."""
  body = {k: v for k, v in metadata.items() if k != "metadata_crc32"}
  return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def _check_fields(path: pathlib.Path, metadata: dict[str, Any]) -> None:
  """ValueError naming the file for a field of the wrong JSON type (they
  used to fail later, with a traceback)."""
  def bad(what: str) -> ValueError:
    return ValueError(f"{path} is damaged: {what}")
  if not isinstance(metadata.get("weights_id"), str):
    raise bad("weights_id must be a string")
  tokenizer = metadata.get("tokenizer")
  if not (isinstance(tokenizer, dict)
          and isinstance(tokenizer.get("gguf"), (str, type(None)))
          and isinstance(tokenizer.get("embedded"), bool)
          and isinstance(tokenizer.get("digest"), (str, type(None)))):
    raise bad('tokenizer must be {"gguf": path or null, "embedded": bool, '
              '"digest": string or null}')
  crcs = metadata.get("state_crc32")
  if crcs is not None and not (isinstance(crcs, dict) and all(
      isinstance(k, str) and is_integer(v) for k, v in crcs.items())):
    raise bad("state_crc32 must map array paths to integers")
  config = metadata.get("config")
  if not isinstance(config, dict):
    raise bad("config must be a JSON object")
  for field in dataclasses.fields(ModelConfig):
    if field.name not in config:
      continue  # config_from_metadata names a missing one
    value, default = config[field.name], field.default
    ok = {str: lambda v: isinstance(v, str),
          bool: lambda v: isinstance(v, bool),
          int: lambda v: is_integer(v) and v > 0,
          float: lambda v: isinstance(v, (int, float))
          and not isinstance(v, bool) and v > 0,
          tuple: lambda v: isinstance(v, list) and all(map(is_integer, v))}
    kind = type(default) if default is not dataclasses.MISSING else (
        str if field.name == "name" else int)
    if field.name == "bos_token_id":  # an id, not a count: 0 is one (it
      # was refused, so a model whose BOS is token 0 saved, then never loaded)
      valid, what = is_integer(value) and value >= 0, "token id"
    else:
      valid, what = ok[kind](value), kind.__name__
    if not valid:
      raise bad(f"config.{field.name} = {value!r} is not a valid {what}")
  vocab = config.get("vocab_size", 0)
  ids = [config.get("bos_token_id", 0), *config.get("eos_token_ids", [])]
  if any(not 0 <= i < vocab for i in ids):
    raise bad(f"token ids {ids} are not all in the vocabulary [0, {vocab})")


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
  if str(directory).lower().endswith(".gguf"):
    raise ValueError(f"{directory}: a checkpoint directory named .gguf could "
                     "not be loaded (--model= reads a .gguf path as a GGUF "
                     "file); give another name")
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
  Siblings of live processes are theirs and left alone. The parent
  directory is fsynced before anything is removed (`sync_directory`), so
  that a power cut cannot keep a removal and lose the rename it relied on
  (this one's rename back, or the killed save's rename of the new one).
  """
  path = pathlib.Path(directory).absolute()
  restored = False
  for pid, old in dead_siblings(path, "old"):
    staged = sibling(path, "partial", pid)
    between_renames = (staged.is_dir() and not path.exists()
                       and (old / METADATA_FILE).is_file())
    if between_renames and not restored:
      os.rename(old, path)
      sync_directory(path.parent)  # the rename back, before what it undoes
      shutil.rmtree(staged, ignore_errors=True)  # the unpublished new one
      restored = True
    else:
      sync_directory(path.parent)  # the killed save's rename of the new one
      shutil.rmtree(old, ignore_errors=True)
  return restored


def sync_tree(root: str | os.PathLike) -> None:
  """fsyncs every regular file under `root`, whoever wrote it (Orbax
  writes its metadata files, `_CHECKPOINT_METADATA` and others, without
  an fsync), then each directory, `root` last (`sync_directory`): run
  before `root` is renamed into place, so that after a power cut the
  renamed directory never holds files whose data or entries never reached
  the disk. A directory that cannot be read is an error, never passed
  over."""
  def fail(error: OSError) -> None:
    raise error
  for folder, _, files in os.walk(root, topdown=False, onerror=fail):
    for name in files:
      path = os.path.join(folder, name)
      if not stat.S_ISREG(os.lstat(path).st_mode):  # a link: not ours to sync
        continue
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    sync_directory(folder)
