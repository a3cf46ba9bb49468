"""The P/D cluster's prefetcher (`engine.prefetch`, `cache.prefetcher`).

The cluster test runs real turns of the tiny model on 1P2D: session a's
turn ends, then session b's, whose blocks push a's out of a hot tier that
holds one session's context. While both are away, the prefetcher reads a's
context (a is predicted back first) from the cold tier into the tier on an
idle NIC, so a's next turn reads its whole prefix hot, with no NIC bytes
after it arrives, and generates exactly the single engine's tokens. Without
the prefetcher the same turn reads the evicted blocks through a NIC.
"""

from __future__ import annotations

import concurrent.futures as cf
import math

import numpy as np
import pytest

from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.cache.hot_tier import HotTier
from dualpath_jax.cache.prefetcher import (ReturnPredictor, blocks_to_read,
                                           pin_prefixes)
from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.factory import model_fingerprint
from dualpath_jax.engine.prefetch import TierPrefetcher
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.transfer import DualPathConfig, MeshConfig, StorageNic
from tests.test_cluster import (BLOCK_BYTES, BS, CACHE, ENGINE, _cold, _run,
                                reference, tiny)  # noqa: F401 (fixtures)


def _chain_of(req, loaded):
  n = (len(req.prompt_tokens) - 1) // BS * BS
  return hash_chain(req.prompt_tokens[:n], BS, model_fingerprint(loaded), "t")


@pytest.mark.parametrize("mode", ["off", "fetch", "pin"])
def test_an_away_session_comes_back_to_a_hot_prefix(tiny, reference, tmp_path,
                                                     mode):
  """off: no prefetcher; fetch: pins off while b runs (so b pushes a out),
  then on; pin: on from the start, so b's puts never push a out."""
  snapshot, turns = reference
  (reqs2, want2), (reqs3, want3) = turns
  by_id2 = {r.request_id: r for r in reqs2}
  a3 = next(r for r in reqs3 if r.session_id == "a")
  a_chain = _chain_of(a3, tiny)
  cluster = make_cluster(
      tiny, CACHE, ENGINE, _cold(tmp_path), MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=100.0,
                     prefill_keeps_prefix=False,
                     prefetch_blocks=0 if mode == "off" else 4),
      hot_tier_bytes=len(a_chain) * BLOCK_BYTES)
  pf = cluster.prefetcher
  if pf is not None:
    pf.predictor.prior_gap_s = 600.0  # back "soon", not gone
    pf.pin_fraction = 0.99 if mode == "pin" else 0.0
  for session, (ids, blocks) in snapshot.items():
    cluster.store.put(ids, blocks, tenant="t", session=session)
  stats = cluster.stats
  try:
    for s in ("a", "b"):  # a's turn 2 ends first, then b's
      got = _run(cluster, [TurnRequest(**by_id2[f"{s}#1"].__dict__)])
      assert got[f"{s}#1"].generated_tokens == \
          want2[f"{s}#1"].generated_tokens
    cluster.flush()  # the DEs' write-backs are in the store
    # a's turn 3 reads turn 2's context: the chain's stored leading run.
    in_store = cluster.store.contains(a_chain)
    a_chain = a_chain[:in_store.index(False) if False in in_store
                      else len(a_chain)]
    assert len(a_chain) > 4
    tier = cluster.workers["P0"].hot_tier
    if mode == "pin":
      assert tier.leading_run(a_chain) == len(a_chain)  # b could not evict
    else:
      assert tier.leading_run(a_chain) < len(a_chain)  # b pushed a out
    if mode == "fetch":
      pf.pin_fraction = 0.99  # the tier is a's, a being predicted first
      assert cluster.prefetch_pending()
      while cluster.prefetch_pending():  # both away: the driver steps
        assert cluster.step() == []
      assert tier.leading_run(a_chain) == len(a_chain)
    elif mode == "off":
      assert not cluster.prefetch_pending()
      assert cluster.cold_tier.report()["prefetch"] is None
    nic_before = sum(stats.nic_bytes.values())
    hot_before = stats.path_blocks["hot"]
    read_before = 0 if pf is None else pf.stats.read_blocks
    got = _run(cluster, [TurnRequest(**a3.__dict__)])
    assert got[a3.request_id].generated_tokens == \
        want3[a3.request_id].generated_tokens
    hot = stats.path_blocks["hot"] - hot_before
    if mode == "off":
      assert hot < len(a_chain)
      assert sum(stats.nic_bytes.values()) > nic_before
      return
    assert hot == len(a_chain)
    assert sum(stats.nic_bytes.values()) == nic_before  # none after arrival
    report = cluster.cold_tier.report()["prefetch"]
    assert report["used_blocks"] + report["unused_held_blocks"] + \
        report["evicted_unused_blocks"] == report["put_blocks"]
    assert sum(report["nic_bytes"].values()) == \
        report["read_blocks"] * BLOCK_BYTES
    if mode == "fetch":
      assert report["used_blocks"] == read_before > 0
    else:
      assert read_before == 0  # a's blocks never left
    # /metrics
    import prometheus_client  # pylint: disable=g-import-not-at-top
    from dualpath_jax.server.prometheus import EngineCollector  # pylint: disable=g-import-not-at-top
    from dualpath_jax.server.engine_loop import LocalEngineHandle  # pylint: disable=g-import-not-at-top
    registry = prometheus_client.CollectorRegistry()
    registry.register(EngineCollector(LocalEngineHandle(cluster).snapshot))
    text = prometheus_client.generate_latest(registry).decode()
    for outcome, key in (("read", "read_blocks"), ("used", "used_blocks"),
                         ("evicted_unused", "evicted_unused_blocks")):
      assert (f'dualpath_prefetch_blocks_total{{outcome="{outcome}"}} '
              f'{float(report[key])}') in text
  finally:
    cluster.close()


