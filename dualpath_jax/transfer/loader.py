"""Path 1 and path 2 block loaders, layer by layer, and the PE -> DE hand-off.

One load moves a turn's hit blocks from the cold tier into pages of its
prefill engine's KV pool `[L, N, 2, Hkv, P, D]`, each block by the path the
scheduler chose (`ReadPath` per block):

    path 1 (PE_READ): cold tier --PE NIC--> PE host buffer --device_put--> PE HBM
    path 2 (DE_READ): cold tier --DE NIC--> DE host buffer --device_put--> DE HBM
                      --Handoff (collective)--> PE HBM
    FREE (oracle):    like path 1 without charging any NIC

Stages:

1. `read_to_host` reads both paths' blocks at once (one thread per path, each
   through its own engine's `StorageNic`) into per-engine host buffers laid
   out layer-major `[L, n, 2, Hkv, P, D]`, so one layer is one contiguous
   slice. A block the source cannot serve is a miss: its page is not written
   and its index is reported, for the engine to recompute.
2. `iter_layers` moves one layer at a time: it stages layer l's slices on the
   devices (path 2: on the DE, then handed off to the PE), scatters them into
   the pool's pages and yields `(l, pool)`. At most `layers_in_flight`
   layers are staged ahead, so the PE holds a bounded slice of the loaded
   prefix beyond its destination pages, and a layer-wise prefill can compute
   layer l while later layers are still moving.

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
import time
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualpath_jax.scheduler.state import ReadPath
from dualpath_jax.transfer.config import DualPathConfig
from dualpath_jax.transfer.handoff import Handoff, head_spec
from dualpath_jax.transfer.mesh import ClusterMesh
from dualpath_jax.transfer.nic import StorageNic
from dualpath_jax.transfer.source import BlockSource

READ_BATCH_BLOCKS = 16  # blocks per cold-tier read (and per NIC admission)


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
  """Blocks in host buffers, per path; layer-major."""

  path1: np.ndarray  # [L, n1, 2, Hkv, P, D], PE host buffer
  path1_pages: np.ndarray  # [n1] int32
  path2: np.ndarray  # [L, n2, 2, Hkv, P, D], DE host buffer
  path2_pages: np.ndarray  # [n2] int32
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
    self._readers = cf.ThreadPoolExecutor(2, thread_name_prefix="dualpath-read")

  def close(self) -> None:
    self._readers.shutdown(wait=True)

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
    futures = {
        g: self._readers.submit(self._read_group, req, idx, nic_of[g])
        for g, idx in groups.items()}
    results = {g: f.result() for g, f in futures.items()}
    missing = sorted(results[1][2] + results[2][2])
    return HostStage(results[1][0], results[1][1], results[2][0],
                     results[2][1], missing,
                     {nic_of[1] + "/path1": results[1][3],
                      nic_of[2] + "/path2": results[2][3]})

  def _check_engines(self, req: LoadRequest) -> None:
    for name, role in ((req.prefill_engine, "prefill"),
                       (req.decode_engine, "decode")):
      if self.cluster.engine(name).role != role:
        raise ValueError(f"{name} is not a {role} engine")

  def _read_group(self, req: LoadRequest, indices: list[int], engine: str):
    t0 = time.perf_counter()
    L = self.block_shape[0]
    host = np.empty((L, len(indices)) + self.block_shape[1:], self.dtype)
    pages, missing, kept = [], [], 0
    for start in range(0, len(indices), READ_BATCH_BLOCKS):
      batch = indices[start:start + READ_BATCH_BLOCKS]
      charged = [i for i in batch if ReadPath(req.paths[i]) != ReadPath.FREE]
      if charged:
        self.nics[engine].acquire(len(charged) * self.block_bytes)
      blocks = self.source.get([req.block_ids[i] for i in batch])
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
    return (host[:, :kept], np.asarray(pages, np.int32), missing,
            time.perf_counter() - t0)

  # --------------------------------------------------------------- stage 2
  def iter_layers(self, pool: jax.Array, req: LoadRequest,
                  stage: HostStage) -> Iterator[tuple[int, jax.Array]]:
    """Yields `(layer, pool)` once that layer's blocks are in `pool`.

    `pool` ([L, N, 2, Hkv, P, D] on the prefill engine) is donated at every
    layer: use the one yielded last.
    """
    pe = self.cluster.engine(req.prefill_engine)
    de = self.cluster.engine(req.decode_engine)
    num_layers = self.block_shape[0]
    if pool.shape[0] != num_layers or pool.shape[2:] != self.block_shape[1:]:
      raise ValueError(f"pool {pool.shape} does not hold blocks "
                       f"{self.block_shape}")
    pool = jax.device_put(pool, pe.kv_pool_sharding())
    pages = np.concatenate([stage.path1_pages, stage.path2_pages])
    if pages.size and pages.max() >= pool.shape[1]:
      raise ValueError(f"page {pages.max()} out of range for {pool.shape[1]}")
    pages_dev = jax.device_put(pages, pe.sharding())
    to_pe = self.handoff(de.name, pe.name, head_axis=2)
    blocks_sharding = pe.kv_blocks_sharding()

    def stage_layer(layer: int):
      parts = []
      if stage.path1.shape[1]:
        parts.append(jax.device_put(stage.path1[layer], blocks_sharding))
      if stage.path2.shape[1]:
        on_de = jax.device_put(stage.path2[layer], de.kv_blocks_sharding())
        parts.append(to_pe(on_de))
      return parts

    pending: collections.deque = collections.deque()
    next_layer = 0
    for layer in range(num_layers):
      while (next_layer < num_layers and
             len(pending) < self.config.layers_in_flight):
        pending.append(stage_layer(next_layer))
        next_layer += 1
      parts = pending.popleft()
      if parts:
        pool = _scatter_layer(pool, jnp.int32(layer), pages_dev, *parts)
      yield layer, pool

  def load(self, pool: jax.Array, req: LoadRequest
           ) -> tuple[jax.Array, LoadReport]:
    """Stage 1 then every layer of stage 2; returns the pool and a report."""
    stage = self.read_to_host(req)
    t0 = time.perf_counter()
    for _, pool in self.iter_layers(pool, req, stage):
      pass
    pool.block_until_ready()
    report = LoadReport(
        path1_blocks=stage.path1.shape[1], path2_blocks=stage.path2.shape[1],
        missing=stage.missing, read_s=stage.read_s,
        layers_s=time.perf_counter() - t0)
    for i, path in enumerate(req.paths):
      engine = {ReadPath.PE_READ: req.prefill_engine,
                ReadPath.DE_READ: req.decode_engine}.get(ReadPath(path))
      if engine is not None:
        report.nic_bytes[engine] = report.nic_bytes.get(engine, 0) + self.block_bytes
    return pool, report

  # -------------------------------------------------------- PE -> DE hand-off
  def move_blocks(self, src_pool: jax.Array, src_pages: Sequence[int],
                  src_engine: str, dst_pool: jax.Array,
                  dst_pages: Sequence[int], dst_engine: str) -> jax.Array:
    """Copies pages (all layers) between engines' pools; returns `dst_pool`.

    `src_pool`, `dst_pool`: [L, N, 2, Hkv, P, D]; `dst_pool` is donated.
    """
    if len(src_pages) != len(dst_pages):
      raise ValueError(f"{len(src_pages)} source pages, {len(dst_pages)} "
                       "destination pages")
    if not len(src_pages):
      return dst_pool
    src = self.cluster.engine(src_engine)
    dst = self.cluster.engine(dst_engine)
    blocks = _gather_pages(src_pool, jax.device_put(
        np.asarray(src_pages, np.int32), src.sharding()))
    blocks = jax.device_put(blocks, src.sharding(head_spec(6, 3)))
    moved = self.handoff(src_engine, dst_engine, head_axis=3)(blocks)
    dst_pool = jax.device_put(dst_pool, dst.kv_pool_sharding())
    return _scatter_pages(dst_pool, jax.device_put(
        np.asarray(dst_pages, np.int32), dst.sharding()), moved)


@jax.jit
def _gather_pages(pool: jax.Array,  # [L, N, 2, Hkv, P, D]
                  pages: jax.Array,  # [n] int32
                  ) -> jax.Array:  # [L, n, 2, Hkv, P, D]
  return pool[:, pages]


def _scatter_pages_impl(pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
                        pages: jax.Array,  # [n] int32
                        blocks: jax.Array,  # [L, n, 2, Hkv, P, D]
                        ) -> jax.Array:
  return pool.at[:, pages].set(blocks)


def _scatter_layer_impl(pool: jax.Array,  # [L, N, 2, Hkv, P, D], donated
                        layer: jax.Array,  # [] int32
                        pages: jax.Array,  # [n] int32, path 1 then path 2
                        *parts: jax.Array,  # each [n_i, 2, Hkv, P, D]
                        ) -> jax.Array:
  blocks = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  return pool.at[layer, pages].set(blocks)


_scatter_pages = jax.jit(_scatter_pages_impl, donate_argnums=(0,))
_scatter_layer = jax.jit(_scatter_layer_impl, donate_argnums=(0,))
