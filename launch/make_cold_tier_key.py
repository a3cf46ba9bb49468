"""Writes a fresh key for an encrypted cold tier.

  python -m launch.make_cold_tier_key --out=/secure/kv.key

The file holds a random 32-byte AES-256 key as 64 hex digits and is made
readable by its owner only. An existing file is never overwritten: the
blocks sealed under its key would be lost. Prints the key's id, which the
store records (a keyed hash; it reveals nothing of the key). Use it with
`--cold_tier_key_file` (agent_eval, serve, bench_online) or
`ColdTierConfig(key_file=...)`; see `storage.encryption`.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from storage import encryption

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program)."""
  flags.DEFINE_string("out", None, "Key file to make (must not exist).")
  flags.mark_flag_as_required("out")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    kid = encryption.write_key_file(FLAGS.out)
  except ValueError as e:
    sys.exit(f"make_cold_tier_key: {e}")
  print(f"wrote {FLAGS.out} (key id {kid})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
