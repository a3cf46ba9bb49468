"""DualPath transfer layer: engine sub-meshes, storage NICs, the two load paths.

  config    MeshConfig (`--mesh=1P2D`, tp per engine), DualPathConfig
  mesh      devices -> prefill / decode engine sub-meshes (`build_cluster_mesh`)
  nic       StorageNic: token-bucket emulation of an engine's storage NIC
  source    BlockSource protocol (the cold tier's read) and an in-memory fake
  handoff   cross-engine copy of head-sharded arrays (ppermute or device_put)
  loader    path 1 / path 2 loads into a prefill pool, layer by layer; the
            PE -> DE hand-off of finished KV

The scheduler (`dualpath_jax.scheduler`) decides; this package moves bytes.
"""

from __future__ import annotations

from dualpath_jax.transfer.config import DualPathConfig, MeshConfig
from dualpath_jax.transfer.handoff import Handoff
from dualpath_jax.transfer.loader import (DualPathLoader, HostStage,
                                          LoadReport, LoadRequest)
from dualpath_jax.transfer.mesh import (ClusterMesh, EngineMesh,
                                        build_cluster_mesh, pair_mesh)
from dualpath_jax.transfer.nic import StorageNic
from dualpath_jax.transfer.source import BlockSource, InMemoryBlockSource

__all__ = [
    "BlockSource",
    "ClusterMesh",
    "DualPathConfig",
    "DualPathLoader",
    "EngineMesh",
    "Handoff",
    "HostStage",
    "InMemoryBlockSource",
    "LoadReport",
    "LoadRequest",
    "MeshConfig",
    "StorageNic",
    "build_cluster_mesh",
    "pair_mesh",
]
