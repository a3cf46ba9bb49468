"""Model weights as an Orbax checkpoint, plus a JSON metadata file.

Layout of a checkpoint directory written by `save_checkpoint` (and by
`python -m launch.convert`):

  <dir>/state/                Orbax StandardCheckpointer tree: the pure dict
                              of `nnx.state(Llama)` (stacked layer weights)
  <dir>/dualpath_model.json   {"config": ModelConfig fields, "weights_id",
                               "tokenizer": {"gguf": path, "embedded": bool,
                                             "digest": its tokenizer's hash},
                               "source": where the weights came from,
                               "state_crc32": {array path: CRC-32 of its bytes}}

Restoring builds an abstract `Llama` with `nnx.eval_shape` (no random init)
and restores straight into its shapes and dtypes, then checks every array
against its CRC-32: Orbax's files carry no checksums, so bytes damaged on
disk would otherwise load as slightly wrong weights without a word. A
checkpoint that cannot be read, or fails the check, is a ValueError that
names it and the array.

A save is written into a hidden staging directory and renamed into place
(`save_checkpoint`, `_publish`). Before the rename every regular file and
directory of the staging tree is fsynced (Orbax's and TensorStore's files
too: the tree is walked once they are written); after it, the parent
directory, and only then is a replaced checkpoint removed. Folders the
save makes for `<dir>` have their entries fsynced too. So a power cut
never leaves a published checkpoint whose files never reached the disk,
nor neither checkpoint (one cut between the renames of a replacement
leaves the old one aside, which `recover_interrupted_replace` puts back),
and once a save has returned, its checkpoint is on disk. A file system
that cannot fsync a directory (EINVAL, ENOTSUP) is left to its own
ordering there; any other fsync error fails the save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from dualpath_jax.model import gguf_loader
from dualpath_jax.model.llama import Llama
from dualpath_jax.model.pure_dict import abstract_model
from dualpath_jax.interrupts import interrupts_deferred

# What needs no JAX lives apart (the metadata file, the output directory's
# checks), so that launchers refuse bad input early; re-exported here.
from dualpath_jax.model.checkpoint_layout import (  # pylint: disable=g-bad-import-order
    FORMAT_VERSION, METADATA_FILE, check_output_directory,
    config_from_metadata, dead_siblings, metadata_checksum, read_metadata,
    sibling, sync_directory, sync_tree)

STATE_DIR = "state"


def save_checkpoint(
    directory: str | os.PathLike,
    model: Llama,
    *,
    weights_id: str,
    tokenizer_gguf: str | os.PathLike | None,
    tokenizer_embedded: bool = False,
    source: str = "",
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `model`'s weights and metadata under `directory`; returns it.

  `directory` is made if missing; an existing one must be empty, or hold a
  checkpoint of ours to be replaced with `overwrite=True`. Anything else
  there is never written into or deleted: ValueError (not a directory, or a
  directory of other files) or FileExistsError (a checkpoint, without
  `overwrite`), before any byte is written.

  The checkpoint is written whole into a hidden sibling directory first
  (`.NAME.partial-PID`) and then renamed into place (`_publish`), so an
  interrupted write (Ctrl-C, a crash, a full disk) leaves `directory` as
  it was: still empty or absent, or still the old checkpoint. Before,
  Orbax's `force=True` deleted the old weights first, and a Ctrl-C during
  the save lost them. Partial directories of processes that died are
  removed by the next save to the same path. The staged tree is fsynced
  whole before the rename, and the parent directory after it (see the
  module docstring): a rename alone is atomic, not durable.

  The metadata records a digest of the tokenizer GGUF's tokenizer
  (`gguf_loader.tokenizer_digest`; none for a path with no file), which
  loads check: the file replaced by another model's since, the weights
  would read another vocabulary's ids.
  """
  check_output_directory(directory, overwrite)
  directory = pathlib.Path(directory).absolute()
  digest = _tokenizer_digest(tokenizer_gguf)  # a bad GGUF fails first
  _make_folders(directory.parent)
  _remove_dead_partials(directory)
  staging = sibling(directory, "partial", os.getpid())
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir()
  try:
    _write(staging, model, weights_id=weights_id,
           tokenizer_gguf=tokenizer_gguf,
           tokenizer_embedded=tokenizer_embedded, tokenizer_digest=digest,
           source=source)
    sync_tree(staging)  # all of it on disk before it is renamed in
    _publish(staging, directory, overwrite)
  finally:
    shutil.rmtree(staging, ignore_errors=True)  # gone if published
  return directory


