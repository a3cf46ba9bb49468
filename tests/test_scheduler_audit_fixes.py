"""Fixes from an audit of the scheduler (`dualpath_jax.scheduler`) and of the
emulated storage NIC and the loader (`transfer.nic`, `transfer.loader`),
each with the case that showed the bug, plus one randomized check of the
loader's NIC accounting."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.scheduler import (ClusterSnapshot, EngineState, ManualClock,
                                    ReadPath, TurnDemand, WaitingTurn,
                                    choose_prefill_batch, dualpath, place_all)
from dualpath_jax.transfer import (DualPathConfig, DualPathLoader,
                                   InMemoryBlockSource, LoadRequest,
                                   MeshConfig, StorageNic, build_cluster_mesh)
from dualpath_jax.transfer import loader as loader_module

PE, DE, FREE = ReadPath.PE_READ, ReadPath.DE_READ, ReadPath.FREE
SHAPE = (2, 2, 1, 2, 4)  # [L, 2, Hkv, P, D] of one block: 128 bytes in f32


def _snapshot(now_s=0.0, **p0):
  return ClusterSnapshot(now_s, (EngineState("P0", "prefill", 1e6, **p0),
                                 EngineState("D0", "decode", 1e6)))


# --------------------------------------------------------- scheduler.state
def test_snapshot_time_must_be_finite():
  """`ClusterSnapshot.now_s` was not checked: a NaN clock reading gave
  placements whose load and ready times were NaN."""
  demand = TurnDemand("t", new_tokens=1, hit_blocks=2, block_bytes=10,
                      total_blocks=3)
  assert dualpath(demand, _snapshot(1.5)).ready_s > 1.5
  for bad in (math.nan, math.inf, "0"):
    with pytest.raises(ValueError, match="now_s"):
      _snapshot(bad)


@pytest.mark.parametrize("field,rate", [
    ("nic_queued_bytes", "nic_bytes_per_s"),
    ("queued_tokens", "compute_tokens_per_s"),
    ("hot_queued_bytes", "hot_bytes_per_s"),
    ("hop_queued_bytes", None)])
def test_an_infinite_backlog_is_rejected(field, rate):
  """Queued amounts accepted math.inf. Over an unlimited link (rate inf)
  that costs inf / inf = NaN seconds, which every comparison of the
  policies takes for "not later": P0, with an infinite NIC backlog, was
  estimated to have its blocks at once."""
  kwargs = {"nic_bytes_per_s": 1.0, field: math.inf}
  if rate is not None:
    kwargs[rate] = math.inf
  with pytest.raises(ValueError, match=field):
    EngineState("P0", "prefill", **kwargs)
  with pytest.raises(ValueError, match="block_bytes"):
    TurnDemand("t", new_tokens=1, hit_blocks=1, block_bytes=math.inf,
               total_blocks=1)


def test_numpy_counts_are_numbers(np_rng):
  """Counts read from numpy (`np.int64`) were refused as "must be a number,
  got 5" (only Python int and float passed the check)."""
  free = np_rng.integers(50, 100, size=2)  # np.int64
  queued = np_rng.integers(0, 10**6, size=2)
  hit = np_rng.integers(1, 8)
  snap = ClusterSnapshot(0.0, (
      EngineState("P0", "prefill", 1e6, nic_queued_bytes=queued[0],
                  free_hbm_blocks=free[0]),
      EngineState("D0", "decode", 1e6, nic_queued_bytes=queued[1],
                  free_hbm_blocks=free[1], queued_tokens=np.int64(3))))
  demand = TurnDemand("t", new_tokens=np.int64(5), hit_blocks=hit,
                      block_bytes=np.int64(1000), total_blocks=hit + 1,
                      resident_blocks={"P0": np.int64(1)})
  as_int = TurnDemand("t", new_tokens=5, hit_blocks=int(hit), block_bytes=1000,
                      total_blocks=int(hit) + 1, resident_blocks={"P0": 1})
  assert dualpath(demand, snap) == dualpath(as_int, snap)


