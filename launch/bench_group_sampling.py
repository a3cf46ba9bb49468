r"""n samples of one prompt, with and without prefill sharing.

    python -m launch.bench_group_sampling --samples=1,4,8 --prompt_tokens=2048 \
        --json=group_sampling.json --plot=group_sampling.png

RL rollouts sample a group of n completions of one prompt (GRPO), agents
explore several continuations of one history, and the server's `n` asks
for n choices. The engine prefills a prompt shared by turns admitted
together once (`EngineConfig.share_prefill`): the first turn computes it,
the others take its full blocks and compute only the last, partial block.

For each `--samples` value n, an engine per setting (shared, unshared)
serves n turns of one `--prompt_tokens` prompt submitted together, each
generating `--max_new_tokens` at `--temperature` with its own seed, and the
run reports: prompt tokens prefilled, prefill seconds, the TTFT of every
sample, the wall time of the group, and whether the two settings sampled
the same tokens. Compilation is excluded: before each timed group, an
untimed group of another prompt of the same length runs the same shapes
(`--share_prefill` is not read: both settings run).
The prompts are random token ids (seeded), unseen by the engine.

Prints each group as it finishes and a table; writes JSON (`--json`) and a
PNG (`--plot`): wall time against n, and the TTFT of each sample of the
largest group. Ctrl-C reports the groups measured so far
(`"complete": false`) and exits 130.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from absl import app, flags

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted
from launch import engine_flags, float_flags, input_paths, key_flags, list_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program)."""
  flags.DEFINE_string("model", None, "model source: None = embedded SmolLM2 "
                      "GGUF, a .gguf path, an Orbax dir from launch.convert, or "
                      "random:<preset>")
  engine_flags.define()
  flags.DEFINE_list("samples", ["1", "4", "8"], "group sizes n (comma list)")
  flags.DEFINE_integer("prompt_tokens", 2048, "tokens of the shared prompt",
                       lower_bound=1)
  flags.DEFINE_integer("max_new_tokens", 16, "tokens each sample generates",
                       lower_bound=1)
  float_flags.define_float("temperature", 1.0, "sampling temperature "
                           "(0 = greedy)", lower_bound=0.0)
  flags.DEFINE_integer("seed", 0, "prompt and sampling seed", lower_bound=0)
  flags.DEFINE_string("json", None, "JSON report path")
  flags.DEFINE_string("plot", None, "PNG plot path")


def run_group(engine, prompt: list[int], n: int, max_new_tokens: int,
              temperature: float, seed: int, tag: str) -> dict:
  """Serves n turns of `prompt` submitted together on `engine`; returns
  what the group cost (the engine's counters are differenced)."""
  from dualpath_jax.engine.request import TurnRequest
  from dualpath_jax.server.protocol import choice_seed
  stats = engine.stats
  before = (stats.prefill_tokens, stats.prefill_s,
            stats.shared_prefill_tokens, stats.decode_s, stats.preemptions)
  start = engine.clock()
  for i in range(n):
    engine.submit(TurnRequest(
        f"{tag}-{i}", prompt, max_new_tokens, stop_on_eos=False,
        temperature=temperature, seed=choice_seed(seed, i), arrival_s=start))
  outs = {}
  while engine.has_work():
    for out in engine.step():
      outs[out.request.request_id] = out
    raise_if_interrupted()
  wall = engine.clock() - start
  ordered = [outs[f"{tag}-{i}"] for i in range(n)]
  return {
      "wall_s": wall,
      "prefill_tokens": stats.prefill_tokens - before[0],
      "prefill_s": stats.prefill_s - before[1],
      "shared_prefill_tokens": stats.shared_prefill_tokens - before[2],
      "decode_s": stats.decode_s - before[3],
      "preemptions": stats.preemptions - before[4],
      "ttft_s": [o.first_token_s - o.arrival_s for o in ordered],
      "cached_prompt_tokens": [o.cached_prompt_tokens for o in ordered],
      "tokens": [o.generated_tokens for o in ordered],
  }


