"""`--help` of a launcher lists the flags it shares with other launchers.

absl's `--help` shows the main module's key flags, and the flags a
launcher defines through the shared modules (`cluster_flags`,
`engine_flags`, `workload_flags`, `float_flags`, `distributed_flags`) are
the defining module's: `agent_eval --help` showed ten flags, and
`--sessions`, `--mesh`, `--cold_tier` or `--max_context` only under
`--helpfull`.
"""

from __future__ import annotations

import sys

from absl import flags

_SHARED_MODULES = ("launch.cluster_flags", "launch.engine_flags",
                   "launch.workload_flags", "launch.float_flags",
                   "launch.distributed_flags")


def list_shared_flags_in_help(
    flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Makes every flag the shared modules defined in this process a key flag
  of the main module (`sys.argv[0]`, the module `--help` describes). Call
  it from the launcher's `__main__` block, before `app.run`."""
  for module, defined in flag_values.flags_by_module_dict().items():
    if module in _SHARED_MODULES:
      for flag in defined:
        flag_values.register_key_flag_for_module(sys.argv[0], flag)
