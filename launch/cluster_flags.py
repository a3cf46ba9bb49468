"""Flags of the prefill/decode cluster and the cold tier, shared by launchers.

`agent_eval`, `serve` and `bench_online` run either one `Engine` or a
`PDCluster` (`--mesh=1P2D`) over a TensorStore cold tier; the flags that
describe the cluster, its load-path policy, the emulated storage NICs and the
cold tier are defined once here, and so is turning them into configs.

`define()` is idempotent (a flag already defined is left alone), so two
launchers imported into one process (tests do this) do not collide.
"""

from __future__ import annotations

from absl import flags, logging

from launch import float_flags

FLAGS = flags.FLAGS

CODECS = ["raw", "zstd", "int8", "int8+zstd"]
POLICIES = ["single_path", "dualpath", "oracle"]


def define_once(define_fn, name: str, *args, **kw) -> None:
  """`define_fn(name, ...)` (an absl `DEFINE_*`) unless `name` exists already."""
  if name not in FLAGS:
    define_fn(name, *args, **kw)


def define(mesh_default: str | None = None) -> None:
  """Defines the cluster and cold-tier flags (once per process)."""
  once = define_once
  once(flags.DEFINE_string, "mesh", mesh_default,
       "prefill/decode split, e.g. 1P2D (needs --cold_tier); unset or none = "
       "one engine doing both")
  once(flags.DEFINE_string, "tp", "1",
       "tensor-parallel size per engine: N or PREFILL_TP,DECODE_TP")
  once(flags.DEFINE_enum, "policy", "dualpath", POLICIES,
       "--mesh: which path loads each cached block")
  once(float_flags.define_float, "storage_nic_gbps", float("inf"),
             "each engine's emulated storage NIC in Gb/s (a token bucket "
             "in front of cold-tier reads, with --mesh or one engine's "
             "--cold_tier; inf = no limit)", allow_inf=True)
  once(float_flags.define_float, "prefill_tokens_per_s", float("inf"),
             "--mesh: the scheduler's estimate of a prefill engine's "
             "throughput (tokens/s), so that placement weighs prefill "
             "queues; inf = NIC queues and free HBM only (queues break ties)",
             allow_inf=True, lower_bound=1e-9)
  once(flags.DEFINE_bool, "prefill_keeps_prefix", True,
       "--mesh: prefill engines keep a turn's blocks after it; false = "
       "DualPath's setting, every cached prefix comes back from the cold tier")
  once(flags.DEFINE_string, "cold_tier", None,
       "directory of a TensorStore cold tier: committed blocks are written "
       "there after each turn and loaded back on a later hit")
  once(float_flags.define_float, "cold_tier_gb", 8.0,
             "cold-tier byte budget (LRU beyond it)")
  once(float_flags.define_float, "hot_tier_gb", 0.0,
             "host-DRAM hot tier in front of the cold tier, GiB, of the "
             "engine (with --mesh: of each prefill engine): blocks the pool "
             "evicted come back from here first; 0 = none",
             lower_bound=0.0)
  once(flags.DEFINE_enum, "hot_tier_memory", "pageable",
       ["pageable", "pinned_host"],
       "with --hot_tier_gb: where the hot tier's bytes live: pageable "
       "(numpy) or pinned_host (a JAX pinned_host buffer that "
       "kernels.block_copy gathers into the pool and scatters back from "
       "it; the engine's pool on one device)")
  once(flags.DEFINE_integer, "prefetch_blocks", 0,
       "with --cold_tier and --hot_tier_gb: blocks per prefetch read; the "
       "prefixes of waiting turns and of sessions predicted to return soon "
       "are read from the cold tier into the hot tier (with --mesh: the "
       "prefill engines') on idle storage NICs; 0 = no prefetch",
       lower_bound=0)
  once(flags.DEFINE_enum, "cold_tier_codec", "raw", CODECS,
       "how cold-tier blocks are stored")
  once(flags.DEFINE_string, "cold_tier_key_file", None,
       "file holding the cold tier's AES-256 key (64 hex digits; python -m "
       "launch.make_cold_tier_key makes one): blocks are sealed before they "
       "are written and authenticated when read; a store made with another "
       "key, or none, is refused")
  once(flags.DEFINE_enum, "cold_tier_sync", "auto", ["auto", "syncfs", "fsync"],
       "how a batch of cold-tier chunk writes is made durable: one syncfs of "
       "the store's file system (give it its own), an fsync per chunk, or "
       "auto (syncfs where the platform has it)")
  once(flags.DEFINE_enum, "cold_tier_reader", "auto",
       ["auto", "direct", "tensorstore"],
       "who reads cold-tier chunk files: the store's own reader (direct: "
       "straight into the load's buffer, O_DIRECT, hardware CRC32C; a "
       "local store without zstd), TensorStore, or auto (direct where it "
       "applies)")