def test_a_float_block_count_is_refused_where_it_is_made():
  """`hit_blocks=3.0` (blocks from a true division) was accepted and failed
  later, inside a policy, as "TypeError: 'float' object cannot be
  interpreted as an integer"."""
  for field in ("hit_blocks", "total_blocks", "new_tokens", "decode_blocks"):
    kwargs = dict(new_tokens=1, hit_blocks=3, block_bytes=8, total_blocks=4)
    kwargs[field] = float(kwargs.get(field, 4))
    with pytest.raises(ValueError, match=f"{field} must be an int"):
      TurnDemand("t", **kwargs)
  with pytest.raises(ValueError, match="resident_blocks must be an int"):
    TurnDemand("t", 1, 3, 8, 4, resident_blocks={"P0": 1.0})


def test_after_refuses_a_placement_on_engines_it_does_not_have():
  """`ClusterSnapshot.after` charged only the engines it found by name: a
  placement naming another cluster's engines (a custom policy's, or one
  placed from another snapshot) charged nothing, so every later turn of
  `place_all` saw the same idle engines."""
  snap = _snapshot()
  demand = TurnDemand("t", new_tokens=7, hit_blocks=2, block_bytes=10,
                      total_blocks=3)
  placement = dualpath(demand, snap)
  for change in (dict(prefill_engine="P9"), dict(decode_engine="P0"),
                 dict(prefill_engine="D0", decode_engine="P0"),
                 dict(paths=placement.paths[:1])):
    with pytest.raises(ValueError):
      snap.after(dataclasses.replace(placement, **change), demand)

  def elsewhere(d, s):
    return dataclasses.replace(dualpath(d, s), prefill_engine="P7")

  with pytest.raises(ValueError, match="P7"):
    place_all(elsewhere, [demand], snap)
  assert snap.after(placement, demand).engine("P0").queued_tokens == 7


# ------------------------------------------------------- scheduler.batching
def test_a_fractional_turn_budget_is_refused(np_rng):
  """`max_batch_turns=2.5` was accepted and never reached (`len(batch) ==
  2.5` is never true): the batch took every ready turn."""
  n = int(np_rng.integers(4, 10))
  waiting = [WaitingTurn(f"t{i}", float(i), 1) for i in range(n)]
  with pytest.raises(ValueError, match="max_batch_turns"):
    choose_prefill_batch(waiting, 0.0, max_batch_tokens=1000,
                         max_batch_turns=2.5)
  assert len(choose_prefill_batch(waiting, 0.0, max_batch_tokens=1000,
                                  max_batch_turns=np.int64(2))) == 2


def test_nan_in_a_batch_choice_is_refused():
  """NaN compares false with everything: a NaN token budget let every turn
  join, a NaN `now_s` or `load_ready_s` kept turns waiting forever (an
  engine with work and nothing to run), a NaN `new_tokens` let every later
  turn fit the budget."""
  waiting = [WaitingTurn("a", 0.0, 10), WaitingTurn("b", 1.0, 10)]
  with pytest.raises(ValueError, match="max_batch_tokens"):
    choose_prefill_batch(waiting, 0.0, max_batch_tokens=math.nan,
                         max_batch_turns=8)
  with pytest.raises(ValueError, match="now_s"):
    choose_prefill_batch(waiting, math.nan, max_batch_tokens=100,
                         max_batch_turns=8)
  for kwargs, field in ((dict(arrival_s=math.nan), "arrival_s"),
                        (dict(load_ready_s=math.nan), "load_ready_s"),
                        (dict(new_tokens=math.nan), "new_tokens"),
                        (dict(new_tokens=math.inf), "new_tokens")):
    with pytest.raises(ValueError, match=field):
      WaitingTurn("c", **{"arrival_s": 0.0, "new_tokens": 1, **kwargs})
  # A turn still loading is load_ready_s=inf (the runtime's way): allowed.
  assert choose_prefill_batch(
      [WaitingTurn("c", 0.0, 1, math.inf)] + waiting, 5.0,
      max_batch_tokens=100, max_batch_turns=8) == ["a", "b"]


