"""`python -m launch.agent_eval` end to end: the report, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launcher_interrupt import interrupt_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "dualpath_jax", "workload", "data", "sample_trace.jsonl")


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "launch.agent_eval", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_sample_trace_report(tmp_path):
  report = tmp_path / "r.json"
  plot = tmp_path / "r.png"
  proc = _run(f"--trace={SAMPLE}", "--limit_sessions=1", "--max_new_tokens=3",
              "--reply=teacher_forced", "--nowarmup", "--noprogress",
              f"--json={report}", f"--plot={plot}")  # --report's alias
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(report.read_text())
  for key in ("sessions", "turns", "prompt_tokens", "cached_prompt_tokens",
              "generated_tokens", "wall_s", "throughput_tok_s", "ttft_s",
              "tpot_s", "job_completion_s", "prefix_hit_ratio", "device",
              "jax_version", "config"):
    assert key in r, key
  assert r["sessions"] == 1 and r["turns"] == 3  # of the trace's 3 x 3
  assert r["generated_tokens"] == sum(t["generated_tokens"] for t in r["turns_detail"])
  assert r["prompt_tokens"] == sum(t["prompt_tokens"] for t in r["turns_detail"])
  assert 0 < r["cached_prompt_tokens"] < r["prompt_tokens"]  # later turns hit
  assert set(r["ttft_s"]) == {"p50", "p90", "p99"}
  assert r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] <= r["wall_s"]
  assert plot.read_bytes()[:4] == b"\x89PNG"
  assert "prefix_hit_ratio" in proc.stdout


@pytest.mark.parametrize("content,msg", [
    ("{broken", "invalid JSON"),
    ('{"session_id": "a", "turns": []}', "non-empty list"),
])
def test_bad_trace_exits_nonzero_with_reason(tmp_path, content, msg):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(content + "\n")
  proc = _run(f"--trace={bad}", f"--report={tmp_path / 'r.json'}", timeout=120)
  assert proc.returncode != 0
  assert msg in proc.stderr and "bad.jsonl:1" in proc.stderr
  assert not (tmp_path / "r.json").exists()


def test_missing_trace_exits_nonzero(tmp_path):
  proc = _run(f"--trace={tmp_path / 'nope.jsonl'}", timeout=120)
  assert proc.returncode != 0 and "not found" in proc.stderr


@pytest.mark.parametrize("args,msg", [
    # Python slicing took -1 as "all but the last", 0 as "all" (synthetic).
    (["--limit_sessions=0"], "--limit_sessions=0: 0 is not a positive"),
    (["--limit_sessions=-1"], "--limit_sessions=-1: -1 is not a positive"),
    (["--max_new_tokens=0"], "--max_new_tokens=0: 0 is not a positive"),
    (["--trace=/"], "/: not a file"),
    (["--model=random:tiny-test"],  # before the weights load
     "random weights have no tokenizer: add --tokenizer=bytes"),
    (["--tokenizer=words"], "--tokenizer"),
])
def test_bad_workload_flags_exit_nonzero(tmp_path, args, msg):
  proc = _run(*args, f"--report={tmp_path / 'r.json'}", timeout=120)
  assert proc.returncode != 0 and msg in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args,msg", [
    (["--mesh=1P2D"], "--cold_tier"),
    (["--mesh=banana", "--cold_tier=/tmp/x"], "--mesh"),
    (["--mesh=1P2D", "--cold_tier=/tmp/x", "--storage_nic_gbps=0"],
     "storage_nic_gbps must be > 0"),
])
def test_bad_mesh_flags_exit_nonzero(tmp_path, args, msg):
  proc = _run(f"--trace={SAMPLE}", *args, f"--report={tmp_path / 'r.json'}",
              timeout=120)
  assert proc.returncode != 0 and msg in proc.stderr
  assert not (tmp_path / "r.json").exists()


def test_mesh_run_loads_through_both_paths(tmp_path):
  """1P2D over a cold tier: a second run loads its prefixes via both paths
  (random weights, one token per byte: the paths' mechanics, in seconds)."""
  cold = tmp_path / "cold"
  common = ["--model=random:tiny-test", "--tokenizer=bytes",
            "--max_context=1024", "--sessions=2", "--turns=2",
            "--first_tool_lines=1", "--growth_lines=1", "--max_new_tokens=2",
            "--reply=teacher_forced", "--nowarmup", "--noprogress",
            f"--cold_tier={cold}", "--mesh=1P2D", "--storage_nic_gbps=2"]
  first = _run(*common, f"--report={tmp_path / 'a.json'}")
  assert first.returncode == 0, first.stderr[-3000:]
  second = _run(*common, "--policy=dualpath", f"--report={tmp_path / 'b.json'}")
  assert second.returncode == 0, second.stderr[-3000:]
  r = json.loads((tmp_path / "b.json").read_text())
  assert r["turns"] == 4 and not r["truncated_sessions"]
  assert r["config"]["tokenizer"] == "bytes"
  assert r["cold_tier"]["loaded_tokens"] > 0
  assert r["engine"]["path_blocks"]["path1"] > 0
  assert r["engine"]["path_blocks"]["path2"] > 0
  assert r["nics"] and r["config"]["mesh"] == "1P2D"
  # One CPU device: every engine on it, as the report says, and no warning
  # (a mesh wider than a host of several devices gets one: test_mesh.py).
  assert r["mesh_devices"] == {"P0": [0], "D0": [0], "D1": [0]}
  assert "share devices" not in second.stderr


def test_mesh_run_with_prefill_hot_tiers(tmp_path):
  """1P2D with a hot tier on the prefill engine, which keeps nothing in its
  pool: each session's second turn reads its first turn's prompt blocks
  from the hot tier, and the report and the by-tier line say so. Pageable
  memory here; --hot_tier_memory=pinned_host goes through this launcher in
  the prefetcher test below, and a pinned tier on a 1P2D cluster serves
  exact tokens in tests/test_cluster.py."""
  memory = "pageable"
  proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
              "--max_context=1024", "--sessions=2", "--turns=2",
              "--first_tool_lines=1", "--growth_lines=1",
              "--max_new_tokens=2", "--reply=teacher_forced", "--nowarmup",
              "--noprogress", f"--cold_tier={tmp_path / 'cold'}",
              "--mesh=1P2D", "--noprefill_keeps_prefix",
              "--hot_tier_gb=0.01", f"--hot_tier_memory={memory}",
              f"--report={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "r.json").read_text())
  hot = r["cold_tier"]["hot_tier"]
  assert hot["engines"] == 1 and hot["hits"] > 0
  assert hot["memory"] == r["config"]["hot_tier_memory"] == memory
  assert r["engine"]["path_blocks"]["hot"] == hot["hits"]
  by_tier = r["engine"]["cached_tokens_by_tier"]
  assert by_tier["hot"] == r["cold_tier"]["hot_loaded_tokens"] > 0
  assert f"hot tier {by_tier['hot']}" in proc.stdout
  assert r["config"]["hot_tier_gb"] == 0.01


def test_mesh_run_with_a_prefetcher(tmp_path):
  """1P2D, decode batches of one turn (so turns wait to be placed) and a
  hot tier of 78 blocks for 8 sessions of about 40: the prefetcher reads
  waiting turns' evicted prefixes back into the tier, the turns read them
  there, and the report and its printed line say so. In pinned_host
  memory: a pageable tier goes through this launcher on a mesh in the test
  above, and the cluster's prefetcher over a pageable tier is tested in
  process (tests/test_cluster_prefetch.py)."""
  memory = "pinned_host"
  proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
              "--max_context=1024", "--sessions=8", "--turns=3",
              "--first_tool_lines=1", "--growth_lines=1",
              "--max_new_tokens=2", "--reply=teacher_forced", "--nowarmup",
              "--noprogress", "--max_batch=1", f"--cold_tier={tmp_path / 'c'}",
              "--mesh=1P2D", "--noprefill_keeps_prefix",
              "--hot_tier_gb=0.0006", "--prefetch_blocks=2",
              f"--hot_tier_memory={memory}", f"--report={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "r.json").read_text())
  pf = r["cold_tier"]["prefetch"]
  assert pf["read_blocks"] > 0 and pf["used_blocks"] > 0
  assert pf["put_blocks"] == (pf["used_blocks"] + pf["unused_held_blocks"] +
                              pf["evicted_unused_blocks"])
  assert pf["batch_blocks"] == 2 and r["config"]["prefetch_blocks"] == 2
  assert (f"prefetch: {pf['read_blocks']} blocks read" in proc.stdout and
          f"{pf['used_blocks']} read by the turns they were for" in
          proc.stdout)


def test_one_engine_with_a_prefetcher(tmp_path):
  """One engine, batches of one turn (so turns queue), a pool of 64 blocks
  and a hot tier of 78 for 8 sessions of about 40: the prefetcher reads
  queued turns' evicted prefixes from the cold tier into the hot tier
  while the engine serves the turn ahead, the turns read them there, and
  the report and its printed line say so."""
  proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
              "--max_context=1024", "--sessions=8", "--turns=3",
              "--first_tool_lines=1", "--growth_lines=1",
              "--max_new_tokens=2", "--reply=teacher_forced", "--nowarmup",
              "--noprogress", "--max_batch=1", "--num_blocks=64",
              f"--cold_tier={tmp_path / 'c'}", "--hot_tier_gb=0.0006",
              "--prefetch_blocks=2", f"--report={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "r.json").read_text())
  pf = r["cold_tier"]["prefetch"]
  assert pf["read_blocks"] > 0 and pf["used_blocks"] > 0
  assert pf["path1_blocks"] == pf["read_blocks"]  # its one reader
  assert pf["put_blocks"] == (pf["used_blocks"] + pf["unused_held_blocks"] +
                              pf["evicted_unused_blocks"])
  assert r["config"]["mesh"] is None and r["config"]["prefetch_blocks"] == 2
  assert r["engine"]["cached_tokens_by_tier"]["hot"] > 0
  assert (f"prefetch: {pf['read_blocks']} blocks read, "
          f"{pf['used_blocks']} read by the turns they were for" in
          proc.stdout)


@pytest.mark.parametrize("reply", ["generate", "teacher_forced"])
def test_rollouts_hold_every_turns_tokens_reply_and_logprobs(tmp_path, reply):
  """--rollouts with --rollout_logprobs=2: one JSONL line per turn, whose
  token counts are the report's, whose reply is what the session's history
  got, and whose logprobs belong to the generated tokens (greedy: each is
  its step's most likely)."""
  from dualpath_jax.config import TINY
  from dualpath_jax.workload.byte_tokenizer import ByteChatTokenizer
  rollouts = tmp_path / "out" / "rollouts.jsonl"  # its folder is made
  proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
              "--max_context=1024", "--sessions=2", "--turns=3",
              "--first_tool_lines=1", "--growth_lines=1",
              "--max_new_tokens=4", f"--reply={reply}", "--nowarmup",
              "--noprogress", f"--rollouts={rollouts}",
              "--rollout_logprobs=2", f"--report={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "r.json").read_text())
  rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
  assert len(rows) == r["turns"] > 0
  # Every turn, unless a session was cut at max_context (teacher_forced's
  # recorded replies are long).
  assert r["turns"] == 6 or r["truncated_sessions"]
  assert r["config"]["rollout_logprobs"] == 2
  detail = {(t["session_id"], t["turn_index"]): t for t in r["turns_detail"]}
  tok = ByteChatTokenizer(TINY.vocab_size)  # random:tiny-test's
  for row in rows:
    t = detail[(row["session_id"], row["turn_index"])]
    assert len(row["generated_tokens"]) == t["generated_tokens"]
    assert len(row["prompt_tokens"]) == t["prompt_tokens"]
    assert row["cached_prompt_tokens"] == t["cached_prompt_tokens"]
    assert [e["token"] for e in row["logprobs"]] == row["generated_tokens"]
    for e in row["logprobs"]:
      top = e["top"]
      assert len(top) == 2 and top[0][1] >= top[1][1]
      assert top[0][0] == e["token"] and e["logprob"] == top[0][1] <= 0
    if reply == "generate":
      ids = row["generated_tokens"][:-1] if row["finish_reason"] == "eos" \
          else row["generated_tokens"]
      assert row["reply"] == tok.decode(ids)
  by_session = {}
  for row in rows:  # a turn's reply is in the next turn's prompt
    by_session.setdefault(row["session_id"], []).append(row)
  for turns in by_session.values():
    turns.sort(key=lambda row: row["turn_index"])
    for a, b in zip(turns, turns[1:]):
      context = a["prompt_tokens"] + tok.encode(a["reply"])
      assert b["prompt_tokens"][:len(context)] == context


def test_samples_per_turn_writes_a_group_of_rollouts_per_turn(tmp_path):
  """--samples_per_turn=3: three rollout lines per turn (samples 0-2, one
  prompt), prefilled once; the next turn's prompt holds sample 0's reply."""
  from dualpath_jax.config import TINY
  from dualpath_jax.workload.byte_tokenizer import ByteChatTokenizer
  rollouts = tmp_path / "rollouts.jsonl"
  proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
              "--max_context=1024", "--sessions=2", "--turns=2",
              "--first_tool_lines=1", "--growth_lines=1",
              "--max_new_tokens=4", "--nowarmup", "--noprogress",
              "--samples_per_turn=3", "--temperature=1.0", "--top_p=0.9",
              f"--rollouts={rollouts}", f"--report={tmp_path / 'r.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "r.json").read_text())
  rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
  assert len(rows) == r["samples"] == 12 and r["turns"] == 4
  assert r["config"]["samples_per_turn"] == 3
  assert r["config"]["temperature"] == 1.0 and r["config"]["top_p"] == 0.9
  assert r["engine"]["shared_prefill_tokens"] > 0
  groups = {}
  for row in rows:
    groups.setdefault((row["session_id"], row["turn_index"]), {})[
        row["sample"]] = row
  assert all(sorted(g) == [0, 1, 2] for g in groups.values())
  assert all(len({tuple(row["prompt_tokens"]) for row in g.values()}) == 1
             for g in groups.values())
  tok = ByteChatTokenizer(TINY.vocab_size)
  for sid in ("synthetic-0000", "synthetic-0001"):
    first, second = groups[(sid, 0)][0], groups[(sid, 1)][0]
    context = first["prompt_tokens"] + tok.encode(first["reply"])
    assert second["prompt_tokens"][:len(context)] == context


def test_workload_seed_keeps_the_prompts_while_seed_resamples(tmp_path):
  """--seed seeded the synthetic sessions' text too, so a new sampling
  seed meant new prompts; --workload_seed fixes them."""
  def rollouts(seed, *extra):
    path = tmp_path / f"r{seed}{len(extra)}.jsonl"
    proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
                "--sessions=1", "--turns=1", "--first_tool_lines=1",
                "--growth_lines=1", "--max_new_tokens=8", "--nowarmup",
                "--noprogress", "--temperature=1.0", f"--seed={seed}", *extra,
                f"--rollouts={path}", f"--report={tmp_path / 'r.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    return row["prompt_tokens"], row["generated_tokens"]
  (p1, g1), (p2, g2) = (rollouts(s, "--workload_seed=5") for s in (1, 2))
  assert p1 == p2 and g1 != g2
  # Without it --seed picks the text too: the synthetic workload of seed 2
  # is not workload seed 5's (the same generator the launcher calls).
  from dualpath_jax.workload import synthetic_agent_workload  # pylint: disable=g-import-not-at-top
  texts = [synthetic_agent_workload(num_sessions=1, turns_per_session=1,
                                    first_tool_lines=1, growth_lines=1,
                                    output_tokens=8, seed=seed)[0]
           for seed in (2, 5)]
  assert texts[0].turns[0].input_delta != texts[1].turns[0].input_delta


@pytest.mark.parametrize("args,msg", [
    (["--samples_per_turn=2"], "--samples_per_turn=2 needs --temperature > 0"),
    (["--samples_per_turn=2", "--temperature=0"], "needs --temperature > 0"),
    (["--top_p=0"], "--top_p must be in (0, 1]"),
    # it was ignored: greedy decoding
    (["--top_p=0.5"], "--top_p=0.5 needs --temperature > 0"),
    (["--samples_per_turn=0"], "samples_per_turn"),
])
def test_bad_sampling_flags_are_refused(tmp_path, args, msg):
  proc = _run(*args, f"--report={tmp_path / 'r.json'}", timeout=120)
  assert proc.returncode != 0
  assert msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert not (tmp_path / "r.json").exists()


def test_rollout_logprobs_without_rollouts_is_refused(tmp_path):
  proc = _run("--rollout_logprobs=1", f"--report={tmp_path / 'r.json'}",
              timeout=120)
  assert proc.returncode != 0
  assert "--rollout_logprobs needs --rollouts" in proc.stderr, proc.stderr
  assert not (tmp_path / "r.json").exists()


def test_hot_tiers_past_the_hosts_memory_are_refused(tmp_path):
  """--hot_tier_gb is each prefill engine's: two that together pass the
  host's available memory are refused before anything is allocated."""
  with open("/proc/meminfo", encoding="ascii") as f:
    avail = next(int(line.split()[1]) for line in f
                 if line.startswith("MemAvailable:")) * 1024
  each = 0.6 * avail / (1 << 30)  # one fits, two do not
  proc = _run(f"--trace={SAMPLE}", f"--cold_tier={tmp_path / 'c'}",
              "--mesh=2P1D", f"--hot_tier_gb={each:.2f}",
              f"--report={tmp_path / 'r.json'}", timeout=120)
  assert proc.returncode != 0
  assert "x 2 prefill engines is more than the" in proc.stderr, \
      proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "r.json").exists()