def mesh_config():
  """The `MeshConfig` of `--mesh`/`--tp`, or None for one engine.

  Raises:
    ValueError: an unparsable `--mesh`/`--tp`, `--tp` other than 1
      without `--mesh`, `--mesh` without
      `--cold_tier`, or DualPath flags its config refuses (a storage NIC of
      no bandwidth), before anything runs.
  """
  if not FLAGS.mesh or FLAGS.mesh.lower() == "none":
    if FLAGS.tp.strip() != "1":
      # It used to be taken silently, any value ("abc", "0") included.
      raise ValueError(f"--tp={FLAGS.tp} sizes the engines of --mesh; one "
                       "engine (no --mesh) runs on one device")
    hot_tier_bytes()  # checked now: a size past the host's memory
    check_prefetch(bool(FLAGS.cold_tier))
    if not FLAGS.storage_nic_gbps > 0:
      raise ValueError(f"--storage_nic_gbps must be > 0 (inf: no limit), "
                       f"got {FLAGS.storage_nic_gbps:g}")
    if FLAGS.storage_nic_gbps < float("inf") and not FLAGS.cold_tier:
      raise ValueError("--storage_nic_gbps limits cold-tier reads: it needs "
                       "--cold_tier")
    return None
  from dualpath_jax.transfer import MeshConfig
  if not FLAGS.cold_tier:
    raise ValueError("--mesh needs --cold_tier (the blocks the paths load)")
  mesh = MeshConfig.parse(FLAGS.mesh, FLAGS.tp)
  hot_tier_bytes(mesh.num_prefill)  # one per prefill engine, all in this host
  check_prefetch(True)
  dualpath_config()  # checked now; built again for each cluster
  return mesh


def check_prefetch(has_cold_tier: bool) -> None:
  """ValueError for `--prefetch_blocks` where nothing would prefetch: no
  cold tier to read from (`has_cold_tier`: whether the launcher gives the
  engines one), or no hot tier to read into; one engine or a cluster."""
  if not FLAGS.prefetch_blocks:
    return
  if not has_cold_tier:
    raise ValueError("--prefetch_blocks needs --cold_tier (prefetched "
                     "blocks are read from it)")
  if not FLAGS.hot_tier_gb:
    raise ValueError("--prefetch_blocks needs --hot_tier_gb (prefetched "
                     "blocks go to the hot tier)")


def dualpath_config(policy: str | None = None):
  """`DualPathConfig` from the flags (`policy` overrides `--policy`)."""
  from dualpath_jax.transfer import DualPathConfig
  return DualPathConfig(policy=policy or FLAGS.policy,
                        storage_nic_gbps=FLAGS.storage_nic_gbps,
                        prefill_keeps_prefix=FLAGS.prefill_keeps_prefix,
                        prefill_tokens_per_s=FLAGS.prefill_tokens_per_s,
                        prefetch_blocks=FLAGS.prefetch_blocks)


