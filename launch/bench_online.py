r"""Online benchmark: agents arrive open-loop; agents/s sustained within a TTFT SLO.

    python -m launch.bench_online --mesh=1P2D --policies=single_path,dualpath \
        --rates=0.05,0.1,0.2 --slo_ttft_s=2 --storage_nic_gbps=10 \
        --report=online.json --plot=online.png

For every offered rate (agents/s) and every policy, agents (the sessions of
a trace, or the built-in synthetic workload) arrive at that rate, Poisson
(seeded, the same pattern at every rate) or evenly spaced, whatever the
engine is doing; each agent's turns follow one another as in
`launch.agent_eval` (`workload.online.run_online`). Each (policy, rate) run
gets a fresh cluster (empty pools, compiled before the clock starts) over
its own clone of one seeded cold tier (`storage.clone`), so every run
starts from the same state. The seed (`--seed_store`): `replay` runs the
whole workload once, closed-loop, on a single engine and keeps the blocks it
wrote (every run then finds the agents' contexts in storage, the regime
DualPath targets); `none` starts every run from an empty store.
`--model=random:<preset> --tokenizer=bytes` runs random weights of any size
(one token per byte, `workload.byte_tokenizer`).

Prints a table (policy x rate: agents/s offered, arrived and achieved,
TTFT and TPOT percentiles, SLO attainment, each engine's storage-NIC GB and
mean utilisation) and the headline, agents/s sustained within the SLO per
policy (`workload.slo`); writes a JSON report with every number, the turns
and the sampled time series, and with `--plot` a PNG.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile

from absl import app, flags, logging

from dualpath_jax.interrupts import ctrl_c_ends_quietly, raise_if_interrupted
from launch import (cluster_flags, distributed_flags, engine_flags, float_flags,
                    input_paths, key_flags, list_flags, workload_flags)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program, so that
  importing it next to other launchers never collides on names); the
  cluster and cold-tier flags are `launch.cluster_flags`'."""
  flags.DEFINE_string("model", None, "model source: None = embedded SmolLM2 "
                      "GGUF, a .gguf path, an Orbax dir from launch.convert, or "
                      "random:<preset> (with --tokenizer=bytes)")
  workload_flags.define(honor_gaps_default=True)
  flags.DEFINE_string("rates", "0.05,0.1,0.2", "offered rates, agents/s (comma list)")
  flags.DEFINE_enum("arrival", "poisson", ["poisson", "uniform"],
                    "agent arrival process (poisson is seeded by --seed)")
  flags.DEFINE_string("policies", "single_path,dualpath", "load-path policies "
                      "to compare in this run (comma list of single_path, "
                      "dualpath, oracle); ignored with --mesh=none")
  float_flags.define_float("slo_ttft_s", 2.0, "TTFT SLO in seconds")
  flags.DEFINE_integer("slo_percentile", 90, "the TTFT percentile that must be "
                       "within the SLO")
  float_flags.define_float("slo_tpot_s", None, "optional TPOT SLO (same percentile)")
  float_flags.define_float("keep_up", 0.9, "a run keeps up when its achieved agents/s "
                           "is at least this fraction of its arrival rate")
  flags.DEFINE_enum("seed_store", "replay", ["replay", "none"],
                    "what every run's cold tier starts with: a copy of one "
                    "closed-loop single-engine replay's store, or nothing")
  float_flags.define_float("sample_every_s", 0.25, "time-series sampling interval "
                           "(0: every engine step)")
  flags.DEFINE_string("cold_tier", None, "working directory of the cold tiers "
                      "(<dir>/seed and <dir>/runs/*, replaced; a directory "
                      "holding a seed or runs of anyone else's is refused); default: a "
                      "temporary directory, removed at the end")
  flags.DEFINE_bool("keep_runs", False, "keep each run's cold tier under "
                    "--cold_tier/runs (else removed after the run)")
  flags.DEFINE_string("report", "bench_online_report.json", "JSON report path")
  flags.DEFINE_alias("json", "report")  # as every JSON-writing launcher
  flags.DEFINE_string("plot", None, "PNG: TTFT vs rate per policy, NIC "
                      "utilisation over time at the highest rate")
  flags.DEFINE_bool("warmup", True, "compile every shape bucket before each run "
                    "(not timed)")
  flags.DEFINE_bool("warm_runs", True, "before the timed runs, run every "
                    "policy once at the first rate, untimed and discarded: "
                    "the cold-tier load and page-move paths compile per block "
                    "count, which --warmup does not cover, and the first "
                    "timed run used to pay for them (its p90 TTFT 15x the "
                    "others': the flag order chose the winner); each run "
                    "reports the compiles it still met")
  flags.DEFINE_bool("progress", True, "show a progress bar per run")
  flags.DEFINE_integer("seed", 0, "synthetic workload, arrival and sampling seed", lower_bound=0)
  engine_flags.define()  # --block_size, --num_blocks, --max_batch, --dtype, ...
  cluster_flags.define(mesh_default="1P2D")  # --mesh none = one engine


