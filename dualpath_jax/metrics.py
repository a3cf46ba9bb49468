"""Run metrics: per-turn records, latency percentiles, the JSON report, plots.

Every number in a report is computed from what ran (timestamps taken by the
engine, token counts from the cache manager); nothing is estimated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any, Callable, Iterable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def _process_umask() -> int:
  """The process's umask, read once at import: reading it means setting it,
  which must not happen while other threads (the server's) create files."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _process_umask()


@dataclasses.dataclass
class TurnRecord:
  """What one finished turn measured (seconds on the engine's clock)."""

  session_id: str
  turn_index: int
  prompt_tokens: int
  cached_prompt_tokens: int
  generated_tokens: int
  arrival_s: float
  first_token_s: float
  finish_s: float
  finish_reason: str  # "eos" | "length"

  @property
  def ttft_s(self) -> float:
    return self.first_token_s - self.arrival_s

  @property
  def tpot_s(self) -> float | None:
    """Mean time per output token after the first (None for 1 token)."""
    if self.generated_tokens < 2:
      return None
    return (self.finish_s - self.first_token_s) / (self.generated_tokens - 1)


def percentiles(values: Sequence[float],
                ps: Iterable[int] = PERCENTILES) -> dict[str, float | None]:
  """Nearest-rank-interpolated percentiles, as `{"p50": ..., ...}`."""
  vals = sorted(v for v in values if v is not None)
  out: dict[str, float | None] = {}
  for p in ps:
    if not vals:
      out[f"p{p}"] = None
      continue
    k = (len(vals) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    out[f"p{p}"] = vals[lo] + (vals[hi] - vals[lo]) * (k - lo)
  return out


def summarize(records: Sequence[TurnRecord], wall_s: float) -> dict[str, Any]:
  """The headline numbers of a run from its turn records."""
  prompt = sum(r.prompt_tokens for r in records)
  cached = sum(r.cached_prompt_tokens for r in records)
  generated = sum(r.generated_tokens for r in records)
  sessions = {r.session_id for r in records}
  session_end: dict[str, float] = {}
  session_start: dict[str, float] = {}
  for r in records:
    session_end[r.session_id] = max(session_end.get(r.session_id, 0.0), r.finish_s)
    session_start[r.session_id] = min(session_start.get(r.session_id, math.inf),
                                      r.arrival_s)
  jct = [session_end[s] - session_start[s] for s in sessions]
  computed = prompt - cached
  return {
      "sessions": len(sessions),
      "turns": len(records),
      "prompt_tokens": prompt,
      "cached_prompt_tokens": cached,
      "computed_prompt_tokens": computed,
      "generated_tokens": generated,
      "wall_s": wall_s,
      # Tokens the engine processed (prefilled or generated) per second.
      "throughput_tok_s": (computed + generated) / wall_s if wall_s > 0 else None,
      "generated_tok_s": generated / wall_s if wall_s > 0 else None,
      "ttft_s": percentiles([r.ttft_s for r in records]),
      "tpot_s": percentiles([r.tpot_s for r in records]),
      "job_completion_s": max(session_end.values()) if records else 0.0,
      "session_completion_s": percentiles(jct),
      "prefix_hit_ratio": cached / prompt if prompt else 0.0,
      "finish_reasons": {k: sum(r.finish_reason == k for r in records)
                         for k in sorted({r.finish_reason for r in records})},
  }


def format_table(summary: dict[str, Any]) -> str:
  """A two-column text table of a summary (nested percentiles flattened)."""
  rows = []
  for key, val in summary.items():
    if isinstance(val, dict) and all(k.startswith("p") for k in val):
      val = "  ".join(f"{k}={_fmt(v)}" for k, v in val.items())
    elif isinstance(val, dict):
      continue
    rows.append((key, _fmt(val)))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def git_commit() -> str | None:
  """The commit of the checkout this code runs from (with "-dirty" if it has
  uncommitted changes), or None where it is not a git checkout."""
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"],
                          capture_output=True, text=True, timeout=10)
    if head.returncode:
      return None
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain",
                            "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
    return head.stdout.strip() + suffix
  except (OSError, subprocess.SubprocessError):
    return None


def run_environment() -> dict[str, Any]:
  """Where and when a report was measured: device, backend, jax and jaxlib
  versions, host, UTC date and time, and the git commit of the code."""
  import datetime
  import platform

  import jax
  import jaxlib
  return {"device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend(), "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__,
          "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                   "cpu_model": cpu_model()},
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "git_commit": git_commit()}


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or the platform's, elsewhere):
  host-side figures depend on it."""
  import platform
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def replace_atomically(path: str, write: Callable[[str], None],
                       suffix: str = "") -> None:
  """Calls `write(tmp)` on a temporary file beside `path`, then renames it
  over `path`: an interrupted or failed write leaves the old file whole.
  Creates `path`'s folder if missing."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=suffix,
                             prefix=f".{os.path.basename(path)}.")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would have made it
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
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


def check_output_path(path: str, what: str) -> str:
  """`path` if a file can be written there: not a directory, and its
  folder a writable directory or one that can be made in a writable
  directory; ValueError saying why not. Nothing is left behind (the folder
  is not made: the writers make it when they write). Launchers call it on
  every output path before any work, so that a typo costs nothing instead
  of a finished run's results."""
  if not path:
    raise ValueError(f"{what}: empty path")
  if os.path.isdir(path):
    raise ValueError(f"{what}: {path} is a directory")
  _check_folder_can_be_written(os.path.dirname(os.path.abspath(path)), what)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise ValueError(f"{what}: {path} exists and is not writable")
  return path


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


def write_json(report: dict[str, Any], path: str) -> None:
  """Writes `report` as indented JSON, atomically (`replace_atomically`),
  creating its folder if missing."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, sort_keys=False, default=_json_value)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
  replace_atomically(path, write, ".json")


def plot_turns(records: Sequence[TurnRecord], path: str, title: str = "") -> None:
  """PNG: per-turn TTFT against prompt length, and the turn timeline."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  xs = [r.prompt_tokens for r in records]
  points = ax1.scatter(
      xs, [r.ttft_s for r in records], s=12,
      c=[r.cached_prompt_tokens / max(r.prompt_tokens, 1) for r in records],
      cmap="viridis", vmin=0, vmax=1)
  fig.colorbar(points, ax=ax1, label="cached fraction of prompt")
  ax1.set_xlabel("prompt tokens")
  ax1.set_ylabel("TTFT (s)")
  ax1.set_title("TTFT (colour: cached fraction)")
  sessions = sorted({r.session_id for r in records})
  row = {s: i for i, s in enumerate(sessions)}
  for r in records:
    ax2.plot([r.arrival_s, r.first_token_s], [row[r.session_id]] * 2,
             color="tab:orange", lw=4)
    ax2.plot([r.first_token_s, r.finish_s], [row[r.session_id]] * 2,
             color="tab:blue", lw=4)
  ax2.set_xlabel("time (s)")
  ax2.set_ylabel("session")
  ax2.set_yticks(range(len(sessions)))
  ax2.set_yticklabels([s[-16:] for s in sessions], fontsize=7)
  ax2.set_title("turns: prefill wait (orange), decode (blue)")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)
