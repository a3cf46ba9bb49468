r"""Offline batch agent evaluation: replay agent sessions, report the numbers.

    python -m launch.agent_eval                      # built-in synthetic workload
    python -m launch.agent_eval --trace=sessions.jsonl.zst --reply=teacher_forced

Runs every session of an `abench-session-jsonl-v1` trace (or the built-in
synthetic coding-agent workload) through one continuous-batching engine on
the embedded SmolLM2-135M-Instruct (or `--model`), then prints a summary
table and writes a JSON report (and a PNG plot with `--plot`; with
`--rollouts`, a JSONL of every turn's tokens and reply, and with
`--rollout_logprobs` their log-probabilities, for RL trainers).
`--samples_per_turn=N --temperature=T` samples every turn N times, as an RL
trainer's group does (the engine prefills the N samples' context once; the
session goes on with sample 0's reply). Ctrl-C during the replay reports
the turns finished so far (`complete: false`) and exits 130.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from absl import app, flags, logging

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted
from launch import (cluster_flags, distributed_flags, engine_flags, float_flags,
                    input_paths, key_flags, workload_flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model source: None = embedded SmolLM2 "
                    "GGUF, a .gguf path, an Orbax dir from launch.convert, or "
                    "random:<preset> (with --tokenizer=bytes)")
workload_flags.define()  # --trace, --sessions, --turns, --reply, --tokenizer
engine_flags.define()  # --block_size, --num_blocks, --max_batch, --dtype, ...
flags.DEFINE_string("report", "agent_eval_report.json", "JSON report path")
flags.DEFINE_alias("json", "report")  # every JSON-writing launcher takes --json
flags.DEFINE_string("plot", None, "PNG plot path (TTFT and timeline)")
flags.DEFINE_string("rollouts", None, "JSONL path: one line per finished turn "
                    "(session, turn, prompt and generated token ids, reply "
                    "text, finish reason), for RL trainers and offline "
                    "evaluation")
flags.DEFINE_integer("rollout_logprobs", None, "with --rollouts: each "
                     "generated token's log-probability and the N most "
                     "likely tokens' (log-softmax of the model's logits, "
                     "before temperature); 0 = the token's only",
                     lower_bound=0, upper_bound=20)
flags.DEFINE_integer("samples_per_turn", 1, "samples of every turn, "
                     "submitted together (an RL group); each is a record and "
                     "a rollout line of its own (`sample`), and the session "
                     "goes on with sample 0's reply; > 1 needs --temperature",
                     lower_bound=1, upper_bound=128)
float_flags.define_float("temperature", None, "every turn's sampling "
                         "temperature (default: greedy)", lower_bound=0.0)
float_flags.define_float("top_p", None, "every turn's nucleus sampling "
                         "(default: 1)", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("warmup", True, "compile every shape bucket before timing")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_integer("seed", 0, "sampling seed (each sample's own seed is "
                     "drawn from it, its session, turn and sample: the same "
                     "in any batching) and, without --workload_seed, the "
                     "synthetic workload's", lower_bound=0)
cluster_flags.define()  # --mesh, --policy, --storage_nic_gbps, --cold_tier, ...


def main(argv):
  del argv
  try:
    multi = distributed_flags.requested()
  except ValueError as e:
    sys.exit(f"agent_eval: {e}")
  if multi:
    sys.exit("agent_eval: the serving loop is single-controller; multi-process "
             "runs are not supported yet (the transfer layer is: see "
             "docs/pod_launch.md)")
  from dualpath_jax import metrics
  from dualpath_jax import outputs
  output_paths = [("--report", FLAGS.report)] + (
      [("--plot", FLAGS.plot)] if FLAGS.plot else []) + (
      # `--rollouts=` (an unset $VAR) is refused, not a run without them.
      [("--rollouts", FLAGS.rollouts)] if FLAGS.rollouts is not None else [])
  try:  # before the run: a bad path must not cost its results
    if FLAGS.rollout_logprobs is not None and FLAGS.rollouts is None:
      raise ValueError("--rollout_logprobs needs --rollouts (the file they "
                       "go to)")
    if FLAGS.samples_per_turn > 1 and not FLAGS.temperature:
      raise ValueError(f"--samples_per_turn={FLAGS.samples_per_turn} needs "
                       "--temperature > 0: greedy decoding gives every "
                       "sample the same reply")
    if FLAGS.top_p == 0:
      raise ValueError("--top_p must be in (0, 1]; got 0")
    if FLAGS.top_p is not None and not FLAGS.temperature:
      # It was ignored: greedy decoding takes the most likely token.
      raise ValueError(f"--top_p={FLAGS.top_p:g} needs --temperature > 0: "
                       "greedy decoding takes the most likely token")
    # Not over what the run reads or keeps (the trace, a key file, a cold
    # tier or checkpoint folder): written at its end, they would be lost.
    outputs.check_output_paths(output_paths,
                               inputs=input_paths.flagged_inputs())
  except ValueError as e:
    sys.exit(f"agent_eval: {e}")
  from dualpath_jax.config import to_dict
  from dualpath_jax.workload.replay import ReplayResult, replay_sessions
  from dualpath_jax.workload.trace import TraceError

  try:
    sessions = workload_flags.load_sessions()
  except (TraceError, FileNotFoundError, ValueError) as e:
    sys.exit(f"agent_eval: {e}")
  try:
    mesh = cluster_flags.mesh_config()
    cold = cluster_flags.cold_tier_config()
  except ValueError as e:
    sys.exit(f"agent_eval: {e}")
  try:  # what needs only the config and tokenizer: refused before JAX loads
    model_config, model_tokenizer = engine_flags.describe_model(FLAGS.model)
    cache, engine_cfg = engine_flags.configs(FLAGS.seed)
    tokenizer = workload_flags.pick_tokenizer(model_config, model_tokenizer)
    engine_flags.check_model_context(model_config)
    longest = min(FLAGS.max_context,
                  workload_flags.max_context_bound(sessions, tokenizer))
    engine_flags.check_pool_holds(longest)
  except ValueError as e:
    sys.exit(f"agent_eval: {e}")
  from dualpath_jax.compile_cache import enable_compilation_cache
  enable_compilation_cache()
  import jax
  import tqdm

  try:  # a source's bad weights, a cluster the devices cannot hold
    loaded = dataclasses.replace(engine_flags.load_model(FLAGS.model),
                                 tokenizer=tokenizer)
    engine = cluster_flags.make(loaded, cache, engine_cfg, mesh, cold)
  except ValueError as e:
    sys.exit(f"agent_eval: {e}")
  total_turns = sum(len(s.turns) for s in sessions)
  # Every sample is a record of its own (the bar and an interruption count
  # them; the table's and the report's `turns` too).
  total_records = total_turns * FLAGS.samples_per_turn
  unit = "turn" if FLAGS.samples_per_turn == 1 else "sample"
  logging.info("%d sessions, %d turns on %s (%s)", len(sessions), total_turns,
               loaded.config.name, jax.devices()[0].device_kind)
  if FLAGS.warmup:
    print("compiling shape buckets ...", flush=True)
    engine.warmup(longest)
    print(f"  {engine.stats.compiled_shapes} shapes in "
          f"{engine.stats.warmup_s:.1f} s", flush=True)

  bar = tqdm.tqdm(total=total_records, unit=unit, disable=not FLAGS.progress,
                  desc="agent_eval", mininterval=0)  # every turn shows
  finished = []  # the turns done so far, for a report of an interrupted run
  rollouts = []  # with --rollouts, written at the end (atomically)

  def on_turn(record):
    finished.append(record)
    bar.update(1)
    raise_if_interrupted()

  start = time.perf_counter()
  try:
    result = replay_sessions(engine, loaded.tokenizer, sessions,
                             reply_mode=FLAGS.reply,
                             max_new_tokens=FLAGS.max_new_tokens,
                             honor_gaps=FLAGS.honor_gaps, on_turn=on_turn,
                             on_rollout=(rollouts.append if FLAGS.rollouts
                                         else None),
                             logprobs=FLAGS.rollout_logprobs,
                             samples_per_turn=FLAGS.samples_per_turn,
                             temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                             seed=FLAGS.seed)
    interrupted = False
  except KeyboardInterrupt:  # Ctrl-C: report the finished turns, exit 130
    # A Ctrl-C between a turn's rollout and its record (`on_turn`) leaves
    # one rollout more: the file holds the report's turns.
    del rollouts[len(finished):]
    result = ReplayResult(records=finished,
                          wall_s=time.perf_counter() - start,
                          truncated_sessions={})
    interrupted = True
  bar.close()
  cold_stats = None
  if engine.cold_tier is not None:
    engine.cold_tier.flush()  # count queued write-backs as done
    cold_stats = engine.cold_tier.report()
  nics = engine.nic_stats() if mesh is not None else None
  engine.close()

  summary = metrics.summarize(result.records, result.wall_s)
  report = {
      **summary,
      "complete": not interrupted,
      "truncated_sessions": result.truncated_sessions,
      "engine": engine.stats.as_dict(),
      "cache": engine.manager.stats,
      "cold_tier": cold_stats,
      "nics": nics,
      "mesh_devices": cluster_flags.device_map(engine),
      **metrics.run_environment(),
      "config": {
          "model": loaded.config.name, "model_source": FLAGS.model or "embedded",
          "tokenizer": FLAGS.tokenizer, "trace": workload_flags.describe(),
          "reply": FLAGS.reply, "max_new_tokens": FLAGS.max_new_tokens,
          "honor_gaps": FLAGS.honor_gaps, "cache": to_dict(cache),
          "limit_sessions": FLAGS.limit_sessions, "warmup": FLAGS.warmup,
          "rollouts": FLAGS.rollouts, "rollout_logprobs": FLAGS.rollout_logprobs,
          "samples_per_turn": FLAGS.samples_per_turn,
          "temperature": FLAGS.temperature, "top_p": FLAGS.top_p,
          "seed": FLAGS.seed, "workload_seed": FLAGS.workload_seed,
          "cold_tier": None if cold is None else to_dict(cold),
          **cluster_flags.as_dict(),
          "engine": to_dict(engine_cfg),
      },
      "turns_detail": [r.__dict__ | {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s}
                       for r in result.records],
  }
  print(metrics.format_table(summary))
  by_tier = engine.stats.cached_tokens_by_tier
  if cold_stats is not None:
    # Where each turn's cached prompt tokens came from, at its admission.
    tiers = [f"device pool {by_tier['device']}"]
    if cold_stats["hot_tier"] is not None:
      tiers.append(f"hot tier {by_tier['hot']}")
    if cold_stats["store"] is not None:
      tiers.append(f"cold tier {by_tier['cold']}")
    print("cached prompt tokens by tier: " + ", ".join(tiers))
    prefetch = cold_stats.get("prefetch")
    if prefetch is not None:
      where = ("" if mesh is None else
               f" ({prefetch['path1_blocks']} on prefill NICs, "
               f"{prefetch['path2_blocks']} on decode NICs)")
      print(f"prefetch: {prefetch['read_blocks']} blocks read{where}, "
            f"{prefetch['used_blocks']} read by the turns they were for, "
            f"{prefetch['evicted_unused_blocks']} evicted unread")
  outputs.write_json(report, FLAGS.report)
  print(f"report: {FLAGS.report}")
  if FLAGS.rollouts:
    outputs.write_jsonl([r.as_dict() for r in rollouts], FLAGS.rollouts)
    print(f"rollouts: {FLAGS.rollouts} ({len(rollouts)} turns)")
  if FLAGS.plot:
    metrics.plot_turns(result.records, FLAGS.plot,
                       title=f"agent_eval {report['config']['trace']}")
    print(f"plot: {FLAGS.plot}")
  if not interrupted and not result.records:
    # Every session ended before its first turn (past --max_context): a
    # report of nothing used to end with exit status 0.
    first = next(iter(result.truncated_sessions.items()), ("", "no turns"))
    sys.exit(f"agent_eval: no turn ran; {len(result.truncated_sessions)} "
             f"session(s) ended early (first: {first[0]}: {first[1]}); the "
             "report lists them (truncated_sessions)")
  if interrupted:
    print(f"interrupted after {len(result.records)} of {total_records} "
          f"{unit}s: the report holds those (complete: false)",
          file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "agent_eval"))