_POLICIES = ("single_path", "dualpath", "oracle")
_COMPILES = [0]  # XLA backend compiles so far (`_count_compiles`)


def _count_compiles(event: str, _secs: float, **_kwargs) -> None:
  """A `jax.monitoring` listener: counts XLA compiles, so that a run can
  report the ones it paid for while timed."""
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


def _fail(msg: str):
  sys.exit(f"bench_online: {msg}")


def _run_dir(root: str, policy: str, rate: float) -> str:
  """The folder of one (policy, rate) run: the rate written exactly, so two
  rates that print alike (`{rate:g}`: 6 digits) never share one (with
  --keep_runs the second deleted the first's store)."""
  return os.path.join(root, "runs", f"{policy}-{rate!r}")


def _cold_config(root: str):
  return cluster_flags.cold_tier_config(root)


def _seed(loaded, cache, engine_cfg, sessions, root: str) -> dict:
  """Fills the store at `root` (a closed-loop replay on one engine)."""
  from dualpath_jax.engine.factory import make_engine
  from dualpath_jax.workload.replay import replay_sessions
  os.makedirs(root)
  if FLAGS.seed_store == "none":
    return {"mode": "none"}
  print("seeding the cold tier (closed-loop replay on one engine) ...",
        flush=True)
  engine = make_engine(loaded, cache, engine_cfg, cold_tier=_cold_config(root))
  res = replay_sessions(engine, loaded.tokenizer, sessions,
                        reply_mode=FLAGS.reply,
                        max_new_tokens=FLAGS.max_new_tokens)
  engine.cold_tier.flush()
  stats = {"mode": "replay", "turns": len(res.records), "wall_s": res.wall_s,
           "store": engine.cold_tier.report()["store"]}
  engine.close()
  print(f"  {len(res.records)} turns in {res.wall_s:.1f} s, "
        f"{stats['store'].get('index_ready', '?')} blocks stored", flush=True)
  return stats


# The file that marks a --cold_tier directory as this launcher's own: its
# seed/ and runs/ are replaced on each run; anyone else's are never removed.
WORK_DIR_MARK = ".bench_online"


def _check_work_dir(root: str) -> None:
  """ValueError if `root` holds a `seed` or `runs` entry that an earlier
  run of this launcher did not make (no `WORK_DIR_MARK`): a run replaces
  both, and must not delete somebody's data of the same name; or if it is
  a cold tier of another launcher (its index), which a run would fill with
  its own folders."""
  if os.path.exists(os.path.join(root, WORK_DIR_MARK)):
    return
  if os.path.lexists(os.path.join(root, "index.sqlite")):
    raise ValueError(
        f"--cold_tier: {root} is a cold tier (it holds index.sqlite), not a "
        "bench_online work directory, in which each run makes its own "
        "stores: give a new or empty directory")
  found = [n for n in ("seed", "runs") if os.path.lexists(os.path.join(root, n))]
  if found:
    raise ValueError(
        f"--cold_tier: {root} holds {' and '.join(found)}, which a run "
        "replaces, and is no earlier bench_online work directory (no "
        f"{WORK_DIR_MARK} file): give a new or empty directory")


