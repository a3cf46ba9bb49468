"""Next-token choice from logits on the host: greedy, or temperature + top-p;
and the log-probabilities a request may ask for."""

from __future__ import annotations

import numpy as np

from dualpath_jax.config import check_sampling


def sample(logits: np.ndarray,  # [batch, vocab] float32
           rng: np.random.Generator, temperature: float = 0.0,
           top_p: float = 1.0) -> np.ndarray:  # [batch] int32
  """Greedy when `temperature == 0`, else nucleus sampling per row.

  A row that is not all finite is sampled from its limit: the tokens at
  +inf share all the probability, NaN logits have none, and a row with
  nothing left (all NaN or -inf) gives what greedy gives (`np.argmax`: its
  first NaN, else token 0). NumPy's draw raised on such a row, which failed
  the engine's whole step: every turn in flight.
  """
  check_sampling(temperature, top_p)
  if temperature == 0:
    return np.argmax(logits, axis=-1).astype(np.int32)
  out = np.empty(logits.shape[0], np.int32)
  for b, row in enumerate(logits.astype(np.float64)):
    row = _finite_limit(row)
    if row is None:
      out[b] = int(np.argmax(logits[b]))
      continue
    # Shift before dividing: a tiny temperature (1e-320) would make
    # row / temperature infinite, and inf - inf is NaN.
    with np.errstate(over="ignore"):  # a far-off logit becomes -inf: p 0
      row = (row - row.max()) / temperature
    order = np.argsort(-row)
    p = np.exp(row[order])
    p /= p.sum()
    keep = min(int(np.searchsorted(np.cumsum(p), top_p) + 1), len(p))
    p = p[:keep] / p[:keep].sum()
    out[b] = order[rng.choice(keep, p=p)]
  return out


def _finite_limit(
    row: np.ndarray,  # [vocab] float64
) -> np.ndarray | None:  # [vocab] float64 with a finite max, or None
  """`row` with +inf as 0 and everything else -inf when any logit is +inf,
  NaN as -inf; None when no token is left with a chance."""
  if np.isnan(row).any():
    row = np.where(np.isnan(row), -np.inf, row)
  peak = row.max()
  if peak == np.inf:
    return np.where(row == np.inf, 0.0, -np.inf)
  return None if peak == -np.inf else row


def token_logprobs(
    logits: np.ndarray,  # [vocab] float32, one row
    token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
  """`token`'s log-probability under softmax(`logits`), and the `top` most
  likely tokens' (most likely first; ties by lower id), in float64: of the
  model's distribution, whatever the sampling settings. Logits that
  overflowed to +inf share all the probability (the limit of the softmax;
  greedy picks one of them): inf - inf made every log-probability NaN, and
  the "most likely" tokens the least likely ones. A row with NaN has no
  distribution: NaN."""
  row = logits.astype(np.float64)
  peak = row.max()
  if peak == np.inf:
    shifted = np.where(row == np.inf, 0.0, -np.inf)
  else:
    shifted = row - peak
  logz = np.log(np.exp(shifted).sum())
  best: tuple[tuple[int, float], ...] = ()
  if top:
    k = min(top, len(row))
    ids = np.argpartition(-shifted, k - 1)[:k]
    ids = ids[np.lexsort((ids, -shifted[ids]))]
    best = tuple((int(i), float(shifted[i] - logz)) for i in ids)
  return float(shifted[token] - logz), best
