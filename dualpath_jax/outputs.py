"""Output files of the launchers: checked before a run, written atomically.

Launchers check every output path (`check_output_path`, `check_output_dir`)
before any work, so a typo costs nothing instead of a finished run's
results; reports, text and PNGs are written to a temporary file beside
their path and renamed over it (`replace_atomically`), so an interrupted or
failed write leaves the previous file whole.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable

import numpy as np


def _process_umask() -> int:
  """The process's umask, read once at import: reading it means setting it,
  which must not happen while other threads (the server's) create files."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _process_umask()


class OutputWriteError(OSError):
  """An output file the OS would not let be written (a full disk, a folder
  made read-only during the run): the launchers' wrapper
  (`interrupts.ctrl_c_ends_quietly`) prints it as one line and exits 1, instead
  of a traceback after a finished run."""


def replace_atomically(path: str, write: Callable[[str], None],
                       suffix: str = "") -> None:
  """Calls `write(tmp)` on a temporary file beside `path`, then renames it
  over `path`: an interrupted or failed write leaves the old file whole.
  Creates `path`'s folder if missing. An OSError on the way is raised as
  `OutputWriteError`, naming `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix,
                               prefix=f".{os.path.basename(path)}.")
    os.close(fd)
    write(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would have made it
    os.replace(tmp, path)
  except BaseException as e:
    if tmp is not None:
      try:
        os.unlink(tmp)
      except OSError:
        pass
    if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
      kept = " (the previous file is kept)" if os.path.exists(path) else ""
      raise OutputWriteError(
          e.errno, f"cannot write {path}: {e.strerror or e}{kept}") from e
    raise


def write_text(text: str, path: str) -> None:
  """Writes `text` to `path` atomically (`replace_atomically`)."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  replace_atomically(path, write, os.path.splitext(path)[1])


def save_figure(fig, path: str, dpi: int = 110) -> None:
  """Saves a Matplotlib figure as a PNG at `path`, atomically: a failed or
  interrupted save leaves the previous PNG whole."""
  replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi,
                                                   format="png"), ".png")


def check_output_path(path: str, what: str, *,
                      suffix: str | None = None) -> str:
  """`path` if a file can be written there: not a directory, and its
  folder a writable directory or one that can be made in a writable
  directory; ValueError saying why not. Nothing is left behind (the folder
  is not made: the writers make it when they write). Launchers call it on
  every output path before any work, so that a typo costs nothing instead
  of a finished run's results. `suffix` (e.g. ".png", any case): the path
  must end in it, so that a PNG is never written over a report given in
  its place."""
  if not path:
    raise ValueError(f"{what}: empty path")
  if os.path.isdir(path):
    raise ValueError(f"{what}: {path} is a directory")
  if suffix and not path.lower().endswith(suffix.lower()):
    raise ValueError(f"{what}: {path} does not end in {suffix}")
  _check_folder_can_be_written(os.path.dirname(os.path.abspath(path)), what)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{what}: {path} exists and is not writable")
  return path


def check_distinct_paths(paths: list[tuple[str, str]]) -> None:
  """ValueError if two of `paths` ((what, path) pairs: a run's outputs, or
  a source and an output) name the same file, which one write would
  destroy."""
  seen: dict[str, str] = {}
  for what, path in paths:
    key = os.path.realpath(os.path.abspath(path))
    if key in seen:
      raise ValueError(f"{seen[key]} and {what} are the same file: {path}")
    seen[key] = what


def check_output_paths(paths: list[tuple[str, str]], *,
                       pngs: tuple[str, ...] = ("--plot",),
                       inputs: list[tuple[str, str | None, str]] = ()
                       ) -> None:
  """A run's outputs, `(what, path)` pairs, checked together before it
  starts: each by `check_output_path` (those named in `pngs` must end in
  .png), no two the same file (`check_distinct_paths`), and none over or
  inside what the run reads (`inputs`, see `check_outputs_spare_inputs`)."""
  for what, path in paths:
    check_output_path(path, what, suffix=".png" if what in pngs else None)
  check_distinct_paths(paths)
  check_outputs_spare_inputs(paths, inputs)


def lies_inside(path: str, folder: str) -> bool:
  """Whether `path` is strictly under `folder`, both resolved (symlinks,
  `..`) first."""
  folder = os.path.realpath(os.path.abspath(folder)).rstrip(os.sep) + os.sep
  return os.path.realpath(os.path.abspath(path)).startswith(folder)