# ---------------------------------------------------------- scheduler.clock
def test_manual_clock_refuses_non_finite_times():
  """A NaN passed every "not backwards" check (`nan < 0` is false) and
  then stayed: every later reading, and every time derived from one, was
  NaN."""
  clock = ManualClock(1.0)
  for bad in (math.nan, math.inf):
    with pytest.raises(ValueError, match="finite"):
      clock.advance(bad)
    with pytest.raises(ValueError, match="finite"):
      clock.advance_to(bad)
    with pytest.raises(ValueError, match="finite"):
      ManualClock(bad)
  assert clock.now() == 1.0 and clock.advance(0.5) == 1.5


# ------------------------------------------------------------ transfer.nic
def test_nic_refuses_byte_counts_that_would_poison_it(np_rng):
  """`reserve`/`plan` took NaN and inf (`nan < 0` is false) and `unplan`
  took anything: a NaN request made `total_bytes` NaN for good and wiped
  every other load's planned bytes, an inf one left the bucket at -inf
  (every later request waiting forever), `unplan(-n)` added n."""
  clock = ManualClock()
  nic = StorageNic("P0", 1000.0, 10, clock=clock.now, sleep=lambda s: None)
  planned = int(np_rng.integers(1, 10**6))
  nic.plan(planned)
  nic.acquire(20)
  before = nic.stats()
  for bad in (math.nan, math.inf, -1, 2.5, True):
    for call in (nic.reserve, nic.plan, nic.unplan,
                 lambda n: nic.reserve(n, planned=True)):
      with pytest.raises(ValueError, match="nbytes"):
        call(bad)
  assert nic.stats() == before
  assert nic.planned_bytes() == planned
  clock.advance(1.0)
  assert nic.queued_bytes() == 0.0


@pytest.mark.parametrize("burst", [math.nan, math.inf, 0.5])
def test_nic_refuses_a_burst_it_cannot_hold(burst):
  """A NaN or inf `burst_bytes` passed the `< 1` check and failed in
  `int()` ("cannot convert float NaN to integer", an OverflowError for
  inf): no message naming the argument."""
  with pytest.raises(ValueError, match="burst_bytes"):
    StorageNic("P0", 1.0, burst)


# --------------------------------------------------------- transfer.loader
@pytest.fixture(scope="module")
def cluster():
  return build_cluster_mesh(MeshConfig.parse("1P2D"), jax.devices()[:1])


def _loader(cluster, source, rate=math.inf):
  clock = ManualClock()
  nics = {e.name: StorageNic(e.name, rate, 64, clock=clock.now,
                             sleep=lambda s: None) for e in cluster.engines}
  return DualPathLoader(cluster, source, nics, DualPathConfig(), SHAPE,
                        np.float32), nics


def _blocks(np_rng, names):
  return {n: np_rng.standard_normal(SHAPE).astype(np.float32) for n in names}


