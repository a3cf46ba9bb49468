"""Copies every block of one `BlockStore` into another (identical starting stores).

A store's directory cannot simply be copied: its index records where its
block bytes live (the kvstore path) and refuses to open elsewhere. Benchmarks
that must start several runs from the same cold-tier content (one per policy
and rate in `launch.bench_online`) seed one store and clone it per run: the
ready blocks are read in batches and put into the destination, verified on
the way like any read. Recency (the LRU order) is not carried over.
"""

from __future__ import annotations

import numpy as np


def clone_store(src, dst, batch_blocks: int = 64) -> int:
  """Puts every ready block of `src` into `dst` (both `BlockStore`s); returns
  how many `dst` now holds of them. `dst` must hold the same model's blocks."""
  if src.block_shape != dst.block_shape:
    raise ValueError(f"block shapes differ: {src.block_shape} vs "
                     f"{dst.block_shape}")
  ids = [ref.block_id for ref in src.index.all_ready()]
  stored = 0
  for i in range(0, len(ids), batch_blocks):
    batch = ids[i:i + batch_blocks]
    blocks = src.get(batch)
    good = [(b, x) for b, x in zip(batch, blocks) if x is not None]
    if not good:
      continue
    res = dst.put([b for b, _ in good], np.stack([x for _, x in good]))
    stored += sum(res.stored)
  dst.flush()
  return stored
