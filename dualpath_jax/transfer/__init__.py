"""DualPath transfer layer: engine sub-meshes, storage NICs, the two load paths.

  config    MeshConfig (`--mesh=1P2D`, tp per engine), DualPathConfig
  mesh      devices -> prefill / decode engine sub-meshes (`build_cluster_mesh`)
  nic       StorageNic: token-bucket emulation of an engine's storage NIC
  source    BlockSource protocol (the cold tier's read) and an in-memory fake
  handoff   cross-engine copy of head-sharded arrays (ppermute or device_put)
  loader    path 1 / path 2 loads into a prefill pool, layer by layer; the
            PE -> DE hand-off of finished KV

The scheduler (`dualpath_jax.scheduler`) decides; this package moves bytes.

The configs and the NIC model import eagerly and need no JAX; the rest
loads on first use (PEP 562), so a launcher checks `--mesh` and the
DualPath settings before paying JAX's ~3 s import.
"""

from __future__ import annotations

import importlib

from dualpath_jax.transfer.config import DualPathConfig, MeshConfig
from dualpath_jax.transfer.nic import StorageNic

# The JAX-side names and the submodule each lives in.
_LAZY = {
    "Handoff": "handoff",
    "DualPathLoader": "loader", "HostStage": "loader", "LoadReport": "loader",
    "LoadRequest": "loader",
    "ClusterMesh": "mesh", "EngineMesh": "mesh", "build_cluster_mesh": "mesh",
    "pair_mesh": "mesh",
    "BlockSource": "source", "InMemoryBlockSource": "source",
}


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
