"""How much of decode's attention a hot set of blocks serves, per policy.

The seeds claim that a hot tier of 12% of the cache, picked by a token-
importance score, serves 98% of attention (docs/hot_tier.md). This runs
one sequence's decode steps through an `AttentionProbe` with one exact row
and one row per (policy, hot fraction): each sparse row reads only the
blocks its own `BlockImportance` state picked before the step, and that
state learns only from the attention the row itself saw. Per step:

- mass hit: the share of the exact row's attention (averaged over layers
  and heads, its own token included) that lands in the row's hot blocks;
  the seeds' "hit rate", weighted by attention;
- needed hit: the share of the blocks that hold `needed_share` of that
  attention which the row had hot;
- top-1 agreement and KL(exact || row) of the next-token distributions:
  what reading only the hot blocks does to the model's output, this step
  (every row reads the exact K/V of the tokens before: the per-step error).

An oracle that knows this step's attention picks the heaviest blocks: the
ceiling of any score at that budget (mass hit only: it needs the step's
attention before the step). A second oracle picks them for each layer and
query head apart, as per-head sparse attention (Quest and the like) may;
a tier moves whole blocks, every layer's and head's at once, so that one
is a ceiling of finer schemes, not of a tier. Concentration (how few
blocks hold 50/90/99% of the attention) is the premise both rest on.

With `free_running`, each turn is then decoded a second time, each row
feeding its own greedy tokens from the same first one (the probe's
`decode_free`): a sparse row's errors build up, as they would in a
server that read only the hot blocks. Per row: how many tokens it
matched the exact row's before it first left them, whether it matched
them all, how often its token is the one exact attention would pick
after the row's own earlier tokens, and how likely the exact model finds
its continuation (mean negative log-likelihood a token, against the
exact row's own).

The turn's prefill is studied too, where the turn's cached prefix is
known (`prefix_tokens`): of the attention its new tokens pay to the
prefix's blocks, how much the heaviest blocks hold (an oracle that knows
the new tokens' attention before loading anything), the newest ones, or
block 0 and the newest. A load that skipped the other blocks would serve
only that much of it.

No JAX here: the probe is passed in (tests drive this with a fake one).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dualpath_jax.cache.token_importance import (POLICIES, BlockImportance,
                                                 ImportanceWeights,
                                                 blocks_for_mass,
                                                 budget_blocks, select_hot)

CONCENTRATION_SHARES = (0.5, 0.9, 0.99)
PREFILL_CHOICES = ("oracle", "recent", "sink_recent")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What one study compares; see the module docstring."""

  policies: tuple[str, ...] = POLICIES
  hot_fractions: tuple[float, ...] = (0.05, 0.12, 0.25, 0.5)
  decode_steps: int = 32
  window: int = 16  # last prompt tokens whose attention seeds the scores
  needed_share: float = 0.95
  weights: ImportanceWeights = ImportanceWeights()
  attention_decay: float = 0.9
  recency_steps: float = 4.0
  position_blocks: float = 8.0
  free_running: bool = False

  def __post_init__(self):
    if not self.policies or any(p not in POLICIES for p in self.policies):
      raise ValueError(f"policies must be among {POLICIES}, got {self.policies}")
    if len(set(self.policies)) != len(self.policies):
      raise ValueError(f"policies repeat: {self.policies}")
    if not self.hot_fractions or any(
        not 0 < f <= 1 for f in self.hot_fractions):
      raise ValueError("hot fractions must be in (0, 1], got "
                       f"{self.hot_fractions}")
    if len(set(self.hot_fractions)) != len(self.hot_fractions):
      raise ValueError(f"hot fractions repeat: {self.hot_fractions}")
    if self.decode_steps < 1 or self.window < 1:
      raise ValueError("decode_steps and window must be >= 1")
    if not 0 < self.needed_share <= 1:
      raise ValueError(f"needed_share must be in (0, 1], got {self.needed_share}")

  def variants(self) -> list[tuple[str, float]]:
    """The sparse rows, in probe row order after the exact row 0."""
    return [(p, f) for p in self.policies for f in self.hot_fractions]


