"""What `launch.bench_online` prints and draws: the policy x rate table, the plot.

A *run* here is the dict `launch.bench_online` builds per (policy, rate):
`policy`, `slo` (`workload.slo.evaluate_run`), `nics` (per engine `bytes`
and `mean_util`) and `series` (`workload.online.SeriesSampler` rows).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from dualpath_jax import outputs


def fmt_number(v: Any, digits: int = 3) -> str:
  """A table cell: "-" for None, a float to `digits` significant digits."""
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def fmt_percent(v: float | None) -> str:
  """A table cell: a fraction as a whole percentage, "-" for None."""
  return "-" if v is None else f"{100 * v:.0f}%"


def _bytes(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.3g}{unit}"
  return f"{n:.0f}B"


def format_runs_table(runs: Sequence[Mapping[str, Any]], percentile: int) -> str:
  """One line per run: rates, TTFT/TPOT percentiles, attainment, goodput
  (agents/s whose every turn met the SLO), NIC traffic."""
  key = f"p{percentile}"
  ttft_keys = sorted({"p50", "p90", "p99", key}, key=lambda k: int(k[1:]))
  head = (["policy", "offered/s", "arrived/s", "achieved/s"]
          + [f"TTFT {k}" for k in ttft_keys] + ["TPOT p50", "TPOT p90",
                                                "attain", "goodput/s", "pass",
                                                "NIC bytes (mean util)"])
  rows = []
  for run in runs:
    s = run["slo"]
    nics = "  ".join(f"{name} {_bytes(n['bytes'])} ({fmt_percent(n['mean_util'])})"
                     for name, n in (run.get("nics") or {}).items())
    rows.append([run["policy"], fmt_number(s["offered_rate"]), fmt_number(s["arrival_rate"]),
                 fmt_number(s["achieved_rate"])]
                + [fmt_number(s["ttft_s"][k]) for k in ttft_keys]
                + [fmt_number(s["tpot_s"]["p50"]), fmt_number(s["tpot_s"]["p90"]),
                   fmt_percent(s["attainment"]), fmt_number(s["goodput_agents_s"]),
                   "yes" if s["passed"] else "no",
                   nics or "-"])
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
           for r in [head, *rows]]
  return "\n".join(lines)


def format_headline(sustained: Mapping[str, float | None], slo_ttft_s: float,
                    percentile: int) -> str:
  """`agents/s sustained within SLO (p90 TTFT <= 2 s, keeping up):
  single_path 0.1, dualpath 0.2` (a policy no rate passed: "none of the
  rates")."""
  parts = ", ".join(f"{p} {fmt_number(r) if r is not None else 'none of the rates'}"
                    for p, r in sustained.items())
  return (f"agents/s sustained within SLO (p{percentile} TTFT <= "
          f"{slo_ttft_s:g} s, keeping up): {parts}")


def plot_online(runs: Sequence[Mapping[str, Any]], path: str, *,
                slo_ttft_s: float, percentile: int, title: str = "") -> None:
  """PNG: TTFT against offered rate per policy (SLO line), and each policy's
  storage-NIC utilisation over time at the highest rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  policies = list(dict.fromkeys(r["policy"] for r in runs))
  top = max(r["slo"]["offered_rate"] for r in runs)
  fig, axes = plt.subplots(1, 1 + len(policies),
                           figsize=(5.5 * (1 + len(policies)), 4), squeeze=False)
  ax = axes[0][0]
  key = f"p{percentile}"
  for i, pol in enumerate(policies):
    mine = sorted((r for r in runs if r["policy"] == pol),
                  key=lambda r: r["slo"]["offered_rate"])
    xs = [r["slo"]["offered_rate"] for r in mine]
    color = f"C{i}"
    ax.plot(xs, [r["slo"]["ttft_s"][key] for r in mine], "o-", color=color,
            label=f"{pol} {key}")
    ax.plot(xs, [r["slo"]["ttft_s"]["p50"] for r in mine], "x--", color=color,
            alpha=0.6, label=f"{pol} p50")
  ax.axhline(slo_ttft_s, color="red", lw=1, ls=":", label=f"SLO {slo_ttft_s:g} s")
  ax.set_xlabel("offered agents/s")
  ax.set_ylabel("TTFT (s)")
  ttfts = [v for r in runs for v in (r["slo"]["ttft_s"][key],
                                      r["slo"]["ttft_s"]["p50"], slo_ttft_s)
           if v is not None and v > 0]
  if max(ttfts) > 10 * min(ttfts):  # overload: TTFT spans decades
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_title("TTFT vs offered rate")
  ax.legend(fontsize=7)
  for ax, pol in zip(axes[0][1:], policies):
    run = next((r for r in runs if r["policy"] == pol
                and r["slo"]["offered_rate"] == top), None)
    plot_nic_series(ax, run["series"] if run else [],
                    f"{pol} at {top:g} agents/s")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  outputs.save_figure(fig, path)
  plt.close(fig)


def plot_nic_series(ax, series: Sequence[Mapping[str, Any]], title: str) -> None:
  """Draws each engine's storage-NIC utilisation over time on `ax` (rows of
  `t` and `nics: {name: {"util"}}`; a sample's rate covers the interval
  since the previous one), or says why there is nothing to draw."""
  names = sorted({n for row in series for n in row.get("nics", {})})
  drawn = False
  for name in names:
    pts = [(row["t"], row["nics"][name]["util"]) for row in series
           if name in row.get("nics", {})
           and row["nics"][name]["util"] is not None]
    if pts:
      ax.step(*zip(*pts), where="pre", lw=1, label=name)
      drawn = drawn or any(u for _, u in pts)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("storage NIC utilisation")
  ax.set_ylim(bottom=0)
  ax.set_title(title)
  if drawn:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no storage reads" if names else
            "no NIC limit\n(unbounded bandwidth)",
            ha="center", va="center", transform=ax.transAxes)