def _make_folders(folder: pathlib.Path) -> None:
  """Makes `folder` and its missing ancestors (mkdir -p), fsyncing each new
  one's parent: a checkpoint published into a folder whose own entry never
  reached the disk is lost with it in a power cut."""
  missing = []
  while not folder.exists():
    missing.append(folder)
    folder = folder.parent
  for new in reversed(missing):
    new.mkdir(exist_ok=True)  # another process may make it meanwhile
    sync_directory(new.parent)


def _tokenizer_digest(tokenizer_gguf: str | os.PathLike | None
                      ) -> str | None:
  """`gguf_loader.tokenizer_digest` of the GGUF file at `tokenizer_gguf`,
  or None where there is none (nothing a load could check)."""
  if tokenizer_gguf is None or not pathlib.Path(tokenizer_gguf).is_file():
    return None
  return gguf_loader.tokenizer_digest(gguf_loader.open_gguf(tokenizer_gguf))


def _write(directory: pathlib.Path, model: Llama, *, weights_id: str,
           tokenizer_gguf: str | os.PathLike | None, tokenizer_embedded: bool,
           tokenizer_digest: str | None, source: str) -> None:
  """The checkpoint's files (Orbax state, then metadata) in `directory`."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Ctrl-C waits for the save to end: Orbax's background threads write on
  # past an interrupt of the caller, into a folder the caller then removes
  # (tracebacks, files left behind, failures at interpreter exit).
  with _orbax_quiet(), interrupts_deferred(
      f"stopping once the weights being written to {directory.name} are "
      "out (seconds)"):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / STATE_DIR, state)
    checkpointer.wait_until_finished()
  metadata = {
      "format_version": FORMAT_VERSION,
      "config": dataclasses.asdict(model.config),
      "weights_id": weights_id,
      "tokenizer": {
          # absolute: a relative path would be read against the loader's
          # working directory
          "gguf": (None if tokenizer_gguf is None
                   else str(pathlib.Path(tokenizer_gguf).absolute())),
          "embedded": tokenizer_embedded,
          "digest": tokenizer_digest,
      },
      "source": source,
      "state_crc32": state_checksums(state),
  }
  metadata["metadata_crc32"] = metadata_checksum(metadata)
  (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


@contextlib.contextmanager
def _orbax_quiet():
  """absl logging at WARNING and above while the body runs: Orbax logs a
  dozen INFO lines per save or restore (versions, handlers, throughput)
  through absl, which launchers print. Warnings and errors still show."""
  previous = logging.get_verbosity()
  # absl's verbosity: DEBUG 1 > INFO 0 > WARNING -1; lower shows less.
  logging.set_verbosity(min(previous, logging.WARNING))
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def _remove_dead_partials(directory: pathlib.Path) -> None:
  """Removes the staging directories that dead processes left for
  `directory` (a live process's staging is its own business)."""
  for _, path in dead_siblings(directory, "partial"):
    shutil.rmtree(path, ignore_errors=True)


def _publish(staging: pathlib.Path, directory: pathlib.Path,
             overwrite: bool) -> None:
  """Moves the finished checkpoint `staging` (fsynced whole: `sync_tree`)
  to `directory`, and fsyncs `directory`'s parent after the rename, which
  is atomic but not durable until then.

  A missing or empty `directory` is replaced by one rename. A checkpoint
  there is first renamed aside (`.NAME.old-PID`), then removed once the new
  one is in place and its rename durable (the parent fsynced: removed
  before, a power cut could keep the removal and lose the rename, leaving
  neither); should the second rename fail, the old one is renamed back.
  Ctrl-C is held back between the renames, so the only ways to stop
  between them are a kill -9 and a power cut, which leave the old
  checkpoint whole, at worst at `.NAME.old-PID`; the next save, load or
  output check of the path renames it back (`recover_interrupted_replace`).

  What is at `directory` is checked again here (`_check_replaceable`):
  the conversion takes a while, and files put there meanwhile were
  renamed aside and deleted with it, and a checkpoint another process
  saved there meanwhile was replaced without `overwrite`.
  """
  with interrupts_deferred():
    if not (directory.is_dir() and any(directory.iterdir())):
      try:
        os.replace(staging, directory)  # replaces an empty directory
      except OSError as e:  # filled since the look: check what is there
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
          raise
      else:
        sync_directory(directory.parent)
        return
    _check_replaceable(directory, overwrite)
    old = sibling(directory, "old", os.getpid())
    shutil.rmtree(old, ignore_errors=True)
    os.rename(directory, old)
    try:
      os.rename(staging, directory)
    except BaseException:
      os.rename(old, directory)
      raise
    sync_directory(directory.parent)  # the new one durable before the old goes
    shutil.rmtree(old, ignore_errors=True)  # before a held Ctrl-C is raised


def _check_replaceable(directory: pathlib.Path, overwrite: bool) -> None:
  """Raises, leaving `directory` alone, unless it holds a checkpoint that
  `overwrite` lets a save replace (`check_output_directory`'s rules, for a
  directory that was new or empty when the save began)."""
  if not (directory / METADATA_FILE).is_file():
    raise ValueError(f"{directory} was given files other than a checkpoint "
                     "while the checkpoint was written: they are left alone "
                     "and the checkpoint is not saved there")
  if not overwrite:
    raise FileExistsError(f"{directory} was given a checkpoint (another "
                          "save's?) while this one was written: it is kept "
                          "(pass overwrite=True, or --overwrite, to replace "
                          "it)")


def state_checksums(state: dict[str, Any]) -> dict[str, int]:
  """{"layers/attn/q_proj/kernel": CRC-32 of the array's bytes, ...} of a
  pure-dict model state (C order, as the arrays are)."""
  sums = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    # As bytes: a memoryview of bfloat16 (an ml_dtypes type) cannot be made.
    array = np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    sums[name] = zlib.crc32(array.view(np.uint8))
  return sums


def restore_checkpoint(
    directory: str | os.PathLike) -> tuple[Llama, dict[str, Any]]:
  """(model, metadata) of a directory written by `save_checkpoint`."""
  directory = pathlib.Path(directory).absolute()
  metadata = read_metadata(directory)
  config = config_from_metadata(metadata)
  graphdef, state = nnx.split(abstract_model(config))
  target = nnx.to_pure_dict(state)
  try:
    with _orbax_quiet():
      restored = ocp.StandardCheckpointer().restore(directory / STATE_DIR,
                                                    target)
  except Exception as e:  # Orbax raises bare Exceptions around TensorStore's
    raise ValueError(f"checkpoint {directory} could not be read: "
                     f"{_root_cause(e)}; it is damaged or incomplete, write it "
                     "again with `python -m launch.convert --overwrite`"
                     ) from e
  _check_state(directory, restored, metadata.get("state_crc32"))
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), metadata


def _root_cause(error: BaseException) -> str:
  """The innermost cause's message, without TensorStore's spec dump."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).split(" [tensorstore_spec=")[0]
  return text.split(". See full TensorStore details")[0].strip().rstrip(".")


def _check_state(directory: pathlib.Path, restored: dict[str, Any],
                 expected: dict[str, int] | None) -> None:
  """ValueError naming the arrays whose bytes differ from what was saved."""
  if expected is None:  # written before checksums were recorded
    logging.warning("checkpoint %s records no checksums: its arrays are not "
                    "checked (write it again with `python -m launch.convert "
                    "--overwrite` to add them)", directory)
    return
  got = state_checksums(restored)
  damaged = sorted(k for k in got if expected.get(k) != got[k])
  if damaged or got.keys() != expected.keys():
    raise ValueError(f"checkpoint {directory} is damaged: "
                     f"{', '.join(damaged) or 'its array list'} "
                     "differ from what was saved (CRC-32); write it again "
                     "with `python -m launch.convert --overwrite`")