# ------------------------------------------------------------ the predictor
def test_the_predictor_learns_each_sessions_gap():
  p = ReturnPredictor(prior_gap_s=2.0, smoothing=0.5)
  assert p.gap_s("new") == 2.0  # nothing seen: the prior
  p.finished("a", 10.0, [b"x"], "P0")
  assert p.away(10.0)[0].due_s == 12.0
  p.arrived("a", 14.0)  # a gap of 4 s
  assert p.gap_s("a") == 4.0 and p.away(14.0) == []
  p.finished("a", 20.0, [b"x"], "P0")
  p.arrived("a", 22.0)  # 2 s: the average moves half way
  assert p.gap_s("a") == 3.0
  assert p.gap_s("new") == 3.0  # a newcomer: the median of gaps seen (4, 2)
  p.arrived("never-away", 30.0)  # an arrival without a turn end: ignored
  assert p.gap_s("never-away") == 3.0
  assert p.last_engine("a") == "P0" and p.last_engine("b") is None


def test_away_sessions_come_soonest_first_and_expire():
  p = ReturnPredictor(prior_gap_s=1.0, expire_factor=4.0)
  p.finished("slow", 0.0, [b"s"], "P0")
  p.arrived("slow", 5.0)  # its gap: 5 s
  p.finished("slow", 10.0, [b"s"], "P0")  # due 15
  p.finished("quick", 11.0, [b"q"], "P1")  # the median gap, 5 s: due 16
  p.finished("quicker", 12.0, [b"r"], "P0")
  p.arrived("quicker", 12.5)
  p.finished("quicker", 13.0, [b"r"], "P0")  # gap 0.5 s: due 13.5
  assert [a.session_id for a in p.away(13.0)] == ["quicker", "slow", "quick"]
  assert p.away(13.0)[1].chain == (b"s",) and p.away(13.0)[2].engine == "P1"
  # Overdue past 4x its gap (13 + 4 * 0.5 = 15): taken to have ended.
  assert [a.session_id for a in p.away(15.5)] == ["slow", "quick"]
  assert p.expired == 1


