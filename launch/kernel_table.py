"""The `launch.bench_kernels` table: one line per row as it is timed, and the
whole table with the target verdicts at the end. Formatting only."""

from __future__ import annotations

from launch.kernel_targets import GATHER_KERNEL


# The table's shape column: at least this wide, else as wide as the longest
# label (never cut).
SHAPE_WIDTH = 78


def _shape_label(row: dict) -> str:
  """A row's shape as `key=value` pairs (an overlap row: both of its parts)."""
  shape = row["shape"]
  if row["kind"] == "overlap":
    return ("gather {blocks} blocks x {layers} layers | decode {batch} x "
            "{ctx}").format(**shape["copy"], **{
                k: v for k, v in shape["attention"].items()
                if k in ("batch", "ctx")})
  if isinstance(shape, dict):
    return " ".join(f"{k}={v}" for k, v in shape.items())
  return str(shape)


def host_to_device(impl: str) -> bool:
  """Whether a copy row moves the tier's bytes to the device (a gather, or
  part of one that transfers): those the plain pinned->device transfer
  bounds."""
  return impl in ("gather host->device (ours)", "gather: block transfers only",
                  GATHER_KERNEL, "plain pinned->device") or impl.startswith(
                      "gather runs of")


def _pct_ceiling(row: dict) -> str:
  """The %ceil column: decode rows as % of the run's device copy, the
  block copy's host -> device rows as % of the plain pinned->device
  transfer of the same bytes (marked "p"), "-" where neither applies."""
  if row["kind"] == "decode" and row.get("pct_copy") is not None:
    return f"{row['pct_copy']:.1f}"
  if row["kind"] == "copy" and row.get("pct_pinned") is not None:
    return f"{row['pct_pinned']:.1f}p"
  return "-"


def fmt_row(row: dict, width: int = SHAPE_WIDTH) -> str:
  """One row of the table: its time, GB/s, TFLOP/s, %ceil and rel_err, or
  its error, or an overlap row's parts."""
  head = f"{row['kind']:8s} {_shape_label(row):{width}s} {row['impl']:28s}"
  if "error" in row:
    return f"{head} ERROR {row['error'][:100]}"
  if row["kind"] == "overlap":
    return (f"{head} {row['time_us']:10.1f}  alone {row['gather_us']:.1f} + "
            f"{row['attention_us']:.1f} us, overlap {row['overlap']:.2f}")
  err = row.get("rel_err")
  err = f"{err:.1e}" if err is not None else "-"
  return (f"{head} {row['time_us']:10.1f} {row['gbps']:8.1f} "
          f"{row['tflops']:7.2f} {_pct_ceiling(row):>7s} {err:>8s}")


def print_table(rows: list[dict], checks: list[dict], interpret: bool
                ) -> None:
  """The rows (shape column as wide as its longest label) and the target
  checks (judged only on a GPU)."""
  width = max([SHAPE_WIDTH] + [len(_shape_label(r)) for r in rows])
  print(f"{'kind':8s} {'shape':{width}s} {'impl':28s} {'time_us':>10s} "
        f"{'GB/s':>8s} {'TFLOP/s':>7s} {'%ceil':>7s} {'rel_err':>8s}")
  for row in rows:
    print(fmt_row(row, width))
  print("%ceil: decode rows as % of the run's device-to-device copy; "
        "host->device copy rows (p) as % of the plain pinned->device "
        "transfer of the same bytes, the gather target's ceiling")
  if not checks:
    return
  if interpret:
    print("\ntargets (n/a (interpret): judged only on a GPU; an interpret-"
          "mode run's ratios say nothing about the kernels' speed)")
  else:
    print("\ntargets")
  for c in checks:
    verdict = "n/a " if c["ok"] is None else "PASS" if c["ok"] else "MISS"
    print(f"  {verdict} {c['target']:40s} {c['value']:6.2f}  {c['shape']}")
