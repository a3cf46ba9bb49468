r"""The hot tier's copies to and from the device pool, per memory, against
the same run's plain copies of the same bytes.

    python -m launch.bench_hot_tier --shape=llama3_8b --blocks=256 \
        --json=hot_tier.json --plot=hot_tier.png

What the engine does with its hot tier (`cache.HotTier`), timed for each
`--memories` value (pageable numpy, pinned_host JAX):

* `load`: a returning session's prefix, `--blocks` blocks scattered over
  the tier, into scattered free pages of the pool
  (`HotTier.read_run_to_pool`, what `engine.cold_tier` does at admission);
* `write_back`: as many pool pages into the tier
  (`HotTier.put_from_pool`, a finished turn's blocks);
* `put_host`: as many blocks from a host numpy array into the tier
  (`HotTier.put`, blocks read from the cold tier or another engine).

Beside them, in the same run, the ceilings: one contiguous array of the
same bytes moved pinned_host -> device, pageable numpy -> device and device
-> pinned_host by `jax.device_put`. The issue's target for the block gather
is >= 85% of the same run's pinned -> device copy; `load` on a pinned tier
is that gather as the engine runs it (bookkeeping, chunking and all).

Each figure is the median of `--repeats` timed calls after an untimed one
(which compiles). Prints a table; writes JSON (`--json`) and a PNG
(`--plot`). On a CPU every memory is host memory: the figures show the
code's overhead, not a bus, and a pinned tier is timed only if asked for
(`--memories=pinned_host`, with few `--blocks`): XLA:CPU copies the whole
pool or tier per call there. Ctrl-C reports what was measured so far
(`"complete": false`) and exits 130.
"""

from __future__ import annotations

import statistics
import sys
import time

from absl import app, flags

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted

FLAGS = flags.FLAGS