def cold_tier_config(root: str | None = None):
  """`ColdTierConfig` at `root` (default `--cold_tier`), or None without one.

  Raises:
    ValueError: `root` is not a directory files can be made in, nor one
      that can be made (`outputs.check_output_dir`), or a setting the
      config refuses; launchers call it before the weights load.
  """
  root = root or FLAGS.cold_tier
  if not root:
    if FLAGS.cold_tier_key_file:
      raise ValueError("--cold_tier_key_file needs --cold_tier")
    return None
  from dualpath_jax import outputs
  from storage.config import ColdTierConfig
  outputs.check_output_dir(root, "--cold_tier")
  if not int(FLAGS.cold_tier_gb * (1 << 30)) > 0:
    raise ValueError(f"--cold_tier_gb must be > 0 (the store's byte budget); "
                     f"got {FLAGS.cold_tier_gb:g}")
  if FLAGS.cold_tier_key_file:  # read now: a bad key file before the weights
    from storage import encryption
    encryption.load_key(FLAGS.cold_tier_key_file)
  return ColdTierConfig(root=root, codec=FLAGS.cold_tier_codec,
                        capacity_bytes=int(FLAGS.cold_tier_gb * (1 << 30)),
                        sync=FLAGS.cold_tier_sync,
                        chunk_reader=FLAGS.cold_tier_reader,
                        key_file=FLAGS.cold_tier_key_file or None)


def _available_memory_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (Linux), or None where there is none."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    return None
  return None


def hot_tier_bytes(num_tiers: int = 1) -> int:
  """`--hot_tier_gb` in bytes (0: no hot tier): one engine's, or each prefill
  engine's of a P/D cluster.

  Raises:
    ValueError: `num_tiers` such tiers are more than the host's available
      memory (a tier is allocated and touched up front, so the process
      would be killed, not swap).
  """
  size = int(FLAGS.hot_tier_gb * (1 << 30))
  available = _available_memory_bytes()
  if size and available is not None and size * num_tiers > available:
    each = "" if num_tiers == 1 else f" x {num_tiers} prefill engines"
    raise ValueError(f"--hot_tier_gb={FLAGS.hot_tier_gb:g}{each} is more than "
                     f"the {available / (1 << 30):.1f} GiB of memory available")
  return size


def as_dict() -> dict:
  """The flags' values, for reports."""
  return {"mesh": FLAGS.mesh, "tp": FLAGS.tp, "policy": FLAGS.policy,
          "storage_nic_gbps": FLAGS.storage_nic_gbps,
          "prefill_keeps_prefix": FLAGS.prefill_keeps_prefix,
          "prefill_tokens_per_s": FLAGS.prefill_tokens_per_s,
          "cold_tier_codec": FLAGS.cold_tier_codec,
          "cold_tier_gb": FLAGS.cold_tier_gb, "cold_tier_sync": FLAGS.cold_tier_sync,
          "cold_tier_reader": FLAGS.cold_tier_reader,
          "cold_tier_encrypted": bool(FLAGS.cold_tier_key_file),
          "hot_tier_gb": FLAGS.hot_tier_gb,
          "hot_tier_memory": FLAGS.hot_tier_memory,
          "prefetch_blocks": FLAGS.prefetch_blocks}


def make(loaded, cache, engine_cfg, mesh, cold, policy: str | None = None):
  """An `Engine` (`mesh` None) or a `PDCluster` over the cold tier `cold`.

  `mesh`, `cold`: from `mesh_config()` and `cold_tier_config()` (or a
  launcher's own, e.g. one cold tier per benchmark run); the load-path
  settings come from the flags, `policy` overriding `--policy`.
  """
  if mesh is None:
    from dualpath_jax.engine.factory import make_engine
    return make_engine(loaded, cache, engine_cfg, cold_tier=cold,
                       hot_tier_bytes=hot_tier_bytes(),
                       hot_tier_memory=FLAGS.hot_tier_memory,
                       storage_nic_gbps=FLAGS.storage_nic_gbps,
                       prefetch_blocks=FLAGS.prefetch_blocks)
  from dualpath_jax.engine.cluster import make_cluster
  cluster = make_cluster(loaded, cache, engine_cfg, cold, mesh,
                         dualpath_config(policy),
                         hot_tier_bytes=hot_tier_bytes(mesh.num_prefill),
                         hot_tier_memory=FLAGS.hot_tier_memory)
  warning = cluster.cluster_mesh.sharing_warning()
  if warning:
    logging.warning(warning)
  return cluster


def device_map(engine) -> dict[str, list[int]] | None:
  """Each engine's device ids (a P/D cluster), for reports; None for one
  engine."""
  cluster_mesh = getattr(engine, "cluster_mesh", None)
  return None if cluster_mesh is None else cluster_mesh.device_ids()
