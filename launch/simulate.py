r"""Cluster-scale simulation: DualPath against single-path loading on a pod.

    python -m launch.simulate                      # llama3-8b shape, 1P2D, H100s
    python -m launch.simulate --mesh=2P4D --gpu=h200 --storage_nic_gbps=100 \
        --report=sim.json --plot=sim.png
    python -m launch.simulate --rates=0.1,0.2,0.4 --slo_ttft_s=2   # online
    python -m launch.simulate --trace=sessions.jsonl.zst --model=qwen2.5-32b-shape --tp=4

Runs the placement policies of `dualpath_jax.scheduler` (`--policies`) on a
simulated prefill/decode cluster (`dualpath_jax.sim`): every engine has a
storage NIC, HBM for `CostModel.pool_blocks` KV blocks and a roofline cost
for prefill and decode; agents' turns arrive, load their cached prefix from
storage by the policy's paths, prefill, hand off, decode, and the next turn
follows after the tool's wait. No JAX, no device: thousands of turns a
second.

Offline (no `--rates`): every agent starts at once, the batch evaluation
and RL-rollout case; the table compares job completion time, throughput,
TTFT and each role's NIC and compute use, and the headline is each policy's
speedup over `single_path`. Online (`--rates`): agents arrive open-loop at
each rate (Poisson, seeded), judged by a TTFT SLO as in
`launch.bench_online`, whose table and plot this reuses.

The costs are a model, not a measurement (docs/simulator.md says what they
assume and how they compare with the real cluster): use it to compare
policies and cluster shapes, not to predict a deployment's latency.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted
from launch import float_flags, input_paths, key_flags, list_flags

FLAGS = flags.FLAGS

POLICY_NAMES = ("single_path", "dualpath", "oracle")


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program)."""
  flags.DEFINE_string("model", "llama3-8b-shape", "model shape: a name of "
                      "dualpath_jax.config.MODEL_PRESETS")
  flags.DEFINE_string("gpu", "h100", "accelerator preset: h100 or h200 "
                      "(dualpath_jax.sim.cost_model.GPUS)")
  flags.DEFINE_string("mesh", "1P2D", "prefill (P) and decode (D) engines")
  flags.DEFINE_string("tp", "1", "GPUs per engine: N, or PREFILL_TP,DECODE_TP")
  flags.DEFINE_integer("block_size", 64, "tokens per KV block", lower_bound=1)
  flags.DEFINE_enum("kv_dtype", "bfloat16", ["bfloat16", "int8"],
                    "KV cache element type (int8: half the bytes)")
  float_flags.define_float("prefill_mfu", 0.5, "fraction of peak bf16 FLOP/s "
                           "a prefill reaches", lower_bound=0.01,
                           upper_bound=1.0)
  float_flags.define_float("decode_bw_efficiency", 0.7, "fraction of HBM "
                           "bandwidth a decode step reaches",
                           lower_bound=0.01, upper_bound=1.0)
  float_flags.define_float("step_overhead_s", 0.002, "fixed seconds per "
                           "forward (launches, sampling, host loop)",
                           lower_bound=0.0)
  float_flags.define_float("storage_nic_gbps", 100.0, "storage-NIC "
                           "bandwidth per GPU, Gbit/s (an engine of tp GPUs "
                           "has tp times it; inf: no limit); the default is "
                           "a DGX H100's 2 x 400G storage ports over 8 GPUs",
                           allow_inf=True, lower_bound=1e-6)
  float_flags.define_float("collective_gb_s", 50.0, "compute-network "
                           "bandwidth per GPU for path 2's DE -> PE hop, GB/s "
                           "(a decode engine has tp times it; inf: free); "
                           "the default is one 400G NIC per GPU",
                           allow_inf=True, lower_bound=1e-6)
  float_flags.define_float("handoff_gb_s", 50.0, "compute-network bandwidth "
                           "per GPU for the PE -> DE KV hand-off, GB/s (a "
                           "prefill engine has tp times it; inf: free)",
                           allow_inf=True, lower_bound=1e-6)
  float_flags.define_float("hot_tier_gb", 0.0, "host DRAM per GPU, GiB, "
                           "for a prefill engine's hot tier (an engine has tp "
                           "times it): the blocks of the turns it prefilled, "
                           "read back over PCIe instead of a NIC; 0 = none",
                           lower_bound=0.0)
  float_flags.define_float("hot_gb_s", 50.0, "host -> HBM bandwidth per GPU "
                           "for hot-tier reads, GB/s (PCIe 5 x16 with pinned "
                           "buffers: about 50; inf: no limit)",
                           allow_inf=True, lower_bound=1e-6)
  flags.DEFINE_integer("prefetch_blocks", 0, "with --hot_tier_gb: blocks per "
                       "prefetch read of the runtime's prefetcher (waiting "
                       "turns' and soonest-returning sessions' prefixes into "
                       "the hot tiers, on idle NICs); 0 = none", lower_bound=0)
  flags.DEFINE_integer("max_prefill_tokens", 16384, "new tokens in one "
                       "prefill batch", lower_bound=1)
  flags.DEFINE_integer("max_prefill_turns", 16, "turns in one prefill batch",
                       lower_bound=1)
  flags.DEFINE_integer("max_decode_batch", 256, "turns in one decode step",
                       lower_bound=1)
  flags.DEFINE_string("policies", ",".join(POLICY_NAMES), "placement "
                      "policies to compare (comma list)")
  flags.DEFINE_string("trace", None, "abench-session-jsonl-v1 trace "
                      "(.jsonl or .jsonl.zst); default: synthetic agents")
  flags.DEFINE_enum("trace_tokenizer", "embedded", ["embedded", "bytes"],
                    "how a trace's text is counted where it recorded no "
                    "input_tokens: the embedded SmolLM2 tokenizer, or one "
                    "token per UTF-8 byte")
  flags.DEFINE_integer("limit_sessions", None, "use only the first N "
                       "sessions", lower_bound=1)
  flags.DEFINE_integer("sessions", 64, "synthetic: agents", lower_bound=1)
  flags.DEFINE_integer("turns", 24, "synthetic: turns per agent",
                       lower_bound=1)
  flags.DEFINE_integer("first_tokens", 16384, "synthetic: mean tokens of the "
                       "first turn (system prompt and task)", lower_bound=1)
  flags.DEFINE_integer("append_tokens", 800, "synthetic: mean tokens a later "
                       "turn appends (tool output, user message)",
                       lower_bound=1)
  flags.DEFINE_integer("output_tokens", 200, "synthetic: mean tokens "
                       "generated a turn", lower_bound=1)
  float_flags.define_float("gap_s", 1.0, "synthetic: mean tool wait between "
                           "turns, s", lower_bound=0.0)
  flags.DEFINE_integer("max_context", None, "synthetic: an agent ends before "
                       "a turn past this many tokens (default: the model's "
                       "context)", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "seeds the synthetic agents and the "
                       "arrivals")
  flags.DEFINE_string("rates", "", "online: offered agents/s (comma list); "
                      "empty: the offline batch, every agent at t=0")
  flags.DEFINE_enum("arrival", "poisson", ["poisson", "uniform"],
                    "online arrival process")
  float_flags.define_float("slo_ttft_s", 2.0, "online: TTFT SLO, s",
                           lower_bound=1e-9)
  flags.DEFINE_integer("slo_percentile", 90, "online: the TTFT percentile "
                       "the SLO bounds", lower_bound=1, upper_bound=100)
  flags.DEFINE_string("report", "simulate_report.json", "JSON report path")
  flags.DEFINE_alias("json", "report")  # as every JSON-writing launcher
  flags.DEFINE_string("plot", None, "PNG path (offline: job completion and "
                      "NIC use over time; online: TTFT vs rate)")
  flags.DEFINE_bool("report_turns", True, "include every turn's timeline in "
                    "the report")
  flags.DEFINE_bool("progress", True, "show a progress bar per run")