def _log_softmax(x: np.ndarray) -> np.ndarray:  # [..., V]
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _needed_blocks(mass: np.ndarray, share: float) -> np.ndarray:  # bool
  """The heaviest blocks that together hold `share` of `mass`."""
  k = blocks_for_mass(mass, share)
  needed = np.zeros(mass.size, bool)
  needed[np.argsort(-mass, kind="stable")[:k]] = True
  return needed


def _per_head_oracle_hits(exact: np.ndarray,  # [L, Hq, n]: exact mass
                          self_mass: np.ndarray,  # [L, Hq]
                          budgets: Sequence[int]) -> list[float]:
  """For each budget, the mean over layers and heads of the mass a
  per-head choice of that many blocks (the newest one and each head's
  heaviest others) holds."""
  n = exact.shape[-1]
  heaviest = np.sort(exact[..., :n - 1], axis=-1)[..., ::-1]
  # held[..., j]: the newest block, the token itself and j heaviest others
  held = np.concatenate([np.zeros(exact.shape[:-1] + (1,)),
                         np.cumsum(heaviest, axis=-1)], axis=-1)
  held += (exact[..., n - 1] + self_mass)[..., None]
  return [float(held[..., min(b, n) - 1].mean()) for b in budgets]


def prefill_study(prompt_mass: np.ndarray,  # [n, NB]: each token's attention
                  prefix_tokens: int, block_size: int,
                  fractions: Sequence[float]) -> dict | None:
  """Of the attention the tokens after the prefix's full blocks pay to
  those blocks, the share each choice of `fraction` of them holds
  (`PREFILL_CHOICES`); None if the prefix has fewer than 2 full blocks
  or no token follows them."""
  n = prompt_mass.shape[0]
  blocks = prefix_tokens // block_size
  start = blocks * block_size  # the engine caches only full blocks
  if blocks < 2 or start >= n:
    return None
  mass = np.asarray(prompt_mass[start:, :blocks], np.float64)  # [new, blocks]
  segment = mass.sum(axis=0)
  total = segment.sum()
  served = {c: [] for c in PREFILL_CHOICES}
  for fraction in fractions:
    k = budget_blocks(fraction, blocks)
    served["oracle"].append(np.sort(segment)[::-1][:k].sum() / total)
    served["recent"].append(segment[blocks - k:].sum() / total)
    served["sink_recent"].append(
        (segment[0] + (segment[blocks - k + 1:].sum() if k > 1 else 0.0))
        / total)
  return {"new_tokens": n - start, "prefix_blocks": blocks,
          "prefix_share": float(mass.sum(axis=1).mean()),
          "blocks_for_90pct": blocks_for_mass(segment, 0.9) / blocks,
          "served": {c: [float(v) for v in vals] for c, vals in served.items()}}


