"""Moves a head-sharded array from one engine's devices to another's.

Two implementations of the same contract (`Handoff.__call__(x) -> y`, `y` on
the destination engine, same shape, dtype, bytes):

* "ppermute": a mesh ("group", "tp") whose row 0 is the source engine and row
  1 the destination; `x`'s shards and a destination scratch buffer form one
  global array sharded over "group", and a `shard_map` of
  `lax.ppermute(perm=[(0, 1)])` sends each source device's shard to the
  destination device in the same "tp" column. This is the collective that
  stands in for RDMA between engines (on GPUs it lowers to NCCL send/recv).
  Needs equal tp and disjoint devices.
* "device_put": `jax.device_put(x, destination sharding)`; JAX copies each
  shard to its new device (on CPU a memcpy, on GPU a peer copy). Works for
  any pair, including engines that share devices (then nothing moves) or
  differ in tp (then the heads are re-split).

"auto" picks "device_put": on 8 CPU devices (jax 0.10.2) it moved one layer
of 16-64 blocks 2.5-5x faster than ppermute (`python -m
dualpath_jax.transfer.bench_handoff`; numbers in docs/dualpath.md), needs no
scratch buffer and works for every pair. Choose "ppermute" explicitly to
exercise the collective (what a multi-host deployment would lower to).

Multi-process (`dualpath_jax.distributed`): when the two engines' devices
belong to different processes, "auto" picks "ppermute", since `device_put`
cannot cross processes without JAX's cross-host transfer server. Every
process then calls the hand-off with the same shapes in the same order (it
is one collective program); a process that owns no source device passes an
array without local shards (`jax.make_array_from_callback` on the source
sharding), and gets back one without local shards unless it owns the
destination. tests/test_multiprocess.py runs it across two CPU processes.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from dualpath_jax.transfer.mesh import (GROUP_AXIS, TP_AXIS, EngineMesh,
                                        pair_mesh)


def head_spec(ndim: int, head_axis: int) -> PartitionSpec:
  """PartitionSpec splitting `head_axis` over "tp", nothing else split."""
  if not 0 <= head_axis < ndim:
    raise ValueError(f"head_axis {head_axis} out of range for rank {ndim}")
  return PartitionSpec(*[TP_AXIS if i == head_axis else None
                         for i in range(ndim)])


def spans_processes(src: EngineMesh, dst: EngineMesh) -> bool:
  """True when `src` and `dst` devices belong to more than one JAX process."""
  return len({d.process_index for d in src.devices + dst.devices}) > 1


class Handoff:
  """Copies arrays sharded over their heads from `src` to `dst`.

  Args:
    src, dst: the two engines.
    method: "auto" (device_put within a process, ppermute across
      processes), "device_put" or "ppermute".
    head_axis: the axis split over "tp" (2 for one layer's blocks
      `[n, 2, Hkv, P, D]`, 3 for whole blocks `[L, n, 2, Hkv, P, D]`).
  """

  def __init__(self, src: EngineMesh, dst: EngineMesh, method: str = "auto",
               head_axis: int = 2):
    if method == "auto":
      method = "ppermute" if spans_processes(src, dst) else "device_put"
    if method not in ("device_put", "ppermute"):
      raise ValueError(f"hand-off method {method!r} not in "
                       "('auto', 'device_put', 'ppermute')")
    self.src, self.dst, self.method, self.head_axis = src, dst, method, head_axis
    self._scratch: dict[tuple, jax.Array] = {}
    if method == "ppermute":
      self._pair = pair_mesh(src, dst)  # raises for tp mismatch / shared devices
      self._fns: dict[int, Callable] = {}

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., Hkv, ...] on src
    spec = head_spec(x.ndim, self.head_axis)
    if x.shape[self.head_axis] % self.dst.tp:
      raise ValueError(f"{x.shape[self.head_axis]} heads do not split over "
                       f"{self.dst.name}'s tp={self.dst.tp}")
    if self.method == "device_put":
      return jax.device_put(x, self.dst.sharding(spec))
    return self._ppermute(x, spec)

  # ------------------------------------------------------------- ppermute
  def _ppermute(self, x: jax.Array, spec: PartitionSpec) -> jax.Array:
    if x.sharding != self.src.sharding(spec):
      x = jax.device_put(x, self.src.sharding(spec))
    global_spec = PartitionSpec(GROUP_AXIS, *spec[1:]) if spec[0] is None else None
    if global_spec is None:
      raise ValueError("the leading axis must not be the head axis")
    global_shape = (2 * x.shape[0],) + x.shape[1:]
    global_sharding = NamedSharding(self._pair, global_spec)
    key = (x.shape, x.dtype)
    if key not in self._scratch:
      self._scratch[key] = jax.device_put(
          jax.numpy.zeros(x.shape, x.dtype), self.dst.sharding(spec))
    shards = ([s.data for s in x.addressable_shards] +
              [s.data for s in self._scratch[key].addressable_shards])
    stacked = jax.make_array_from_single_device_arrays(
        global_shape, global_sharding, shards, dtype=x.dtype)
    out = self._fn(x.ndim, global_spec)(stacked)
    dst_ids = {d.id for d in self.dst.devices}
    mine = [s.data for s in out.addressable_shards if s.device.id in dst_ids]
    return jax.make_array_from_single_device_arrays(
        x.shape, self.dst.sharding(spec), mine, dtype=x.dtype)

  def _fn(self, ndim: int, global_spec: PartitionSpec) -> Callable:
    if ndim not in self._fns:
      def send(block):
        return lax.ppermute(block, GROUP_AXIS, perm=[(0, 1)])
      self._fns[ndim] = jax.jit(jax.shard_map(
          send, mesh=self._pair, in_specs=global_spec, out_specs=global_spec))
    return self._fns[ndim]
