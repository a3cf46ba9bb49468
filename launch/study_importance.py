r"""Measures the seeds' claim: a hot 12% of the cache serves 98% of attention.

    python -m launch.study_importance                 # SmolLM2, synthetic agent turns
    python -m launch.study_importance --trace=sessions.jsonl --study_turns=2 \
        --hot_fractions=0.12 --report=r.json --plot=r.png

For the last `--study_turns` turns of each session (their contexts built
from the recorded history, as `agent_eval --reply=teacher_forced` builds
them), prefills the context exactly, then decodes `--decode_steps` greedy
tokens. At every step, one row attends to the whole cache and one row per
(policy, hot fraction) attends only to the blocks its importance score
picked (`dualpath_jax.cache.importance_study`). Of each turn's prefill, it
reports how much of the new tokens' attention to the cached prefix the
heaviest, or the newest, prefix blocks hold. Prints a table, writes a
JSON report and, with `--plot`, a PNG: attention served by the hot blocks
(the seeds' hit rate), the blocks that hold 95% of it, and top-1 agreement
and KL of the next token against exact attention.

With `--free_running` (the default), each turn is then decoded again with
every row feeding its own greedy tokens, so that a sparse row's errors
build up as they would in a server that read only its hot blocks: per
row, how many tokens it kept to the exact row's, and how likely the
exact model finds what it wrote (negative log-likelihood a token). The
report holds every row's continuation as text.

The engine does not serve this way: its attention is exact and a returning
turn reads every block (docs/hot_tier.md). This launcher is the
measurement behind that choice.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted
from launch import float_flags, input_paths, key_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model source: None = embedded SmolLM2 "
                    "GGUF, a .gguf path, an Orbax dir, or random:<preset> "
                    "(with --tokenizer=bytes)")
flags.DEFINE_enum("tokenizer", "model", ["model", "bytes"],
                  "model: the model's own; bytes: one token per byte (for "
                  "random weights)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "weights, activations and the cache")
flags.DEFINE_string("trace", None, "abench-session-jsonl-v1 trace; default: "
                    "the built-in synthetic coding-agent workload")
flags.DEFINE_integer("sessions", 4, "synthetic workload: sessions", lower_bound=1)
flags.DEFINE_integer("turns", 6, "synthetic workload: turns per session",
                     lower_bound=1)
flags.DEFINE_integer("limit_sessions", None, "study only the first N sessions",
                     lower_bound=1)
flags.DEFINE_integer("study_turns", 1, "the last N turns of each session "
                     "are studied (the longest contexts)", lower_bound=1)
flags.DEFINE_integer("decode_steps", 32, "greedy tokens decoded per turn",
                     lower_bound=1)
flags.DEFINE_list("hot_fractions", ["0.05", "0.12", "0.25", "0.5"],
                  "hot set sizes, as fractions of the sequence's blocks")
flags.DEFINE_list("policies", ["recent", "sink_recent", "attention",
                               "seed_score"],
                  "importance scores: recent (newest blocks), sink_recent "
                  "(the first block and the newest), attention "
                  "(EMA of the attention each block got), seed_score "
                  "(recency + attention + position, --score_weights)")
flags.DEFINE_list("score_weights", ["1", "1", "1"], "seed_score's weights "
                  "of recency, attention and position")
flags.DEFINE_bool("free_running", True, "decode each turn a second time "
                  "with every row feeding its own tokens (errors build up)")
flags.DEFINE_integer("block_size", 16, "tokens per block (the unit a tier "
                     "moves)", lower_bound=1)
flags.DEFINE_integer("window", 16, "last prompt tokens whose attention "
                     "seeds the attention score", lower_bound=1)
float_flags.define_float("needed_share", 0.95, "a step's needed blocks are "
                         "the heaviest ones holding this share of its "
                         "attention", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("max_context", 8192, "refuse turns whose context plus "
                     "--decode_steps is longer", lower_bound=16)
flags.DEFINE_string("report", "study_importance_report.json", "JSON report path")
flags.DEFINE_alias("json", "report")
flags.DEFINE_string("plot", None, "PNG plot path")
flags.DEFINE_string("replot", None, "a report this launcher wrote: print "
                    "its tables and draw --plot from it, running nothing")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_integer("seed", 0, "synthetic workload seed", lower_bound=0)


def _study_config():
  """StudyConfig from the flags; ValueError naming the flag."""
  from dualpath_jax.cache.importance_study import StudyConfig
  from dualpath_jax.cache.token_importance import ImportanceWeights
  try:
    fractions = tuple(float(f) for f in FLAGS.hot_fractions)
  except ValueError:
    fractions = ()
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise ValueError("--hot_fractions: give fractions in (0, 1], e.g. "
                     f"0.05,0.12; got {','.join(FLAGS.hot_fractions)!r}")
  try:
    weights = [float(w) for w in FLAGS.score_weights]
  except ValueError:
    weights = []
  if len(weights) != 3:
    raise ValueError("--score_weights: give three numbers (recency, "
                     "attention, position), e.g. 1,1,1; got "
                     f"{','.join(FLAGS.score_weights)!r}")
  if FLAGS.needed_share == 0:
    raise ValueError("--needed_share must be in (0, 1]; got 0")
  try:
    return StudyConfig(policies=tuple(FLAGS.policies),
                       hot_fractions=fractions,
                       decode_steps=FLAGS.decode_steps, window=FLAGS.window,
                       needed_share=FLAGS.needed_share,
                       weights=ImportanceWeights(*weights),
                       free_running=FLAGS.free_running)
  except ValueError as e:
    raise ValueError(f"--policies / --hot_fractions / --score_weights: {e}"
                     ) from e


def _print_table(summary: dict) -> None:
  c = summary["concentration"]
  shares = ", ".join(
      f"{v:.1%} of the blocks hold {k.split('_')[-1].replace('pct', '%')}"
      for k, v in c.items() if k.startswith("blocks_for_"))
  print(f"\n{summary['steps']} decode steps; exact attention: {shares}; "
        f"per layer and head, {c['per_head_blocks_for_90pct']:.1%} hold 90%; "
        f"the token's own key {c['own_token_mass']:.1%}")
  print(f"{'policy':<12}{'hot':>6}{'blocks':>8}{'attn hit':>10}"
        f"{'needed hit':>12}{'top-1 agree':>13}{'KL nats':>10}")
  for r in summary["variants"]:
    print(f"{r['policy']:<12}{r['hot_fraction']:>6.0%}{r['mean_hot_blocks']:>8.1f}"
          f"{r['mass_hit']:>10.1%}{r['needed_hit']:>12.1%}"
          f"{r['top1_agreement']:>13.1%}{r['kl_nats']:>10.4f}")
  for o in summary["oracle"]:
    print(f"{'oracle':<12}{o['hot_fraction']:>6.0%}{'':>8}{o['mass_hit']:>10.1%}"
          f"   (per layer and head: {o['per_head_mass_hit']:.1%})")
  p = summary.get("prefill")
  if p:
    print(f"\nprefill of {p['new_tokens']} new tokens in {p['turns']} turns: "
          f"{p['prefix_share']:.1%} of their attention goes to the cached "
          f"prefix, {p['blocks_for_90pct']:.1%} of whose blocks hold 90% of "
          "it; share held by")
    print(f"{'hot':>6}{'oracle':>10}{'recent':>10}{'sink_recent':>13}")
    for row in p["served"]:
      print(f"{row['hot_fraction']:>6.0%}{row['oracle']:>10.1%}"
            f"{row['recent']:>10.1%}{row['sink_recent']:>13.1%}")


def _print_free_table(free: dict) -> None:
  e = free["exact"]
  print(f"\nfree-running, {free['turns']} turns: each row feeds its own "
        f"tokens; the exact row wrote {e['tokens']} tokens at "
        f"{e['nll_per_token']:.3f} nats a token (the exact model's NLL)")
  print(f"{'policy':<12}{'hot':>6}{'blocks':>8}{'kept':>8}{'same turn':>11}"
        f"{'exact pick':>12}{'NLL/token':>11}{'excess':>9}")
  for r in free["variants"]:
    print(f"{r['policy']:<12}{r['hot_fraction']:>6.0%}"
          f"{r['mean_hot_blocks']:>8.1f}{r['matched_tokens']:>8.1f}"
          f"{r['identical_turns']:>11.0%}{r['exact_pick']:>12.1%}"
          f"{r['nll_per_token']:>11.3f}{r['nll_excess']:>+9.3f}")
  print("kept: the exact row's tokens matched before the first difference, "
        "a turn; same turn: turns whose tokens all matched; exact pick: "
        "tokens that exact attention would pick after the row's own")


def _continuations(free: dict | None, cfg, tokenizer) -> dict | None:
  """Each row's free-running continuation as text, by row label."""
  if free is None:
    return None
  labels = ["exact"] + [f"{p}@{f:g}" for p, f in cfg.variants()]
  return {label: tokenizer.decode(ids)
          for label, ids in zip(labels, free["tokens"])}


