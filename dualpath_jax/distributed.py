"""Starts multi-process JAX (`jax.distributed`): one process per host or GPU.

With several processes, each owns its local devices and `jax.devices()` lists
every process's devices (process 0's first). A `jax.sharding.Mesh` may span
processes, and a collective over it (the ppermute hand-off,
`transfer.handoff`) crosses them: NCCL between GPUs, gloo over TCP between
CPU processes. Every process must then run the same jitted programs in the
same order (multi-controller SPMD); a program whose arrays all live on one
process's devices runs on that process alone.

`DistributedConfig` is what to start, read from explicit values or from the
environment:

    JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator service
    JAX_NUM_PROCESSES        how many processes
    JAX_PROCESS_ID           this process's rank, 0 .. num_processes - 1
    JAX_LOCAL_DEVICE_IDS     optional: the local GPUs this process uses (1,3)

(JAX itself reads the first and last; the middle two are this project's.)
`auto_detect` leaves everything to `jax.distributed.initialize()`'s cluster
detection instead (Cloud TPU pods, SLURM, Open MPI, Kubernetes).

`initialize(config)` does it, before anything touches a JAX backend: it turns
on gloo CPU collectives if none is chosen (CPU collectives across processes
need one; jax 0.10 already defaults to gloo, and an explicit
`jax_cpu_collectives_implementation=mpi` is kept), optionally sets the number
of CPU devices per process, and calls `jax.distributed.initialize`. Calling
it again is a no-op. One process (the default) initializes nothing, so
launchers call it always.
launch/distributed_flags.py maps absl flags onto it; docs/pod_launch.md shows
pod launches.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Which multi-process JAX to start (see the module docstring).

  Attributes:
    coordinator_address: "host:port" of process 0 (every process passes the
      same); process 0 also listens on that port.
    num_processes: processes in the job; 1 = single-process, nothing to start.
    process_id: this process's rank.
    local_device_ids: local GPU ids this process uses (None = all visible).
    num_cpu_devices: CPU devices per process (tests: 2 per process on one
      host); None keeps JAX's default (1, or XLA_FLAGS).
    auto_detect: let `jax.distributed.initialize()` detect the cluster (TPU
      pod, SLURM, Open MPI, k8s); the other fields then only override.
    timeout_s: how long process k waits for the others to connect.
  """

  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  num_cpu_devices: int | None = None
  auto_detect: bool = False
  timeout_s: int = 300

  def __post_init__(self):
    n, rank = self.num_processes, self.process_id
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"num_processes must be an int >= 1, got {n!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                             or rank < 0):
      raise ValueError(f"process_id must be an int >= 0, got {rank!r}")
    if rank is not None and rank >= n and not (self.auto_detect and n == 1):
      raise ValueError(f"process_id must be < num_processes={n}, got {rank}")
    if n > 1 and not self.auto_detect:
      if rank is None:
        raise ValueError(f"num_processes={n} needs a process_id (--process_id "
                         f"or ${ENV_PROCESS_ID})")
      _check_address(self.coordinator_address)
    elif self.coordinator_address is not None:
      _check_address(self.coordinator_address)
    if self.num_cpu_devices is not None and self.num_cpu_devices < 1:
      raise ValueError(
          f"num_cpu_devices must be >= 1, got {self.num_cpu_devices}")
    if self.local_device_ids is not None and any(
        not isinstance(i, int) or i < 0 for i in self.local_device_ids):
      raise ValueError(f"local_device_ids must be ints >= 0, got "
                       f"{self.local_device_ids!r}")
    if self.timeout_s < 1:
      raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")

  @property
  def multi_process(self) -> bool:
    return self.auto_detect or self.num_processes > 1

  @classmethod
  def from_env(cls, env: Mapping[str, str] | None = None, *,
               coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               **others) -> "DistributedConfig":
    """Explicit values win; unset ones come from `env` (default os.environ)."""
    env = os.environ if env is None else env
    if coordinator_address is None:
      coordinator_address = env.get(ENV_COORDINATOR) or None
    if num_processes is None:
      num_processes = _env_int(env, ENV_NUM_PROCESSES, 1)
    if process_id is None:
      process_id = _env_int(env, ENV_PROCESS_ID, None)
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
      local_device_ids = _parse_ids(env[ENV_LOCAL_DEVICE_IDS],
                                    ENV_LOCAL_DEVICE_IDS)
    return cls(coordinator_address, num_processes, process_id,
               None if local_device_ids is None else tuple(local_device_ids),
               **others)