def _fail(msg: str):
  sys.exit(f"simulate: {msg}")


def _parse_rates(text: str) -> list[float]:
  """--rates; empty: no online runs (the offline job only)."""
  return list_flags.rates("rates", text) if text.strip() else []


def _cost_models(model_config):
  """(prefill cost, decode cost, mesh) from the flags."""
  from dualpath_jax.sim.cost_model import CostModel, get_gpu
  from dualpath_jax.transfer.config import MeshConfig
  mesh = MeshConfig.parse(FLAGS.mesh, FLAGS.tp)
  gpu = get_gpu(FLAGS.gpu)
  common = dict(model=model_config, gpu=gpu, block_size=FLAGS.block_size,
                kv_bytes=1 if FLAGS.kv_dtype == "int8" else 2,
                prefill_mfu=FLAGS.prefill_mfu,
                decode_bw_efficiency=FLAGS.decode_bw_efficiency,
                step_overhead_s=FLAGS.step_overhead_s)
  return (CostModel(tp=mesh.prefill_tp, **common),
          CostModel(tp=mesh.decode_tp, **common), mesh)


def _max_context(model_config) -> int:
  """`--max_context`, or the model's context; no more than the model's."""
  max_context = FLAGS.max_context or model_config.max_position
  if max_context > model_config.max_position:
    raise ValueError(f"--max_context={max_context} is past the context of "
                     f"{model_config.name} ({model_config.max_position})")
  return max_context


