r"""PNG of a kernel benchmark report (`launch.bench_kernels`' JSON): each
kernel against its ceiling, measured in the same run, with the issue's
target lines.

    python -m launch.kernel_plot REPORT.json [--out=OUT.png]

(default OUT: the report's path with .png; `python -m launch.kernel_plot
REPORT.json OUT.png` works too). A file that is no such report, or a PNG
path that cannot be written, is an error (exit 1) with no traceback; the PNG
is replaced only once the new one is complete.

Three panels, one bar per implementation and shape:

* decode: K/V read bandwidth as % of the run's device-to-device copy
  (targets: 80% for large calls, 60% for 1-4 sequences at 32k);
* prefill: TFLOP/s as % of cuDNN's dense attention on the same lengths
  (target 50%);
* block copy: GB/s as % of the run's plain pinned -> device transfer
  (target 85% for the gathers).

A panel with no rows (a run cut short, a section not asked for) or no
ceiling to divide by (no copy calibration, no cuDNN row off a GPU, no plain
transfer) says so instead of drawing empty axes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence


_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def _tokens(n: int) -> str:
  """A token count, compact: 32768 -> 32k, 32256 -> 31.5k, 96 -> 96."""
  if n < 1024:
    return str(n)
  if n % 1024 == 0:
    return f"{n // 1024}k"
  return f"{n / 1024:.1f}".rstrip("0").rstrip(".") + "k"


def _field(key: str, value: Any) -> str:
  return _DTYPES.get(value, value) if key == "dtype" else f"{key}={value}"


def _shape_label(kind: str, shape: Mapping[str, Any]) -> str:
  if kind == "decode":
    return (f"{shape['batch']}x{_tokens(shape['ctx'])} "
            f"{shape['heads']}/{shape['kv_heads']}h d{shape['head_dim']} "
            f"p{shape['page']} {_field('dtype', shape['dtype'])}")
  if kind == "prefill":
    return (f"{shape['batch']}x({_tokens(shape['prefix'])}+"
            f"{_tokens(shape['new'])}) p{shape['page']}")
  return f"{shape['layers']}L x {shape['blocks']} blk p{shape['page']}"


def shape_labels(kind: str, shapes: Sequence[Mapping[str, Any]]
                 ) -> list[str]:
  """Compact labels of a panel's shapes; shapes whose labels coincide get
  the fields they differ in (e.g. the dtype) appended."""
  labels = [_shape_label(kind, s) for s in shapes]
  for label in set(labels):
    same = [i for i, l in enumerate(labels) if l == label]
    if len(same) < 2:
      continue
    keys = [k for k in shapes[same[0]]
            if len({json.dumps(shapes[i].get(k), sort_keys=True)
                    for i in same}) > 1]
    for i in same:
      labels[i] = " ".join([label] + [_field(k, shapes[i].get(k))
                                      for k in keys])
  return labels


def find_row(rows: Sequence[Mapping[str, Any]], kind: str, impl: str,
             shape: Any) -> Mapping[str, Any] | None:
  """The timed row of `impl` on `shape` in a report's rows (None if it
  did not run or failed)."""
  for r in rows:
    if (r["kind"] == kind and r["impl"] == impl and r["shape"] == shape
        and "time_us" in r):
      return r
  return None


def panel_values(report: Mapping[str, Any], kind: str
                 ) -> tuple[list[str], dict[str, list[float | None]]]:
  """(shape labels, {implementation: % of the ceiling per shape, None where
  it did not run}) for one panel: "decode", "prefill" or "copy"."""
  rows = [r for r in report["rows"] if r["kind"] == kind]
  shapes: list[Any] = []
  for r in rows:
    if r["shape"] not in shapes:
      shapes.append(r["shape"])
  copy_gbps = report.get("ceilings", {}).get("copy_gbps")
  skip = {"decode": (), "prefill": ("cudnn dense (full ctx)",),
          "copy": ("plain pinned->device",)}[kind]
  impls = [i for i in dict.fromkeys(r["impl"] for r in rows if "time_us" in r)
           if i not in skip]
  values: dict[str, list[float | None]] = {i: [] for i in impls}
  for shape in shapes:
    for impl in impls:
      r = find_row(rows, kind, impl, shape)
      pct = None
      if r is not None and kind == "decode" and copy_gbps:
        pct = 100 * r["gbps"] / copy_gbps
      elif r is not None and kind == "prefill":
        ref = find_row(rows, kind, "cudnn dense (full ctx)", shape)
        pct = 100 * r["tflops"] / ref["tflops"] if ref else None
      elif r is not None and kind == "copy":
        ref = find_row(rows, kind, "plain pinned->device", shape)
        pct = 100 * r["gbps"] / ref["gbps"] if ref else None
      values[impl].append(pct)
  return shape_labels(kind, shapes), values


_PANELS = (
    ("decode", "decode: K/V GB/s, % of the run's copy", ((80, "80%"),
                                                         (60, "60% (1-4 x 32k)"))),
    ("prefill", "prefill: TFLOP/s, % of cuDNN (dense)", ((50, "50%"),)),
    ("copy", "block copy: GB/s, % of pinned -> device", ((85, "85% (gather)"),)),
)


def plot_kernels(report: Mapping[str, Any], path: str) -> None:
  """Writes the three-panel PNG of `report` to `path` (replacing an old
  file only once the new one is complete)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dualpath_jax import outputs

  fig, axes = plt.subplots(len(_PANELS), 1, figsize=(13, 12))
  for ax, (kind, title, targets) in zip(axes, _PANELS):
    labels, values = panel_values(report, kind)
    ax.set_title(title, fontsize=10, loc="left")
    if not labels or not values:
      ax.text(0.5, 0.5, f"no {kind} rows in this run", ha="center",
              va="center", transform=ax.transAxes)
      ax.set_axis_off()
      continue
    if all(p is None for v in values.values() for p in v):
      ax.text(0.5, 0.5, f"no {kind} ceiling in this run to divide by",
              ha="center", va="center", transform=ax.transAxes)
      ax.set_axis_off()
      continue
    width = 0.8 / len(values)
    for i, (impl, pcts) in enumerate(values.items()):
      xs = [j + (i - (len(values) - 1) / 2) * width
            for j, p in enumerate(pcts) if p is not None]
      ys = [p for p in pcts if p is not None]
      ax.bar(xs, ys, width, label=impl, color=f"C{i}")
    for y, name in targets:
      ax.axhline(y, color="red", lw=1, ls=":")
      ax.text(len(labels) - 0.55, y, name, color="red", fontsize=8,
              va="bottom", ha="right")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("%")
    top = max([p for v in values.values() for p in v if p is not None]
              + [100])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=min(4, len(values)), loc="upper left")
  # Reports before 2026-11-27 name the jax version "jax".
  jax_version = report.get("jax_version", report.get("jax", "?"))
  fig.suptitle(f"{report.get('device', '?')}, jax {jax_version}"
               + ("" if report.get("complete", True) else " (run cut short)"),
               fontsize=11)
  fig.tight_layout()
  try:
    outputs.save_figure(fig, path)
  finally:
    plt.close(fig)


