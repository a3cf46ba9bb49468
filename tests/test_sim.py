"""The cluster simulator: its cost model, workloads, event timeline, policies.

References are independent of the code under test: Llama-3-8B's published
parameter count, causal pairs counted one query at a time, timelines summed
by hand from the cost model's own (separately tested) prices, and the
NIC-bound burst whose answer is bytes over bandwidth.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from dualpath_jax.config import LLAMA3_8B, TINY
from dualpath_jax.metrics import summarize
from dualpath_jax.sim import (CostModel, GpuSpec, SimConfig, SimSession,
                             SimTurn, Simulator, sessions_from_trace,
                             simulate, synthetic_sessions)
from dualpath_jax.sim.cost_model import GPUS, get_gpu
from dualpath_jax.workload.trace import AgentSession, AgentTurn

# Round numbers so that a timeline can be summed by hand.
UNIT_GPU = GpuSpec("unit", bf16_tflops=1e-3, hbm_gb_s=1.0, hbm_gib=1.0)
FAST_GPU = GpuSpec("fast", bf16_tflops=1e12, hbm_gb_s=1e12, hbm_gib=1.0)


def _tiny_cost(gpu=UNIT_GPU, **kw) -> CostModel:
  kw.setdefault("block_size", 4)
  kw.setdefault("step_overhead_s", 0.0)
  return CostModel(TINY, gpu, **kw)


# ---------------------------------------------------------------- cost model
def test_llama3_8b_weights_match_its_published_parameter_count():
  cost = CostModel(LLAMA3_8B, GPUS["h100"])
  norms = LLAMA3_8B.num_layers * 2 * LLAMA3_8B.hidden_size + LLAMA3_8B.hidden_size
  # Meta-Llama-3-8B's safetensors hold 8,030,261,248 parameters.
  assert cost.weight_bytes // 2 + norms == 8_030_261_248
  # K and V of 32 layers x 8 heads x 128 dims in bf16.
  assert cost.kv_bytes_per_token == 131072
  assert cost.block_bytes == 64 * 131072


def test_pool_holds_hbm_minus_weights_and_reserve():
  cost = CostModel(LLAMA3_8B, GPUS["h200"], tp=2, activation_reserve=0.2)
  hbm = 2 * 141 * 2**30 * 0.8
  assert cost.pool_blocks == int((hbm - cost.weight_bytes) // cost.block_bytes)
  assert CostModel(LLAMA3_8B, GPUS["h200"], kv_pool_blocks=7).pool_blocks == 7
  # int8 KV halves a block, so about twice the blocks fit.
  int8 = CostModel(LLAMA3_8B, GPUS["h200"], tp=2, activation_reserve=0.2,
                   kv_bytes=1)
  assert int8.block_bytes * 2 == cost.block_bytes
  assert int8.pool_blocks in (2 * cost.pool_blocks, 2 * cost.pool_blocks + 1)


@pytest.mark.parametrize("new,past", [(1, 0), (7, 0), (5, 9), (16, 33)])
def test_attention_flops_count_causal_pairs_one_query_at_a_time(new, past):
  cost = _tiny_cost()
  pairs = sum(past + i + 1 for i in range(new))  # query i sees past + i + 1 keys
  per_pair = 4 * TINY.num_layers * TINY.num_heads * TINY.head_dim
  matmul = 2 * cost.layer_params * new + 2 * TINY.vocab_size * TINY.hidden_size
  assert cost.prefill_flops([(new, past)]) == pytest.approx(
      matmul + per_pair * pairs, rel=1e-12)
  assert cost.prefill_flops([(new, past), (0, 5)]) == cost.prefill_flops(
      [(new, past)])


def test_prefill_and_decode_seconds():
  cost = _tiny_cost(prefill_mfu=0.5, decode_bw_efficiency=0.25)
  flops = cost.prefill_flops([(10, 3), (4, 0)])
  assert cost.prefill_s([(10, 3), (4, 0)]) == pytest.approx(
      flops / (1e9 * 0.5))
  # Decode of a small batch is bound by reading weights + KV.
  contexts = [10, 20]
  read = cost.weight_bytes + 30 * cost.kv_bytes_per_token
  assert cost.decode_step_s(contexts) == pytest.approx(read / (1e9 * 0.25))
  assert cost.decode_step_s([]) == 0.0
  # A huge batch on a slow-FLOP part turns compute-bound.
  slow = _tiny_cost(GpuSpec("slow", 1e-9, 1e6, 1.0))
  flops = 2 * 2 * (slow.layer_params + slow.head_params) + 4 * TINY.num_layers * \
      TINY.num_heads * TINY.head_dim * 30
  assert slow.decode_step_s(contexts) == pytest.approx(flops / (1e3 * 0.5))
  assert cost.prefill_tokens_per_s() == pytest.approx(
      1e9 * 0.5 / (2 * cost.layer_params))
  with_overhead = _tiny_cost(step_overhead_s=0.25)
  assert with_overhead.decode_step_s([5]) == pytest.approx(
      _tiny_cost().decode_step_s([5]) + 0.25)


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 3}, "does not divide"),
    ({"tp": 0}, "tp must be"),
    ({"prefill_mfu": 0.0}, "prefill_mfu"),
    ({"decode_bw_efficiency": 1.5}, "decode_bw_efficiency"),
    ({"step_overhead_s": math.nan}, "step_overhead_s"),
    ({"activation_reserve": 1.0}, "activation_reserve"),
    ({"kv_pool_blocks": 0}, "kv_pool_blocks"),
    ({"gpu": GpuSpec("small", 1.0, 1.0, 0.001)}, "no room for one KV block"),
])
def test_cost_model_refuses_bad_settings(kwargs, match):
  args = {"model": LLAMA3_8B, "gpu": GPUS["h100"], **kwargs}
  with pytest.raises(ValueError, match=match):
    CostModel(**args)


def test_gpu_presets_and_bad_specs():
  assert get_gpu("h200").hbm_gib == 141.0
  with pytest.raises(ValueError, match="unknown GPU 'b200'"):
    get_gpu("b200")
  with pytest.raises(ValueError, match="hbm_gb_s"):
    GpuSpec("x", 1.0, math.inf, 1.0)


# ---------------------------------------------------------------- workloads
def test_session_context_and_stored_prefix():
  s = SimSession("a", (SimTurn(10, 3), SimTurn(5, 2, 0.5), SimTurn(7, 1)),
                 stored_tokens=9)
  assert [s.context_tokens(i) for i in range(3)] == [10, 18, 27]
  # Turn 0: 9 stored tokens are 2 full blocks of 4. Turn 1: turn 0 stored
  # its 10 prompt + 3 generated tokens but the last one's KV (12 = 3 blocks);
  # turn 2: 18 + 2 - 1 = 19 tokens, 4 full blocks.
  assert [s.hit_tokens(i, 4) for i in range(3)] == [8, 12, 16]
  # A whole stored first context still leaves one token to compute.
  whole = SimSession("b", (SimTurn(8, 1),), stored_tokens=100)
  assert whole.hit_tokens(0, 4) == 4


@pytest.mark.parametrize("build,match", [
    (lambda: SimTurn(-1, 1), "append_tokens"),
    (lambda: SimTurn(1, 0), "at least one token"),
    (lambda: SimTurn(1, 1, math.inf), "gap_s"),
    (lambda: SimSession("s", ()), "no turns"),
    (lambda: SimSession("s", (SimTurn(0, 1),)), "appends no tokens"),
    (lambda: SimSession("s", (SimTurn(1, 1),), stored_tokens=-1),
     "stored_tokens"),
    (lambda: synthetic_sessions(0), "num_sessions"),
    (lambda: synthetic_sessions(1, gap_s=-1.0), "gap_s"),
    (lambda: synthetic_sessions(1, first_tokens=1000, max_context=10),
     "smaller than session 0"),
])
def test_workload_refuses_bad_values(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_synthetic_sessions_are_seeded_and_respect_max_context():
  a = synthetic_sessions(6, 10, seed=3)
  assert a == synthetic_sessions(6, 10, seed=3)
  assert a != synthetic_sessions(6, 10, seed=4)
  assert all(len(s.turns) == 10 and s.turns[0].gap_s == 0 for s in a)
  firsts = [s.turns[0].append_tokens for s in a]
  assert all(16384 * 0.5 <= f <= 16384 * 1.5 for f in firsts)
  capped = synthetic_sessions(6, 40, max_context=30000, seed=3)
  for s in capped:
    last = len(s.turns) - 1
    assert s.context_tokens(last) + s.turns[last].output_tokens <= 30000
  assert any(len(s.turns) < 40 for s in capped)


def _agent(turns, system="sys") -> AgentSession:
  return AgentSession("t", system, turns)


def test_sessions_from_trace_counts_text_or_takes_recorded_lengths():
  counted, how = sessions_from_trace([_agent([
      AgentTurn(0, [{"role": "user", "content": "abcd"}],
                assistant_text="xy", output_tokens=0),
      AgentTurn(1, [{"role": "user", "content": "ab"},
                    {"role": "user", "content": "c"}], output_tokens=5,
                pre_gap_ms=250.0)])], count_tokens=len)
  # 3 system + 4 user chars, each message + 4 template tokens.
  assert counted[0].turns == (SimTurn(3 + 4 + 4 + 4, 2, 0.0),
                              SimTurn(2 + 4 + 1 + 4, 5, 0.25))
  assert how == {"sessions_with_recorded_input_tokens": 0,
                 "sessions_counted_by_tokenizer": 1}
  recorded, how = sessions_from_trace([_agent([
      AgentTurn(0, [], output_tokens=10, input_tokens=100),
      AgentTurn(1, [], output_tokens=20, input_tokens=150)])],
                                      count_tokens=len)
  assert [t.append_tokens for t in recorded[0].turns] == [100, 40]
  assert how["sessions_with_recorded_input_tokens"] == 1
  with pytest.raises(ValueError, match="smaller than the context before"):
    sessions_from_trace([_agent([
        AgentTurn(0, [], output_tokens=10, input_tokens=100),
        AgentTurn(1, [], output_tokens=20, input_tokens=105)])], len)


# ---------------------------------------------------------------- simulator
def test_two_turn_timeline_matches_a_hand_sum():
  cost = _tiny_cost()
  nic = 1e9  # bytes/s: storage_nic_gbps=8
  config = SimConfig(1, 1, storage_nic_gbps=8.0, collective_gb_s=math.inf,
                     handoff_gb_s=math.inf)
  session = SimSession("s", (SimTurn(10, 3), SimTurn(5, 2, 0.5)))
  result = simulate(cost, config, "single_path", [session])
  r0, r1 = result.records
  # Turn 0: nothing stored; prefill 10 tokens, then 2 decode steps.
  t = cost.prefill_s([(10, 0)])
  assert r0.first_token_s == pytest.approx(t, rel=1e-12)
  t += cost.decode_step_s([11]) + cost.decode_step_s([12])
  assert r0.finish_s == pytest.approx(t, rel=1e-12)
  # Turn 1 arrives after the tool's 0.5 s; loads 3 blocks over the PE NIC,
  # prefills 6 tokens over 12 stored ones, decodes 1 step.
  arrival = t + 0.5
  assert r1.arrival_s == pytest.approx(arrival, rel=1e-12)
  assert (r1.prompt_tokens, r1.cached_prompt_tokens) == (18, 12)
  first = arrival + 3 * cost.block_bytes / nic + cost.prefill_s([(6, 12)])
  assert r1.first_token_s == pytest.approx(first, rel=1e-12)
  assert r1.finish_s == pytest.approx(first + cost.decode_step_s([19]),
                                      rel=1e-12)
  assert result.paths["PE_READ"] == 3 and result.paths["DE_READ"] == 0
  assert result.engines["P0"]["nic_bytes"] == 3 * cost.block_bytes
  assert result.engines["D0"]["nic_bytes"] == 0
  assert result.makespan_s == pytest.approx(r1.finish_s, rel=1e-12)
  # Stored after each turn: the full blocks of prompt + output, less the
  # blocks it loaded: 3, then (18 + 2 - 1) // 4 - 3 = 1.
  assert result.written_bytes == 4 * cost.block_bytes


def test_handoff_and_hop_links_are_charged():
  cost = _tiny_cost(FAST_GPU)
  config = SimConfig(1, 1, storage_nic_gbps=math.inf, collective_gb_s=1.0,
                     handoff_gb_s=2.0)
  session = SimSession("s", (SimTurn(10, 1),))
  (r,) = simulate(cost, config, "single_path", [session]).records
  handoff = 3 * cost.block_bytes / 2e9  # 10 tokens fill 3 blocks of 4
  # One generated token: the turn ends when its KV is on the decode engine.
  assert r.finish_s - r.first_token_s == pytest.approx(handoff, rel=1e-9)


def _burst(n_turns: int, blocks: int, bs: int = 4) -> list[SimSession]:
  """Turns whose context is stored but for one token, all at t=0."""
  return [SimSession(f"s{i}", (SimTurn(blocks * bs + 1, 1),),
                     stored_tokens=blocks * bs) for i in range(n_turns)]


def test_storage_bound_burst_dualpath_uses_all_three_nics():
  cost = _tiny_cost(FAST_GPU)
  config = SimConfig(1, 2, storage_nic_gbps=8.0, collective_gb_s=math.inf,
                     handoff_gb_s=math.inf)
  sessions = _burst(30, 12)
  by_policy = {p: simulate(cost, config, p, sessions)
               for p in ("single_path", "dualpath", "oracle")}
  total = 30 * 12 * cost.block_bytes
  single = by_policy["single_path"]
  assert single.makespan_s == pytest.approx(total / 1e9, rel=1e-3)
  dual = by_policy["dualpath"]
  assert dual.makespan_s == pytest.approx(total / 3e9, rel=0.02)
  nic = [dual.engines[e]["nic_bytes"] for e in ("P0", "D0", "D1")]
  assert sum(nic) == total
  assert max(nic) - min(nic) <= 12 * cost.block_bytes  # within one turn
  assert by_policy["oracle"].makespan_s < dual.makespan_s / 100
  assert all(e["nic_bytes"] == 0 for e in by_policy["oracle"].engines.values())


def test_unlimited_nics_make_every_policy_the_same():
  cost = CostModel(LLAMA3_8B, GPUS["h100"])
  config = SimConfig(2, 2, storage_nic_gbps=math.inf)
  sessions = synthetic_sessions(8, 6, seed=1)
  runs = [simulate(cost, config, p, sessions)
          for p in ("single_path", "dualpath", "oracle")]
  assert runs[0].paths["DE_READ"] == runs[1].paths["DE_READ"] == 0
  for other in runs[1:]:
    assert [r.finish_s for r in other.records] == [
        r.finish_s for r in runs[0].records]


def test_nic_bound_cluster_dualpath_near_oracle_and_well_ahead_of_single_path():
  cost = CostModel(LLAMA3_8B, GPUS["h200"])
  config = SimConfig(1, 4, storage_nic_gbps=100.0)
  sessions = synthetic_sessions(24, 24, seed=2)
  jct = {p: simulate(cost, config, p, sessions).makespan_s
         for p in ("single_path", "dualpath", "oracle")}
  assert jct["single_path"] / jct["dualpath"] > 1.5
  assert jct["dualpath"] <= jct["oracle"] * 1.1
  assert jct["oracle"] <= jct["dualpath"] * 1.001


def test_every_turn_ends_in_order_and_bytes_are_conserved():
  cost = CostModel(LLAMA3_8B, GPUS["h100"], kv_pool_blocks=2500)
  config = SimConfig(2, 3, storage_nic_gbps=50.0, max_decode_batch=4,
                     max_prefill_turns=2)
  sessions = synthetic_sessions(12, 8, first_tokens=30000, seed=5,
                                max_context=150000)
  result = simulate(cost, config, "dualpath", sessions)
  assert len(result.records) == sum(len(s.turns) for s in sessions)
  by_session = {}
  for r in result.records:
    by_session.setdefault(r.session_id, []).append(r)
  for s in sessions:
    recs = sorted(by_session[s.session_id], key=lambda r: r.turn_index)
    assert [r.turn_index for r in recs] == list(range(len(s.turns)))
    for a, b in zip(recs, recs[1:]):
      assert b.arrival_s >= a.finish_s
    for r in recs:
      assert r.arrival_s <= r.first_token_s <= r.finish_s
  hit_blocks = sum(s.hit_tokens(i, cost.block_size) // cost.block_size
                   for s in sessions for i in range(len(s.turns)))
  assert result.paths["PE_READ"] + result.paths["DE_READ"] == hit_blocks
  nic_bytes = sum(e["nic_bytes"] for e in result.engines.values())
  assert nic_bytes == hit_blocks * cost.block_bytes
  # A small pool made turns wait for HBM, and none over-committed it.
  assert result.hbm_waits > 0
  for e in result.engines.values():
    assert 0 < e["peak_hbm_blocks"] <= e["hbm_blocks"] == 2500
  for turn in result.turns:
    assert turn["placed_s"] >= turn["arrival_s"]
    assert turn["load_done_s"] <= turn["prefill_start_s"]


def test_simulation_is_deterministic_and_online_starts_are_honoured():
  cost = CostModel(LLAMA3_8B, GPUS["h100"])
  config = SimConfig(1, 2)
  sessions = synthetic_sessions(6, 4, seed=7)
  starts = [0.0, 1.0, 2.5, 4.0, 9.0, 20.0]
  a = simulate(cost, config, "dualpath", sessions, starts)
  b = simulate(cost, config, "dualpath", sessions, starts)
  assert a.records == b.records and a.turns == b.turns
  first = {r.session_id: r.arrival_s for r in a.records if r.turn_index == 0}
  assert [first[s.session_id] for s in sessions] == starts
  summary = summarize(a.records, a.makespan_s)
  assert summary["turns"] == 24


def test_a_turn_no_engine_can_hold_is_refused_up_front():
  cost = _tiny_cost(kv_pool_blocks=3)
  with pytest.raises(ValueError, match="needs 4 KV blocks"):
    Simulator(cost, SimConfig(), "dualpath", [SimSession(
        "big", (SimTurn(13, 1),))])


@pytest.mark.parametrize("kwargs,match", [
    ({"policy": "fastest"}, "unknown scheduler policy"),
    ({"sessions": []}, "no sessions"),
    ({"start_s": [0.0, 1.0]}, "2 start times for 1 sessions"),
    ({"start_s": [math.nan]}, "finite"),
    ({"decode_cost": "other_block"}, "same blocks"),
])
def test_simulator_refuses_bad_arguments(kwargs, match):
  args = {"cost": _tiny_cost(), "config": SimConfig(), "policy": "dualpath",
          "sessions": [SimSession("s", (SimTurn(5, 1),))], **kwargs}
  if args.get("decode_cost") == "other_block":
    args["decode_cost"] = _tiny_cost(block_size=8)
  with pytest.raises(ValueError, match=match):
    Simulator(**args)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_prefill": 0}, "num_prefill"),
    ({"storage_nic_gbps": 0.0}, "storage_nic_gbps"),
    ({"collective_gb_s": math.nan}, "collective_gb_s"),
    ({"max_decode_batch": 1.5}, "max_decode_batch"),
])
def test_sim_config_refuses_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SimConfig(**kwargs)


@pytest.mark.parametrize("collective_gb_s", [5.0, 12.5, 50.0])
def test_dualpath_is_never_slower_than_single_path_with_a_slow_hop(
    collective_gb_s):
  """A hop slower than the storage NIC made dualpath 1.9x slower than
  single_path (the policy took the hop for a delay, not a bandwidth)."""
  cost = CostModel(LLAMA3_8B, GPUS["h100"])
  sessions = [SimSession(f"s{i}", (SimTurn(32768, 1),), stored_tokens=32768)
              for i in range(8)]
  config = SimConfig(1, 1, storage_nic_gbps=100.0,
                     collective_gb_s=collective_gb_s)
  single = simulate(cost, config, "single_path", sessions)
  dual = simulate(cost, config, "dualpath", sessions)
  assert dual.makespan_s <= single.makespan_s * 1.001
  for turn in dual.turns:  # the estimate now tracks what happened
    assert turn["estimated_first_token_s"] == pytest.approx(
        turn["first_token_s"], rel=0.1)


def test_a_first_turns_recorded_wait_does_not_delay_the_session():
  cost = _tiny_cost()
  session = SimSession("s", (SimTurn(10, 2, 100.0), SimTurn(5, 1, 0.25)))
  result = simulate(cost, SimConfig(), "dualpath", [session], [3.0])
  r0, r1 = result.records
  assert r0.arrival_s == 3.0
  assert r1.arrival_s == pytest.approx(r0.finish_s + 0.25)
  assert result.makespan_s == pytest.approx(r1.finish_s - 3.0)


def test_decode_engines_may_have_their_own_storage_nic():
  config = SimConfig(1, 1, storage_nic_gbps=8.0, decode_storage_nic_gbps=16.0)
  assert config.nic_bytes_per_s("prefill") == 1e9
  assert config.nic_bytes_per_s("decode") == 2e9
  with pytest.raises(ValueError, match="decode_storage_nic_gbps"):
    SimConfig(decode_storage_nic_gbps=0.0)


def test_hot_tier_serves_a_sessions_next_turn_over_the_host_link():
  cost = _tiny_cost(FAST_GPU)
  bb = cost.block_bytes
  session = SimSession("s", (SimTurn(40, 1), SimTurn(4, 1, 0.5)))
  # A hot tier of 100 blocks per prefill engine, a 10 GB/s host link (the
  # NICs: 1 GB/s each).
  config = SimConfig(2, 1, storage_nic_gbps=8.0, collective_gb_s=math.inf,
                     handoff_gb_s=math.inf, hot_tier_gb=100 * bb / 2**30,
                     hot_gb_s=10.0)
  result = simulate(cost, config, "dualpath", [session])
  first, second = result.turns
  assert second["hot_read_blocks"] == 10  # 40 prompt tokens: 10 full blocks
  assert second["pe_read_blocks"] == second["de_read_blocks"] == 0
  assert second["prefill_engine"] == first["prefill_engine"]
  assert second["load_done_s"] - second["placed_s"] == pytest.approx(
      10 * bb / 1e10, rel=1e-9)
  assert all(e["nic_bytes"] == 0 for e in result.engines.values())
  # Without a hot tier the same blocks cross a NIC.
  cold = simulate(cost, dataclasses.replace(config, hot_tier_gb=0.0),
                  "dualpath", [session])
  assert cold.paths["HOT"] == 0
  assert sum(e["nic_bytes"] for e in cold.engines.values()) == 10 * bb


def test_the_blocks_with_generated_tokens_join_the_prefill_engines_tier():
  """As in the runtime, a turn's end puts the blocks with its generated
  tokens into its prefill engine's hot tier: the next turn's whole hit
  (12 blocks: 40 prompt + 9 generated tokens, the last not yet written) is
  hot, none of it on a NIC."""
  cost = _tiny_cost(FAST_GPU)
  bb = cost.block_bytes
  session = SimSession("s", (SimTurn(40, 9), SimTurn(4, 1, 0.5)))
  config = SimConfig(1, 1, storage_nic_gbps=8.0, collective_gb_s=math.inf,
                     handoff_gb_s=math.inf, hot_tier_gb=100 * bb / 2**30)
  result = simulate(cost, config, "dualpath", [session])
  second = result.turns[1]
  assert second["hit_tokens"] == 48
  assert second["hot_read_blocks"] == 12
  assert all(e["nic_bytes"] == 0 for e in result.engines.values())


def test_a_small_hot_tier_keeps_each_sessions_shallowest_blocks():
  cost = _tiny_cost(FAST_GPU)
  sessions = [SimSession(f"s{i}", (SimTurn(40, 1), SimTurn(4, 1, 5.0)))
              for i in range(2)]
  # 12 blocks per engine for two sessions of 10: the first session's
  # deepest blocks go first, so a leading run of it stays.
  config = SimConfig(1, 1, hot_tier_gb=12 * cost.block_bytes / 2**30)
  result = simulate(cost, config, "single_path", sessions)
  hot = {t["session_id"]: t["hot_read_blocks"] for t in result.turns
         if t["turn_index"] == 1}
  assert hot == {"s0": 2, "s1": 10}
  with pytest.raises(ValueError, match="hot_tier_gb"):
    SimConfig(hot_tier_gb=-1.0)


def test_the_prefetcher_reads_an_away_sessions_evicted_blocks_back():
  """Two sessions of 10 blocks, a 12-block tier: the second's blocks push
  the first's out. With the runtime's prefetcher (pins up to 90% of the
  tier here), s1, predicted back after s0, is pinned once s0 has come
  back, and its 8 evicted blocks are read back during its tool wait on the
  two idle NICs (4 on the prefill engine's, 4 on the decode engine's):
  every second turn reads its whole prefix hot, none over a NIC after it
  arrives. Without it, 17 blocks cross the prefill engine's NIC."""
  cost = _tiny_cost(FAST_GPU)
  bb = cost.block_bytes
  sessions = [SimSession(f"s{i}", (SimTurn(40, 1), SimTurn(4, 1, 2.0 + i)))
              for i in range(2)]
  config = SimConfig(1, 1, storage_nic_gbps=8.0,
                     hot_tier_gb=12 * bb / 2**30, prefetch_blocks=4,
                     prefetch_pin_fraction=0.9)
  off = simulate(cost, dataclasses.replace(config, prefetch_blocks=0),
                 "single_path", sessions)
  assert off.prefetch is None
  assert off.paths["PE_READ"] == 17 and off.paths["HOT"] == 3
  on = simulate(cost, config, "single_path", sessions)
  second = {t["session_id"]: t for t in on.turns if t["turn_index"] == 1}
  for t in second.values():
    assert (t["hot_read_blocks"], t["pe_read_blocks"]) == (10, 0)
  assert on.prefetch == {"read_blocks": 8, "path1_blocks": 4,
                         "path2_blocks": 4, "used_blocks": 8,
                         "evicted_unused_blocks": 0, "unused_held_blocks": 0}
  # The prefetch bytes are NIC bytes: 4 blocks on each engine's NIC.
  assert {n: e["nic_bytes"] for n, e in on.engines.items()} == {
      "P0": 4 * bb, "D0": 4 * bb}
  with pytest.raises(ValueError, match="prefetch_blocks needs hot_tier_gb"):
    SimConfig(prefetch_blocks=4)
  with pytest.raises(ValueError, match="prefetch_pin_fraction"):
    SimConfig(hot_tier_gb=1.0, prefetch_pin_fraction=1.0)


def test_a_turn_that_waited_for_hbm_counts_the_hot_tier_again():
  """The hot blocks a turn reads are those its engine holds when it is
  placed, not when it arrived: a turn that waited for HBM while the tier
  lost its prefix reads it over a NIC. (The simulator counted them at
  arrival, and such turns read evicted blocks over the host link.)"""
  from dualpath_jax.scheduler.state import ReadPath
  cost = _tiny_cost(FAST_GPU)
  session = SimSession("s", (SimTurn(40, 1), SimTurn(4, 1, 0.5)))
  config = SimConfig(1, 1, hot_tier_gb=100 * cost.block_bytes / 2**30)
  sim = Simulator(cost, config, "single_path", [session])
  pe, de = sim.prefill[0], sim.decode[0]
  for k in range(10):  # the session's prefix is hot...
    pe.hot[("s", k)] = None
  de.used = de.capacity  # ... but the decode engine has no room
  sim._arrive(session, 1)
  assert len(sim._pending) == 1  # it waits
  pe.hot.clear()  # meanwhile the tier lost the prefix
  de.used = 0
  sim._place_pending()
  placement = pe.waiting[0].placement
  assert placement.count(ReadPath.HOT) == 0
  assert placement.count(ReadPath.PE_READ) == 10