def _sessions(model_config):
  """(sessions, description of where their token counts came from)."""
  from dualpath_jax.sim import workload
  if FLAGS.trace:
    from dualpath_jax.workload.trace import load_trace
    agents = load_trace(FLAGS.trace, limit=FLAGS.limit_sessions)
    if FLAGS.trace_tokenizer == "bytes":
      count = lambda text: len(text.encode("utf-8"))  # noqa: E731
    else:
      from dualpath_jax.model import describe_model
      tokenizer = describe_model(None)[1]
      count = lambda text: len(tokenizer.encode(text, add_bos=False))  # noqa: E731
    sessions, how = workload.sessions_from_trace(agents, count)
    limit = _max_context(model_config)
    for session in sessions:
      for i, turn in enumerate(session.turns):
        tokens = session.context_tokens(i) + turn.output_tokens
        if tokens > limit:
          raise ValueError(
              f"{FLAGS.trace}: session {session.session_id!r} turn {i} holds "
              f"{tokens} tokens, past {limit} (the context of "
              f"{model_config.name}, or --max_context)")
    return sessions, {"trace": FLAGS.trace,
                      "trace_tokenizer": FLAGS.trace_tokenizer, **how}
  max_context = _max_context(model_config)
  sessions = workload.synthetic_sessions(
      FLAGS.sessions, FLAGS.turns, first_tokens=FLAGS.first_tokens,
      append_tokens=FLAGS.append_tokens, output_tokens=FLAGS.output_tokens,
      gap_s=FLAGS.gap_s, max_context=max_context, seed=FLAGS.seed)
  if FLAGS.limit_sessions is not None:
    sessions = sessions[:FLAGS.limit_sessions]
  return sessions, {
      "synthetic": {"sessions": FLAGS.sessions, "turns": FLAGS.turns,
                    "first_tokens": FLAGS.first_tokens,
                    "append_tokens": FLAGS.append_tokens,
                    "output_tokens": FLAGS.output_tokens,
                    "gap_s": FLAGS.gap_s, "max_context": max_context,
                    "seed": FLAGS.seed}}


