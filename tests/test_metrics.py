"""Report numbers are computed from the records, percentiles are right."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dualpath_jax import metrics
from dualpath_jax import outputs
from dualpath_jax import buckets
from dualpath_jax.engine.sampling import sample


def _rec(sid, i, prompt, cached, gen, arrival, first, finish):
  return metrics.TurnRecord(sid, i, prompt, cached, gen, arrival, first, finish,
                            "length")


def test_percentiles_match_numpy():
  rng = np.random.default_rng(0)
  vals = rng.exponential(size=101).tolist()
  got = metrics.percentiles(vals)
  for p in (50, 90, 99):
    assert got[f"p{p}"] == pytest.approx(np.percentile(vals, p))
  assert metrics.percentiles([])["p50"] is None


def test_summary_from_records(tmp_path):
  recs = [_rec("a", 0, 100, 0, 10, 0.0, 1.0, 2.8),
          _rec("a", 1, 150, 96, 1, 3.0, 3.5, 3.5),
          _rec("b", 0, 100, 96, 5, 0.5, 1.5, 2.3)]
  s = metrics.summarize(recs, wall_s=4.0)
  assert s["sessions"] == 2 and s["turns"] == 3
  assert s["prompt_tokens"] == 350 and s["cached_prompt_tokens"] == 192
  assert s["generated_tokens"] == 16
  assert s["throughput_tok_s"] == pytest.approx((350 - 192 + 16) / 4.0)
  assert s["prefix_hit_ratio"] == pytest.approx(192 / 350)
  assert s["ttft_s"]["p50"] == pytest.approx(1.0)
  # TPOT ignores the 1-token turn: (2.8-1)/9 and (2.3-1.5)/4.
  assert s["tpot_s"]["p50"] == pytest.approx(
      ((2.8 - 1.0) / 9 + (2.3 - 1.5) / 4) / 2)
  assert s["job_completion_s"] == pytest.approx(3.5)
  assert s["session_completion_s"]["p50"] == pytest.approx((3.5 + 1.8) / 2)
  path = tmp_path / "r.json"
  outputs.write_json(s, str(path))
  assert json.loads(path.read_text())["turns"] == 3
  assert "ttft_s" in metrics.format_table(s)
  assert s["samples"] == 3


def test_samples_of_a_turn_count_once_as_a_turn():
  """With n samples a turn, `turns` counted every sample (12 for 2 x 2
  turns x 3): turns are (session, turn) pairs, samples the records."""
  recs = [dataclasses.replace(_rec(sid, t, 100, 0, 4, 0.0, 1.0, 2.0),
                              sample=k)
          for sid in ("a", "b") for t in (0, 1) for k in range(3)]
  s = metrics.summarize(recs[:-1], wall_s=3.0)  # b's last sample unfinished
  assert (s["sessions"], s["turns"], s["samples"]) == (2, 4, 11)
  assert s["generated_tokens"] == 44


def test_plot_writes_png(tmp_path):
  recs = [_rec("a", 0, 100, 0, 10, 0.0, 1.0, 2.8), _rec("b", 0, 90, 16, 3, 0, .5, 1)]
  path = tmp_path / "p.png"
  metrics.plot_turns(recs, str(path), title="t")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n,lo,hi,want", [(1, 16, 512, 16), (17, 16, 512, 32),
                                          (512, 16, 512, 512), (300, 8, 384, 384)])
def test_buckets(n, lo, hi, want):
  assert buckets.bucket(n, lo, hi) == want


def test_bucket_errors_and_sizes():
  with pytest.raises(ValueError):
    buckets.bucket(513, 16, 512)
  assert buckets.bucket_sizes(16, 512) == [16, 32, 64, 128, 256, 512]
  assert buckets.bucket_sizes(1, 6) == [1, 2, 4, 6]


def test_sampling_greedy_and_top_p():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32)
  assert (sample(logits, rng) == logits.argmax(-1)).all()
  # top_p tiny keeps only the argmax even when sampling.
  assert (sample(logits, rng, temperature=1.0, top_p=1e-6) == logits.argmax(-1)).all()
  draws = np.array([sample(logits[:1], rng, temperature=1.0)[0] for _ in range(300)])
  assert len(set(draws.tolist())) > 3
  with pytest.raises(ValueError):
    sample(logits, rng, temperature=-1)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.6, 1.0)])
def test_sampling_draws_follow_the_tempered_nucleus(temperature, top_p):
  """The draws' frequencies are softmax(logits / T) over the nucleus (the
  most likely tokens until their mass reaches top_p, the one crossing it
  included), renormalised: computed here token by token. 6,000 draws: a
  frequency's standard deviation is at most 0.0065; the bound is 0.03. Half
  or twice the temperature moves some token's probability by 0.09 or more."""
  logits = np.array([1.0, 2.0, -3.0, 1.5, 0.0, -1.0], np.float32)
  p = np.exp((logits - logits.max()) / temperature)
  p /= p.sum()
  want = np.zeros_like(p)
  mass = 0.0
  for token in np.argsort(-p, kind="stable"):
    want[token] = p[token]
    mass += p[token]
    if mass >= top_p:
      break
  want /= want.sum()
  draws = sample(np.tile(logits, (6000, 1)), np.random.default_rng(5),
                 temperature=temperature, top_p=top_p)
  freq = np.bincount(draws, minlength=len(logits)) / len(draws)
  np.testing.assert_allclose(freq, want, atol=0.03)
  assert not freq[want == 0].any()  # outside the nucleus: never drawn


def test_git_commit_names_the_checkout_or_the_override(monkeypatch):
  """Reports record the checkout's commit; a copied tree whose git metadata
  is stale (a device lease's) names it with DUALPATH_GIT_COMMIT."""
  import os
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"],
                        capture_output=True, text=True)
  monkeypatch.delenv("DUALPATH_GIT_COMMIT", raising=False)
  assert head.returncode == 0, head.stderr  # the suite runs in a checkout
  assert metrics.git_commit().startswith(head.stdout.strip())
  monkeypatch.setenv("DUALPATH_GIT_COMMIT", " abc1234 ")
  assert metrics.git_commit() == "abc1234"
  assert metrics.run_environment()["git_commit"] == "abc1234"