def format_table(rows: list[dict]) -> str:
  lines = [f"{'n':>3} {'sharing':<8} {'prefilled':>9} {'prefill s':>9} "
           f"{'wall s':>7} {'TTFT mean':>9} {'TTFT last':>9} {'x wall':>6}"]
  unshared = {r["n"]: r["wall_s"] for r in rows if not r["share_prefill"]}
  for r in rows:
    base = unshared.get(r["n"])
    speedup = f"{base / r['wall_s']:.2f}" if base and r["share_prefill"] else ""
    lines.append(
        f"{r['n']:>3} {'on' if r['share_prefill'] else 'off':<8} "
        f"{r['prefill_tokens']:>9} {r['prefill_s']:>9.2f} {r['wall_s']:>7.2f} "
        f"{r['ttft_mean_s']:>9.2f} {r['ttft_s'][-1]:>9.2f} {speedup:>6}")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  """Wall time against n per setting, and the TTFT of each sample of the
  largest group."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dualpath_jax import outputs
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  largest = max(r["n"] for r in rows)
  for share, label, color in ((True, "sharing on", "tab:blue"),
                              (False, "sharing off", "tab:orange")):
    mine = sorted((r for r in rows if r["share_prefill"] == share),
                  key=lambda r: r["n"])
    if not mine:
      continue
    left.plot([r["n"] for r in mine], [r["wall_s"] for r in mine], "o-",
              color=color, label=label)
    for r in mine:
      if r["n"] == largest:
        right.plot(range(1, largest + 1), r["ttft_s"], "o-", color=color,
                   label=label)
  left.set(xlabel="samples of the prompt (n)", ylabel="group wall time (s)",
           title="one group, prefill + decode")
  right.set(xlabel="sample", ylabel="TTFT (s)",
            title=f"TTFT of each of {largest} samples")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_ylim(bottom=0)
  fig.suptitle(title)
  fig.tight_layout()
  outputs.save_figure(fig, path)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from dualpath_jax import metrics, outputs
  try:  # before JAX and the model load: bad flags cost nothing
    sizes = list_flags.positive_ints("samples", FLAGS.samples,
                                     example="1,4,8")
    paths = [(name, path) for name, path in (("--json", FLAGS.json),
                                             ("--plot", FLAGS.plot)) if path]
    outputs.check_output_paths(paths, inputs=input_paths.flagged_inputs())
    model_config, _ = engine_flags.describe_model(FLAGS.model)
    cache, engine_cfg = engine_flags.configs(FLAGS.seed)
    context = FLAGS.prompt_tokens + FLAGS.max_new_tokens
    if context > FLAGS.max_context:
      raise ValueError(f"--prompt_tokens + --max_new_tokens = {context} is "
                       f"past --max_context {FLAGS.max_context}")
    # The largest group unshared holds n whole contexts at once (fewer
    # would be preempted and recomputed: the timing would measure that).
    blocks = -(-context // FLAGS.block_size)
    if max(sizes) * blocks > FLAGS.num_blocks:
      raise ValueError(
          f"--num_blocks: {max(sizes)} samples of {context} tokens need "
          f"{max(sizes) * blocks} blocks of {FLAGS.block_size}; the pool "
          f"has {FLAGS.num_blocks}")
    engine_flags.check_model_context(model_config)
  except ValueError as e:
    sys.exit(f"bench_group_sampling: {e}")
  from dualpath_jax.compile_cache import enable_compilation_cache
  enable_compilation_cache()
  import numpy as np
  from dualpath_jax.config import to_dict
  from dualpath_jax.engine.factory import make_engine
  try:
    loaded = engine_flags.load_model(FLAGS.model)
  except ValueError as e:
    sys.exit(f"bench_group_sampling: {e}")

  rng = np.random.default_rng(FLAGS.seed)
  vocab = loaded.config.vocab_size

  def prompt() -> list[int]:
    return rng.integers(0, vocab, FLAGS.prompt_tokens).tolist()

  prompts = {n: (prompt(), prompt()) for n in sizes}  # (warm, timed)
  rows, interrupted = [], False
  print(f"{loaded.config.name}: groups of {sizes} samples of a "
        f"{FLAGS.prompt_tokens}-token prompt, {FLAGS.max_new_tokens} new "
        "tokens each", flush=True)
  try:
    for share in (False, True):
      engine = make_engine(loaded, cache, dataclasses.replace(
          engine_cfg, share_prefill=share))
      for n in sizes:
        warm, timed = prompts[n]
        run_group(engine, warm, n, FLAGS.max_new_tokens, FLAGS.temperature,
                  FLAGS.seed, f"warm{n}")
        t0 = time.perf_counter()
        row = run_group(engine, timed, n, FLAGS.max_new_tokens,
                        FLAGS.temperature, FLAGS.seed, f"group{n}")
        row |= {"n": n, "share_prefill": share,
                "ttft_mean_s": float(np.mean(row["ttft_s"])),
                "measured_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"  n={n} sharing {'on ' if share else 'off'}: prefilled "
              f"{row['prefill_tokens']} tokens in {row['prefill_s']:.2f} s, "
              f"group {row['wall_s']:.2f} s", flush=True)
      engine.close()
  except KeyboardInterrupt:
    interrupted = True
    print("interrupted: the groups measured so far", flush=True)

  tokens = {(r["n"], r["share_prefill"]): r["tokens"] for r in rows}
  for r in rows:
    other = tokens.get((r["n"], not r["share_prefill"]))
    r["same_tokens_as_other_setting"] = (
        None if other is None else
        sum(a == b for a, b in zip(r["tokens"], other)))
  if rows:
    print(format_table(rows))
  report = {
      "model": loaded.config.name, "model_source": FLAGS.model or "embedded",
      "prompt_tokens": FLAGS.prompt_tokens,
      "max_new_tokens": FLAGS.max_new_tokens,
      "temperature": FLAGS.temperature, "seed": FLAGS.seed,
      "cache": to_dict(cache), "engine": to_dict(engine_cfg),
      "rows": rows, "complete": not interrupted,
      **metrics.run_environment(),
  }
  title = (f"{loaded.config.name}: n samples of a {FLAGS.prompt_tokens}-"
           f"token prompt ({report.get('device') or ''})")
  outputs.write_report_and_plot(
      report, FLAGS.json, FLAGS.plot,
      (lambda path: plot(rows, path, title)) if rows else None)
  if interrupted:
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "bench_group_sampling"))
