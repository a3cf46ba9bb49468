"""Path 1 and path 2 block loaders, layer by layer, and the PE -> DE hand-off.

One load moves a turn's hit blocks from the cold tier into pages of its
prefill engine's KV pool `[L, N, 2, Hkv, P, D]`, each block by the path the
scheduler chose (`ReadPath` per block):

    path 1 (PE_READ): cold tier --PE NIC--> PE host buffer --device_put--> PE HBM
    path 2 (DE_READ): cold tier --DE NIC--> DE host buffer --device_put--> DE HBM
                      --Handoff (collective)--> PE HBM
    FREE (oracle):    like path 1 without charging any NIC

Stages:

1. `read_to_host_async` reads both paths' blocks at once into per-engine
   host buffers laid out layer-major `[L, n, 2, Hkv, P, D]` (one layer is one
   contiguous slice) and returns a future. Every engine's reads run on that
   engine's own reader thread, in submission order, each batch first
   admitted by the engine's `StorageNic`: a FIFO queue per NIC, as a real
   NIC serves its requests, so loads of different turns on different NICs
   proceed in parallel. The bytes a load will read are `plan`ned on its NICs
   when it is submitted, so the scheduler sees them at once. A block the
   source cannot serve is a miss: its page is not written and its index is
   reported, for the engine to recompute.
2. `LayerStager` moves one layer at a time: it stages layer l's slices on the
   devices (path 2: on the DE, then handed off to the PE) and scatters them
   into the pool's pages when asked for layer l. At most `layers_in_flight`
   layers are staged ahead, so the PE holds a bounded slice of the loaded
   prefix beyond its destination pages, and a layer-wise prefill
   (`ModelRunner.step_layerwise`) computes layer l while later layers are
   still moving. `iter_layers` is the same without a prefill.

`move_blocks` is the hand-off after prefill: it gathers pages of every layer
from one engine's pool, hands them to another engine and scatters them into
its pool (same `Handoff` as path 2).

Every step copies bytes (no cast, no arithmetic), so a block arrives
bit-identical whichever path delivered it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import inspect
import threading
import time
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.buckets import next_pow2
from dualpath_jax.scheduler.state import ReadPath
from dualpath_jax.transfer.config import DualPathConfig
from dualpath_jax.transfer.handoff import Handoff, head_spec
from dualpath_jax.transfer.mesh import ClusterMesh
from dualpath_jax.transfer.nic import StorageNic
from dualpath_jax.transfer.source import BlockSource, StagingRows

READ_BATCH_BLOCKS = 16  # blocks per cold-tier read (and per NIC admission)
MIN_BLOCK_BUCKET = 16  # block counts are padded to powers of two from here


def block_bucket(n: int) -> int:
  """Rows a buffer of `n` blocks is padded to: one compile per bucket, not per n."""
  return next_pow2(n, MIN_BLOCK_BUCKET)


@dataclasses.dataclass(frozen=True)
class LoadRequest:
  """Blocks to bring into a prefill engine's pool, with their paths.

  Attributes:
    block_ids: cold-tier ids of the blocks.
    dest_pages: the PE pool page of each block.
    paths: `ReadPath` of each block (RESIDENT blocks are skipped).
    prefill_engine / decode_engine: engine names.
  """

  block_ids: Sequence[bytes]
  dest_pages: Sequence[int]
  paths: Sequence[ReadPath]
  prefill_engine: str
  decode_engine: str

  def __post_init__(self):
    n = len(self.block_ids)
    if len(self.dest_pages) != n or len(self.paths) != n:
      raise ValueError(f"block_ids ({n}), dest_pages ({len(self.dest_pages)}) "
                       f"and paths ({len(self.paths)}) must have equal length")
    if len(set(self.dest_pages)) != n:
      raise ValueError("dest_pages must be distinct")


@dataclasses.dataclass
class HostStage:
  """Blocks in host buffers, per path; layer-major.

  Each buffer has `block_bucket(n)` columns for the path's n requested
  blocks; the first `len(pathK_pages)` hold the blocks read, the rest are
  padding that no scatter writes.
  """

  path1: np.ndarray  # [L, b1, 2, Hkv, P, D], PE host buffer
  path1_pages: np.ndarray  # [k1 <= b1] int32, destination of each block read
  path2: np.ndarray  # [L, b2, 2, Hkv, P, D], DE host buffer
  path2_pages: np.ndarray  # [k2 <= b2] int32
  missing: list[int]  # indices into the request's block_ids
  read_s: dict[str, float]  # wall seconds of each path's reads


@dataclasses.dataclass
class LoadReport:
  """What one load did."""

  path1_blocks: int = 0
  path2_blocks: int = 0
  missing: list[int] = dataclasses.field(default_factory=list)
  nic_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  read_s: dict[str, float] = dataclasses.field(default_factory=dict)
  layers_s: float = 0.0


class DualPathLoader:
  """Loads blocks into a prefill engine's pool by path 1 and path 2.

  Args:
    cluster: the engines' sub-meshes.
    source: the cold tier (`BlockSource`).
    nics: each engine's `StorageNic`, by engine name.
    config: `DualPathConfig` (staging bounds, hand-off method).
    block_shape: `(L, 2, Hkv, P, D)` of one block.
    dtype: the pool dtype.
  """

  def __init__(self, cluster: ClusterMesh, source: BlockSource,
               nics: Mapping[str, StorageNic], config: DualPathConfig,
               block_shape: Sequence[int], dtype):
    missing = [e.name for e in cluster.engines if e.name not in nics]
    if missing:
      raise ValueError(f"no StorageNic for engines {missing}")
    if len(block_shape) != 5:
      raise ValueError(f"block_shape must be (L, 2, Hkv, P, D), got {block_shape}")
    self.cluster = cluster
    self.source = source
    self.nics = dict(nics)
    self.config = config
    self.block_shape = tuple(int(s) for s in block_shape)
    self.dtype = np.dtype(dtype)
    self.block_bytes = int(np.prod(self.block_shape)) * self.dtype.itemsize
    self._handoffs: dict[tuple[str, str, int], Handoff] = {}
    self._readers = {  # one FIFO reader per engine NIC
        e.name: cf.ThreadPoolExecutor(1, thread_name_prefix=f"read-{e.name}")
        for e in cluster.engines}
    # A source that reads into a caller's buffer (`storage.BlockStore`) gets
    # one reused staging buffer per reader: fresh result arrays cost more CPU
    # (page faults) than the disk read itself on small hosts (docs/storage.md).
    reads_into = "out" in inspect.signature(source.get).parameters
    self._staging = {e.name: StagingRows(self.block_shape, self.dtype, READ_BATCH_BLOCKS)
                     for e in cluster.engines} if reads_into else {}

  def close(self) -> None:
    for reader in self._readers.values():
      reader.shutdown(wait=True)

  def handoff(self, src: str, dst: str, head_axis: int) -> Handoff:
    key = (src, dst, head_axis)
    if key not in self._handoffs:
      self._handoffs[key] = Handoff(self.cluster.engine(src),
                                    self.cluster.engine(dst),
                                    self.config.handoff, head_axis)
    return self._handoffs[key]

  # --------------------------------------------------------------- stage 1
  def read_to_host(self, req: LoadRequest) -> HostStage:
    """Reads path-1 and path-2 blocks concurrently, each via its engine's NIC."""
    return self.read_to_host_async(req).result()

  def read_to_host_async(self, req: LoadRequest) -> "cf.Future[HostStage]":
    """Queues the reads of `read_to_host` on the engines' readers; a future."""
    self._check_engines(req)
    groups = {1: [], 2: []}
    for i, path in enumerate(req.paths):
      path = ReadPath(path)
      if path in (ReadPath.PE_READ, ReadPath.FREE):
        groups[1].append(i)
      elif path == ReadPath.DE_READ:
        groups[2].append(i)
    for group in groups.values():
      if len(group) * self.block_bytes > self.config.host_buffer_bytes:
        raise ValueError(
            f"{len(group)} blocks ({len(group) * self.block_bytes} bytes) exceed "
            f"an engine's host buffer ({self.config.host_buffer_bytes} bytes); "
            "split the load or raise DualPathConfig.host_buffer_bytes")
    nic_of = {1: req.prefill_engine, 2: req.decode_engine}
    futures = {}
    for g, idx in groups.items():
      nbytes = self._charged_bytes(req, idx)
      self.nics[nic_of[g]].plan(nbytes)
      try:
        futures[g] = self._readers[nic_of[g]].submit(
            self._read_group, req, idx, nic_of[g])
      except BaseException:  # not queued (the reader is shut down): no read
        self.nics[nic_of[g]].unplan(nbytes)
        raise
    joined: cf.Future = cf.Future()
    joined.set_running_or_notify_cancel()
    # The two reads end on two reader threads, and a callback added to a
    # future already done runs at once on this one: more than one `join` may
    # find both done. The lock makes "not done yet, so set it" one step.
    joining = threading.Lock()

    def join(_):
      if not all(f.done() for f in futures.values()):
        return
      with joining:
        if joined.done():
          return
        try:
          results = {g: f.result() for g, f in futures.items()}
        except BaseException as e:  # pylint: disable=broad-except
          joined.set_exception(e)
          return
        missing = sorted(results[1][2] + results[2][2])
        joined.set_result(HostStage(
            results[1][0], results[1][1], results[2][0], results[2][1],
            missing, {nic_of[1] + "/path1": results[1][3],
                      nic_of[2] + "/path2": results[2][3]}))

    for f in futures.values():
      f.add_done_callback(join)
    return joined

  def read_blocks_async(self, block_ids: Sequence[bytes], engine: str
                        ) -> "cf.Future[tuple[np.ndarray, int]]":
    """Reads `block_ids` (one chain's consecutive blocks) from the cold tier
    through `engine`'s NIC into a new block-major host array, queued on that
    NIC's reader behind its loads.

    For the prefetcher: the blocks go to a hot tier, not into a pool. The
    future's result is `(blocks [n, L, 2, Hkv, P, D], good)`, `good` being
    how many leading blocks the store served (a block it lacks or cannot
    verify ends the run: the ones after it are useless to a prefix).
    Cancelling the future while the read is still queued withdraws its
    planned bytes from the NIC.
    """
    if engine not in self._readers:
      raise ValueError(f"no engine {engine!r}")
    n = len(block_ids)
    nbytes = n * self.block_bytes
    self.nics[engine].plan(nbytes)

    def read():
      try:  # what fails before the NIC admits the bytes leaves them planned
        out = np.empty((n,) + self.block_shape, self.dtype)
        self.nics[engine].acquire(nbytes, planned=True)
      except BaseException:
        self.nics[engine].unplan(nbytes)
        raise
      got = (self.source.get(list(block_ids), out=out)
             if engine in self._staging else self.source.get(list(block_ids)))
      if len(got) != n:
        raise ValueError(f"source returned {len(got)} blocks for {n} ids")
      good = next((i for i, b in enumerate(got) if b is None), n)
      if engine not in self._staging:
        for i in range(good):  # checked as a load's are: no cast, no broadcast
          block = np.asarray(got[i])
          if block.shape != self.block_shape or block.dtype != self.dtype:
            raise ValueError(f"block {block_ids[i]!r} is {block.shape} "
                             f"{block.dtype}, expected {self.block_shape} "
                             f"{self.dtype}")
          out[i] = block
      return out, good

    try:
      future = self._readers[engine].submit(read)
    except BaseException:  # not queued (the reader is shut down): no read
      self.nics[engine].unplan(nbytes)
      raise

    def unplan_if_cancelled(f: cf.Future) -> None:
      if f.cancelled():  # cancelled while queued: `read` never runs
        self.nics[engine].unplan(nbytes)

    future.add_done_callback(unplan_if_cancelled)
    return future

  def _check_engines(self, req: LoadRequest) -> None:
    for name, role in ((req.prefill_engine, "prefill"),
                       (req.decode_engine, "decode")):
      if self.cluster.engine(name).role != role:
        raise ValueError(f"{name} is not a {role} engine")

  def _read_group(self, req: LoadRequest, indices: list[int], engine: str):
    t0 = time.perf_counter()
    L = self.block_shape[0]
    pages, missing, kept = [], [], 0
    unread = self._charged_bytes(req, indices)
    try:  # the buffer too: a failed allocation must not leave bytes planned
      host = np.empty((L, block_bucket(len(indices))) + self.block_shape[1:],
                      self.dtype)
      for start in range(0, len(indices), READ_BATCH_BLOCKS):
        batch = indices[start:start + READ_BATCH_BLOCKS]
        nbytes = self._charged_bytes(req, batch)
        if nbytes:
          self.nics[engine].acquire(nbytes, planned=True)
        unread -= nbytes
        kept = self._read_batch(req, batch, host, pages, missing, kept,
                                self._staging.get(engine))
    finally:
      self.nics[engine].unplan(unread)  # what an error left unread
    return (host, np.asarray(pages, np.int32), missing,
            time.perf_counter() - t0)

  def _charged_bytes(self, req: LoadRequest, indices: Sequence[int]) -> int:
    """Bytes of `indices` that pass a NIC (FREE reads pass none)."""
    return sum(ReadPath(req.paths[i]) != ReadPath.FREE
               for i in indices) * self.block_bytes

  def _read_batch(self, req: LoadRequest, batch: list[int],
                  host: np.ndarray,  # [L, n, 2, Hkv, P, D]
                  pages: list[int], missing: list[int], kept: int,
                  staging: StagingRows | None = None,
                  ) -> int:
    """Reads `batch` from the source into `host` from column `kept` on.

    Appends each stored block's page to `pages` and each miss to `missing`;
    returns the new `kept`. With `staging`, the source reads into it (rows
    are copied out before the next batch reuses it).
    """
    ids = [req.block_ids[i] for i in batch]
    blocks = (self.source.get(ids) if staging is None else
              self.source.get(ids, out=staging.rows(len(ids))))
    if len(blocks) != len(batch):
      raise ValueError(f"source returned {len(blocks)} blocks for "
                       f"{len(batch)} ids")
    for i, block in zip(batch, blocks):
      if block is None:
        missing.append(i)
        continue
      block = np.asarray(block)
      if block.shape != self.block_shape or block.dtype != self.dtype:
        raise ValueError(f"block {req.block_ids[i]!r} is {block.shape} "
                         f"{block.dtype}, expected {self.block_shape} "
                         f"{self.dtype}")
      host[:, kept] = block
      pages.append(req.dest_pages[i])
      kept += 1
    return kept

  # --------------------------------------------------------------- stage 2
  def stager(self, req: LoadRequest, stage: HostStage,
             pool_shape: Sequence[int],
             de_sink: "DecodeSink | None" = None) -> "LayerStager":
    """A `LayerStager` putting `stage`'s blocks into a pool of `pool_shape`."""
    return LayerStager(self, req, stage, pool_shape, de_sink)

  def iter_layers(self,
                  pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
                  req: LoadRequest,
                  stage: HostStage) -> Iterator[tuple[int, jax.Array]]:
    """Yields `(layer, pool)` once that layer's blocks are in `pool`.

    `pool` ([L, N, 2, Hkv, P, D] on the prefill engine) is donated at every
    layer: use the one yielded last.
    """
    stager = self.stager(req, stage, pool.shape)
    for layer in range(self.block_shape[0]):
      pool = stager(layer, pool)
      yield layer, pool

  def report(self, req: LoadRequest, stage: HostStage,
             layers_s: float = 0.0) -> LoadReport:
    """What loading `req` did: blocks per path, misses, bytes per NIC."""
    report = LoadReport(
        path1_blocks=stage.path1_pages.size,
        path2_blocks=stage.path2_pages.size,
        missing=stage.missing, read_s=stage.read_s, layers_s=layers_s)
    for path in req.paths:
      engine = {ReadPath.PE_READ: req.prefill_engine,
                ReadPath.DE_READ: req.decode_engine}.get(ReadPath(path))
      if engine is not None:
        report.nic_bytes[engine] = report.nic_bytes.get(engine, 0) + self.block_bytes
    return report

  def load(self,
           pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
           req: LoadRequest) -> tuple[jax.Array, LoadReport]:
    """Stage 1 then every layer of stage 2; returns the pool and a report."""
    stage = self.read_to_host(req)
    t0 = time.perf_counter()
    for _, pool in self.iter_layers(pool, req, stage):
      pass
    pool.block_until_ready()
    return pool, self.report(req, stage, time.perf_counter() - t0)

  # -------------------------------------------------------- PE -> DE hand-off
  def move_blocks(self,
                  src_pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                  src_pages: Sequence[int], src_engine: str,
                  dst_pool: jax.Array,  # [L, N', 2, Hkv, P, D], donated
                  dst_pages: Sequence[int], dst_engine: str) -> jax.Array:
    """Copies pages (all layers) between engines' pools; returns `dst_pool`.

    `src_pool`, `dst_pool`: [L, N, 2, Hkv, P, D]; `dst_pool` is donated.
    """
    if len(src_pages) != len(dst_pages):
      raise ValueError(f"{len(src_pages)} source pages, {len(dst_pages)} "
                       "destination pages")
    if not len(src_pages):
      return dst_pool
    # JAX would not raise: a gather clamps a page past the pool (copying the
    # last page), a scatter drops it, and both wrap negative pages.
    _check_pages("source", src_pages, src_pool.shape[1])
    _check_pages("destination", dst_pages, dst_pool.shape[1])
    if len(set(dst_pages)) != len(dst_pages):
      raise ValueError(f"destination pages must be distinct, got {dst_pages}")
    src = self.cluster.engine(src_engine)
    dst = self.cluster.engine(dst_engine)
    width = block_bucket(len(src_pages))  # padded: one compile per bucket
    src_idx = np.zeros(width, np.int32)  # padding gathers page 0 ...
    src_idx[:len(src_pages)] = src_pages
    dst_idx = np.full(width, dst_pool.shape[1], np.int32)  # ... dropped here
    dst_idx[:len(dst_pages)] = dst_pages
    blocks = _gather_pages(src_pool, jax.device_put(src_idx, src.sharding()))
    blocks = jax.device_put(blocks, src.sharding(head_spec(6, 3)))
    moved = self.handoff(src_engine, dst_engine, head_axis=3)(blocks)
    dst_pool = jax.device_put(dst_pool, dst.kv_pool_sharding())
    return _scatter_pages(dst_pool, jax.device_put(dst_idx, dst.sharding()),
                          moved)


