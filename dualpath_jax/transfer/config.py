"""Configuration of the P/D split and of DualPath loading.

`MeshConfig` says how devices split into prefill engines (PE) and decode
engines (DE), `--mesh=1P2D` style, with a tensor-parallel size per engine.
`DualPathConfig` holds the knobs of the load paths: the policy, each engine's
emulated storage-NIC bandwidth, the staging bounds and the hand-off method.

These could move into `dualpath_jax/config.py` (the one home of defaults);
they live here while the transfer layer settles.
"""

from __future__ import annotations

import dataclasses
import math
import re

_MESH_RE = re.compile(r"^\s*(\d+)\s*[pP]\s*(\d+)\s*[dD]\s*$")

POLICIES = ("single_path", "dualpath", "oracle")
HANDOFF_METHODS = ("auto", "device_put", "ppermute")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """How the devices split into prefill and decode engines.

  Attributes:
    num_prefill: prefill engines (PE).
    num_decode: decode engines (DE).
    prefill_tp: devices (tensor-parallel size) of each prefill engine.
    decode_tp: devices of each decode engine.
    allow_shared_devices: with fewer devices than the engines need, let
      engines share devices (one GPU or a CPU: every engine on device 0).
      False raises instead.
  """

  num_prefill: int = 1
  num_decode: int = 1
  prefill_tp: int = 1
  decode_tp: int = 1
  allow_shared_devices: bool = True

  def __post_init__(self):
    for name in ("num_prefill", "num_decode", "prefill_tp", "decode_tp"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MeshConfig.{name} must be an int >= 1, got {value!r}")

  @classmethod
  def parse(cls, spec: str, tp: str | int = 1,
            allow_shared_devices: bool = True) -> "MeshConfig":
    """From flags: `spec` like "1P2D", `tp` like 2 or "2,1" (prefill, decode)."""
    match = _MESH_RE.match(spec) if isinstance(spec, str) else None
    if not match:
      raise ValueError(
          f"--mesh must look like 1P2D (prefill engines P, decode engines D), "
          f"got {spec!r}")
    if isinstance(tp, int):
      tps = (tp, tp)
    else:
      parts = [p.strip() for p in str(tp).split(",")]
      if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"--tp must be N or PREFILL_TP,DECODE_TP (ints), got {tp!r}")
      tps = (int(parts[0]), int(parts[-1]))
    return cls(int(match.group(1)), int(match.group(2)), tps[0], tps[1],
               allow_shared_devices)

  @property
  def devices_needed(self) -> int:
    """Devices for every engine to have its own."""
    return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp

  def __str__(self) -> str:
    return (f"{self.num_prefill}P{self.num_decode}D"
            f"(tp={self.prefill_tp},{self.decode_tp})")


@dataclasses.dataclass(frozen=True)
class DualPathConfig:
  """Knobs of the DualPath load paths.

  Attributes:
    policy: scheduler policy, one of `POLICIES`.
    storage_nic_gbps: bandwidth of every engine's emulated storage NIC, in
      gigabits per second (1 Gb/s = 125e6 bytes/s); `math.inf` = no limit.
      An emulation: a token bucket in front of the cold-tier reads, so one
      machine can stand in for a cluster whose NICs are slower than its disk.
    nic_burst_bytes: bucket depth: bytes a NIC idle long enough may pass at
      once. Small values give a smooth rate.
    layers_in_flight: layers of loaded KV staged on a device at once (per
      path) ahead of the layer being consumed; bounds the HBM the load takes
      beyond the destination pages.
    host_buffer_bytes: the blocks one load may stage on one engine's host
      (the cluster loads the leading blocks that fit and recomputes the
      rest; the loader refuses more). It bounds each load, not an engine:
      every load in flight has its own buffer, padded to a power-of-two
      number of blocks (at least 16), so one buffer may take up to twice
      this.
    prefill_keeps_prefix: whether a prefill engine keeps a turn's blocks
      cached in its pool after handing the turn to a decode engine. False is
      DualPath's setting (agents' KV far exceeds HBM, so every cached
      prefix comes back from the cold tier): the pool holds only turns in
      flight.
    handoff: "device_put" (JAX copies between the sub-meshes' shardings),
      "ppermute" (`shard_map` + `lax.ppermute` over a "group" axis of a mesh
      spanning both engines) or "auto" (see `transfer.handoff`).
    prefill_tokens_per_s: the scheduler's estimate of one prefill engine's
      throughput, which turns its queued prompt tokens into seconds of
      wait. `math.inf` (the default): placement weighs storage-NIC queues
      and free HBM only, and a prefill engine's queue breaks ties. A
      measured rate (e.g. `engine.prefill_tok_s` of an earlier report) makes
      a turn avoid a prefill engine whose compute queue finishes later than
      another's load.
    prefetch_blocks: blocks per prefetch read: the cluster reads the
      prefixes of waiting turns and of sessions predicted to return soon
      from the cold tier into the prefill engines' hot tiers, on NICs with
      nothing queued (`engine.prefetch`). 0 (the default): no prefetch.
      Needs hot tiers.
  """

  policy: str = "dualpath"
  storage_nic_gbps: float = math.inf
  nic_burst_bytes: int = 1 << 20
  layers_in_flight: int = 2
  host_buffer_bytes: int = 1 << 30
  prefill_keeps_prefix: bool = True
  handoff: str = "auto"
  prefill_tokens_per_s: float = math.inf
  prefetch_blocks: int = 0

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"policy {self.policy!r} not in {POLICIES}")
    if not (isinstance(self.storage_nic_gbps, (int, float)) and
            self.storage_nic_gbps > 0):
      raise ValueError(
          f"storage_nic_gbps must be > 0 (inf: no limit), "
          f"got {self.storage_nic_gbps!r}")
    if self.nic_burst_bytes < 1:
      raise ValueError(f"nic_burst_bytes must be >= 1, got {self.nic_burst_bytes}")
    if self.layers_in_flight < 1:
      raise ValueError(
          f"layers_in_flight must be >= 1, got {self.layers_in_flight}")
    if self.host_buffer_bytes < 1:
      raise ValueError(
          f"host_buffer_bytes must be >= 1, got {self.host_buffer_bytes}")
    if self.handoff not in HANDOFF_METHODS:
      raise ValueError(f"handoff {self.handoff!r} not in {HANDOFF_METHODS}")
    rate = self.prefill_tokens_per_s
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
        rate > 0):
      raise ValueError("prefill_tokens_per_s must be > 0 (inf: prefill "
                       f"queues only break ties), got {rate!r}")
    if (isinstance(self.prefetch_blocks, bool) or
        not isinstance(self.prefetch_blocks, int) or self.prefetch_blocks < 0):
      raise ValueError("prefetch_blocks must be an int >= 0 (0: no "
                       f"prefetch), got {self.prefetch_blocks!r}")

  @property
  def nic_bytes_per_s(self) -> float:
    """`storage_nic_gbps` in bytes per second."""
    return self.storage_nic_gbps * 1e9 / 8