def test_a_load_submitted_after_close_leaves_nothing_planned(cluster, np_rng):
  """`read_to_host_async` planned each path's bytes, then queued the read:
  on a closed loader the queueing raised and the bytes stayed planned, a
  backlog the scheduler saw on the PE's NIC forever."""
  ids = [f"b{i}".encode() for i in range(int(np_rng.integers(2, 20)))]
  loader, nics = _loader(cluster, InMemoryBlockSource(_blocks(np_rng, ids)))
  loader.close()
  paths = [PE, DE] * (len(ids) // 2) + [PE] * (len(ids) % 2)
  with pytest.raises(RuntimeError):
    loader.read_to_host_async(LoadRequest(ids, range(len(ids)), paths,
                                          "P0", "D1"))
  with pytest.raises(RuntimeError):
    loader.read_blocks_async(ids, "D0")
  assert {n: nic.planned_bytes() for n, nic in nics.items()} == {
      "P0": 0, "D0": 0, "D1": 0}


def test_a_host_buffer_that_cannot_be_allocated_leaves_nothing_planned(
    cluster, np_rng, monkeypatch):
  """Both reads allocated their host buffer before the code that unplans
  on failure: a MemoryError there (a large load on a full host) left the
  load's bytes planned for good."""
  ids = [f"b{i}".encode() for i in range(int(np_rng.integers(1, 40)))]
  loader, nics = _loader(cluster, InMemoryBlockSource(_blocks(np_rng, ids)))
  empty = np.empty

  def empty_but_not_on_readers(*args, **kwargs):
    if threading.current_thread().name.startswith("read-"):
      raise MemoryError("no host memory for the buffer")
    return empty(*args, **kwargs)

  monkeypatch.setattr(np, "empty", empty_but_not_on_readers)
  with pytest.raises(MemoryError):
    loader.read_to_host(LoadRequest(ids, range(len(ids)), [DE] * len(ids),
                                    "P0", "D0"))
  with pytest.raises(MemoryError):
    loader.read_blocks_async(ids, "P0").result()
  loader.close()
  assert all(nic.planned_bytes() == 0 for nic in nics.values())
  assert all(nic.total_bytes == 0 for nic in nics.values())


class _GatedSource(InMemoryBlockSource):
  """Reads wait until `gate` is set."""

  def __init__(self, blocks):
    super().__init__(blocks)
    self.gate = threading.Event()

  def get(self, ids):
    self.gate.wait(10)
    return super().get(ids)


def test_a_prefetch_read_cancelled_while_queued_leaves_nothing_planned(
    cluster, np_rng):
  """`read_blocks_async` hands out its reader's future: cancelled while
  queued (behind a read still running), the read never ran and its bytes
  stayed planned on the NIC for good."""
  ids = [f"b{i}".encode() for i in range(int(np_rng.integers(2, 30)))]
  source = _GatedSource(_blocks(np_rng, ids))
  loader, nics = _loader(cluster, source, rate=1e6)
  running = loader.read_blocks_async(ids[:1], "D0")  # holds D0's reader
  queued = loader.read_blocks_async(ids, "D0")
  assert queued.cancel()
  source.gate.set()
  assert running.result()[1] == 1
  loader.close()
  assert nics["D0"].planned_bytes() == 0
  assert nics["D0"].total_bytes == loader.block_bytes


def test_move_blocks_refuses_pages_outside_the_pools(cluster, np_rng):
  """JAX does not raise on a bad index: `move_blocks` copied the last page
  for a source page past the pool (gathers clamp), silently dropped a
  destination page past it (the scatter's padding rule), wrapped negative
  pages, and wrote duplicate destinations in no defined order."""
  loader, _ = _loader(cluster, InMemoryBlockSource())
  n_src, n_dst = (int(n) for n in np_rng.integers(3, 9, size=2))
  src = jnp.asarray(np_rng.standard_normal((SHAPE[0], n_src) + SHAPE[1:]),
                    jnp.float32)
  dst = jnp.zeros((SHAPE[0], n_dst) + SHAPE[1:], jnp.float32)
  for src_pages, dst_pages, match in (
      ([0, n_src], [0, 1], "source pages"),
      ([-1, 0], [0, 1], "source pages"),
      ([0, 1], [n_dst, 0], "destination pages"),
      ([0, 1], [0, -2], "destination pages"),
      ([0, 1], [2, 2], "distinct")):
    with pytest.raises(ValueError, match=match):
      loader.move_blocks(src, src_pages, "P0", dst, dst_pages, "D0")
  loader.close()


class _HeldFuture:
  """A reader's future, done at once, whose callbacks the test runs."""

  def __init__(self, result):
    self._result = result
    self.callbacks = []

  def done(self) -> bool:
    return True

  def result(self):
    return self._result

  def add_done_callback(self, fn) -> None:
    self.callbacks.append(fn)


class _InlineReader:
  """A reader that runs each read at once and holds its future's callbacks."""

  def __init__(self):
    self.futures: list[_HeldFuture] = []

  def submit(self, fn, *args):
    self.futures.append(_HeldFuture(fn(*args)))
    return self.futures[-1]


class _StaleDoneFuture(cf.Future):
  """`done()` answers, then takes a moment to return: what a thread switch
  between a callback's "not done yet?" and its `set_result` does, every
  time."""

  def done(self) -> bool:
    answer = super().done()
    time.sleep(0.05)
    return answer


def test_two_reads_ending_together_set_the_load_once(cluster, np_rng,
                                                      monkeypatch):
  """The two paths' reads end on two reader threads (or one already done
  when its callback is added, which runs it at once on the caller's). Each
  callback that finds both reads done checked `joined.done()` and then set
  the result: two of them could both pass the check, and the second
  `set_result` raised InvalidStateError (logged by concurrent.futures as
  "exception calling callback")."""
  ids = [f"b{i}".encode() for i in range(4)]
  loader, _ = _loader(cluster, InMemoryBlockSource(_blocks(np_rng, ids)))
  readers = {name: _InlineReader() for name in loader._readers}
  monkeypatch.setattr(loader, "_readers", readers)
  monkeypatch.setattr(loader_module, "cf",
                      types.SimpleNamespace(Future=_StaleDoneFuture))
  joined = loader.read_to_host_async(
      LoadRequest(ids, range(4), [PE, DE, DE, PE], "P0", "D1"))
  callbacks = [(f, fn) for name in ("P0", "D1")
               for f in readers[name].futures for fn in f.callbacks]
  assert len(callbacks) == 2
  start, errors = threading.Barrier(2), []

  def fire(future, fn):
    start.wait()
    try:
      fn(future)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=fire, args=c) for c in callbacks]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert sorted(joined.result().path1_pages) == [0, 3]
  assert sorted(joined.result().path2_pages) == [1, 2]


