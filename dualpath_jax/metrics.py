"""Run metrics: per-turn records, latency percentiles, the run's environment,
the per-turn plot. Files are written through `dualpath_jax.outputs`.

Every number in a report is computed from what ran (timestamps taken by the
engine, token counts from the cache manager); nothing is estimated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

from dualpath_jax import outputs

PERCENTILES = (50, 90, 99)


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
  sample: int = 0  # which sample of its turn (`replay_sessions`' samples_per_turn)

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
  """Percentiles interpolated linearly between the two nearest ranks (NumPy's
  default, "linear"), as `{"p50": ..., ...}`; None values are left out, and
  every percentile of no values is None."""
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
  """The headline numbers of a run from its turn records.

  `sessions`: the sessions with a finished turn; `turns`: the finished
  (session, turn) pairs; `samples`: the records, one per sample of a turn
  (`turns` times the samples per turn, when every sample finished). Token
  counts and percentiles are over the records."""
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
      "turns": len({(r.session_id, r.turn_index) for r in records}),
      "samples": len(records),
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
    if _is_percentiles(val):
      val = "  ".join(f"{k}={_fmt(v)}" for k, v in val.items())
    elif isinstance(val, dict):
      continue
    rows.append((key, _fmt(val)))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _is_percentiles(val: Any) -> bool:
  """Whether `val` is a `percentiles` dict (`{"p50": ..., ...}`): other
  dicts (finish reasons, an empty one included) are left out of the table."""
  return (isinstance(val, dict) and bool(val)
          and all(isinstance(k, str) and k[:1] == "p" and k[1:].isdigit()
                  for k in val))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def git_commit() -> str | None:
  """The commit of the checkout this code runs from (with "-dirty" if it has
  uncommitted changes), or None where it is not a git checkout.

  `DUALPATH_GIT_COMMIT`, where set, is returned instead: for a copied
  working tree whose git metadata is not its own (the device leases' copies
  recorded a stale "6d13377-dirty" in every report, docs/benchmarks.md).
  """
  override = os.environ.get("DUALPATH_GIT_COMMIT", "").strip()
  if override:
    return override
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


def run_environment(device: bool = True) -> dict[str, Any]:
  """Where, when and how a report was measured: device, backend, jax and
  jaxlib versions, host, UTC date and time, the git commit of the code, and
  the command line (`sys.argv`: every flag given, so the run can be
  repeated; the launchers' `config` adds the values that matter).

  `device=False` (a launcher that runs no JAX, e.g. the simulator) leaves
  the device and backend out and reads the versions from the installed
  packages' metadata: starting a backend would take a GPU's memory."""
  import datetime
  import platform
  import sys

  if device:
    import jax
    import jaxlib
    where = {"device": str(jax.devices()[0].device_kind),
             "backend": jax.default_backend(), "jax_version": jax.__version__,
             "jaxlib_version": jaxlib.__version__}
  else:
    from importlib import metadata

    def version(name: str) -> str | None:
      try:
        return metadata.version(name)
      except metadata.PackageNotFoundError:
        return None
    where = {"device": None, "backend": None, "jax_version": version("jax"),
             "jaxlib_version": version("jaxlib")}
  return {**where,
          "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                   "cpu_model": cpu_model()},
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "git_commit": git_commit(), "command": list(sys.argv)}


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
  outputs.save_figure(fig, path)
  plt.close(fig)
