"""What `launch.simulate` reports: one dict per run, tables, headlines, plots.

A run dict has the keys `workload.online_report` reads (`policy`, `slo`,
`nics`, `series`), so an online sweep of the simulator prints and draws
exactly like one of `launch.bench_online`, plus the simulator's own:
`summary` (`metrics.summarize`), `engines` (per engine NIC, link, compute
and HBM use), `paths` (blocks per read path), `hbm_waits`, `turns`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from dualpath_jax import metrics, outputs
from dualpath_jax.sim.simulator import SimResult
from dualpath_jax.workload import slo as slo_lib
from dualpath_jax.workload import online_report
from dualpath_jax.workload.online_report import fmt_number, fmt_percent


def nic_series(result: SimResult, rates: Mapping[str, float],
               bins: int = 200) -> list[dict[str, Any]]:
  """Storage-NIC utilisation over time, in `bins` equal intervals.

  Row `k` covers `(t_{k-1}, t_k]` and holds, per engine whose NIC has a
  finite rate, the fraction of that interval its NIC spent transferring.
  """
  if result.makespan_s <= 0:
    return []
  start = min(r.arrival_s for r in result.records)
  width = result.makespan_s / bins
  busy = {name: [0.0] * bins for name, rate in rates.items()
          if math.isfinite(rate)}
  for name, spans in result.nic_spans.items():
    if name not in busy:
      continue
    row = busy[name]
    for begin, end, _ in spans:
      b, e = (begin - start) / width, (end - start) / width
      k = max(0, int(b))
      while k < bins and k < e:
        row[k] += max(0.0, min(e, k + 1) - max(b, k))
        k += 1
  return [{"t": start + (k + 1) * width,
           "nics": {name: {"util": round(min(1.0, row[k]), 4)}
                    for name, row in busy.items()}}
          for k in range(bins)]


def run_dict(result: SimResult, *, rate: float | None,
             arrivals: Mapping[str, float], slo: slo_lib.SloSpec,
             nic_rates: Mapping[str, float]) -> dict[str, Any]:
  """The report's entry for one simulated run (`rate` None: offline batch)."""
  summary = metrics.summarize(result.records, result.makespan_s)
  offered = rate
  loaded = result.paths["PE_READ"] + result.paths["DE_READ"]
  hot = result.paths.get("HOT", 0)
  return {
      "policy": result.policy,
      "rate": rate,
      "summary": summary,
      # Offline every agent starts at once: no arrival rate to judge.
      "slo": (None if rate is None else
              slo_lib.evaluate_run(result.records, arrivals, offered, slo)),
      "engines": result.engines,
      "nics": {name: {"bytes": e["nic_bytes"],
                      "mean_util": e["nic_utilization"]}
               for name, e in result.engines.items()},
      "paths": result.paths,
      "path2_share": result.paths["DE_READ"] / loaded if loaded else None,
      # Of the blocks loaded from outside HBM, those the hot tier gave.
      "hot_share": hot / (hot + loaded) if hot + loaded else None,
      "hbm_waits": result.hbm_waits,
      "written_bytes": result.written_bytes,
      "prefetch": result.prefetch,
      "series": nic_series(result, nic_rates),
      "turns": result.turns,
  }


def _role_util(run: Mapping[str, Any], role: str, key: str) -> float | None:
  vals = [e[key] for e in run["engines"].values()
          if e["role"] == role and e[key] is not None]
  return sum(vals) / len(vals) if vals else None


def format_offline_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """One line per policy: job completion, throughput, TTFT, NIC use.

  "PE/DE NIC" is the mean fraction of the run a role's storage NICs spent
  transferring; "PE/DE busy" the fraction its engines spent computing (a
  decode engine stepping a small batch is busy, not efficient); "path 2"
  the share of NIC-loaded blocks that came through a decode engine's NIC;
  "hot" the share of all loaded blocks a prefill engine's hot tier gave.
  """
  base = {r["policy"]: r["summary"]["job_completion_s"] for r in runs}
  ref = base.get("single_path")
  head = ["policy", "JCT s", "vs single_path", "turns/s", "tok/s",
          "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "PE NIC",
          "DE NIC", "PE busy", "DE busy", "path 2", "hot", "HBM waits"]
  rows = []
  for run in runs:
    s = run["summary"]
    jct = s["job_completion_s"]
    rows.append([
        run["policy"], fmt_number(jct, 4),
        f"{ref / jct:.2f}x" if ref and jct else "-",
        fmt_number(s["turns"] / jct if jct else None), fmt_number(s["throughput_tok_s"], 4),
        fmt_number(s["ttft_s"]["p50"]), fmt_number(s["ttft_s"]["p90"]), fmt_number(s["ttft_s"]["p99"]),
        fmt_number(s["tpot_s"]["p50"]),
        fmt_percent(_role_util(run, "prefill", "nic_utilization")),
        fmt_percent(_role_util(run, "decode", "nic_utilization")),
        fmt_percent(_role_util(run, "prefill", "compute_busy")),
        fmt_percent(_role_util(run, "decode", "compute_busy")),
        fmt_percent(run["path2_share"]), fmt_percent(run["hot_share"]),
        str(run["hbm_waits"])])
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
                   for r in [head, *rows])


def offline_speedups(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Each policy's job-completion speedup over `single_path` (1.0 for it)."""
  jct = {r["policy"]: r["summary"]["job_completion_s"] for r in runs}
  ref = jct.get("single_path")
  if not ref:
    return {}
  return {p: ref / t for p, t in jct.items() if t}


def plot_offline(runs: Sequence[Mapping[str, Any]], path: str,
                 title: str = "") -> None:
  """PNG: job completion time per policy, and each policy's storage-NIC
  utilisation over time per engine."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 1 + len(runs), figsize=(5 * (1 + len(runs)), 4),
                           squeeze=False)
  ax = axes[0][0]
  names = [r["policy"] for r in runs]
  jcts = [r["summary"]["job_completion_s"] for r in runs]
  bars = ax.bar(names, jcts, color=[f"C{i}" for i in range(len(runs))])
  for bar, jct in zip(bars, jcts):
    ax.annotate(f"{jct:.3g} s", (bar.get_x() + bar.get_width() / 2, jct),
                ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("job completion time (s)")
  ax.set_title("offline batch")
  for ax, run in zip(axes[0][1:], runs):
    online_report.plot_nic_series(ax, run["series"], run["policy"])
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  outputs.save_figure(fig, path)
  plt.close(fig)

