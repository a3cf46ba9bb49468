"""absl flags that start multi-process JAX; shared by the launchers.

    from launch import distributed_flags   # defines the flags (at import)
    ...
    def main(argv):
      distributed_flags.initialize_from_flags()   # first, before any JAX call

Unset flags fall back to the environment (`JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS`); with neither,
the launcher stays single-process. See dualpath_jax/distributed.py and
docs/pod_launch.md.
"""

from __future__ import annotations

import os

from absl import flags, logging

from dualpath_jax.distributed import (ENV_NUM_PROCESSES, DistributedConfig,
                                      describe, initialize)

FLAGS = flags.FLAGS
flags.DEFINE_string("coordinator_address", None, "multi-process JAX: host:port "
                    "of process 0's coordinator, the same on every process "
                    "(default $JAX_COORDINATOR_ADDRESS)")
flags.DEFINE_integer("num_processes", None, "multi-process JAX: processes in "
                     "the job (default $JAX_NUM_PROCESSES, else 1 = "
                     "single-process)")
flags.DEFINE_integer("process_id", None, "multi-process JAX: this process's "
                     "rank, 0 .. num_processes-1 (default $JAX_PROCESS_ID)")
flags.DEFINE_list("local_device_ids", None, "multi-process JAX: local GPU ids "
                  "this process uses, e.g. 0,1 (default $JAX_LOCAL_DEVICE_IDS, "
                  "else all visible)")
flags.DEFINE_bool("distributed_auto", False, "multi-process JAX: let "
                  "jax.distributed.initialize() detect the cluster (TPU pod, "
                  "SLURM, Open MPI, k8s)")


def config_from_flags() -> DistributedConfig:
  """The flags (unset ones from the environment) as a `DistributedConfig`.

  Raises ValueError for bad values, and for a job's flags given to a
  single-process run (`--coordinator_address` or `--process_id` with
  neither `--num_processes` nor `--distributed_auto`, and no job in the
  environment): they would be ignored, and the "multi-process" run would
  quietly run alone. `--num_processes=1` says single-process on purpose
  (one script for any N), and is taken as said."""
  given = [f"--{name}" for name in ("coordinator_address", "process_id")
           if FLAGS[name].present]
  lone = (f"{' and '.join(given)} given to a single-process run: "
          "add --num_processes=N or --distributed_auto")
  if (given and not FLAGS["num_processes"].present and
      not FLAGS.distributed_auto and not os.environ.get(ENV_NUM_PROCESSES)):
    raise ValueError(lone)  # before --process_id=1 is judged against 1 process
  ids = FLAGS.local_device_ids
  try:
    ids = None if ids is None else [int(i) for i in ids]
  except ValueError:
    raise ValueError(f"--local_device_ids must be ints, got {ids!r}") from None
  config = DistributedConfig.from_env(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
      local_device_ids=ids, auto_detect=FLAGS.distributed_auto)
  if not config.multi_process and not FLAGS["num_processes"].present and given:
    raise ValueError(lone)
  return config


def requested() -> bool:
  """Whether the flags or the environment ask for a multi-process job.

  Launchers that cannot run multi-process yet check this before
  `initialize_from_flags`, which would block until every peer joins.
  """
  return config_from_flags().multi_process


def initialize_from_flags() -> bool:
  """Starts multi-process JAX if the flags or environment ask for it.

  Returns whether this process is in a multi-process job. Call it first in
  `main`; it raises if a JAX backend already exists.
  """
  if initialize(config_from_flags()):
    logging.info("multi-process JAX: %s", describe())
    return True
  return False
