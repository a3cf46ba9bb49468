"""Fixes from an audit of the P/D cluster's prefetcher (`engine.prefetch`,
`cache.prefetcher`, `DualPathLoader.read_blocks_async`), each with the case
that showed the bug."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dualpath_jax.cache.prefetcher import ReturnPredictor
from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.transfer import (DualPathConfig, DualPathLoader,
                                   InMemoryBlockSource, MeshConfig,
                                   StorageNic, build_cluster_mesh)
from tests.test_cluster import (BLOCK_BYTES, CACHE, ENGINE, _cold, _run,
                                reference, tiny)  # noqa: F401 (fixtures)
from tests.test_cluster_prefetch import SHAPE, _Worker, _ids, _prefetcher


# ------------------------------------------- the prefetcher, on two PEs
def test_one_block_prefetched_into_two_prefill_engines_is_counted_twice():
  """A session's blocks prefetched into P0, then (its next turn ran on P1)
  into P1 as well. Tracked by id alone, P1's put counted P0's copy, still
  held, as evicted unused and forgot it; a turn then reading P0's copy was
  no prefetch hit."""
  p0, p1 = _Worker("P0", 16), _Worker("P1", 16)
  a = _ids("a", 4)
  pf, loader, _ = _prefetcher([p0, p1], a)
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([], now=0.0)
  loader.finish()
  pf.step([], now=0.0)
  assert p0.hot_tier.leading_run(a) == 4
  pf.turn_arrived("a", 1.0)  # placed on P1 after all, and ended there
  pf.turn_finished("a", 2.0, a, "P1")
  pf.step([], now=2.0)
  loader.finish()
  pf.step([], now=2.0)
  assert p1.hot_tier.leading_run(a) == 4 and p0.hot_tier.leading_run(a) == 4
  report = pf.report()
  assert report["put_blocks"] == 8
  assert report["evicted_unused_blocks"] == 0  # P0's are still there
  assert report["unused_held_blocks"] == 8
  pf.note_hot_read("P0", a)  # a turn on P0 read P0's copies
  report = pf.report()
  assert report["used_blocks"] == 4 and report["unused_held_blocks"] == 4


# ------------------------------------------------- read_blocks_async
def _loader(blocks):
  """A 1P2D loader over an in-memory source (no `out=`: its blocks are
  copied) of `blocks`, with unlimited NICs."""
  cluster = build_cluster_mesh(MeshConfig.parse("1P2D"), jax.devices()[:1])
  nics = {e.name: StorageNic(e.name, float("inf")) for e in cluster.engines}
  return DualPathLoader(cluster, InMemoryBlockSource(blocks), nics,
                        DualPathConfig(), SHAPE, np.float32), nics


@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_a_prefetch_read_refuses_a_block_not_of_the_cache_layout(bad):
  """A source serving a block of another dtype or shape: a turn's load
  raises (`_read_batch`); the prefetch read cast it, or broadcast it, into
  its buffer and called it served, so the hot tier held bytes that are not
  the block's."""
  block = (np.ones(SHAPE, np.float16) if bad == "dtype" else
           np.ones((1,) * len(SHAPE), np.float32))
  loader, _ = _loader({b"good": np.zeros(SHAPE, np.float32), b"bad": block})
  try:
    blocks, good = loader.read_blocks_async([b"good"], "P0").result()
    assert good == 1 and blocks.shape == (1, *SHAPE)
    with pytest.raises(ValueError, match="expected"):
      loader.read_blocks_async([b"good", b"bad"], "D0").result()
  finally:
    loader.close()


def test_a_prefetch_read_that_cannot_be_queued_leaves_no_planned_bytes():
  """Its bytes were planned on the NIC before the reader took it: a reader
  shut down (the cluster closing) refused it, and the NIC kept them planned
  for ever (a backlog no read would clear)."""
  loader, nics = _loader({b"a": np.zeros(SHAPE, np.float32)})
  loader.close()
  with pytest.raises(RuntimeError):
    loader.read_blocks_async([b"a"], "P0")
  assert nics["P0"].planned_bytes() == 0 and nics["P0"].backlog_bytes() == 0


