"""List flags whose values must be positive integers (`--samples=1,4,8`).

absl's `DEFINE_list` hands the launcher strings; each launcher that takes
sizes used to turn them into ints with its own loop and message. One place
now: `positive_ints` refuses a non-integer, a value < 1 and an empty list,
naming the flag and an example, before anything runs.
"""

from __future__ import annotations

from typing import Sequence


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
