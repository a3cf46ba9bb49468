"""Static shape buckets: the few padded shapes the jitted model compiles for.

Every distinct `(batch, q_len, pages_per_seq)` costs one XLA compile, so the
engine pads each step's arrays up to the next bucket. Powers of two bound
the padding waste by 2x and keep the number of compiles logarithmic. The
block copies between tiers (`cache.pool_io`, `cache.hot_tier_memory`,
`transfer.loader`) pad their block counts the same way. A module of its own,
below the engine, so that those lower layers do not import the engine.
"""

from __future__ import annotations


def next_pow2(n: int, minimum: int = 1) -> int:
  """Smallest power of two `>= max(n, minimum)`."""
  n = max(n, minimum, 1)
  return 1 << (n - 1).bit_length()


def bucket(n: int, minimum: int, maximum: int) -> int:
  """`next_pow2(n)` clamped to `[minimum, maximum]`; errors if `n > maximum`."""
  if n > maximum:
    raise ValueError(f"{n} exceeds the largest bucket {maximum}")
  return min(next_pow2(n, minimum), maximum)


def bucket_sizes(minimum: int, maximum: int) -> list[int]:
  """All bucket values between `minimum` and `maximum` (both included)."""
  sizes, b = [], next_pow2(minimum)
  while b < maximum:
    sizes.append(b)
    b *= 2
  sizes.append(maximum)
  return sizes
