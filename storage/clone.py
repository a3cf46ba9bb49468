"""Copies every block of one `BlockStore` into another (identical starting stores).

A store's directory cannot simply be copied: its index records where its
block bytes live (the kvstore path) and refuses to open elsewhere. Benchmarks
that must start several runs from the same cold-tier content (one per policy
and rate in `launch.bench_online`) seed one store and clone it per run: the
ready blocks are read in batches and put into the destination, verified on
the way like any read. Each block is put under every (tenant, session) that
put it into `src`, so `delete_session`/`delete_tenant` on the clone remove
what they remove on the source (the clone used to put every block under the
empty tenant: a deleted tenant's blocks stayed in it). The puts skip the
destination's admission rule (`admitted=True`): the blocks were admitted
into `src` already, and a `second_put` or `session_continues` destination
deferred each one's (or each session's) first put, so the clone silently
lacked them. Recency (the LRU order) is not carried over.
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
  # A session's blocks together: a batch is then one put (one write) per owner.
  owner_of = dict(zip(ids, (o[:1] for o in src.index.owners(ids))))
  ids.sort(key=owner_of.__getitem__)
  stored = 0
  for i in range(0, len(ids), batch_blocks):
    batch = ids[i:i + batch_blocks]
    blocks = src.get(batch)
    good = [(b, x) for b, x in zip(batch, blocks) if x is not None]
    if not good:
      continue
    groups: dict[tuple[str, str], list[int]] = {}  # (tenant, session) -> rows
    for row, owners in enumerate(src.index.owners([b for b, _ in good])):
      for owner in owners or [("", "")]:
        groups.setdefault(owner, []).append(row)
    kept = set()
    for (tenant, session), rows in groups.items():
      res = dst.put([good[r][0] for r in rows], np.stack([good[r][1] for r in rows]),
                    tenant=tenant, session=session, admitted=True)
      kept.update(r for r, ok in zip(rows, res.stored) if ok)
    stored += len(kept)
  dst.flush()
  return stored