def _workload_stats(sessions, block_size: int) -> dict:
  turns = [(s, i) for s in sessions for i in range(len(s.turns))]
  context = sum(s.context_tokens(i) for s, i in turns)
  hit = sum(s.hit_tokens(i, block_size) for s, i in turns)
  return {"sessions": len(sessions), "turns": len(turns),
          "context_tokens": context, "hit_tokens": hit,
          "hit_ratio": hit / context if context else None,
          "mean_context_tokens": context / len(turns),
          "max_context_tokens": max(s.context_tokens(i) for s, i in turns),
          "output_tokens": sum(t.output_tokens for s in sessions
                               for t in s.turns)}


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  from dualpath_jax import metrics, outputs
  from dualpath_jax.config import MODEL_PRESETS
  from dualpath_jax.sim import report as sim_report
  from dualpath_jax.sim.simulator import SimConfig, Simulator
  from dualpath_jax.workload import online_report
  from dualpath_jax.workload.online import arrival_offsets
  from dualpath_jax.workload.slo import SloSpec, sustained_rate
  from dualpath_jax.workload.trace import TraceError

  try:
    policies = list_flags.choices("policies", FLAGS.policies, POLICY_NAMES)
    rates = _parse_rates(FLAGS.rates)
  except ValueError as e:
    _fail(str(e))
  if FLAGS.model not in MODEL_PRESETS:
    _fail(f"--model {FLAGS.model!r} is not a preset; choose one of "
          f"{sorted(MODEL_PRESETS)}")
  model_config = MODEL_PRESETS[FLAGS.model]
  try:
    prefill_cost, decode_cost, mesh = _cost_models(model_config)
    config = SimConfig(  # per-GPU bandwidths times each engine's GPUs
        mesh.num_prefill, mesh.num_decode,
        storage_nic_gbps=FLAGS.storage_nic_gbps * mesh.prefill_tp,
        decode_storage_nic_gbps=FLAGS.storage_nic_gbps * mesh.decode_tp,
        collective_gb_s=FLAGS.collective_gb_s * mesh.decode_tp,
        handoff_gb_s=FLAGS.handoff_gb_s * mesh.prefill_tp,
        hot_tier_gb=FLAGS.hot_tier_gb * mesh.prefill_tp,
        hot_gb_s=FLAGS.hot_gb_s * mesh.prefill_tp,
        prefetch_blocks=FLAGS.prefetch_blocks,
        max_prefill_tokens=FLAGS.max_prefill_tokens,
        max_prefill_turns=FLAGS.max_prefill_turns,
        max_decode_batch=FLAGS.max_decode_batch)
    slo = SloSpec(ttft_s=FLAGS.slo_ttft_s, percentile=FLAGS.slo_percentile)
    if FLAGS.hot_tier_gb and FLAGS.hot_gb_s * 8 < FLAGS.storage_nic_gbps:
      # As the runtime's, a prefill engine's hot blocks take its host link
      # whatever the NICs could do: a tier behind a slower link slows loads
      # (the simulator models the runtime, it does not improve on it).
      print(f"simulate: note: --hot_gb_s={FLAGS.hot_gb_s:g} GB/s is slower "
            f"than a storage NIC's {FLAGS.storage_nic_gbps / 8:g} GB/s "
            f"(--storage_nic_gbps={FLAGS.storage_nic_gbps:g}); hot blocks "
            "take the host link all the same, as in the runtime, so the hot "
            "tier can make loads slower", file=sys.stderr)
    outputs.check_output_paths([("--report", FLAGS.report)] + (
        [("--plot", FLAGS.plot)] if FLAGS.plot else []),
        inputs=input_paths.flagged_inputs())
    sessions, source = _sessions(model_config)
    # A turn no engine can hold is refused here, before any run.
    Simulator(prefill_cost, config, policies[0], sessions,
              decode_cost=decode_cost)
  except (TraceError, FileNotFoundError, ValueError) as e:
    _fail(str(e))
  stats = _workload_stats(sessions, prefill_cost.block_size)
  print(f"{stats['sessions']} agents, {stats['turns']} turns, mean context "
        f"{stats['mean_context_tokens']:.0f} tokens, "
        f"{100 * stats['hit_ratio']:.1f}% of them stored; "
        f"{model_config.name} on {mesh} x {prefill_cost.gpu.name}, "
        f"storage NIC {FLAGS.storage_nic_gbps:g} Gbit/s per GPU",
        flush=True)

  import tqdm
  nic_rates = {f"{letter}{i}": config.nic_bytes_per_s(role)
               for letter, role, n in (("P", "prefill", config.num_prefill),
                                       ("D", "decode", config.num_decode))
               for i in range(n)}
  runs, interrupted = [], False
  plan = [(None, p) for p in policies] if not rates else [
      (r, p) for r in rates for p in policies]
  try:
    for rate, policy in plan:
      starts = ([0.0] * len(sessions) if rate is None else
                arrival_offsets(len(sessions), rate, FLAGS.arrival,
                                FLAGS.seed))
      label = policy if rate is None else f"{policy} @ {rate:g}/s"
      with tqdm.tqdm(total=stats["turns"], unit="turn", desc=label,
                     disable=not FLAGS.progress, leave=False) as bar:
        def done(record, bar=bar):
          bar.update(1)
          raise_if_interrupted()
        result = Simulator(prefill_cost, config, policy, sessions, starts,
                           on_turn_done=done, decode_cost=decode_cost).run()
      run = sim_report.run_dict(
          result, rate=rate,
          arrivals={s.session_id: t for s, t in zip(sessions, starts)},
          slo=slo, nic_rates=nic_rates)
      if not FLAGS.report_turns:
        run.pop("turns")
      runs.append(run)
      summary = run["summary"]
      print(f"{label}: {summary['turns']} turns done at "
            f"{summary['job_completion_s']:.4g} s, p50 TTFT "
            f"{summary['ttft_s']['p50']:.3g} s", flush=True)
  except KeyboardInterrupt:
    interrupted = True

  report = {
      "complete": not interrupted,
      "mode": "offline" if not rates else "online",
      "workload": {**stats, **source},
      "cost_model": {"prefill": prefill_cost.describe(),
                     "decode": decode_cost.describe()},
      "cluster": dataclasses.asdict(config),
      "runs": runs,
      **metrics.run_environment(device=False),  # no JAX: no GPU taken
      "config": {"model": FLAGS.model, "gpu": FLAGS.gpu, "mesh": FLAGS.mesh,
                 "tp": FLAGS.tp, "kv_dtype": FLAGS.kv_dtype,
                 "policies": policies, "rates": rates,
                 "arrival": FLAGS.arrival, "seed": FLAGS.seed,
                 "slo": dataclasses.asdict(slo)},
  }
  if not rates:
    report["speedup_over_single_path"] = sim_report.offline_speedups(runs)
    if runs:
      print(sim_report.format_offline_table(runs))
    for policy, x in report["speedup_over_single_path"].items():
      if policy != "single_path":
        print(f"{policy}: job completion {x:.2f}x faster than single_path")
  else:
    sustained = {p: sustained_rate([r["slo"] for r in runs
                                    if r["policy"] == p]) for p in policies}
    report["agents_per_s_within_slo"] = sustained
    if runs:
      print(online_report.format_runs_table(runs, slo.percentile))
    print(online_report.format_headline(sustained, slo.ttft_s,
                                        slo.percentile))
  outputs.write_json(report, FLAGS.report)
  print(f"report: {FLAGS.report}")
  if FLAGS.plot and not runs:
    print(f"plot: not drawn, no run finished ({FLAGS.plot})")
  elif FLAGS.plot:
    title = (f"simulate {model_config.name} {mesh} {prefill_cost.gpu.name}, "
             f"NIC {FLAGS.storage_nic_gbps:g} Gbit/s per GPU")
    if rates:
      online_report.plot_online(runs, FLAGS.plot, slo_ttft_s=slo.ttft_s,
                                percentile=slo.percentile, title=title)
    else:
      sim_report.plot_offline(runs, FLAGS.plot, title=title)
    print(f"plot: {FLAGS.plot}")
  if interrupted:
    print(f"interrupted after {len(runs)} of {len(plan)} runs: the report "
          "holds those (complete: false)", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "simulate"))
