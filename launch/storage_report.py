"""The cold-tier benchmark's report: paired ratios summarized, and its tables.

Pure functions of the measured dicts (`launch.bench_storage` measures,
`launch.storage_disk` gives the baselines), so that a report can be
re-summarized or re-printed from its JSON.
"""

from __future__ import annotations

import numpy as np

from launch.storage_disk import MiB

# Store / raw ratios a round must reach: writes 70%, reads 85% of the disk.
TARGETS = {"write": 0.70, "seq_read": 0.85, "random_read": 0.85}
FIGURES = ("write", "seq_read", "random_read")


def ratio_stats(values: list[float]) -> dict:
  """Median, min, max and every round's value of a paired ratio."""
  return {"median": float(np.median(values)), "min": float(min(values)),
          "max": float(max(values)), "rounds": [float(v) for v in values]}


def summarize(pairs: list[dict], bytes_per_token: float) -> dict:
  """The store entry of the report: medians of its runs and its paired ratios."""
  runs = [p["store"] for p in pairs]
  out = dict(runs[-1])
  for key, value in runs[0].items():
    if isinstance(value, float):
      out[key] = float(np.median([r[key] for r in runs]))
  for key in ("latency_ms_cold_single_block", "cpu_s_per_gb"):
    out[key] = {k: float(np.median([r[key][k] for r in runs])) for k in runs[0][key]}
  out["runs"] = len(runs)
  out["ratios"] = {k: ratio_stats([p["ratio"][k] for p in pairs]) for k in FIGURES}
  if all("ratio_to_file_floor" in p for p in pairs):
    out["ratios_to_file_floor"] = {
        k: ratio_stats([p["ratio_to_file_floor"][k] for p in pairs]) for k in FIGURES}
  out["rounds_met"] = {k: sum(p["met"][k] for p in pairs) for k in FIGURES}
  if all("ratio_rewrite" in p for p in pairs):
    out["ratio_rewrite"] = ratio_stats([p["ratio_rewrite"] for p in pairs])
  # The pre-v4 keys, now paired medians (each round against its own raw run).
  out["write_vs_raw_seq_write"] = out["ratios"]["write"]["median"]
  out["seq_read_vs_raw_seq_read"] = out["ratios"]["seq_read"]["median"]
  out["random_read_vs_raw_random_read"] = out["ratios"]["random_read"]["median"]
  out["load_tokens_per_s"] = out["read_random_logical_bytes_per_s"] / bytes_per_token
  out["cold_checked"] = all(all(x == 0 for x in r["resident_before"]) for r in runs)
  return out


def _gbs(x: float) -> str:
  return f"{x / 1e9:.2f}"


def _ratio(stats: dict) -> str:
  return f"{100 * stats['median']:.0f}% ({100 * stats['min']:.0f}-{100 * stats['max']:.0f})"