def test_blocks_gone_from_every_tier_cut_the_away_sessions_chains():
  """A deleted session's blocks (`forget_blocks`): an away session whose
  chain holds one keeps only what comes before it; one left with nothing
  is no longer listed (it took pins and store lookups for nothing)."""
  p = ReturnPredictor(prior_gap_s=1.0)
  p.finished("a", 0.0, [b"a0", b"a1", b"a2"], "P0")
  p.finished("b", 0.0, [b"s0", b"b1"], "P0")  # s0: another session's block
  p.finished("c", 0.0, [b"c0"], "P0")
  p.forget([b"a1", b"s0"])
  assert {a.session_id: a.chain for a in p.away(0.5)} == {
      "a": (b"a0",), "c": (b"c0",)}
  p.arrived("b", 0.8)  # b came back: learnt as any other arrival
  assert [a.session_id for a in p.away(0.9)] == ["a", "c"]


def test_the_predictor_forgets_the_least_recent_sessions():
  p = ReturnPredictor(max_sessions=2)
  for i, s in enumerate("abc"):
    p.finished(s, float(i), [s.encode()], "P0")
  assert [a.session_id for a in p.away(2.0)] == ["b", "c"]
  assert p.last_engine("a") is None and p.last_engine("c") == "P0"


@pytest.mark.parametrize("kw", [
    {"prior_gap_s": -1.0}, {"smoothing": 0.0}, {"smoothing": 1.5},
    {"expire_factor": 1.0}, {"max_sessions": 0}, {"history": 0}])
def test_the_predictor_refuses_bad_settings(kw):
  with pytest.raises(ValueError):
    ReturnPredictor(**kw)


def test_hot_tier_room_counts_free_slots_and_blocks_outside_keep():
  tier = HotTier(4, (1, 1), np.float32)
  assert tier.room() == 4
  tier.put([b"a", b"b"], np.zeros((2, 1, 1), np.float32))
  assert tier.room() == 4  # held blocks can be evicted
  assert tier.room(keep=[b"a", b"zz"]) == 3  # not b"a"; b"zz" is not held
  assert tier.room(keep=[b"a", b"b", b"a"]) == 2


# ------------------------------------------------- the prefetcher, on fakes
SHAPE = (1, 2, 1, 2, 2)  # [L, 2, Hkv, P, D]


class _Pool:
  """Holds `held` (ids), those in `running` referenced by a running turn."""

  def __init__(self, held=(), running=()):
    self.held, self.running = list(held), set(running)

  def lookup(self, block_id):
    return self.held.index(block_id) if block_id in self.held else None

  def ref_count(self, block):
    return int(self.held[block] in self.running)


class _Worker:
  def __init__(self, name, capacity, resident=(), running=(), queued=0):
    self.name = name
    self.hot_tier = HotTier(capacity, SHAPE, np.float32)
    self.manager = type("M", (), {"pool": _Pool(resident, running)})()
    self.queued = queued

  def queued_tokens(self):
    return self.queued


class _Store:
  def __init__(self, ids):
    self.blocks = {i: np.full(SHAPE, k, np.float32) for k, i in enumerate(ids)}

  def contains(self, ids):
    return [i in self.blocks for i in ids]


class _Loader:
  """Reads finish when the test says (`finish`), from `_Store`."""

  block_bytes = 4 * int(np.prod(SHAPE))

  def __init__(self, store):
    self.store, self.reads = store, []

  def read_blocks_async(self, ids, nic):
    future = cf.Future()
    self.reads.append((list(ids), nic, future))
    return future

  def finish(self, fail=False):
    for ids, _, future in self.reads:
      if future.done():
        continue
      if fail:
        future.set_exception(OSError("disk gone"))
        continue
      good = next((k for k, i in enumerate(ids) if i not in self.store.blocks),
                  len(ids))
      out = np.zeros((len(ids),) + SHAPE, np.float32)
      for k in range(good):
        out[k] = self.store.blocks[ids[k]]
      future.set_result((out, good))