def study_sequence(probe, tokens: Sequence[int], cfg: StudyConfig,
                   stop_ids: Sequence[int] = (),
                   prefix_tokens: int | None = None) -> dict:
  """Prefills `tokens` on `probe`, then decodes greedily (the exact row's
  choice) for `cfg.decode_steps` steps or until a `stop_ids` token.

  `probe` is an `AttentionProbe` or any object with its `prefill`,
  `decode`, `length`, `block_size` and `num_blocks`. Returns this
  sequence's sums (`merge_results` adds sequences up, `summarize` turns
  sums into means) and, given the tokens of its cached prefix,
  `prefill_study` of its prefill.
  """
  bs = probe.block_size
  variants = cfg.variants()
  logits, prompt_mass = probe.prefill(list(tokens))
  prefill = None if prefix_tokens is None else prefill_study(
      prompt_mass, prefix_tokens, bs, cfg.hot_fractions)

  def blocks_now():  # the blocks holding the cached tokens; the next
    # token, which every row reads as itself, is in the last one or (at a
    # block boundary) starts the next, which holds no cached token
    return -(-probe.length // bs)

  states = _new_states(cfg, blocks_now(), prompt_mass)
  sums = {"mass_hit": np.zeros(len(variants)),
          "needed_hit": np.zeros(len(variants)),
          "top1": np.zeros(len(variants)), "kl": np.zeros(len(variants)),
          "budget": np.zeros(len(variants)),
          "oracle_mass_hit": np.zeros(len(cfg.hot_fractions)),
          "head_oracle_mass_hit": np.zeros(len(cfg.hot_fractions)),
          "concentration": np.zeros(len(CONCENTRATION_SHARES)),
          "head_concentration": 0.0, "self_mass": 0.0}
  steps = 0
  first = token = int(np.argmax(logits))
  for _ in range(cfg.decode_steps):
    if token in stop_ids:
      break
    n = blocks_now()
    masks = np.zeros((1 + len(variants), probe.num_blocks), bool)
    masks[0] = True
    for i, ((policy, fraction), state) in enumerate(zip(variants, states)):
      state.grow(n)
      budget = budget_blocks(fraction, n)
      masks[1 + i, :n] = select_hot(state.scores(policy), budget)
      sums["budget"][i] += budget
    out = probe.decode(token, masks)
    exact = out.block_mass[0][..., :n]  # [L, Hq, n]
    mass = exact.mean(axis=(0, 1))
    self_mass = float(out.self_mass[0].mean())
    needed = _needed_blocks(mass, cfg.needed_share)
    exact_logp = _log_softmax(out.logits[0])
    row_logp = _log_softmax(out.logits[1:])
    for i, state in enumerate(states):
      hot = masks[1 + i, :n]
      sums["mass_hit"][i] += mass[hot].sum() + self_mass
      # A step with no attention on the cache needed no block.
      sums["needed_hit"][i] += ((needed & hot).sum() / needed.sum()
                                if needed.any() else 1.0)
      sums["top1"][i] += float(np.argmax(out.logits[1 + i])
                               == np.argmax(out.logits[0]))
      sums["kl"][i] += float(np.sum(np.exp(exact_logp)
                                    * (exact_logp - row_logp[i])))
      state.observe(out.block_mass[1 + i][..., :n].mean(axis=(0, 1)))
    budgets = [budget_blocks(f, n) for f in cfg.hot_fractions]
    for j, budget in enumerate(budgets):
      hot = select_hot(mass, budget)
      sums["oracle_mass_hit"][j] += mass[hot].sum() + self_mass
    sums["head_oracle_mass_hit"] += _per_head_oracle_hits(
        exact, out.self_mass[0], budgets)
    for j, share in enumerate(CONCENTRATION_SHARES):
      sums["concentration"][j] += blocks_for_mass(mass, share) / n
    heads = exact.reshape(-1, n)
    sums["head_concentration"] += np.mean(
        [blocks_for_mass(h, 0.9) / n for h in heads])
    sums["self_mass"] += self_mass
    steps += 1
    token = int(np.argmax(out.logits[0]))
  free = (free_running_study(probe, first, prompt_mass, cfg, stop_ids)
          if cfg.free_running else None)
  return {"prompt_tokens": len(tokens), "steps": steps,
          "final_blocks": blocks_now(), "prefill": prefill,
          "sums": {k: np.asarray(v).tolist() for k, v in sums.items()},
          "free_running": free}


def _new_states(cfg: StudyConfig, num_blocks: int,
                prompt_mass: np.ndarray) -> list[BlockImportance]:
  """One importance state per sparse row, seeded with the attention of
  the prompt's last `cfg.window` tokens."""
  states = [BlockImportance(num_blocks, attention_decay=cfg.attention_decay,
                            recency_steps=cfg.recency_steps,
                            position_blocks=cfg.position_blocks,
                            weights=cfg.weights) for _ in cfg.variants()]
  seed = prompt_mass[-cfg.window:].mean(axis=0)[:num_blocks]
  for state in states:
    state.observe(seed)
  return states


def free_running_study(probe, first_token: int,
                       prompt_mass: np.ndarray,  # [n, NB]: from prefill
                       cfg: StudyConfig, stop_ids: Sequence[int] = ()
                       ) -> dict | None:
  """Decodes the prompt of the probe's last `prefill` again, every row
  free-running from `first_token`: row 0 reads every block, row 1 + i the
  hot set of `cfg.variants()[i]`, scored from the row's own attention.
  Each row stops at a `stop_ids` token or after `cfg.decode_steps`.

  Returns the turn's sums per row (row 0 first; `merge_free` adds turns
  up) and each row's tokens, or None if `first_token` is a stop token
  (nothing is decoded).
  """
  if first_token in stop_ids:
    return None
  bs = probe.block_size
  prompt = probe.prompt_length
  variants = cfg.variants()
  rows = 1 + len(variants)
  probe.start_free_rows(rows, cfg.decode_steps)
  states = _new_states(cfg, -(-prompt // bs), prompt_mass)
  tokens = [[first_token] for _ in range(rows)]
  active = np.ones(rows, bool)
  hot_blocks = np.zeros(rows)
  for step in range(cfg.decode_steps):
    if not active.any():
      break
    n = -(-(prompt + step) // bs)  # blocks holding the cached tokens
    masks = np.zeros((rows, probe.num_blocks), bool)
    masks[0] = True
    for i, ((policy, fraction), state) in enumerate(zip(variants, states)):
      state.grow(n)
      masks[1 + i, :n] = select_hot(state.scores(policy),
                                    budget_blocks(fraction, n))
    out = probe.decode_free([t[-1] for t in tokens], masks)
    for r in np.flatnonzero(active):
      token = int(np.argmax(out.logits[r]))
      tokens[r].append(token)
      hot_blocks[r] += masks[r, :n].sum()
      active[r] = token not in stop_ids
    for i, state in enumerate(states):
      state.observe(out.block_mass[1 + i][..., :n].mean(axis=(0, 1)))
  exact = tokens[0][1:]
  sums = {name: np.zeros(rows) for name in
          ("tokens", "nll", "exact_pick", "matched", "identical", "hot_blocks")}
  scores = {}  # rows that wrote the same tokens (often the exact row's) share one
  for r, row in enumerate(tokens):
    score = scores.get(tuple(row))
    if score is None:
      score = scores[tuple(row)] = probe.score(row)
    made = np.asarray(row[1:])
    sums["tokens"][r] = len(made)
    sums["nll"][r] = -score.logprobs.sum()
    sums["exact_pick"][r] = (made == score.greedy).sum()
    same = [a == b for a, b in zip(made, exact)]
    sums["matched"][r] = same.index(False) if False in same else len(same)
    sums["identical"][r] = float(list(made) == exact)
    sums["hot_blocks"][r] = hot_blocks[r]
  return {"turns": 1, "sums": {k: v.tolist() for k, v in sums.items()},
          "tokens": tokens}


def merge_free(results: Sequence[dict | None]) -> dict | None:
  """Adds up the `free_running_study` sums of several turns."""
  results = [r for r in results if r]
  if not results:
    return None
  sums = {k: np.sum([r["sums"][k] for r in results], axis=0)
          for k in results[0]["sums"]}
  return {"turns": sum(r["turns"] for r in results), "sums": sums}


def summarize_free(merged: dict | None, cfg: StudyConfig) -> dict | None:
  """Per-row figures of the free-running pass over all turns: `exact`
  (row 0) and one row per (policy, fraction)."""
  if merged is None:
    return None
  s, turns = merged["sums"], merged["turns"]

  def row(r):
    tokens = s["tokens"][r]
    return {"tokens": int(tokens),
            "mean_hot_blocks": float(s["hot_blocks"][r] / max(tokens, 1)),
            "matched_tokens": float(s["matched"][r] / turns),
            "identical_turns": float(s["identical"][r] / turns),
            "exact_pick": float(s["exact_pick"][r] / max(tokens, 1)),
            "nll_per_token": float(s["nll"][r] / max(tokens, 1))}

  exact = row(0)
  variants = []
  for i, (policy, fraction) in enumerate(cfg.variants()):
    figures = row(1 + i)
    figures["nll_excess"] = figures["nll_per_token"] - exact["nll_per_token"]
    variants.append({"policy": policy, "hot_fraction": fraction, **figures})
  return {"turns": turns, "exact": exact, "variants": variants}


def merge_results(results: Sequence[dict]) -> dict:
  """Adds the per-step sums of several sequences (same `StudyConfig`)."""
  total = {"steps": 0, "sums": None,
           "prefills": [r["prefill"] for r in results if r.get("prefill")],
           "free_running": merge_free([r.get("free_running")
                                       for r in results])}
  for r in results:
    total["steps"] += r["steps"]
    if total["sums"] is None:
      total["sums"] = {k: np.asarray(v, np.float64) for k, v in r["sums"].items()}
    else:
      for k, v in r["sums"].items():
        total["sums"][k] = total["sums"][k] + np.asarray(v, np.float64)
  return total


def summarize(merged: dict, cfg: StudyConfig) -> dict:
  """Per-step means: one row per (policy, fraction), the oracle's mass
  hit per fraction, the concentration of the exact attention."""
  steps = merged["steps"]
  if steps == 0 or merged["sums"] is None:
    raise ValueError("no decode step was studied (every sequence stopped "
                     "at once)")
  s = {k: np.asarray(v) / steps for k, v in merged["sums"].items()}
  rows = [{"policy": p, "hot_fraction": f,
           "mean_hot_blocks": float(s["budget"][i]),
           "mass_hit": float(s["mass_hit"][i]),
           "needed_hit": float(s["needed_hit"][i]),
           "top1_agreement": float(s["top1"][i]),
           "kl_nats": float(s["kl"][i])}
          for i, (p, f) in enumerate(cfg.variants())]
  oracle = [{"hot_fraction": f, "mass_hit": float(s["oracle_mass_hit"][j]),
             "per_head_mass_hit": float(s["head_oracle_mass_hit"][j])}
            for j, f in enumerate(cfg.hot_fractions)]
  concentration = {f"blocks_for_{int(round(share * 100))}pct":
                   float(s["concentration"][j])
                   for j, share in enumerate(CONCENTRATION_SHARES)}
  concentration["per_head_blocks_for_90pct"] = float(s["head_concentration"])
  concentration["own_token_mass"] = float(s["self_mass"])
  return {"steps": steps, "variants": rows, "oracle": oracle,
          "concentration": concentration,
          "prefill": _summarize_prefills(merged["prefills"], cfg),
          "free_running": summarize_free(merged.get("free_running"), cfg)}


def _summarize_prefills(prefills: Sequence[dict], cfg: StudyConfig
                        ) -> dict | None:
  """Means over the turns' `prefill_study` results (one choice per turn)."""
  if not prefills:
    return None
  served = {c: np.mean([p["served"][c] for p in prefills], axis=0)
            for c in PREFILL_CHOICES}
  return {"turns": len(prefills),
          "new_tokens": int(sum(p["new_tokens"] for p in prefills)),
          "prefix_share": float(np.mean([p["prefix_share"] for p in prefills])),
          "blocks_for_90pct": float(np.mean([p["blocks_for_90pct"]
                                             for p in prefills])),
          "served": [{"hot_fraction": f,
                      **{c: float(served[c][j]) for c in PREFILL_CHOICES}}
                     for j, f in enumerate(cfg.hot_fractions)]}