def check_report(report: Any) -> None:
  """ValueError unless `report` looks like a launch.bench_kernels report:
  a dict with a list of rows, each with a kind, an implementation and a
  shape, and the numbers the panels read on each timed row."""
  if not isinstance(report, dict) or not isinstance(report.get("rows"),
                                                    list):
    raise ValueError("no 'rows' list: not a launch.bench_kernels report")
  for i, r in enumerate(report["rows"]):
    if not isinstance(r, dict) or not {"kind", "impl", "shape"} <= set(r):
      raise ValueError(f"row {i} lacks kind/impl/shape: not a "
                       "launch.bench_kernels report")
    if "time_us" in r and r["kind"] in ("decode", "prefill", "copy"):
      key = "tflops" if r["kind"] == "prefill" else "gbps"
      if not isinstance(r.get(key), (int, float)):
        raise ValueError(f"row {i} ({r['kind']}, {r['impl']}) has no "
                         f"numeric {key!r}")
      if not isinstance(r["shape"], dict):
        raise ValueError(f"row {i} has no shape fields")
  if not isinstance(report.get("ceilings", {}), dict):
    raise ValueError("'ceilings' is not an object")


def main(argv: Sequence[str]) -> int:
  from absl import app
  from dualpath_jax import outputs
  if len(argv) not in (2, 3):
    raise app.UsageError("give one report: python -m launch.kernel_plot "
                         "REPORT.json [--out=OUT.png]")
  if len(argv) == 3 and _FLAGS.out:
    raise app.UsageError("give the PNG path once: --out or a second "
                         "argument")
  src = argv[1]
  try:
    with open(src) as f:
      report = json.load(f)
    check_report(report)
  except (OSError, ValueError) as e:
    print(f"error: cannot read {src}: {e}", file=sys.stderr)
    return 1
  out = (argv[2] if len(argv) == 3 else _FLAGS.out
         or os.path.splitext(src)[0] + ".png")
  try:
    outputs.check_output_path(out, "the PNG", suffix=".png")
    outputs.check_distinct_paths([("the report", src), ("the PNG", out)])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  try:
    plot_kernels(report, out)
  except OSError as e:
    print(f"error: cannot write {out}: {e}", file=sys.stderr)
    return 1
  except (KeyError, TypeError, ValueError, AttributeError,
          ZeroDivisionError) as e:
    print(f"error: cannot plot {src} (a malformed report?): "
          f"{type(e).__name__}: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  # Flags only when run as a program: launch.bench_kernels imports this
  # module and defines flags of its own.
  from absl import app as _app
  from absl import flags as _flags
  _flags.DEFINE_string("out", None, "PNG path (default: the report's path "
                       "with .png)")
  _FLAGS = _flags.FLAGS
  _app.run(main)