def _draw(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dualpath_jax import outputs
  prefill = summary.get("prefill")
  free = summary.get("free_running")
  count = 3 + 2 * bool(free) + bool(prefill)
  nrows = 1 if count <= 3 else 2
  ncols = -(-count // nrows)
  fig, grid = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 4 * nrows),
                           squeeze=False)
  axes = list(grid.flat)
  for ax in axes[count:]:
    ax.set_visible(False)
  policies = list(dict.fromkeys(r["policy"] for r in summary["variants"]))

  def by_policy(ax, variants, key):
    for policy in policies:
      rows = [r for r in variants if r["policy"] == policy]
      ax.plot([100 * r["hot_fraction"] for r in rows], [r[key] for r in rows],
              marker="o", label=policy)
    ax.set_xlabel("hot blocks, % of the sequence's")
    ax.grid(alpha=0.3)

  panels = (("mass_hit", "attention served by the hot blocks"),
            ("top1_agreement", "top-1 agreement with exact attention"),
            ("kl_nats", "KL(exact || sparse), nats"))
  for ax, (key, title) in zip(axes, panels):
    by_policy(ax, summary["variants"], key)
    if key == "mass_hit":
      ax.plot([100 * o["hot_fraction"] for o in summary["oracle"]],
              [o["mass_hit"] for o in summary["oracle"]], "k--", marker="x",
              label="oracle (this step's attention)")
      ax.plot([100 * o["hot_fraction"] for o in summary["oracle"]],
              [o["per_head_mass_hit"] for o in summary["oracle"]], "k:",
              marker="+", label="oracle per layer and head")
      ax.axhline(0.98, color="grey", lw=0.8, ls=":")
      ax.axvline(12, color="grey", lw=0.8, ls=":")
    if key != "kl_nats":
      ax.set_ylim(top=1.02)
    ax.set_title(title, fontsize=10)
  axes[0].legend(fontsize=8)
  next_panel = 3
  if free:
    ax = axes[next_panel]
    by_policy(ax, free["variants"], "nll_excess")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title("free-running: exact model's NLL a token, over the "
                 "exact row's", fontsize=10)
    ax = axes[next_panel + 1]
    by_policy(ax, free["variants"], "matched_tokens")
    ax.set_title("free-running: the exact row's tokens kept before the "
                 "first difference", fontsize=10)
    next_panel += 2
  if prefill:
    ax = axes[next_panel]
    x = [100 * r["hot_fraction"] for r in prefill["served"]]
    for choice, style in (("oracle", "k--"), ("recent", "-"),
                          ("sink_recent", "-")):
      ax.plot(x, [r[choice] for r in prefill["served"]], style, marker="o",
              label=choice)
    ax.set_ylim(top=1.02)
    ax.set_xlabel("prefix blocks loaded, % of the prefix's")
    ax.set_title("prefill: new tokens' attention to the prefix served",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"block importance over {summary['steps']} decode steps "
               "(dotted: the seeds' 98% at 12%)", fontsize=10)
  fig.tight_layout()
  outputs.save_figure(fig, path)
  plt.close(fig)