class _FlakySource:
  """Blocks by id; a read asking for a `broken` id raises (a storage
  error), an unknown id is a miss. Records every id asked for."""

  def __init__(self, blocks, broken):
    self.blocks, self.broken = blocks, broken
    self.asked: list[bytes] = []
    self._lock = threading.Lock()

  def get(self, ids):
    with self._lock:
      self.asked.extend(ids)
    if self.broken.intersection(ids):
      raise OSError("storage error")
    return [self.blocks.get(i) for i in ids]


def test_random_loads_admit_exactly_the_bytes_read(cluster, np_rng):
  """Random loads (both paths, FREE, RESIDENT, misses, storage errors,
  batches past READ_BATCH_BLOCKS) and prefetch reads (some cancelled), with
  the loader closed at a random point: once every read has ended, no NIC has bytes
  still planned, and each NIC admitted exactly the bytes of the blocks read
  through it (the source was asked for them)."""
  bb = int(np.prod(SHAPE)) * 4
  block = np.zeros(SHAPE, np.float32)
  for trial in range(1000):
    stored, broken, charge = {}, set(), {}  # charge: id -> (NIC, bytes)
    source = _FlakySource(stored, broken)
    rate = float(np_rng.choice([1e3, 1e6, math.inf]))
    loader, nics = _loader(cluster, source, rate)
    futures, ops = [], int(np_rng.integers(1, 7))
    close_at = int(np_rng.integers(0, ops + 2))
    for op in range(ops):
      if op == close_at:
        loader.close()
      n = int(np_rng.integers(1, 40))
      ids = [f"{trial}/{op}/{i}".encode() for i in range(n)]
      for i in ids:
        kind = np_rng.random()
        if kind < 0.8:
          stored[i] = block
        elif kind < 0.83:
          broken.add(i)
      try:
        if np_rng.random() < 0.7:
          paths = list(np_rng.choice([ReadPath.RESIDENT, PE, DE, FREE], n))
          de = str(np_rng.choice(["D0", "D1"]))
          for i, p in zip(ids, paths):
            charge[i] = ("P0" if p in (PE, FREE) else de,
                         bb if p in (PE, DE) else 0)
          futures.append(loader.read_to_host_async(
              LoadRequest(ids, range(n), paths, "P0", de)))
        else:
          engine = str(np_rng.choice(["P0", "D0", "D1"]))
          charge.update((i, (engine, bb)) for i in ids)
          futures.append(loader.read_blocks_async(ids, engine))
          if np_rng.random() < 0.3:
            futures[-1].cancel()  # a prefetch no longer wanted
      except RuntimeError:
        assert op >= close_at  # only a closed loader refuses a read
    cf.wait(futures)
    loader.close()
    admitted = {name: 0 for name in nics}
    for i in source.asked:
      admitted[charge[i][0]] += charge[i][1]
    assert {n: nic.total_bytes for n, nic in nics.items()} == admitted, trial
    assert all(nic.planned_bytes() == 0 for nic in nics.values()), trial