def _check_pages(what: str, pages: Sequence[int], num_pages: int) -> None:
  """Raises unless every page is in [0, num_pages)."""
  bad = [int(p) for p in pages if not 0 <= p < num_pages]
  if bad:
    raise ValueError(f"{what} pages {bad} out of range for a pool of "
                     f"{num_pages} pages")


@dataclasses.dataclass
class DecodeSink:
  """Where path-2 blocks also land on their decode engine, on the way.

  A path-2 block passes through the DE's devices; writing it into the DE
  pool page its turn will decode from there saves moving it back PE -> DE
  after prefill.

  Attributes:
    pages: per path-2 block of the stage, in `HostStage.path2_pages` order,
      its DE pool page, or -1 to skip it (the DE holds it already).
    get_pool / set_pool: read and replace the DE's pool `[L, N, 2, Hkv, P, D]`
      (it is donated to each scatter).
  """

  pages: np.ndarray  # [k2] int32
  get_pool: Callable[[], jax.Array]
  set_pool: Callable[[jax.Array], None]


class LayerStager:
  """Puts a loaded `HostStage` into a PE pool one layer at a time.

  `stager(l, pool) -> pool` scatters layer l's blocks into their pages
  (`pool` [L, N, 2, Hkv, P, D] is donated) after starting to stage layers up
  to `l + layers_in_flight - 1` on the devices: path 1 straight from the
  PE's host buffer, path 2 through the DE's devices and the hand-off. Call
  it for layers 0, 1, ... in order, e.g. as `ModelRunner.step_layerwise`'s
  `before_layer`; every call is asynchronous, so the copies of later layers
  overlap the compute of earlier ones.
  """

  def __init__(self, loader: DualPathLoader, req: LoadRequest,
               stage: HostStage, pool_shape: Sequence[int],
               de_sink: DecodeSink | None = None):
    self.pe = loader.cluster.engine(req.prefill_engine)
    self.de = loader.cluster.engine(req.decode_engine)
    self.num_layers = loader.block_shape[0]
    pool_shape = tuple(pool_shape)
    if (len(pool_shape) != 6 or pool_shape[0] != self.num_layers or
        pool_shape[2:] != loader.block_shape[1:]):
      raise ValueError(f"pool {pool_shape} does not hold blocks "
                       f"{loader.block_shape}")
    num_pages = pool_shape[1]
    parts = []  # destination pages per staged buffer, padded with num_pages
    self.use1 = bool(stage.path1_pages.size)
    self.use2 = bool(stage.path2_pages.size)
    for use, host, pages in ((self.use1, stage.path1, stage.path1_pages),
                             (self.use2, stage.path2, stage.path2_pages)):
      if pages.size and (pages.max() >= num_pages or pages.min() < 0):
        raise ValueError(f"page {pages.max()} out of range for {num_pages}")
      if use:
        padded = np.full(host.shape[1], num_pages, np.int32)  # dropped rows
        padded[:pages.size] = pages
        parts.append(padded)
    self.stage = stage
    self.empty = not parts
    self.pages = (None if self.empty else
                  jax.device_put(np.concatenate(parts), self.pe.sharding()))
    self.to_pe = loader.handoff(self.de.name, self.pe.name, head_axis=2)
    self.de_sink = de_sink if self.use2 else None
    if self.de_sink is not None:
      de_pages = np.asarray(de_sink.pages, np.int32)
      if de_pages.shape != stage.path2_pages.shape:
        raise ValueError(f"{de_pages.size} DE pages for "
                         f"{stage.path2_pages.size} path-2 blocks")
      de_num_pages = de_sink.get_pool().shape[1]
      if de_pages.size and de_pages.max() >= de_num_pages:
        raise ValueError(f"DE page {de_pages.max()} out of range for "
                         f"{de_num_pages}")
      padded = np.full(stage.path2.shape[1], de_num_pages, np.int32)
      padded[:de_pages.size] = np.where(de_pages < 0, de_num_pages, de_pages)
      self.de_pages = jax.device_put(padded, self.de.sharding())
    self.in_flight = loader.config.layers_in_flight
    self.pending: collections.deque = collections.deque()
    self.next_layer = 0  # the next layer to stage
    self.expected = 0  # the next layer to scatter

  def _stage(self, layer: int) -> list[jax.Array]:  # each [n_i, 2, Hkv, P, D]
    parts = []
    if self.use1:
      parts.append(jax.device_put(self.stage.path1[layer],
                                  self.pe.kv_blocks_sharding()))
    if self.use2:
      on_de = jax.device_put(self.stage.path2[layer],
                             self.de.kv_blocks_sharding())
      if self.de_sink is not None:
        self.de_sink.set_pool(_scatter_layer(
            self.de_sink.get_pool(), jnp.int32(layer), self.de_pages, on_de))
      parts.append(self.to_pe(on_de))
    return parts

  def __call__(self, layer: int,
               pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
               ) -> jax.Array:  # the same pool, layer `layer`'s blocks in
    if layer != self.expected:
      raise ValueError(f"layers must be staged in order: expected layer "
                       f"{self.expected}, got {layer}")
    self.expected += 1
    if self.empty:
      return pool
    if layer == 0:
      pool = jax.device_put(pool, self.pe.kv_pool_sharding())
    while (self.next_layer < self.num_layers and
           len(self.pending) < self.in_flight):
      self.pending.append(self._stage(self.next_layer))
      self.next_layer += 1
    parts = self.pending.popleft()
    return _scatter_layer(pool, jnp.int32(layer), self.pages, *parts)


@jax.jit
def _gather_pages(pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                  pages: jax.Array,  # [n] int32
                  ) -> jax.Array:  # [L, n, 2, Hkv, P, D]
  return pool[:, pages]


def _scatter_pages_impl(pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
                        pages: jax.Array,  # [n] int32, N = padding
                        blocks: jax.Array,  # [L, n, 2, Hkv, P, D]
                        ) -> jax.Array:
  return pool.at[:, pages].set(blocks, mode="drop")


def _scatter_layer_impl(pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
                        layer: jax.Array,  # [] int32
                        pages: jax.Array,  # [n] int32, path 1 then 2, N = padding
                        *parts: jax.Array,  # each [n_i, 2, Hkv, P, D]
                        ) -> jax.Array:
  blocks = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  return pool.at[layer, pages].set(blocks, mode="drop")


_scatter_pages = jax.jit(_scatter_pages_impl, donate_argnums=(0,))
_scatter_layer = jax.jit(_scatter_layer_impl, donate_argnums=(0,))