def _ids(prefix, n):
  return [f"{prefix}{i}".encode() for i in range(n)]


def _prefetcher(workers, store_ids, *, batch=4, nic_rate=math.inf,
                errors=None, pin_fraction=0.5):
  store = _Store(store_ids)
  loader = _Loader(store)
  nics = {n: StorageNic(n, nic_rate) for n in
          [w.name for w in workers] + ["D0", "D1"]}
  pf = TierPrefetcher(
      loader, store, workers, ["D0", "D1"], nics, batch_blocks=batch,
      pin_fraction=pin_fraction, on_store_error=None if errors is None else
      (lambda what, err: errors.append(what)))
  return pf, loader, nics


def test_waiting_turns_come_first_then_the_soonest_away_session():
  p0 = _Worker("P0", 64)
  a, b, w = _ids("a", 8), _ids("b", 8), _ids("w", 8)
  pf, loader, _ = _prefetcher([p0], a + b + w)
  pf.turn_finished("b", 1.0, b, "P0")  # due later
  pf.turn_finished("a", 0.5, a, "P0")  # due sooner
  pf.step([("w", w)], now=1.0)
  # One read per idle NIC, the PE's own first: the waiting turn's two, then
  # the soonest away session's first.
  assert [(ids, nic) for ids, nic, _ in loader.reads] == [
      (w[:4], "P0"), (w[4:], "D0"), (a[:4], "D1")]
  assert pf.stats.path1_blocks == 4 and pf.stats.path2_blocks == 8
  assert pf.stats.nic_bytes == {n: 4 * _Loader.block_bytes
                                for n in ("P0", "D0", "D1")}
  pf.step([("w", w)], now=1.0)  # every NIC has a read in flight: none more
  assert len(loader.reads) == 3
  loader.finish()
  pf.step([("w", w)], now=1.0)  # installs, then reads the next blocks
  assert p0.hot_tier.leading_run(w) == 8 and p0.hot_tier.leading_run(a) == 4
  assert [(ids, nic) for ids, nic, _ in loader.reads[3:]] == [
      (a[4:], "P0"), (b[:4], "D0"), (b[4:], "D1")]
  loader.finish()
  pf.step([("w", w)], now=1.0)
  got = np.zeros((8,) + SHAPE, np.float32)  # the store's bytes, by id
  assert p0.hot_tier.read_run(b, got) == 8
  np.testing.assert_array_equal(got[:, 0, 0, 0, 0, 0], np.arange(8, 16))
  assert p0.hot_tier.read_run(w, got) == 8
  np.testing.assert_array_equal(got[:, 0, 0, 0, 0, 0], np.arange(16, 24))
  assert len(loader.reads) == 6  # all there: nothing more to read


def test_reads_skip_what_is_held_or_coming_and_stop_at_the_first_gap():
  a = _ids("a", 12)
  # a0, a1 in the pool, a running turn holding a0 only: a1 may be evicted
  # from the pool before a's turn comes, so it is read for the hot tier.
  p0 = _Worker("P0", 64, resident=a[:2], running=a[:1])
  p0.hot_tier.put(a[2:4], np.zeros((2,) + SHAPE, np.float32))
  pf, loader, _ = _prefetcher([p0], a[:7] + a[8:], batch=8)  # a7 not stored
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([], now=0.0)
  # Not a2, a3 (hot), nor a7 (not stored) or anything after it.
  assert [ids for ids, _, _ in loader.reads] == [[a[1]] + a[4:7]]
  loader.finish()
  pf.step([], now=0.0)
  assert len(loader.reads) == 1  # a7 is missing: nothing more to read
  assert p0.hot_tier.leading_run(a[1:]) == 6


