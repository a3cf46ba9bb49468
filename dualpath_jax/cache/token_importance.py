"""The seeds' token-importance score, per block, and the hot set it picks.

The seed articles (../shared/seeds) keep a small hot tier of the KV cache
that attention reads, chosen by a score of three signals: recency (was
the entry attended to in the last steps), attention weight (how much
attention it got before) and positional distance (how far it is from the
query). Attention then reads only what is hot: it is approximate. The
serving path of this project keeps attention exact and does not use this;
`launch.study_importance` uses it to measure what the seeds claim (98% of
the attention served from 12% of the cache) on a real model and workload.

It works in blocks (the unit a tier moves), not tokens: a block's
attention mass is the sum over its tokens. `BlockImportance` keeps one
sequence's per-block state across decode steps, fed with the attention
mass that the sequence itself saw (`observe`: a block outside the hot set
was not attended to, so it gets no mass). `select_hot` turns a score into
a hot set of a given size. The block that holds the newest tokens is
always hot: they were just written, from the device.

Pure numpy; no JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np

POLICIES = ("recent", "sink_recent", "attention", "seed_score")


@dataclasses.dataclass(frozen=True)
class ImportanceWeights:
  """Weights of the seed score's three signals, each scaled to [0, 1]."""

  recency: float = 1.0
  attention: float = 1.0
  position: float = 1.0

  def __post_init__(self):
    values = (self.recency, self.attention, self.position)
    if any(not np.isfinite(w) or w < 0 for w in values) or sum(values) == 0:
      raise ValueError("importance weights must be finite, >= 0 and not all "
                       f"0; got {values}")


class BlockImportance:
  """One sequence's block scores over its decode steps.

  Signals, each in [0, 1], computed for `num_blocks` blocks:
  - attention: an exponential moving average (`attention_decay` a step) of
    the mass each block got, scaled by its maximum;
  - recency: `exp(-(step - last) / recency_steps)`, where `last` is the
    last step at which the block got at least its fair share
    (`1 / blocks attended`) of the mass; never: 0;
  - position: `exp(-distance / position_blocks)`, `distance` being how
    many blocks lie between the block and the newest one.
  """

  def __init__(self, num_blocks: int, *, attention_decay: float = 0.9,
               recency_steps: float = 4.0, position_blocks: float = 8.0,
               weights: ImportanceWeights = ImportanceWeights()):
    if num_blocks < 1:
      raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0 <= attention_decay < 1:
      raise ValueError(f"attention_decay must be in [0, 1), got {attention_decay}")
    if not (recency_steps > 0 and position_blocks > 0):
      raise ValueError("recency_steps and position_blocks must be > 0")
    self.num_blocks = num_blocks
    self.attention_decay = attention_decay
    self.recency_steps = recency_steps
    self.position_blocks = position_blocks
    self.weights = weights
    self.step = 0
    self._attention = np.zeros(num_blocks, np.float64)  # EMA of mass
    self._last_seen = np.full(num_blocks, -np.inf)  # step of last fair share

  def grow(self, num_blocks: int) -> None:
    """Decoding went past the last block: new blocks start unseen."""
    if num_blocks < self.num_blocks:
      raise ValueError("a sequence's blocks do not shrink")
    extra = num_blocks - self.num_blocks
    if not extra:
      return
    self._attention = np.concatenate([self._attention, np.zeros(extra)])
    self._last_seen = np.concatenate([self._last_seen, np.full(extra, -np.inf)])
    self.num_blocks = num_blocks

  def observe(self, mass: np.ndarray  # [num_blocks] float, >= 0
              ) -> None:
    """One step's attention mass per block, as the sequence saw it (zero
    outside what it attended to); the step counter moves on."""
    mass = np.asarray(mass, np.float64)
    if mass.shape != (self.num_blocks,):
      raise ValueError(f"mass must be [{self.num_blocks}], got {mass.shape}")
    if not np.all(np.isfinite(mass)) or np.any(mass < 0):
      raise ValueError("attention mass must be finite and >= 0")
    d = self.attention_decay
    self._attention = d * self._attention + (1 - d) * mass
    attended = np.count_nonzero(mass)
    if attended:
      fair = mass.sum() / attended
      self._last_seen[mass >= fair] = self.step
    self.step += 1

  def signals(self) -> dict[str, np.ndarray]:
    """{"attention", "recency", "position"}: each [num_blocks] in [0, 1]."""
    top = self._attention.max()
    attention = self._attention / top if top > 0 else np.zeros(self.num_blocks)
    # `_last_seen` holds steps already taken; `step` is the one about to be.
    recency = np.exp(-(self.step - self._last_seen) / self.recency_steps)
    distance = np.arange(self.num_blocks)[::-1].astype(np.float64)
    position = np.exp(-distance / self.position_blocks)
    return {"attention": attention, "recency": recency, "position": position}

  def scores(self, policy: str) -> np.ndarray:  # [num_blocks] float64
    """The score `policy` ranks blocks by (higher = keep hot).

    recent: position only (the newest blocks: a sliding window);
    sink_recent: the first block, then the newest (StreamingLLM's
      attention sink and window: models put much of their attention on
      the first tokens, whatever they hold);
    attention: the attention EMA only (heavy hitters);
    seed_score: the weighted sum of the three signals.
    """
    s = self.signals()
    if policy == "recent":
      return s["position"]
    if policy == "sink_recent":
      scores = s["position"].copy()
      scores[0] = np.inf
      return scores
    if policy == "attention":
      return s["attention"]
    if policy == "seed_score":
      w = self.weights
      return (w.recency * s["recency"] + w.attention * s["attention"]
              + w.position * s["position"])
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")


def select_hot(scores: np.ndarray,  # [num_blocks] float
               budget: int) -> np.ndarray:  # [num_blocks] bool
  """The `budget` highest-scored blocks, the last (newest) block always
  among them; ties go to the newer block. `budget` is clipped to
  [1, num_blocks]."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"scores must be a non-empty vector, got {scores.shape}")
  n = scores.size
  budget = int(min(max(budget, 1), n))
  hot = np.zeros(n, bool)
  hot[-1] = True
  if budget > 1:
    rest = scores[:-1]
    # Stable sort of the negated scores on reversed blocks: the newer of
    # two equal scores comes first.
    order = np.argsort(-rest[::-1], kind="stable")[:budget - 1]
    hot[(n - 2) - order] = True
  return hot


def budget_blocks(fraction: float, num_blocks: int) -> int:
  """Blocks a hot set of `fraction` of `num_blocks` holds (at least 1)."""
  if not 0 < fraction <= 1:
    raise ValueError(f"a hot fraction must be in (0, 1], got {fraction}")
  return max(1, int(round(fraction * num_blocks)))


def blocks_for_mass(mass: np.ndarray,  # [num_blocks] float, sums to <= 1
                    share: float) -> int:
  """Fewest blocks whose mass reaches `share` of the total: how
  concentrated attention is (the seeds' premise is that few blocks hold
  nearly all of it)."""
  mass = np.sort(np.asarray(mass, np.float64))[::-1]
  total = mass.sum()
  if total <= 0:
    return 0
  reached = np.cumsum(mass) >= share * total - 1e-12
  return int(np.argmax(reached)) + 1