def _replot(report_path: str, plot_path: str | None) -> None:
  """`--replot`: the tables and the plot of an earlier report."""
  import json
  from dualpath_jax import outputs
  if not plot_path:
    sys.exit("study_importance: --replot needs --plot (the PNG to draw)")
  try:
    outputs.check_output_paths([("--plot", plot_path)])
    outputs.check_distinct_paths([("--replot", report_path),
                                  ("--plot", plot_path)])
    with open(report_path, encoding="utf-8") as f:
      report = json.load(f)
    if not isinstance(report, dict) or not {
        "variants", "oracle", "concentration", "steps"} <= set(report):
      raise ValueError("it is not a study_importance report")
  except (OSError, ValueError) as e:
    sys.exit(f"study_importance: --replot={report_path}: {e}")
  try:  # a report cut short or edited by hand: say so, no traceback
    _print_table(report)
    if report.get("free_running"):
      _print_free_table(report["free_running"])
    _draw(report, plot_path)
  except (KeyError, TypeError, ValueError) as e:
    sys.exit(f"study_importance: --replot={report_path}: not a complete "
             f"study_importance report (missing or bad {e})")
  print(f"wrote {plot_path}")


def main(argv):
  del argv
  from dualpath_jax import outputs
  if FLAGS.replot:
    _replot(FLAGS.replot, FLAGS.plot)
    return
  paths = [("--report", FLAGS.report)] + (
      [("--plot", FLAGS.plot)] if FLAGS.plot else [])
  try:  # before anything loads: bad input costs nothing
    cfg = _study_config()
    outputs.check_output_paths(paths, inputs=input_paths.flagged_inputs())
  except ValueError as e:
    sys.exit(f"study_importance: {e}")
  from dualpath_jax.model import describe_model, load_model
  from dualpath_jax.workload import load_trace, synthetic_agent_workload
  from dualpath_jax.workload.turn_contexts import last_turn_contexts
  from dualpath_jax.workload.trace import TraceError
  from launch import workload_flags
  try:
    if FLAGS.trace:
      sessions = load_trace(FLAGS.trace, limit=FLAGS.limit_sessions)
    else:
      sessions = synthetic_agent_workload(num_sessions=FLAGS.sessions,
                                          turns_per_session=FLAGS.turns,
                                          seed=FLAGS.seed)
      sessions = sessions[:FLAGS.limit_sessions]
    model_config, model_tokenizer = describe_model(FLAGS.model,
                                                   dtype=FLAGS.dtype)
    tokenizer = workload_flags.pick_tokenizer(model_config, model_tokenizer)
    turns = last_turn_contexts(sessions, tokenizer, FLAGS.study_turns,
                               model_config.eos_token_ids)
    longest = max(len(t) for _, _, t, _ in turns) + FLAGS.decode_steps
    limit = min(FLAGS.max_context, model_config.max_position)
    if longest > limit:
      raise ValueError(f"a studied turn needs {longest} tokens (context + "
                       f"--decode_steps), past --max_context / the model's "
                       f"{limit}: lower --study_turns or --turns")
  except (TraceError, FileNotFoundError, ValueError) as e:
    sys.exit(f"study_importance: {e}")
  from dualpath_jax.compile_cache import enable_compilation_cache
  enable_compilation_cache()
  import jax
  import tqdm
  from dualpath_jax import metrics
  from dualpath_jax.cache import importance_study as study
  from dualpath_jax.config import to_dict
  from dualpath_jax.model.attention_probe import AttentionProbe
  try:
    loaded = load_model(FLAGS.model, dtype=FLAGS.dtype)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"study_importance: {e}")
  bs = FLAGS.block_size
  capacity = -(-longest // bs) * bs + bs
  probe = AttentionProbe(loaded.model, capacity=capacity, block_size=bs)
  stop_ids = tuple(loaded.config.eos_token_ids)
  print(f"{len(turns)} turns of {len(sessions)} sessions on "
        f"{loaded.config.name} ({jax.devices()[0].device_kind}); "
        f"{len(cfg.variants())} sparse rows a step", flush=True)
  results = []
  start = time.perf_counter()
  interrupted = False
  try:  # Ctrl-C: report the turns studied so far, exit 130
    for session_id, turn_index, tokens, prefix in tqdm.tqdm(
        turns, unit="turn", disable=not FLAGS.progress,
        desc="study_importance"):
      r = study.study_sequence(probe, tokens, cfg, stop_ids, prefix)
      results.append({"session_id": session_id, "turn": turn_index,
                      "prefix_tokens": prefix, **r,
                      "continuations": _continuations(r["free_running"], cfg,
                                                      tokenizer)})
      raise_if_interrupted()
  except KeyboardInterrupt:
    interrupted = True
  wall = time.perf_counter() - start
  try:
    summary = study.summarize(study.merge_results(results), cfg)
  except ValueError as e:  # no decode step studied
    if interrupted:
      print("study_importance: interrupted before a turn was studied",
            file=sys.stderr)
      sys.exit(130)
    sys.exit(f"study_importance: {e}")
  _print_table(summary)
  if summary["free_running"]:
    _print_free_table(summary["free_running"])
  report = {
      **summary, "wall_s": wall, "turns": len(results),
      "complete": not interrupted,
      **metrics.run_environment(),
      "config": {"model": loaded.config.name,
                 "model_source": FLAGS.model or "embedded",
                 "dtype": FLAGS.dtype, "trace": FLAGS.trace,
                 "sessions": len(sessions), "study_turns": FLAGS.study_turns,
                 "block_size": bs, "study": to_dict(cfg)},
      "turns_detail": results,
  }
  outputs.write_report_and_plot(report, FLAGS.report, FLAGS.plot,
                                lambda p: _draw(summary, p))
  if interrupted:
    print(f"interrupted after {len(results)} of {len(turns)} turns: the "
          "report holds those (complete: false)", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "study_importance"))
