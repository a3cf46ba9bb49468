"""The seeds' block-importance score, the hot set it picks, and the study
that measures it (driven here by a fake probe with a known attention)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from dualpath_jax.cache import importance_study as study
from dualpath_jax.cache.token_importance import (BlockImportance,
                                                 ImportanceWeights,
                                                 blocks_for_mass,
                                                 budget_blocks, select_hot)


def test_select_hot_keeps_the_newest_block_and_the_top_scores():
  scores = np.array([0.9, 0.1, 0.5, 0.7, 0.0])
  np.testing.assert_array_equal(select_hot(scores, 1), [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(select_hot(scores, 3), [1, 0, 0, 1, 1])
  np.testing.assert_array_equal(select_hot(scores, 99), [1] * 5)
  assert select_hot(scores, 0).sum() == 1  # clipped up to the newest block
  # ties go to the newer block
  np.testing.assert_array_equal(select_hot(np.zeros(4), 2), [0, 0, 1, 1])


def test_select_hot_on_random_scores_matches_a_sort(np_rng):
  for _ in range(20):
    n = int(np_rng.integers(2, 40))
    scores = np_rng.random(n)
    budget = int(np_rng.integers(1, n + 1))
    hot = select_hot(scores, budget)
    assert hot.sum() == budget and hot[-1]
    rest = np.sort(scores[:-1])[::-1]
    chosen = np.sort(scores[:-1][hot[:-1]])[::-1]
    np.testing.assert_allclose(chosen, rest[:budget - 1])


def test_budget_and_concentration():
  assert budget_blocks(0.12, 100) == 12
  assert budget_blocks(0.01, 10) == 1
  assert budget_blocks(1.0, 7) == 7
  for bad in (0.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="hot fraction"):
      budget_blocks(bad, 10)
  mass = np.array([0.05, 0.6, 0.05, 0.3])
  assert blocks_for_mass(mass, 0.5) == 1
  assert blocks_for_mass(mass, 0.9) == 2
  assert blocks_for_mass(mass, 0.95) == 3
  assert blocks_for_mass(mass, 1.0) == 4
  assert blocks_for_mass(np.zeros(3), 0.9) == 0


def test_block_importance_signals():
  imp = BlockImportance(4, attention_decay=0.5, recency_steps=1.0,
                        position_blocks=1.0)
  s = imp.signals()
  assert not s["attention"].any() and not s["recency"].any()
  np.testing.assert_allclose(s["position"], np.exp(-np.arange(4)[::-1]))
  imp.observe(np.array([0.6, 0.0, 0.1, 0.3]))  # fair share 1/3 of 1.0
  imp.observe(np.array([0.0, 0.0, 0.2, 0.8]))  # fair share 0.5
  s = imp.signals()
  # EMA: block 0 = 0.5 * 0.5 * 0.6 = 0.15, block 2 = 0.025 + 0.1,
  # block 3 = 0.5 * 0.5 * 0.3 + 0.5 * 0.8 = 0.475 (the maximum)
  np.testing.assert_allclose(s["attention"] * 0.475, [0.15, 0, 0.125, 0.475])
  # block 0 last had its fair share at step 0, block 3 at step 1, now step 2
  np.testing.assert_allclose(s["recency"], [np.exp(-2), 0, 0, np.exp(-1)])
  w = ImportanceWeights(recency=2.0, attention=0.0, position=1.0)
  imp.weights = w
  np.testing.assert_allclose(imp.scores("seed_score"),
                             2 * s["recency"] + s["position"])
  np.testing.assert_array_equal(imp.scores("recent"), s["position"])
  sink = imp.scores("sink_recent")
  assert sink[0] == np.inf
  np.testing.assert_array_equal(sink[1:], s["position"][1:])
  np.testing.assert_array_equal(select_hot(sink, 2), [1, 0, 0, 1])
  with pytest.raises(ValueError, match="unknown policy"):
    imp.scores("lru")
  imp.grow(6)
  assert imp.signals()["attention"].shape == (6,)
  assert imp.signals()["recency"][4:].sum() == 0
  with pytest.raises(ValueError, match="do not shrink"):
    imp.grow(5)
  with pytest.raises(ValueError, match="finite and >= 0"):
    imp.observe(np.array([0, 0, 0, 0, 0, -1.0]))
  with pytest.raises(ValueError, match=r"mass must be \[6\]"):
    imp.observe(np.ones(4))


def test_bad_weights_and_configs_are_refused():
  with pytest.raises(ValueError, match="importance weights"):
    ImportanceWeights(0, 0, 0)
  with pytest.raises(ValueError, match="importance weights"):
    ImportanceWeights(-1, 1, 1)
  with pytest.raises(ValueError, match="policies must be among"):
    study.StudyConfig(policies=("lru",))
  with pytest.raises(ValueError, match="repeat"):
    study.StudyConfig(policies=("recent", "recent"))
  with pytest.raises(ValueError, match="hot fractions"):
    study.StudyConfig(hot_fractions=(0.0,))
  with pytest.raises(ValueError, match="hot fractions repeat"):
    study.StudyConfig(hot_fractions=(0.12, 0.12))
  with pytest.raises(ValueError, match="decode_steps"):
    study.StudyConfig(decode_steps=0)


@dataclasses.dataclass
class _Out:
  logits: np.ndarray
  block_mass: np.ndarray
  self_mass: np.ndarray


class _FakeProbe:
  """One layer, one head. Exact attention: 0.5 on block 0 (a sink), 0.4 on
  the block before the newest, 0.1 on the token itself. A row reads what
  its mask allows (renormalised); its argmax is the exact one (1) only if
  it read both heavy blocks."""

  block_size = 4
  num_blocks = 16

  def __init__(self, vocab=5):
    self.vocab = vocab
    self.length = 0
    self.masks_seen = []

  def _exact(self, n_blocks):
    mass = np.zeros(self.num_blocks)
    mass[0] += 0.5
    mass[n_blocks - 2] += 0.4
    return mass

  def prefill(self, tokens):
    self.length = len(tokens)
    n = self.length // self.block_size + 1
    prompt = np.tile(self._exact(n) / 0.9, (len(tokens), 1))
    logits = np.eye(self.vocab)[1] * 5.0
    return logits, prompt

  def decode(self, token, masks):
    self.masks_seen.append(masks.copy())
    n = self.length // self.block_size + 1
    exact = self._exact(n)
    rows = len(masks)
    mass = np.zeros((rows, 1, 1, self.num_blocks))
    self_mass = np.zeros((rows, 1, 1))
    logits = np.zeros((rows, self.vocab))
    for r, m in enumerate(masks):
      seen = exact * m
      total = seen.sum() + 0.1
      mass[r, 0, 0] = seen / total
      self_mass[r] = 0.1 / total
      full = m[0] and m[n - 2]
      logits[r] = np.eye(self.vocab)[1 if full else 2] * 5.0
    self.length += 1
    return _Out(logits, mass, self_mass)


def test_study_on_a_known_attention():
  # Prompt of 21 tokens, 3 steps: 6 blocks at every step; 0.5 -> 3 hot
  # blocks, 0.17 -> 1 (only the newest).
  cfg = study.StudyConfig(policies=("recent", "sink_recent", "attention",
                                    "seed_score"),
                          hot_fractions=(0.17, 0.5), decode_steps=3)
  probe = _FakeProbe()
  result = study.study_sequence(probe, list(range(21)), cfg)
  assert result["steps"] == 3 and result["final_blocks"] == 6
  summary = study.summarize(study.merge_results([result]), cfg)
  rows = {(r["policy"], r["hot_fraction"]): r for r in summary["variants"]}
  # Only the newest block (no cached mass there): the own token's 0.1.
  for policy in cfg.policies:
    r = rows[(policy, 0.17)]
    assert r["mean_hot_blocks"] == 1
    assert r["mass_hit"] == pytest.approx(0.1)
    assert r["needed_hit"] == 0 and r["top1_agreement"] == 0
    assert r["kl_nats"] > 1
  # The heavy hitters: the attention score finds the sink, the window does not.
  att = rows[("attention", 0.5)]
  assert att["mass_hit"] == pytest.approx(1.0)
  assert att["needed_hit"] == 1 and att["top1_agreement"] == 1
  assert att["kl_nats"] == pytest.approx(0, abs=1e-12)
  recent = rows[("recent", 0.5)]
  assert recent["mass_hit"] == pytest.approx(0.5)  # 0.4 + own 0.1
  assert recent["needed_hit"] == 0.5 and recent["top1_agreement"] == 0
  assert rows[("seed_score", 0.5)]["mass_hit"] == pytest.approx(1.0)
  # The sink and the window: block 0 and the two newest.
  assert rows[("sink_recent", 0.5)]["mass_hit"] == pytest.approx(1.0)
  oracle = {o["hot_fraction"]: o["mass_hit"] for o in summary["oracle"]}
  assert oracle == pytest.approx({0.17: 0.1, 0.5: 1.0})
  # one layer, one head: the per-head oracle is the block oracle
  assert [o["per_head_mass_hit"] for o in summary["oracle"]] == pytest.approx(
      [0.1, 1.0])
  c = summary["concentration"]
  assert c["blocks_for_50pct"] == pytest.approx(1 / 6)
  assert c["blocks_for_90pct"] == pytest.approx(2 / 6)
  assert c["own_token_mass"] == pytest.approx(0.1)
  # Row 0 reads everything; each row has its budget of blocks.
  for masks in probe.masks_seen:
    assert masks[0].all()
    assert [m.sum() for m in masks[1:]] == [1, 3] * 4


class _FakeFreeProbe(_FakeProbe):
  """`_FakeProbe` with free-running rows: a row's next token is 1 if it
  read both heavy blocks, else 2, whatever it fed. The exact model puts
  0.9 on token 1 everywhere and shares the rest evenly."""

  def prefill(self, tokens):
    self.prompt_length = len(tokens)
    self.free_masks = []
    return super().prefill(tokens)

  def start_free_rows(self, rows, steps):
    self.free_rows, self.free_steps, self.free_step = rows, steps, 0

  def decode_free(self, tokens, masks):
    assert len(tokens) == len(masks) == self.free_rows
    assert self.free_step < self.free_steps
    self.free_masks.append(masks.copy())
    saved = self.length
    self.length = self.prompt_length + self.free_step
    out = self.decode(0, masks)
    self.length = saved
    self.free_step += 1
    return out

  def score(self, tokens):
    self.scored = getattr(self, "scored", 0) + 1
    made = np.asarray(tokens[1:])
    logp = np.where(made == 1, np.log(0.9), np.log(0.1 / (self.vocab - 1)))
    return types.SimpleNamespace(logprobs=logp,
                                 greedy=np.ones(len(made), int))


def test_free_running_on_a_known_attention():
  """The window misses the sink and goes its own way from the first step;
  the sink + window row stays on the exact row's tokens throughout."""
  cfg = study.StudyConfig(policies=("recent", "sink_recent"),
                          hot_fractions=(0.5,), decode_steps=3,
                          free_running=True)
  probe = _FakeFreeProbe()
  result = study.study_sequence(probe, list(range(21)), cfg)
  free = result["free_running"]
  assert free["tokens"] == [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1]]
  assert probe.scored == 2  # the two rows with the same tokens share one
  assert len(probe.free_masks) == 3
  for masks in probe.free_masks:  # 6 blocks at each of the 3 steps
    assert masks[0].all()
    np.testing.assert_array_equal(masks[1, :6], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(masks[2, :6], [1, 0, 0, 0, 1, 1])
  summary = study.summarize(study.merge_results([result, result]), cfg)
  fr = summary["free_running"]
  assert fr["turns"] == 2
  assert fr["exact"]["tokens"] == 6 and fr["exact"]["matched_tokens"] == 3
  assert fr["exact"]["identical_turns"] == 1 and fr["exact"]["exact_pick"] == 1
  assert fr["exact"]["nll_per_token"] == pytest.approx(-np.log(0.9))
  rows = {r["policy"]: r for r in fr["variants"]}
  assert rows["recent"]["matched_tokens"] == 0
  assert rows["recent"]["identical_turns"] == 0
  assert rows["recent"]["exact_pick"] == 0
  assert rows["recent"]["nll_excess"] == pytest.approx(
      np.log(0.9) - np.log(0.025))
  assert rows["recent"]["mean_hot_blocks"] == 3
  assert rows["sink_recent"]["identical_turns"] == 1
  assert rows["sink_recent"]["nll_excess"] == pytest.approx(0)


@pytest.mark.parametrize("prompt_len", [20, 21, 23])
def test_free_running_keeps_the_newest_cached_block_hot(prompt_len):
  """Across block boundaries (4-token blocks, 6 steps): at step s the
  cached tokens are the prompt's and s generated ones, the newest of them
  in block (prompt_len + s - 1) // 4, which every row reads; no row reads
  a block past it (the fed token itself starts or joins it)."""
  cfg = study.StudyConfig(policies=("recent", "attention"),
                          hot_fractions=(0.1, 0.5), decode_steps=6,
                          free_running=True)
  probe = _FakeFreeProbe()
  study.study_sequence(probe, list(range(prompt_len)), cfg)
  assert len(probe.free_masks) == 6
  for step, masks in enumerate(probe.free_masks):
    newest = (prompt_len + step - 1) // 4
    assert masks[:, newest].all(), (step, masks)
    assert not masks[1:, newest + 1:].any(), (step, masks)
    assert [m.sum() for m in masks[1:]] == [
        budget_blocks(f, newest + 1) for f in (0.1, 0.5)] * 2


def test_merge_free_adds_merged_turns():
  cfg = study.StudyConfig(policies=("recent",), hot_fractions=(0.5,),
                          decode_steps=3, free_running=True)
  one = study.study_sequence(_FakeFreeProbe(), list(range(21)), cfg)
  two = study.merge_free([one["free_running"], one["free_running"]])
  three = study.merge_free([two, one["free_running"]])
  assert three["turns"] == 3
  row = study.summarize_free(three, cfg)["exact"]
  assert row["identical_turns"] == 1 and row["matched_tokens"] == 3


def test_free_running_rows_stop_on_their_own():
  """A row stops at its own stop token; the others go on. A turn whose
  first token is a stop token has no free-running figures."""
  cfg = study.StudyConfig(policies=("recent",), hot_fractions=(0.5,),
                          decode_steps=3, free_running=True)
  result = study.study_sequence(_FakeFreeProbe(), list(range(21)), cfg,
                                stop_ids=(2,))
  assert result["free_running"]["tokens"] == [[1, 1, 1, 1], [1, 2]]
  row = study.summarize(study.merge_results([result]), cfg)[
      "free_running"]["variants"][0]
  assert row["tokens"] == 1 and row["matched_tokens"] == 0
  stopped = study.study_sequence(_FakeFreeProbe(), list(range(21)), cfg,
                                 stop_ids=(1,))
  assert stopped["free_running"] is None
  assert study.merge_free([stopped["free_running"]]) is None


def test_study_stops_at_a_stop_token_and_refuses_an_empty_study():
  cfg = study.StudyConfig(policies=("recent",), hot_fractions=(0.5,),
                          decode_steps=4)
  result = study.study_sequence(_FakeProbe(), list(range(9)), cfg,
                                stop_ids=(1,))  # the first greedy token
  assert result["steps"] == 0
  with pytest.raises(ValueError, match="no decode step"):
    study.summarize(study.merge_results([result]), cfg)


def test_merge_adds_steps_and_sums():
  cfg = study.StudyConfig(policies=("attention",), hot_fractions=(0.5,),
                          decode_steps=2)
  a = study.study_sequence(_FakeProbe(), list(range(20)), cfg)
  b = study.study_sequence(_FakeProbe(), list(range(20)), cfg)
  merged = study.merge_results([a, b])
  assert merged["steps"] == 4
  one = study.summarize(study.merge_results([a]), cfg)
  two = study.summarize(merged, cfg)
  assert one["variants"] == two["variants"]


def test_prefill_study_on_a_known_attention():
  # 12 tokens, blocks of 2: a prefix of 7 tokens = 3 full blocks (the
  # engine caches only full ones), so rows 6.. are the new tokens.
  mass = np.zeros((12, 6))
  mass[6:, 0] = 0.3   # the sink
  mass[6:, 1] = 0.05
  mass[6:, 2] = 0.15  # the newest prefix block
  mass[6:, 3:] = 0.5 / 3  # the new tokens' own blocks: not the prefix's
  p = study.prefill_study(mass, 7, 2, fractions=(0.34, 0.67, 1.0))
  assert p["new_tokens"] == 6 and p["prefix_blocks"] == 3
  assert p["prefix_share"] == pytest.approx(0.5)
  assert p["blocks_for_90pct"] == pytest.approx(2 / 3)
  s = p["served"]  # 1, 2 and 3 of the 3 prefix blocks
  assert s["oracle"] == pytest.approx([0.6, 0.9, 1.0])
  assert s["recent"] == pytest.approx([0.3, 0.4, 1.0])
  assert s["sink_recent"] == pytest.approx([0.6, 0.9, 1.0])
  assert study.prefill_study(mass, 3, 2, (0.5,)) is None  # one full block
  assert study.prefill_study(mass, 12, 2, (0.5,)) is None  # nothing new


def test_study_reports_the_prefill_of_a_turn_with_a_prefix():
  cfg = study.StudyConfig(policies=("attention",), hot_fractions=(0.5, 1.0),
                          decode_steps=1)
  with_prefix = study.study_sequence(_FakeProbe(), list(range(20)), cfg,
                                     prefix_tokens=12)
  without = study.study_sequence(_FakeProbe(), list(range(20)), cfg)
  assert without["prefill"] is None
  # the fake's prompt rows put 5/9 on block 0 and 4/9 on block 4: the
  # prefix (blocks 0-2) gets 5/9, all of it on block 0
  p = with_prefix["prefill"]
  assert p["prefix_share"] == pytest.approx(5 / 9)
  assert p["served"]["oracle"] == pytest.approx([1.0, 1.0])
  summary = study.summarize(study.merge_results([with_prefix, without]), cfg)
  assert summary["prefill"]["turns"] == 1
  assert summary["prefill"]["served"][0]["oracle"] == pytest.approx(1.0)
  assert summary["prefill"]["served"][0]["recent"] == pytest.approx(0.0)


def test_the_newest_cached_block_is_hot_at_a_block_boundary(np_rng):
  """A prompt that fills its last block: the block forced hot is the one
  holding the newest cached tokens, not the empty one the next token
  starts (every row reads that token as itself anyway)."""
  # Here, not at the top: the rest of this file needs no JAX.
  # pylint: disable=g-import-not-at-top
  from dualpath_jax import config
  from dualpath_jax.model.attention_probe import AttentionProbe
  from test_model_mechanics import make_model

  class Recording(AttentionProbe):
    def __init__(self, *args, **kw):
      super().__init__(*args, **kw)
      self.masks_seen = []

    def decode(self, token, block_masks):
      self.masks_seen.append((self.length, np.array(block_masks)))
      return super().decode(token, block_masks)

  model = make_model(config.TINY, np_rng)
  probe = Recording(model, capacity=32, block_size=4, chunk=8)
  cfg = study.StudyConfig(policies=("recent",), hot_fractions=(0.1,),
                          decode_steps=1)  # one hot block
  result = study.study_sequence(probe, list(np_rng.integers(3, 200, 8)), cfg)
  (length, masks), = probe.masks_seen
  assert length == 8  # tokens 0-7: blocks 0 and 1, both full
  np.testing.assert_array_equal(masks[1, :3], [False, True, False])
  # the row read block 1: more than its own token's mass
  assert result["sums"]["mass_hit"][0] > result["sums"]["self_mass"] + 1e-3


def test_per_head_oracle_against_a_loop(np_rng):
  for _ in range(20):
    n = int(np_rng.integers(1, 30))
    exact, own = np_rng.random((2, 3, n)), np_rng.random((2, 3))
    budgets = [int(b) for b in np_rng.integers(1, n + 1, 4)]
    want = []
    for b in budgets:
      held = [exact[l, h, n - 1] + own[l, h]
              + sum(sorted(exact[l, h, :n - 1], reverse=True)[:b - 1])
              for l in range(2) for h in range(3)]
      want.append(np.mean(held))
    np.testing.assert_allclose(
        study._per_head_oracle_hits(exact, own, budgets), want)
