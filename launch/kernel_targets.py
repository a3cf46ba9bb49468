"""The kernel issue's targets, judged on a `launch.bench_kernels` report's rows.

A pure function of the rows (no timing, no I/O), so that what counts as a
pass is readable in one place and testable on made-up rows:

* decode, context >= 4k and >= 256 MiB of K/V: >= 80% of the run's
  device-to-device copy bandwidth, and >= 1.25x JAX's own Pallas op;
* decode at batch <= 4 and context >= 32k: >= 60% of copy bandwidth;
* prefill: >= 50% of cuDNN's TFLOP/s on the same lengths (dense);
* block gather host -> device: >= 85% of the plain pinned -> device
  transfer of the same bytes;
* int8 decode: >= 1.6x the tokens/s of the same kernel on bf16, and of the
  fastest bf16 kernel of ours.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from launch import kernel_plot

# The warp-specialized Mosaic GPU kernels: prefill on two computing
# warpgroups and a copying one (prefill_mosaic_gpu_ws.py), decode with a
# copying warpgroup (`copy_warpgroup`).
MOSAIC_WS = "pallas_mosaic_gpu_ws (ours)"
# The Mosaic GPU decode with its queries padded to the 64-row tile by an XLA
# op before the launch (`pad_query`, the form before 2026-11-28), timed
# beside the default on calls reading < 256 MiB, where a launch of a few
# microseconds is a sizeable share.
MOSAIC_PADDED_Q = "pallas_mosaic_gpu, padded q (ours)"
# The Mosaic GPU decode merging its splits in one XLA reduction
# (`one_reduce_merge`) instead of three, timed beside the default likewise.
MOSAIC_ONE_REDUCE = "pallas_mosaic_gpu, one-reduce merge (ours)"
# The Triton decode of an int8 pool with its queries in int8 too
# (`int8_query`: q @ K^T an int8 matmul), timed beside the default.
TRITON_INT8_QUERY = "pallas_triton, int8 query (ours)"
# The Triton decode of an int8 pool whose V pages are stored transposed
# (`v_transposed`, `kernels.quantize.transpose_v_pages`: p @ V reads tokens
# along the contiguous axis), without and with int8 queries.
TRITON_V_TRANSPOSED = "pallas_triton, V transposed (ours)"
TRITON_INT8_QUERY_V_TRANSPOSED = "pallas_triton, int8 query + V transposed (ours)"
# The block gather as one kernel reading the pinned tier
# (kernels/host_gather_triton.py; `gather_to_device`'s path on GPUs), and as
# one XLA transfer per block (its path elsewhere).
GATHER_KERNEL = "gather: one kernel (ours)"
GATHER_TRANSFERS = "gather: per-block transfers (ours)"
# Our attention kernels' rows.
OURS = ("pallas_triton (ours)", "pallas_mosaic_gpu (ours)", MOSAIC_WS,
        MOSAIC_PADDED_Q, MOSAIC_ONE_REDUCE, TRITON_INT8_QUERY,
        TRITON_V_TRANSPOSED, TRITON_INT8_QUERY_V_TRANSPOSED)


def check_targets(rows: Sequence[Mapping[str, Any]],
                  copy_gbps: float | None) -> list[dict]:
  """The targets, checked on a run's rows where they apply: one
  `{target, shape, value, ok}` per (target, row of ours), `value` the ratio
  judged. `copy_gbps`: the run's device-to-device copy bandwidth (None: the
  decode bandwidth targets are not judged)."""
  def find(kind, impl, shape):
    return kernel_plot.find_row(rows, kind, impl, shape)

  checks = []
  for r in rows:
    if r["impl"] not in OURS or "time_us" not in r:
      continue
    ours = r["impl"]
    s = r["shape"]
    name = f"[{ours.replace(' (ours)', '')}] " + " ".join(
        f"{k}={v}" for k, v in s.items())
    if r["kind"] == "decode" and s["dtype"] != "int8":
      small = s["batch"] <= 4 and s["ctx"] >= 32768
      if copy_gbps and (small or (s["ctx"] >= 4096 and r["kv_mib"] >= 256)):
        want = 0.6 if small else 0.8
        checks.append(dict(target=f"decode >= {want:.0%} of copy BW",
                           shape=name, value=r["gbps"] / copy_gbps,
                           ok=r["gbps"] / copy_gbps >= want))
      theirs = find("decode", "jax pallas op", s)
      if theirs and r["kv_mib"] >= 256:
        ratio = theirs["time_us"] / r["time_us"]
        checks.append(dict(target="decode >= 1.25x JAX's op", shape=name,
                           value=ratio, ok=ratio >= 1.25))
    if r["kind"] == "decode" and s["dtype"] == "int8":
      bf16 = find("decode", ours, dict(s, dtype="bfloat16"))
      if bf16:
        ratio = bf16["time_us"] / r["time_us"]
        checks.append(dict(target="int8 decode >= 1.6x bf16 tokens/s",
                           shape=name, value=ratio, ok=ratio >= 1.6))
      # Also against the fastest bf16 kernel of ours on the shape (what
      # "auto" would run for a bf16 pool).
      best = [find("decode", impl, dict(s, dtype="bfloat16"))
              for impl in OURS]
      best = [b for b in best if b]
      if best:
        ratio = min(b["time_us"] for b in best) / r["time_us"]
        checks.append(dict(target="int8 decode >= 1.6x best bf16 tokens/s",
                           shape=name, value=ratio, ok=ratio >= 1.6))
    if r["kind"] == "prefill":
      cudnn = find("prefill", "cudnn dense (full ctx)", s)
      if cudnn:
        ratio = r["tflops"] / cudnn["tflops"]
        checks.append(dict(target="prefill >= 50% of cuDNN TFLOP/s",
                           shape=name, value=ratio, ok=ratio >= 0.5))
  for r in rows:
    gather = r["impl"] in ("gather host->device (ours)", GATHER_KERNEL,
                           GATHER_TRANSFERS) or (
        r["impl"].startswith("gather runs of"))
    if r["kind"] == "copy" and gather and "gbps" in r:
      plain = find("copy", "plain pinned->device", r["shape"])
      if plain:
        ratio = r["gbps"] / plain["gbps"]
        name = f"[{r['impl'].replace(' (ours)', '')}] " + " ".join(
            f"{k}={v}" for k, v in r["shape"].items() if k != "run_lengths")
        checks.append(dict(target="block gather >= 85% of pinned->device",
                           shape=name, value=ratio, ok=ratio >= 0.85))
  return checks