def check_outputs_spare_inputs(
    paths: list[tuple[str, str]],
    inputs: list[tuple[str, str | None, str]],
) -> None:
  """ValueError if an output (`(what, path)`) would be written over a file
  the run reads or into a folder it keeps, which the write would destroy or
  corrupt: a report over the cold tier's key file or its index, into a
  model checkpoint, over the trace. `inputs`: `(what, path, kind)`, kind
  "file" (an existing file: the same file is refused), "dir" (a folder,
  existing or to be made: the folder and anything under it are refused) or
  "any" (a source that is whichever of the two exists, e.g. a model that is
  a GGUF file or a checkpoint folder); a None or empty path, and a "file" or
  "any" path that does not exist (a keyword such as `random:tiny-test`),
  name nothing."""
  for in_what, in_path, kind in inputs:
    if not in_path:
      continue
    real_in = os.path.realpath(os.path.abspath(in_path))
    if kind == "any":
      if not os.path.exists(real_in):
        continue
      kind = "dir" if os.path.isdir(real_in) else "file"
    elif kind == "file" and not os.path.isfile(real_in):
      continue
    for out_what, out_path in paths:
      real_out = os.path.realpath(os.path.abspath(out_path))
      if real_out == real_in:
        raise ValueError(f"{in_what} and {out_what} are the same file: "
                         f"{out_path}")
      if kind == "dir" and lies_inside(real_out, real_in):
        raise ValueError(f"{out_what} {out_path} lies inside {in_what} "
                         f"{in_path}: write it elsewhere, the run keeps that "
                         "folder")


def check_output_dir(path: str, what: str) -> str:
  """`path` if it is a directory files can be made in, or can be made as
  one (`check_output_path`'s rules, for a folder such as a cold tier's
  root); ValueError saying why not. Nothing is left behind."""
  if not path:
    raise ValueError(f"{what}: empty path")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what}: {path} exists and is not a directory")
  _check_folder_can_be_written(os.path.abspath(path), what)
  return path


def _check_folder_can_be_written(folder: str, what: str) -> None:
  """ValueError unless files can be made in `folder`, or `folder` made in
  its nearest existing ancestor. That ancestor is probed by making and
  removing an empty file in it: permission bits do not say that a root
  process cannot write a read-only mount or /proc."""
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{what}: cannot create the folder {folder}: "
                     f"{existing} is not a directory")
  try:
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".write_probe.")
  except OSError as e:
    raise ValueError(f"{what}: the folder {existing} is not writable "
                     f"({e.strerror})") from None
  os.close(fd)
  os.unlink(probe)


def _json_value(obj: Any) -> Any:
  """What JSON writes for a value it has no type for: a NumPy scalar or
  array as its number(s) (np.float32 is no Python float), anything else
  (paths, dtypes) as its string."""
  if isinstance(obj, (np.generic, np.ndarray)):
    return obj.tolist()
  return str(obj)


def _finite_or_none(obj: Any) -> Any:
  """`obj` with every non-finite float (NumPy's included) as None."""
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  if isinstance(obj, (np.generic, np.ndarray)):
    return _finite_or_none(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(report: dict[str, Any], path: str) -> None:
  """Writes `report` as indented strict JSON, atomically
  (`replace_atomically`), creating its folder if missing. Non-finite numbers
  (an unlimited NIC's inf, a ratio over nothing's nan) are written as null:
  Python writes Infinity and NaN, which strict readers (JavaScript's
  JSON.parse, jq) refuse."""
  report = _finite_or_none(report)

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, sort_keys=False, default=_json_value,
                allow_nan=False)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
  replace_atomically(path, write, ".json")


def write_report_and_plot(report: dict[str, Any], json_path: str | None,
                          plot_path: str | None,
                          draw: Callable[[str], None] | None) -> None:
  """A benchmark's outputs: `report` as JSON at `json_path`, and the PNG
  `draw(plot_path)` saves (None: nothing measured to draw), each if asked
  for, saying where each went."""
  if json_path:
    write_json(report, json_path)
    print(f"wrote {json_path}")
  if plot_path and draw is not None:
    draw(plot_path)
    print(f"wrote {plot_path}")


def write_jsonl(rows: list[dict[str, Any]], path: str) -> None:
  """Writes one strict-JSON object per line (non-finite numbers as null, as
  `write_json`), atomically (`replace_atomically`)."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(_finite_or_none(row), default=_json_value,
                           allow_nan=False, ensure_ascii=False))
        f.write("\n")
      f.flush()
      os.fsync(f.fileno())
  replace_atomically(path, write, os.path.splitext(path)[1])