def test_reads_stay_within_the_pins_and_pinned_blocks_stay():
  p0 = _Worker("P0", 8)
  w, a, x = _ids("w", 4), _ids("a", 4), _ids("x", 8)
  p0.hot_tier.put(w, np.zeros((4,) + SHAPE, np.float32))  # the waiting turn's
  pf, loader, _ = _prefetcher([p0], w + a, pin_fraction=0.75)
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([("w", w)], now=0.0)
  # 6 pins: w's 4 (hot already), then a's first 2, the only ones read.
  assert p0.hot_tier.pinned == frozenset(w + a[:2])
  assert [ids for ids, _, _ in loader.reads] == [a[:2]]
  loader.finish()
  pf.step([("w", w)], now=0.0)
  # Another turn's 8 blocks take the 2 unpinned slots only.
  assert p0.hot_tier.put(x, np.zeros((8,) + SHAPE, np.float32)) == 2
  assert p0.hot_tier.leading_run(w) == 4 and p0.hot_tier.leading_run(a) == 2


def test_a_prefix_running_turns_hold_in_the_pool_takes_no_pins():
  # A 6-block shared prefix that a running turn holds in the pool, then the
  # session's own 4 blocks; the pin budget is 4 (half of 8 slots).
  shared, own = _ids("s", 6), _ids("o", 4)
  p0 = _Worker("P0", 8, resident=shared, running=shared)
  pf, loader, _ = _prefetcher([p0], shared + own)
  pf.turn_finished("a", 0.0, shared + own, "P0")
  pf.step([], now=0.0)
  # The budget goes to the blocks only the tier can keep, and they are read.
  assert p0.hot_tier.pinned == frozenset(own)
  assert [ids for ids, _, _ in loader.reads] == [own]
  loader.finish()
  pf.step([], now=0.0)
  assert p0.hot_tier.leading_run(own) == 4


def test_a_busy_nic_gets_no_read_and_failures_are_counted():
  p0 = _Worker("P0", 64)
  a = _ids("a", 8)
  errors = []
  pf, loader, nics = _prefetcher([p0], a, nic_rate=1e3, errors=errors)
  for name in ("P0", "D0"):
    nics[name].plan(10_000)  # a turn's load queued there
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([], now=0.0)
  assert [nic for _, nic, _ in loader.reads] == ["D1"]
  loader.finish(fail=True)
  pf.step([], now=0.0)
  assert pf.stats.read_errors == 1 and errors == ["prefetch read"]
  assert p0.hot_tier.leading_run(a) == 0


def test_the_predicted_prefixes_are_pinned_against_other_puts():
  p0 = _Worker("P0", 8)
  a, b, c = _ids("a", 4), _ids("b", 4), _ids("c", 8)
  pf, loader, _ = _prefetcher([p0], a + b)
  pf.turn_finished("a", 0.0, a, "P0")  # first back: pinned
  pf.turn_finished("b", 0.5, b, "P0")  # past the half-tier budget: not
  pf.step([], now=1.0)
  assert p0.hot_tier.pinned == frozenset(a)
  loader.finish()
  pf.step([], now=1.0)
  # b is not pinned: not read (it would not stay).
  assert p0.hot_tier.leading_run(a) == 4 and p0.hot_tier.leading_run(b) == 0
  assert [ids for ids, _, _ in loader.reads] == [a]
  # Another turn's 8 blocks: a's stay, and c keeps what fits.
  assert p0.hot_tier.put(c, np.zeros((8,) + SHAPE, np.float32)) == 4
  assert p0.hot_tier.leading_run(a) == 4
  pf.turn_arrived("a", 2.0)  # a came back (and is placed): unpinned
  pf.step([], now=2.0)
  assert a[0] not in p0.hot_tier.pinned
  pf.close()
  assert p0.hot_tier.pinned == frozenset()


