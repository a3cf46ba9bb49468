"""Comma-list flags checked in one place: sizes, names, rates.

absl's `DEFINE_list` hands the launcher strings (and a plain string flag a
comma list); each launcher used to parse them with its own loop and
message. Here: `positive_ints` (`--samples=1,4,8`), `choices`
(`--policies=dualpath,oracle`) and `rates` (`--rates=0.1,0.2`) refuse an
empty list or entry ("0.1,,0.2" is a typo, not two rates), a repeat and a
value out of range, naming the flag, before anything runs (ValueError).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def positive_ints(name: str, values: Sequence[str] | None, *,
                  power_of_2: bool = False, example: str = "1,8"
                  ) -> list[int]:
  """`--name`'s values as ints >= 1 (powers of 2 if asked); ValueError
  naming the flag otherwise."""
  what = "positive integers" + (" (powers of 2)" if power_of_2 else "")
  try:
    out = [int(v) for v in values or ()]
  except (TypeError, ValueError):
    out = []
  if not out or any(v < 1 or (power_of_2 and v & (v - 1)) for v in out):
    got = ",".join(str(v) for v in values or ())
    raise ValueError(f"--{name}: give {what}, e.g. {example}; got {got!r}")
  return out


def _entries(name: str, text: str) -> list[str]:
  items = [p.strip() for p in text.split(",")]
  if not any(items):
    raise ValueError(f"--{name} is empty")
  if not all(items):
    raise ValueError(f"--{name} has an empty entry: {text!r}")
  if len(set(items)) != len(items):
    raise ValueError(f"--{name} lists an entry twice: {text!r}")
  return items


def choices(name: str, text: str, allowed: Iterable[str]) -> list[str]:
  """`--name`'s comma list, each entry one of `allowed`, none twice."""
  items = _entries(name, text)
  allowed = list(allowed)
  bad = [p for p in items if p not in allowed]
  if bad:
    raise ValueError(f"--{name}: unknown {bad}; choose from {allowed}")
  return items


def rates(name: str, text: str) -> list[float]:
  """`--name`'s comma list of finite numbers > 0 (agents/s), none twice,
  sorted."""
  items = _entries(name, text)
  try:
    values = [float(p) for p in items]
  except ValueError:
    raise ValueError(f"--{name} must be a comma list of numbers, got "
                     f"{text!r}") from None
  if any(not (r > 0 and math.isfinite(r)) for r in values):
    raise ValueError(f"--{name} must be finite agents/s > 0, got {text!r}")
  if len(set(values)) != len(values):  # "0.1,0.10"
    raise ValueError(f"--{name} lists a rate twice: {text!r}")
  return sorted(values)