def format_table(report: dict) -> str:
  """The report as the text tables the launcher prints (and stores as
  `table`): baselines, store / raw per configuration, rewrites, every
  round, CPU cost, and the model figures when measured."""
  d = report["disk"]
  lines = [
      f"Paired rounds: {report['rounds']}; QD {d['queue_depth']} on both sides; "
      f"{d['requests']} blocks of {d['request_bytes'] / MiB:.2f} MiB per pass "
      f"({d['requests'] * d['request_bytes'] / 1e9:.2f} GB).",
      f"raw disk (O_DIRECT, medians of the paired runs): write {_gbs(d['seq_write'])}, "
      f"seq read {_gbs(d['seq_read'])}, random read {_gbs(d['random_read'])} GB/s; "
      f"1-block read p50 {d['latency_ms_single_block']['p50']:.1f} ms",
  ]
  if report.get("file_floor"):
    f = report["file_floor"]
    lines.append(f"file floor (file per block, buffered, fsync+rename+dir fsync): write "
                 f"{_gbs(f['write'])}, seq read {_gbs(f['seq_read'])}, random read "
                 f"{_gbs(f['random_read'])} GB/s")
  m = report["memory"]
  lines += [
      f"memory: first touch {_gbs(m['first_touch'])} GB/s, already touched "
      f"{_gbs(m['touched'])} GB/s (medians)",
      "load average (1 min) at each pair's start: " + ", ".join(
          f"{p['load_average_1_5_15_start'][0]:.1f}" for p in report["pairs"]),
      "",
      "Store / raw, paired per round: median (min-max); 'met' = rounds meeting the "
      "target (write >= 70%, reads >= 85%).",
      "",
      "| store | write GB/s | write % raw | seq read GB/s | seq % raw | rand read GB/s | "
      "rand % raw | met w/s/r | write % file floor | lat p50/p90/p99 ms | load tok/s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s in report["stores"]:
    lat = s["latency_ms_cold_single_block"]
    r = s["ratios"]
    met = s["rounds_met"]
    floor = s.get("ratios_to_file_floor", {}).get("write")
    lines.append(
        f"| {s['config']} | {_gbs(s['write_disk_bytes_per_s'])} | {_ratio(r['write'])} | "
        f"{_gbs(s['read_seq_disk_bytes_per_s'])} | {_ratio(r['seq_read'])} | "
        f"{_gbs(s['read_random_disk_bytes_per_s'])} | {_ratio(r['random_read'])} | "
        f"{met['write']}/{met['seq_read']}/{met['random_read']} of {s['runs']} | "
        f"{_ratio(floor) if floor else '-'} | "
        f"{lat['p50']:.1f}/{lat['p90']:.1f}/{lat['p99']:.1f} | "
        f"{s['load_tokens_per_s']:,.0f} |")
  rewrites = [s for s in report["stores"] if "ratio_rewrite" in s]
  if rewrites:
    lines += ["", "Rewrite of the full store (new blocks evict the old ones and reuse their "
              "slots, the steady state of a long-running cache), vs the raw write of the "
              "same round:", ""]
    for s in rewrites:
      lines.append(f"- {s['config']}: {_gbs(s['rewrite_disk_bytes_per_s'])} GB/s, "
                   f"{_ratio(s['ratio_rewrite'])} of raw, "
                   f"{s['cpu_s_per_gb']['rewrite']:.2f} CPU s/GB "
                   f"({s['rewrite_reused_slots']} of {s['blocks']} blocks into reused slots)")
  lines += ["", "Per round (GB/s write/seq/random; ratio = store / raw of the same round):",
            "", "| store | round | first | load | raw | store | ratio % | file floor |",
            "|---|---|---|---|---|---|---|---|"]
  for p in report["pairs"]:
    s, r = p["store"], p["raw"]
    f = p.get("file_floor")
    lines.append(
        f"| {s['config']} | {p['round']} | {p['order'][0]} | "
        f"{p['load_average_1_5_15_start'][0]:.1f} | "
        f"{_gbs(r['write'])}/{_gbs(r['seq_read'])}/{_gbs(r['random_read'])} | "
        f"{_gbs(s['write_disk_bytes_per_s'])}/{_gbs(s['read_seq_disk_bytes_per_s'])}/"
        f"{_gbs(s['read_random_disk_bytes_per_s'])} | "
        + "/".join(f"{100 * p['ratio'][k]:.0f}" for k in FIGURES) + " | "
        + (f"{_gbs(f['write'])}/{_gbs(f['seq_read'])}/{_gbs(f['random_read'])}" if f else "-")
        + " |")
  lines += ["", "CPU seconds per GB moved by this process (medians; write/seq/random):"]
  lines.append("- raw disk: " + "/".join(f"{report['disk']['cpu_s_per_gb'][k]:.2f}"
                                          for k in FIGURES))
  if report.get("file_floor"):
    lines.append("- file floor: " + "/".join(
        f"{report['file_floor']['cpu_s_per_gb'][k]:.2f}" for k in FIGURES))
  for s in report["stores"]:
    lines.append(f"- {s['config']}: " + "/".join(f"{s['cpu_s_per_gb'][k]:.2f}" for k in FIGURES))
  cold = all(s["cold_checked"] for s in report["stores"])
  drops = {s.get("cache_drop") for s in report["stores"]} - {None}
  lines += ["", f"cold reads: page cache evicted with {', '.join(sorted(drops)) or '-'}; "
            f"store files resident before every read pass: "
            f"{'0 bytes (checked with mincore)' if cold else 'NOT ALWAYS 0 (see JSON)'}; "
            "raw reads are O_DIRECT. A host-side cache of a virtual disk is out of reach."]
  if report.get("prefill"):
    lines.append("")
    for p in report["prefill"]:
      lines.append(f"prefill recompute {p['tokens']} tokens: {p['tokens_per_s']:,.0f} tokens/s")
  for name in ("logits_bf16", "logits_int8"):
    if name in report:
      r = report[name]
      lines.append(f"{name}: max|dlogit| {r['max_abs_diff']:.4f} (logit std "
                   f"{r['logit_std']:.2f}), mean KL {r['mean_kl']:.2e}, top-1 agreement "
                   f"{100 * r['top1_agreement']:.1f}%")
  if report.get("break_even"):
    lines.append(report["break_even"])
  return "\n".join(lines)


def median_dict(runs: list[dict]) -> dict:
  """Medians of the numeric (and nested numeric) values of `runs`."""
  out = {}
  for key, value in runs[0].items():
    if isinstance(value, float):
      out[key] = float(np.median([r[key] for r in runs]))
    elif isinstance(value, dict) and all(isinstance(v, float) for v in value.values()):
      out[key] = {k: float(np.median([r[key][k] for r in runs])) for k in value}
    else:
      out[key] = value
  out["runs"] = len(runs)
  return out