def test_used_and_unused_prefetched_blocks_are_counted():
  p0 = _Worker("P0", 8)
  a, b = _ids("a", 4), _ids("b", 8)
  pf, loader, _ = _prefetcher([p0], a + b)
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([], now=0.0)
  loader.finish()
  pf.step([], now=0.0)
  pf.turn_arrived("a", 1.0)
  pf.note_hot_read("P0", a[:3])  # a came back and read 3 of them
  pf.note_hot_read("P1", a[3:])  # another engine's read is not ours
  pf.step([], now=1.0)  # a is no longer predicted: unpinned
  p0.hot_tier.put(b, np.zeros((8,) + SHAPE, np.float32))  # evicts a's
  # /metrics' counts see the eviction at once, not at the report.
  assert pf.counts() == {"read": 4, "used": 3, "evicted_unused": 1}
  report = pf.report()
  assert report["put_blocks"] == 4 and report["used_blocks"] == 3
  assert report["evicted_unused_blocks"] == 1
  assert report["unused_held_blocks"] == 0


def test_prefetching_needs_a_hot_tier_on_every_prefill_engine():
  w = _Worker("P0", 4)
  w.hot_tier = None
  with pytest.raises(ValueError, match="hot tier"):
    _prefetcher([w], [])
  with pytest.raises(ValueError, match="prefetch_blocks"):
    DualPathConfig(prefetch_blocks=-1)
  with pytest.raises(ValueError, match="prefetch_blocks"):
    DualPathConfig(prefetch_blocks=True)


def test_a_cluster_prefetching_without_hot_tiers_is_refused(tiny, tmp_path):
  with pytest.raises(ValueError, match="hot tiers"):
    make_cluster(tiny, CACHE, ENGINE, _cold(tmp_path),
                 MeshConfig.parse("1P1D"), DualPathConfig(prefetch_blocks=4))


def test_replay_steps_a_prefetching_engine_while_every_session_is_away():
  """With every session in its tool wait, the replay loop used to sleep to
  the first return; an engine with prefetch reads going is stepped instead
  (each step waits at most 50 ms for a read), then the loop sleeps."""
  from dualpath_jax.workload.replay import replay_sessions
  from replay_fakes import InstantEngine, two_turn_session
  from tests.test_replay import ByteChatTokenizer

  now = [0.0]

  class Engine(InstantEngine):
    """Its turns' ends give the prefetcher 3 reads, one landing per idle step."""

    def __init__(self):
      super().__init__(now)
      self.idle_steps, self.pending = 0, 0

    def prefetch_pending(self):
      return self.pending > 0

    def step(self):
      if not self.queue:  # an idle step: one prefetch read lands
        self.idle_steps += 1
        self.pending -= 1
        now[0] += 0.01
        return []
      self.pending = 3
      return super().step()

  sleeps = []

  def sleep(s):
    sleeps.append(s)
    now[0] += s

  engine = Engine()
  res = replay_sessions(engine, ByteChatTokenizer(), [two_turn_session(1000)],
                        honor_gaps=True, clock=lambda: now[0], sleep=sleep)
  assert len(res.records) == 2
  assert engine.idle_steps == 3  # stepped while the session was away
  assert len(sleeps) == 1 and sleeps[0] == pytest.approx(1.0 - 0.03)


def test_the_servers_loop_steps_a_prefetching_engine_with_no_turns():
  """No request in flight, prefetch reads going: the server's engine loop
  steps the engine until they are done (it used to block for requests)."""
  import threading
  import time
  from dualpath_jax.server.engine_loop import EngineLoop, LocalEngineHandle

  class Engine:
    config = type("C", (), {"max_context": 64})()
    stats = None

    def __init__(self):
      self.reads_left, self.steps = 3, 0
      self.done = threading.Event()

    def has_work(self):
      return False

    def prefetch_pending(self):
      return self.reads_left > 0

    def step(self):
      self.steps += 1
      self.reads_left -= 1
      if not self.reads_left:
        self.done.set()
      return []

  engine = Engine()
  handle = LocalEngineHandle(engine)
  handle.snapshot = dict  # no /metrics in this test
  loop = EngineLoop(handle, idle_wait_s=0.01)
  loop.start()
  try:
    assert engine.done.wait(5.0)
    time.sleep(0.1)  # and no step after the reads are done
    assert engine.steps == 3
  finally:
    loop.stop()