# ------------------------------------------------------ on the cluster
def _prefetching_cluster(tiny, reference, tmp_path, **kw):
  snapshot, _ = reference
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=100.0,
                     prefill_keeps_prefix=False, prefetch_blocks=4, **kw),
      hot_tier_bytes=64 * BLOCK_BYTES)
  for session, (ids, blocks) in snapshot.items():
    cluster.store.put(ids, blocks, tenant="t", session=session)
  cluster.prefetcher.predictor.prior_gap_s = 600.0  # back soon, not gone
  return cluster


def test_two_tenants_sessions_of_one_id_are_predicted_apart(tiny, reference,
                                                            tmp_path):
  """Session ids are the client's, per tenant (block ids are salted with
  the tenant). The predictor knew sessions by id alone: tenant u's session
  "a" arriving took tenant t's "a" off the away list (its prefix was no
  longer prefetched) and learnt u's gap from t's turn end."""
  _, turns = reference
  (reqs2, want2), _ = turns
  a2 = next(r for r in reqs2 if r.session_id == "a")
  cluster = _prefetching_cluster(tiny, reference, tmp_path)
  pf = cluster.prefetcher
  try:
    got = _run(cluster, [TurnRequest(**a2.__dict__)])  # tenant t's a ends
    assert got[a2.request_id].generated_tokens == \
        want2[a2.request_id].generated_tokens
    away = pf.predictor.away(cluster.clock())
    assert len(away) == 1
    t_chain = away[0].chain
    cluster.submit(TurnRequest("u-a#1", list(a2.prompt_tokens), 2,
                               tenant="u", session_id="a"))
    # t's a is still away, its prefix still the one to prefetch.
    assert [s.chain for s in pf.predictor.away(cluster.clock())] == [t_chain]
    assert pf.predictor.expired == 0
    assert not pf.predictor._gaps  # pylint: disable=protected-access
  finally:
    cluster.close()


# ------------------------------------------------ a store that raises
def test_a_lookup_that_raised_is_not_repeated_at_every_step():
  """The store's `contains` raising: every step looked each candidate's
  blocks up again (the cluster steps at its decode rate), logging and
  counting one store error per candidate per step. Like a read that
  failed, the block is not asked about again until a turn ends."""
  p0 = _Worker("P0", 64)
  a, b = _ids("a", 8), _ids("b", 8)
  errors = []
  pf, loader, _ = _prefetcher([p0], a + b, errors=errors)
  calls = []

  def contains(ids):
    calls.append(list(ids))
    raise OSError("index gone")

  pf.store.contains = contains
  pf.turn_finished("a", 0.0, a, "P0")
  pf.turn_finished("b", 0.5, b, "P0")
  for _ in range(5):
    pf.step([], now=1.0)
  assert errors == ["prefetch lookup"] * 2  # a's, then b's: once each
  assert not loader.reads
  pf.store.contains = lambda ids: [True] * len(ids)  # the store is back
  pf.turn_finished("c", 2.0, _ids("c", 1), "P0")  # a turn ended: try again
  pf.step([], now=2.0)
  assert [ids for ids, _, _ in loader.reads][:1] == [a[:4]]


# ------------------------------------------------------------ the predictor
def test_a_session_back_after_it_was_taken_for_ended_still_teaches_its_gap():
  """A session overdue by 4x its gap is dropped as ended; when it came back
  after all, its gap was not learnt (nothing remembered its turn's end). A
  session whose gaps grew past 4x its average then never taught a longer
  one: it was dropped before every return, never prefetched again."""
  p = ReturnPredictor(prior_gap_s=1.0, expire_factor=4.0)
  p.finished("a", 0.0, [b"x"], "P0")
  assert p.away(5.0) == [] and p.expired == 1  # taken for ended
  p.arrived("a", 10.0)  # but it was a 10 s gap
  assert p.gap_s("a") == 10.0 and p.gap_s("new") == 10.0
  p.finished("a", 11.0, [b"x"], "P0")
  assert [s.due_s for s in p.away(30.0)] == [21.0]  # kept this time
  p.arrived("a", 31.0)  # an ordinary return: learnt as before
  assert p.gap_s("a") == 15.0
  p.arrived("a", 40.0)  # no turn ended since: nothing to learn
  assert p.gap_s("a") == 15.0