def _run(loaded, cache, engine_cfg, mesh, policy, rate, sessions, slo, seed_dir,
         run_dir, context_bound) -> dict:
  """One (policy, rate) run on a fresh engine over a clone of the seed store."""
  import tqdm

  from dualpath_jax import metrics
  from dualpath_jax.workload.online import run_online
  from dualpath_jax.workload.slo import evaluate_run

  if os.path.exists(run_dir):
    shutil.rmtree(run_dir)
  cold = _cold_config(run_dir)
  cloned = 0
  if FLAGS.seed_store != "none":
    from storage.block_store import BlockStore
    from storage.clone import clone_store
    with BlockStore(_cold_config(seed_dir), loaded.config, cache) as src, \
        BlockStore(cold, loaded.config, cache) as dst:
      cloned = clone_store(src, dst)
  engine = cluster_flags.make(loaded, cache, engine_cfg, mesh, cold, policy)
  block_bytes = cache.bytes_per_block(loaded.config)
  if FLAGS.warmup:
    engine.warmup(min(FLAGS.max_context, context_bound))
  total = sum(len(s.turns) for s in sessions)
  bar = tqdm.tqdm(total=total, unit="turn", disable=not FLAGS.progress,
                  desc=f"{policy} @ {rate:g}/s")
  compiles_before = _COMPILES[0]
  res = run_online(engine, loaded.tokenizer, sessions, rate=rate,
                   arrival=FLAGS.arrival, seed=FLAGS.seed,
                   reply_mode=FLAGS.reply, max_new_tokens=FLAGS.max_new_tokens,
                   honor_gaps=FLAGS.honor_gaps,
                   sample_every_s=FLAGS.sample_every_s,
                   on_turn=lambda r: (bar.update(1), raise_if_interrupted()))
  bar.close()
  compiles = _COMPILES[0] - compiles_before
  engine.cold_tier.flush()
  cold_stats = engine.cold_tier.report()
  nics = {}
  if mesh is not None:
    last = res.series[-1].get("nics", {})
    for name, s in engine.nic_stats().items():
      passed = last.get(name, {}).get("passed_bytes", s["bytes"])
      cap = s["bytes_per_s"]
      nics[name] = {**s, "gb": s["bytes"] / 1e9,
                    "mean_util": (passed / (cap * res.wall_s)
                                  if math.isfinite(cap) and res.wall_s > 0
                                  else None)}
  stats = engine.stats.as_dict()
  paths = stats.get("path_blocks") or {}
  cache_stats = engine.manager.stats
  engine.close()
  if not FLAGS.keep_runs:
    shutil.rmtree(run_dir, ignore_errors=True)
  return {
      "policy": policy,
      "rate": rate,
      "slo": evaluate_run(res.records, res.arrivals, rate, slo),
      "summary": metrics.summarize(res.records, res.wall_s),
      "nics": nics,
      "path_bytes": {k: paths[k] * block_bytes
                     for k in ("hot", "path1", "path2") if k in paths},
      "block_bytes": block_bytes,
      "seed_blocks": cloned,
      "compiles_during_run": compiles,
      "engine": stats,
      "cache": cache_stats,
      "cold_tier": cold_stats,
      "truncated_sessions": res.truncated_sessions,
      "arrivals": res.arrivals,
      "series": res.series,
      "turns_detail": [r.__dict__ | {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s}
                       for r in res.records],
  }


