"""Splits the devices into prefill and decode engines, each on its own sub-mesh.

`build_cluster_mesh(MeshConfig.parse("1P2D", tp=2))` on 8 devices gives

    P0: devices 0,1    D0: devices 2,3    D1: devices 4,5   (6, 7 unused)

Each engine is an `EngineMesh`: a 1-D `jax.sharding.Mesh` with axis "tp" over
its devices, on which it runs its jitted programs. The KV pool
`[L, N, 2, Hkv, P, D]` is sharded over the KV heads along "tp" (each device
holds its heads' pages), and so is every block in flight.

With fewer devices than the engines need (one GPU, or a CPU without
`--xla_force_host_platform_device_count`), engines share devices when
`allow_shared_devices` is set: engine k takes `tp` consecutive devices
starting where engine k-1 stopped, wrapping around. Shared devices are
reported (`ClusterMesh.shared`) because they change what a hand-off costs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualpath_jax.transfer.config import MeshConfig

TP_AXIS = "tp"
GROUP_AXIS = "group"
PREFILL = "prefill"
DECODE = "decode"


@dataclasses.dataclass(frozen=True)
class EngineMesh:
  """One engine's devices as a mesh with a single "tp" axis."""

  name: str  # "P0", "D1", ...
  role: str  # "prefill" | "decode"
  mesh: Mesh

  @property
  def devices(self) -> tuple[jax.Device, ...]:
    return tuple(self.mesh.devices.flat)

  @property
  def tp(self) -> int:
    return self.mesh.devices.size

  def sharding(self, spec: PartitionSpec = PartitionSpec(),
               memory_kind: str | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, spec, memory_kind=memory_kind)

  def kv_pool_sharding(self) -> NamedSharding:
    """For the pool `[L, N, 2, Hkv, P, D]`: KV heads split over "tp"."""
    return self.sharding(PartitionSpec(None, None, None, TP_AXIS))

  def kv_blocks_sharding(self) -> NamedSharding:
    """For one layer's blocks in flight `[n, 2, Hkv, P, D]`."""
    return self.sharding(PartitionSpec(None, None, TP_AXIS))


@dataclasses.dataclass(frozen=True)
class ClusterMesh:
  """Every engine's sub-mesh."""

  config: MeshConfig
  prefill: tuple[EngineMesh, ...]
  decode: tuple[EngineMesh, ...]
  # Devices there were to assign (`build_cluster_mesh`).
  num_devices: int = 1

  @property
  def engines(self) -> tuple[EngineMesh, ...]:
    return self.prefill + self.decode

  def engine(self, name: str) -> EngineMesh:
    for e in self.engines:
      if e.name == name:
        return e
    raise ValueError(f"no engine named {name!r} in {self.config}")

  @property
  def shared(self) -> bool:
    """True when some device serves more than one engine."""
    ids = [d.id for e in self.engines for d in e.devices]
    return len(ids) != len(set(ids))

  def device_ids(self) -> dict[str, list[int]]:
    """Each engine's device ids, by engine name (for reports)."""
    return {e.name: [d.id for d in e.devices] for e in self.engines}

  def sharing_warning(self) -> str | None:
    """A line saying engines share devices although several exist, else
    None. On one device (a plain CPU, one GPU) sharing is the point: the
    cluster's mechanics on one chip. With several it is likelier a
    `--mesh`/`--tp` too wide for the host, and every figure of the run
    then describes a cluster that is not there."""
    if not self.shared or self.num_devices < 2:
      return None
    return (f"{self.config} needs {self.config.devices_needed} devices, "
            f"{self.num_devices} available: engines share devices "
            f"({self.device_ids()})")


def build_cluster_mesh(config: MeshConfig,
                       devices: Sequence[jax.Device] | None = None
                       ) -> ClusterMesh:
  """Assigns devices to engines, prefill engines first (see module docstring)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("no devices to build a mesh from")
  widest = max(config.prefill_tp, config.decode_tp)
  if widest > len(devices):
    raise ValueError(
        f"{config} needs {widest} devices for one engine; only "
        f"{len(devices)} available")
  if config.devices_needed > len(devices) and not config.allow_shared_devices:
    raise ValueError(
        f"{config} needs {config.devices_needed} devices, only {len(devices)} "
        f"available (allow_shared_devices=False)")
  cursor = 0
  built = {PREFILL: [], DECODE: []}
  for role, count, tp, prefix in ((PREFILL, config.num_prefill,
                                   config.prefill_tp, "P"),
                                  (DECODE, config.num_decode,
                                   config.decode_tp, "D")):
    for i in range(count):
      mine = [devices[(cursor + j) % len(devices)] for j in range(tp)]
      cursor += tp
      built[role].append(EngineMesh(f"{prefix}{i}", role,
                                    Mesh(np.array(mine), (TP_AXIS,))))
  return ClusterMesh(config, tuple(built[PREFILL]), tuple(built[DECODE]),
                     num_devices=len(devices))


def pair_mesh(src: EngineMesh, dst: EngineMesh) -> Mesh:
  """A 2-D mesh ("group", "tp") with `src` as group 0 and `dst` as group 1.

  The ppermute hand-off runs on it. Needs equal tp and disjoint devices.
  """
  if src.tp != dst.tp:
    raise ValueError(f"{src.name} (tp={src.tp}) and {dst.name} (tp={dst.tp}) "
                     "need equal tp for a ppermute hand-off")
  if {d.id for d in src.devices} & {d.id for d in dst.devices}:
    raise ValueError(f"{src.name} and {dst.name} share devices; a ppermute "
                     "hand-off needs disjoint devices")
  return Mesh(np.array([src.devices, dst.devices]), (GROUP_AXIS, TP_AXIS))
