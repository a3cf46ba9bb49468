"""Float flags that must be numbers: absl's `DEFINE_float` takes "nan" and
"inf", and NaN passes its `lower_bound` (every comparison with it is
false), so `--warmup_s=nan` or `--cold_tier_gb=inf` used to run on, or fail
deep inside with a traceback. `define_float` refuses them when the flags are
parsed, naming the flag (exit 1)."""

from __future__ import annotations

import math

from absl import flags


def define_float(name: str, default: float | None, help_text: str, *,
                 allow_inf: bool = False,
                 flag_values: flags.FlagValues = flags.FLAGS,
                 **bounds: float) -> None:
  """`flags.DEFINE_float(name, default, help_text, **bounds)` (bounds:
  `lower_bound`, `upper_bound`) that refuses NaN always and +-inf unless
  `allow_inf` (e.g. a rate whose inf means "no limit")."""
  flags.DEFINE_float(name, default, help_text, flag_values=flag_values,
                     **bounds)

  def is_number(value: float | None) -> bool:
    return value is None or not (
        math.isnan(value) or (math.isinf(value) and not allow_inf))

  flags.register_validator(
      name, is_number, flag_values=flag_values,
      message=(f"--{name} must be a number or inf, not nan" if allow_inf
               else f"--{name} must be a finite number, not nan or inf"))