def test_ctrl_c_reports_the_finished_turns(tmp_path):
  """Ctrl-C mid-replay is an end, not a lost run: the report and plot of
  the turns finished so far, marked incomplete, and exit 130. The second
  turn waits on a 10-minute recorded tool gap (--honor_gaps), so the
  interrupt lands after exactly one finished turn."""
  trace = tmp_path / "t.jsonl"
  turn = {"input_delta": [{"role": "user", "content": "list the files"}],
          "output_tokens": 4}
  trace.write_text(json.dumps({"session_id": "s", "turns": [
      turn, {**turn, "pre_gap_ms": 600_000}]}) + "\n")
  report, plot = tmp_path / "r.json", tmp_path / "r.png"
  done = interrupt_after(
      ["launch.agent_eval", "--model=random:tiny-test", "--tokenizer=bytes",
       "--max_context=1024", f"--trace={trace}", "--honor_gaps",
       f"--report={report}", f"--plot={plot}"],
      "1/2", stream="stderr", cwd=ROOT)  # the progress bar: one turn done
  assert done.returncode == 130, done.stderr[-3000:]
  data = json.loads(report.read_text())
  assert data["complete"] is False and data["turns"] == 1
  assert [t["turn_index"] for t in data["turns_detail"]] == [0]
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "interrupted after 1 of 2 turns" in done.stderr
  assert "Traceback" not in done.stderr


def test_a_run_in_which_no_turn_fits_exits_nonzero_with_its_report(tmp_path):
  """Every session past --max_context at its first turn: a report of no
  turns used to end with exit status 0."""
  report = tmp_path / "r.json"
  proc = _run("--model=random:tiny-test", "--tokenizer=bytes",
              "--max_context=64", "--sessions=2", "--turns=2",
              "--max_new_tokens=4", "--nowarmup", "--noprogress",
              f"--report={report}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "agent_eval: no turn ran; 2 session(s) ended early" in proc.stderr
  assert "exceed max_context 64" in proc.stderr
  r = json.loads(report.read_text())
  assert r["turns"] == 0 and len(r["truncated_sessions"]) == 2