@pytest.mark.parametrize("failure", ["raises", "short"])
def test_a_block_the_store_cannot_serve_is_not_asked_for_again(failure):
  """A read that raised, or came back short (a block listed but torn), was
  issued again at every step: a driver stepping while every session is
  away spun on it. Not asked for again until a turn ends (which may have
  written the block anew)."""
  p0 = _Worker("P0", 64)
  a = _ids("a", 8)
  errors = []
  pf, loader, _ = _prefetcher([p0], a if failure == "raises" else
                              a[:2] + a[3:], batch=8, errors=errors)
  pf.store.contains = lambda ids: [True] * len(ids)  # the index lists all
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([], now=0.0)
  assert len(loader.reads) == 1
  loader.finish(fail=failure == "raises")
  for _ in range(3):
    pf.step([], now=0.0)
  if failure == "raises":
    assert len(loader.reads) == 1 and errors == ["prefetch read"]
  else:  # a0, a1 read; a2 failed; nothing after it is of use
    assert len(loader.reads) == 1 and p0.hot_tier.leading_run(a) == 2
    assert pf.stats.missed_blocks == 6
  pf.turn_finished("b", 1.0, _ids("b", 1), "P0")  # a turn ended: try again
  pf.step([], now=1.0)
  assert loader.reads[1][0][0] == (a[0] if failure == "raises" else a[2])


def test_pins_take_the_chains_in_order_up_to_the_budget():
  assert pin_prefixes([[1, 2, 3], [4, 5], [6]], 4) == [1, 2, 3, 4]
  assert pin_prefixes([[1, 2, 3], [4]], 2) == [1, 2]  # the head of the first
  assert pin_prefixes([[1], [2]], 0) == []
  assert pin_prefixes([], 5) == []


def test_a_read_asks_for_missing_pinned_blocks_and_stops_at_an_unpinned_one():
  chain = list(range(10))
  pinned = set(range(8)) - {5}
  held = {0, 1, 3}
  want = blocks_to_read(chain, 1, pinned.__contains__, held.__contains__, 8)
  assert want == [2, 4]  # 0 before start; 1, 3 held; stops at 5
  assert blocks_to_read(chain, 0, pinned.__contains__, held.__contains__,
                        1) == [2]
  assert blocks_to_read(chain, 0, lambda i: True, lambda i: False,
                        3) == [0, 1, 2]


def test_a_prefetched_block_put_again_by_another_is_not_counted_used():
  """A prefetched block that left the tier unread, then came back by
  another put (a turn's write-back), is an unused prefetch when a turn
  reads it, not a used one."""
  p0 = _Worker("P0", 8)
  a = _ids("a", 3)
  pf, loader, _ = _prefetcher([p0], a, batch=4)
  pf.turn_finished("a", 0.0, a, "P0")
  pf.step([], now=0.0)
  loader.finish()
  pf.step([], now=0.0)
  assert p0.hot_tier.leading_run(a) == 3
  assert p0.hot_tier.discard([a[0]]) == 1  # gone unread ...
  p0.hot_tier.put([a[0]], np.zeros((1,) + SHAPE, np.float32))  # ... put anew
  pf.note_hot_read("P0", a)
  assert pf.stats.used_blocks == 2 and pf.stats.evicted_unused_blocks == 1
  assert pf.report()["unused_held_blocks"] == 0