def main(argv):
  del argv
  try:  # a pod's job settings (flags or JAX_* variables): refused, not run
    multi = distributed_flags.requested()
  except ValueError as e:
    _fail(str(e))
  if multi:
    _fail("the benchmark's serving loop is single-controller; multi-process "
          "runs are not supported yet (docs/pod_launch.md)")
  try:
    rates = list_flags.rates("rates", FLAGS.rates)
    policies = list_flags.choices("policies", FLAGS.policies, _POLICIES)
  except ValueError as e:
    _fail(str(e))
  from dualpath_jax.workload.slo import SloSpec, sustained_rate
  try:
    slo = SloSpec(ttft_s=FLAGS.slo_ttft_s, percentile=FLAGS.slo_percentile,
                  tpot_s=FLAGS.slo_tpot_s, keep_up=FLAGS.keep_up)
  except ValueError as e:
    _fail(str(e))
  if FLAGS.sample_every_s < 0:
    _fail("--sample_every_s must be >= 0")
  mesh = None
  if FLAGS.mesh and FLAGS.mesh.lower() != "none":
    from dualpath_jax.transfer import MeshConfig
    try:
      mesh = MeshConfig.parse(FLAGS.mesh, FLAGS.tp)
    except ValueError as e:
      _fail(f"--mesh: {e}")
    try:
      cluster_flags.dualpath_config()  # e.g. a storage NIC of no bandwidth
    except ValueError as e:
      _fail(str(e))
  else:
    policies = ["engine"]
  try:  # hot tiers past the host's memory: refused before the weights load
    cluster_flags.hot_tier_bytes(mesh.num_prefill if mesh else 1)
    cluster_flags.check_prefetch(True)  # every run gets a cold tier
  except ValueError as e:
    _fail(str(e))
  try:  # the cold tiers' settings, before the first is seeded
    _cold_config(FLAGS.cold_tier or tempfile.gettempdir())
    if FLAGS.cold_tier:
      _check_work_dir(FLAGS.cold_tier)
  except ValueError as e:
    _fail(str(e))
  from dualpath_jax.workload.trace import TraceError
  try:
    sessions = workload_flags.load_sessions()
  except (TraceError, FileNotFoundError, ValueError) as e:
    _fail(str(e))

  from dualpath_jax import metrics
  from dualpath_jax import outputs
  try:  # before the runs: a bad path must not cost their results
    outputs.check_output_paths([("--report", FLAGS.report)] + (
        [("--plot", FLAGS.plot)] if FLAGS.plot else []),
        inputs=input_paths.flagged_inputs())
  except ValueError as e:
    _fail(str(e))

  from dualpath_jax.config import to_dict
  from dualpath_jax.workload import online_report

  try:  # what needs only the config and tokenizer: refused before JAX loads
    model_config, model_tokenizer = engine_flags.describe_model(FLAGS.model)
    cache, engine_cfg = engine_flags.configs(FLAGS.seed)
    tokenizer = workload_flags.pick_tokenizer(model_config, model_tokenizer)
    engine_flags.check_model_context(model_config)
    bound = workload_flags.max_context_bound(sessions, tokenizer)
    engine_flags.check_pool_holds(min(FLAGS.max_context, bound))
  except ValueError as e:
    _fail(str(e))
  from dualpath_jax.compile_cache import enable_compilation_cache
  enable_compilation_cache()
  import jax

  try:  # a source's bad weights
    loaded = dataclasses.replace(engine_flags.load_model(FLAGS.model),
                                 tokenizer=tokenizer)
  except ValueError as e:
    _fail(str(e))
  logging.info("%d sessions, %d turns on %s (%s)", len(sessions),
               sum(len(s.turns) for s in sessions), loaded.config.name,
               jax.devices()[0].device_kind)

  root = FLAGS.cold_tier or tempfile.mkdtemp(prefix="bench_online_")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, WORK_DIR_MARK), "w", encoding="utf-8") as f:
    f.write("launch.bench_online replaces seed/ and runs/ here on each run\n")
  seed_dir = os.path.join(root, "seed")
  for d in (seed_dir, os.path.join(root, "runs")):
    if os.path.exists(d):
      shutil.rmtree(d)
  runs, seed_stats, interrupted = [], None, False
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  try:
    seed_stats = _seed(loaded, cache, engine_cfg, sessions, seed_dir)
    for policy in policies if FLAGS.warm_runs else ():
      print(f"warm run (untimed, discarded): {policy} @ {rates[0]:g} "
            "agents/s", flush=True)
      _run(loaded, cache, engine_cfg, mesh, policy, rates[0], sessions, slo,
           seed_dir, os.path.join(root, "runs", f"warm-{policy}"), bound)
    for rate in rates:  # policies side by side at each rate
      for policy in policies:
        run_dir = _run_dir(root, policy, rate)
        run = _run(loaded, cache, engine_cfg, mesh, policy, rate, sessions,
                   slo, seed_dir, run_dir, bound)
        runs.append(run)
        v = run["slo"]
        print(f"{policy} @ {rate:g} agents/s: {v['turns']} turns in "
              f"{run['summary']['wall_s']:.1f} s, p{slo.percentile} TTFT "
              f"{v['ttft_s'][f'p{slo.percentile}'] or math.nan:.3g} s, "
              f"{'pass' if v['passed'] else 'fail'}", flush=True)
  except KeyboardInterrupt:  # Ctrl-C: report the finished runs, exit 130
    interrupted = True
  finally:
    if not FLAGS.cold_tier:
      shutil.rmtree(root, ignore_errors=True)

  sustained = {p: sustained_rate([r["slo"] for r in runs if r["policy"] == p])
               for p in policies}
  trace = workload_flags.describe()
  report = {
      "complete": not interrupted,
      "agents_per_s_within_slo": sustained,
      "slo": dataclasses.asdict(slo),
      "runs": runs,
      "seed_store": seed_stats,
      **metrics.run_environment(),
      "config": {
          "model": loaded.config.name, "model_source": FLAGS.model or "embedded",
          "tokenizer": FLAGS.tokenizer, "trace": trace, "sessions": len(sessions), "reply": FLAGS.reply,
          "max_new_tokens": FLAGS.max_new_tokens,
          "honor_gaps": FLAGS.honor_gaps, "rates": rates,
          "arrival": FLAGS.arrival, "seed": FLAGS.seed,
          "policies": policies, "mesh": FLAGS.mesh, "tp": FLAGS.tp,
          "storage_nic_gbps": FLAGS.storage_nic_gbps,
          "seed_store": FLAGS.seed_store,
          "sample_every_s": FLAGS.sample_every_s, "warmup": FLAGS.warmup,
          "warm_runs": FLAGS.warm_runs,
          "limit_sessions": FLAGS.limit_sessions,
          "prefill_keeps_prefix": FLAGS.prefill_keeps_prefix,
          "cache": to_dict(cache), "engine": to_dict(engine_cfg),
          "cold_tier": to_dict(_cold_config(root)),
      },
  }
  print(online_report.format_runs_table(runs, slo.percentile))
  print(online_report.format_headline(sustained, slo.ttft_s, slo.percentile))
  outputs.write_json(report, FLAGS.report)
  print(f"report: {FLAGS.report}")
  if FLAGS.plot and not runs:
    print(f"plot: not drawn, no run finished ({FLAGS.plot})")
  elif FLAGS.plot:
    online_report.plot_online(runs, FLAGS.plot, slo_ttft_s=slo.ttft_s,
                              percentile=slo.percentile,
                              title=f"bench_online {trace} on {FLAGS.mesh}")
    print(f"plot: {FLAGS.plot}")
  if interrupted:
    print(f"interrupted after {len(runs)} of {len(rates) * len(policies)} "
          "runs: the report holds those (complete: false)", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  define_flags()
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "bench_online"))