# [num_layers, num_kv_heads, head_dim] of the models people serve.
SHAPES = {
    "smollm2": (30, 3, 64),  # SmolLM2-135M, the embedded default
    "llama3_8b": (32, 8, 128),
    "tiny": (2, 2, 16),  # for tests
}
MEMORIES = ("pageable", "pinned_host")
OPS = ("load", "write_back", "put_host")


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program)."""
  flags.DEFINE_enum("shape", "smollm2", list(SHAPES),
                    "model whose KV blocks move (layers, KV heads, head_dim)")
  flags.DEFINE_integer("block_size", 16, "tokens per block", lower_bound=1)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                    "KV dtype")
  flags.DEFINE_integer("blocks", 256, "blocks per call (a session's prefix)",
                       lower_bound=1)
  flags.DEFINE_integer("repeats", 5, "timed calls per figure (median)",
                       lower_bound=1)
  flags.DEFINE_list("memories", None, "hot-tier memories to time (default: "
                    "both on an accelerator, pageable on CPU, where a "
                    "pinned tier is a test path: cache/hot_tier_memory.py)")
  flags.DEFINE_integer("seed", 0, "data and placement seed", lower_bound=0)
  flags.DEFINE_string("json", None, "JSON report path")
  flags.DEFINE_string("plot", None, "PNG plot path")


def memories(values: list[str] | None) -> list[str] | None:
  """--memories checked (None: the backend's default, `default_memories`);
  ValueError names the choices."""
  if values is None:
    return None
  bad = [v for v in values if v not in MEMORIES]
  if not values or bad:
    raise ValueError(f"--memories: choose from {','.join(MEMORIES)}; got "
                     f"{','.join(values)!r}")
  return list(dict.fromkeys(values))


def default_memories() -> list[str]:
  """Both memories on an accelerator; on CPU only pageable: there a pinned
  tier copies the whole pool or tier per call (cache/hot_tier_memory.py)."""
  import jax
  return list(MEMORIES) if jax.default_backend() != "cpu" else ["pageable"]


def _median_s(fn, repeats: int) -> float:
  """Median wall seconds of `fn()` (which waits for its own copies) after
  one untimed call."""
  fn()
  times = []
  for _ in range(repeats):
    raise_if_interrupted()
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure_ceilings(nbytes_shape: tuple[int, ...], dtype, repeats: int,
                     rng) -> dict[str, float]:
  """Seconds of `jax.device_put` of one contiguous array of the moved
  bytes: pinned_host -> device, pageable numpy -> device, device ->
  pinned_host."""
  import jax
  dev = jax.devices()[0]
  pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  host = rng.standard_normal(nbytes_shape).astype(dtype)
  on_pinned = jax.device_put(host, pinned)
  on_device = jax.device_put(host, device)
  return {
      "pinned_to_device": _median_s(
          lambda: jax.device_put(on_pinned, device).block_until_ready(),
          repeats),
      "pageable_to_device": _median_s(
          lambda: jax.device_put(host, device).block_until_ready(), repeats),
      "device_to_pinned": _median_s(
          lambda: jax.device_put(on_device, pinned).block_until_ready(),
          repeats),
  }


def measure_tier(memory: str, layers: int, kv_heads: int, head_dim: int,
                 block_size: int, dtype, blocks: int, repeats: int,
                 rng) -> dict[str, float]:
  """Seconds of each of `OPS` on a tier of 2 x `blocks` slots in `memory`
  and a pool of 2 x `blocks` pages, the moved blocks' slots and pages
  shuffled; checks that `load` moved the bytes `put_host` wrote."""
  import jax
  import numpy as np
  from dualpath_jax.cache.hot_tier import HotTier
  block = (layers, 2, kv_heads, block_size, head_dim)
  tier = HotTier(2 * blocks, block, dtype, memory=memory)
  pool = jax.device_put(rng.standard_normal(  # committed, as an engine's
      (layers, 2 * blocks, 2, kv_heads, block_size, head_dim)).astype(dtype),
      jax.devices()[0])
  host = rng.standard_normal((blocks, *block)).astype(dtype)
  # Fill the tier with a first chain so that the timed blocks' slots are
  # scattered over it, not the first `blocks` in order.
  filler = [b"f%d" % i for i in range(blocks)]
  tier.put(filler, host)
  tier.discard(filler[::2])
  ids = [b"s%d" % i for i in range(blocks)]
  pages = rng.permutation(2 * blocks)[:blocks].tolist()
  result = {}

  def put_host():
    tier.discard(ids)
    assert tier.put(ids, host) == blocks
    tier.wait()
  result["put_host"] = _median_s(put_host, repeats)

  state = {"pool": pool}

  def load():
    state["pool"], n = tier.read_run_to_pool(ids, state["pool"], pages)
    assert n == blocks
    state["pool"].block_until_ready()
  result["load"] = _median_s(load, repeats)
  got = np.asarray(state["pool"])[:, pages]
  if not np.array_equal(np.swapaxes(got, 0, 1), host):
    raise AssertionError(f"{memory}: the loaded pages are not the blocks put")

  back = [b"w%d" % i for i in range(blocks)]

  def write_back():
    tier.discard(back)
    assert tier.put_from_pool(back, state["pool"], pages) == blocks
    tier.wait()
  result["write_back"] = _median_s(write_back, repeats)
  return result


def format_table(report: dict) -> str:
  gb = report["bytes"] / 1e9
  pinned = report["ceilings_s"]["pinned_to_device"]
  lines = [f"{report['blocks']} blocks of {report['block_bytes'] / 2**10:.0f} "
           f"KiB ({report['bytes'] / 2**20:.0f} MiB) per call",
           f"{'':<24} {'GB/s':>8} {'ms':>8} {'of pinned->device':>18}"]
  for name, s in report["ceilings_s"].items():
    lines.append(f"{name:<24} {gb / s:>8.2f} {s * 1e3:>8.2f} "
                 f"{pinned / s:>17.0%}")
  for memory, ops in report["tiers"].items():
    for op, s in ops.items():
      lines.append(f"{memory + ' ' + op:<24} {gb / s:>8.2f} {s * 1e3:>8.2f} "
                   f"{pinned / s:>17.0%}")
  return "\n".join(lines)


def plot(report: dict, path: str, title: str) -> None:
  """GB/s of each tier operation per memory, the ceilings as lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dualpath_jax import outputs
  gb = report["bytes"] / 1e9
  fig, ax = plt.subplots(figsize=(8, 4))
  tiers = report["tiers"]
  width = 0.8 / max(len(tiers), 1)
  for k, (memory, ops) in enumerate(tiers.items()):
    xs = [i + k * width for i in range(len(OPS))]
    ax.bar(xs, [gb / ops[op] for op in OPS], width, label=memory)
  styles = {"pinned_to_device": "-", "pageable_to_device": "--",
            "device_to_pinned": ":"}
  for name, s in report["ceilings_s"].items():
    ax.axhline(gb / s, color="gray", linestyle=styles[name],
               label=f"{name} copy")
  ax.set_xticks([i + width * (len(tiers) - 1) / 2 for i in range(len(OPS))],
                OPS)
  ax.set(ylabel="GB/s", title=title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  outputs.save_figure(fig, path)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from dualpath_jax import metrics, outputs
  try:  # before JAX starts: bad flags cost nothing
    kinds = memories(FLAGS.memories)
    outputs.check_output_paths([(name, path) for name, path in (
        ("--json", FLAGS.json), ("--plot", FLAGS.plot)) if path])
  except ValueError as e:
    sys.exit(f"bench_hot_tier: {e}")
  import ml_dtypes  # noqa: F401  (numpy's bfloat16)
  import numpy as np
  if kinds is None:
    kinds = default_memories()
  dtype = np.dtype(FLAGS.dtype)
  layers, kv_heads, head_dim = SHAPES[FLAGS.shape]
  block = (layers, 2, kv_heads, FLAGS.block_size, head_dim)
  block_bytes = int(np.prod(block)) * dtype.itemsize
  report = {
      "shape": FLAGS.shape, "layers": layers, "kv_heads": kv_heads,
      "head_dim": head_dim, "block_size": FLAGS.block_size,
      "dtype": FLAGS.dtype, "blocks": FLAGS.blocks, "repeats": FLAGS.repeats,
      "block_bytes": block_bytes, "bytes": block_bytes * FLAGS.blocks,
      "ceilings_s": {}, "tiers": {}, "complete": False,
  }
  rng = np.random.default_rng(FLAGS.seed)
  print(f"{FLAGS.shape}: {FLAGS.blocks} blocks of {block} {FLAGS.dtype}",
        flush=True)
  interrupted = False
  try:
    report["ceilings_s"] = measure_ceilings(
        (FLAGS.blocks, *block), dtype, FLAGS.repeats, rng)
    print("  plain copies: " + ", ".join(
        f"{k} {report['bytes'] / s / 1e9:.2f} GB/s"
        for k, s in report["ceilings_s"].items()), flush=True)
    for memory in kinds:
      report["tiers"][memory] = measure_tier(
          memory, layers, kv_heads, head_dim, FLAGS.block_size, dtype,
          FLAGS.blocks, FLAGS.repeats, rng)
      print(f"  {memory}: " + ", ".join(
          f"{op} {report['bytes'] / s / 1e9:.2f} GB/s"
          for op, s in report["tiers"][memory].items()), flush=True)
    report["complete"] = True
  except KeyboardInterrupt:
    interrupted = True
    print("interrupted: the figures measured so far", flush=True)
  report |= metrics.run_environment()
  if report["ceilings_s"]:
    pinned = report["ceilings_s"]["pinned_to_device"]
    report["of_pinned_to_device"] = {
        memory: {op: pinned / s for op, s in ops.items()}
        for memory, ops in report["tiers"].items()}
    print(format_table(report))
  title = (f"hot tier <-> pool: {FLAGS.blocks} {FLAGS.shape} blocks "
           f"({report['bytes'] / 2**20:.0f} MiB) a call, "
           f"{report.get('device') or ''}")
  outputs.write_report_and_plot(
      report, FLAGS.json, FLAGS.plot,
      (lambda path: plot(report, path, title)) if report["ceilings_s"]
      else None)
  if interrupted:
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  app.run(ctrl_c_ends_quietly(main, "bench_hot_tier"))