def initialize(config: DistributedConfig | None = None) -> bool:
  """Starts multi-process JAX per `config` (default: from the environment).

  Returns True when this process is part of a multi-process job (started now
  or by an earlier call; a later call asking for a job checks it is the same
  one), False for one process.
  Raises RuntimeError when a JAX backend already exists (call this first in
  `main`, before any `jax.devices()`, `device_put` or model load), when an
  earlier call started something else, when process 0's port is taken, when
  no coordinator listens within `timeout_s`, or when the job joined has
  another process count (see `_check_coordinator`); ValueError for bad
  settings.
  """
  import jax  # after the caller had its chance to set XLA_FLAGS

  config = DistributedConfig.from_env() if config is None else config
  if jax.distributed.is_initialized():
    if config.multi_process:  # asked for a job: the running one must be it
      _check_same(config)
    return True
  if not config.multi_process:
    return False
  if _backend_started():
    raise RuntimeError(
        "dualpath_jax.distributed.initialize() must run before anything "
        "creates a JAX backend (jax.devices(), device_put, a jitted call, "
        "loading a model); call it first thing in main()")
  if getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if config.num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
  kwargs = dict(coordinator_address=config.coordinator_address,
                num_processes=None if config.auto_detect and
                config.num_processes == 1 else config.num_processes,
                process_id=config.process_id,
                local_device_ids=(None if config.local_device_ids is None
                                  else list(config.local_device_ids)),
                initialization_timeout=config.timeout_s)
  if not config.auto_detect:
    kwargs["cluster_detection_method"] = "deactivate"
  _check_coordinator(config)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    kind = ValueError if isinstance(e, ValueError) else RuntimeError
    raise kind(f"jax.distributed.initialize({_describe_kwargs(kwargs)}) "
               f"failed: {e}") from e
  _check_same(config)  # a process count unlike the others' joins silently
  return True


def describe() -> str:
  """One log line: this process, the job, local and global device counts."""
  import jax
  return (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} "
          f"{jax.default_backend()} devices")


# ----------------------------------------------------------------- helpers
def _backend_started() -> bool:
  try:  # JAX has no public "has a backend started?"; jax.distributed raises
    from jax._src import xla_bridge  # too, with a less specific message
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def _check_same(config: DistributedConfig) -> None:
  import jax
  if config.auto_detect and config.num_processes == 1:
    want_n = jax.process_count()
  else:
    want_n = config.num_processes
  want_rank = jax.process_index() if config.process_id is None \
      else config.process_id
  if (jax.process_count(), jax.process_index()) != (want_n, want_rank):
    raise RuntimeError(
        f"jax.distributed runs this process as process {jax.process_index()} "
        f"of {jax.process_count()}, not {want_rank} of {want_n} as asked: "
        "every process of a job needs the same --num_processes (an earlier "
        "initialize, or process 0's, set the job)")


def _check_coordinator(config: DistributedConfig) -> None:
  """Fails clearly where JAX would kill the process instead.

  jax 0.10.2's `jax.distributed.initialize` crashes with SIGSEGV when
  process 0's coordinator port is taken (another job, a second process 0),
  and aborts with a C++ check failure ("another task died ...
  DEADLINE_EXCEEDED") when a process finds no coordinator within
  `timeout_s`: no Python exception, no hint at the cause. So process 0
  checks that it can listen on the port, the others wait (up to
  `timeout_s`) until something listens there. Skipped when JAX picks the
  address or the rank (`auto_detect`).
  """
  if config.coordinator_address is None or config.process_id is None:
    return
  host, _, port = config.coordinator_address.rpartition(":")
  host, port = host.strip("[]"), int(port)
  if config.process_id == 0:
    if not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
      _check_port_free(port)
  else:
    _wait_for_listener(host, port, config.timeout_s)


def _check_port_free(port: int) -> None:
  """RuntimeError if this host cannot listen on `port` (all interfaces, as
  JAX's coordinator does)."""
  import errno
  import socket
  for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        s.listen()
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise RuntimeError(
            f"process 0 cannot start the coordinator: port {port} is already "
            "in use on this host (another job, or a second process with "
            "process_id 0?); pick another --coordinator_address port") \
            from None
      # no IPv6 on this host: try IPv4


def _wait_for_listener(host: str, port: int, timeout_s: float) -> None:
  """Returns once something accepts TCP connections at host:port;
  RuntimeError after `timeout_s` s of trying."""
  import socket
  import time
  deadline, error = time.monotonic() + timeout_s, None
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as e:
      error = e
    if time.monotonic() >= deadline:
      raise RuntimeError(
          f"no coordinator at {host}:{port} after {timeout_s} s ({error}): "
          "is process 0 of the job running, with the same "
          "--coordinator_address?")
    time.sleep(0.5)


def _describe_kwargs(kwargs) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None)


def _check_address(address: str | None) -> None:
  if not address:
    raise ValueError(f"a multi-process job needs a coordinator address "
                     f"(--coordinator_address or ${ENV_COORDINATOR}), "
                     f"host:port of process 0")
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator address must be host:port, got {address!r}")


def _env_int(env: Mapping[str, str], name: str, default):
  raw = env.get(name, "").strip()
  if not raw:
    return default
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"${name} must be an integer, got {raw!r}") from None


def _parse_ids(raw: str, name: str) -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in raw.split(",") if p.strip())
  except ValueError:
    raise ValueError(f"{name} must be comma-separated ints, got {raw!r}") \
        from None
