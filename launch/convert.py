"""Converts a GGUF model to an Orbax checkpoint that `load_model(dir)` restores.

  python -m launch.convert --out=/tmp/smollm2_ckpt [--gguf=model.gguf]
      [--dtype=bfloat16]

Dequantises once (Q4_1/Q8_0 -> `--dtype`), so later loads skip the GGUF
parsing and dequantisation. The tokenizer stays in the GGUF: the checkpoint's
metadata records which file (or "the embedded SmolLM2") to read it from.

The checkpoint is written beside `--out` and renamed into place when
whole, so Ctrl-C (exit 130), a crash or a full disk leaves `--out` as it
was: absent, empty, or the checkpoint `--overwrite` was replacing. Its
files are fsynced before the rename and `--out`'s parent after it (the
replaced checkpoint removed only then), so a power cut leaves the old
checkpoint or the new one, never one with files missing their data, and
the new one is on disk once its path is printed.
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

# JAX-free until the conversion itself (`checkpoint`, `load_model`'s
# weights): bad flags are refused before JAX's ~3 s import.
from dualpath_jax import outputs
from dualpath_jax.model import checkpoint_layout, describe_model, gguf_loader
from dualpath_jax.interrupts import ctrl_c_ends_quietly

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program)."""
  flags.DEFINE_string("gguf", None,
                      "GGUF file to convert (default: the embedded SmolLM2).")
  flags.DEFINE_string("out", None, "Checkpoint directory to write.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Weight dtype stored in the checkpoint.")
  flags.DEFINE_bool("overwrite", False,
                    "Replace an existing checkpoint at --out.")
  flags.mark_flag_as_required("out")


def check_gguf_flag(gguf: str | None) -> None:
  """ValueError unless `--gguf` names a `.gguf` file (or is not given):
  `load_model` takes checkpoints and `random:` presets too, and converting
  one of those would write a checkpoint whose tokenizer points at no GGUF
  (with `--overwrite`, in place of a good one)."""
  if gguf is None:
    return
  path = pathlib.Path(gguf).expanduser()
  if path.suffix != ".gguf":
    raise ValueError(f"--gguf must name a .gguf file; got {gguf!r} (a "
                     "checkpoint or random: model has nothing to convert)")
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path} (--gguf)")


def convert(gguf_path: str | None, out: str, dtype: str,
            overwrite: bool = False) -> str:
  """Writes the checkpoint; returns its directory."""
  from dualpath_jax.model import checkpoint, load_model  # pylint: disable=g-import-not-at-top
  loaded = load_model(gguf_path, dtype=dtype)
  embedded = gguf_path is None
  tokenizer_gguf = (gguf_loader.find_smollm2_gguf() if embedded
                    else loaded.source)
  directory = checkpoint.save_checkpoint(
      out, loaded.model, weights_id=loaded.weights_id,
      tokenizer_gguf=tokenizer_gguf, tokenizer_embedded=embedded,
      source=loaded.source, overwrite=overwrite)
  return str(directory)


def _check_gguf_outside_out(gguf: str | None, out: str | None) -> None:
  """ValueError if the GGUF lies inside `out`, which `--overwrite` replaces
  as a whole: the source would go with the old checkpoint."""
  if gguf is not None and out is not None and outputs.lies_inside(gguf, out):
    raise ValueError(f"--gguf {gguf} lies inside --out {out}, which the "
                     "checkpoint replaces: move the GGUF out first")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  try:  # the directory and the GGUF's header first: the conversion is slow
    check_gguf_flag(FLAGS.gguf)
    checkpoint_layout.check_output_directory(FLAGS.out, FLAGS.overwrite)
    _check_gguf_outside_out(FLAGS.gguf, FLAGS.out)
    describe_model(FLAGS.gguf, dtype=FLAGS.dtype)
    directory = convert(FLAGS.gguf, FLAGS.out, FLAGS.dtype, FLAGS.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    sys.exit(f"convert: {e}")
  except KeyboardInterrupt:  # the checkpoint is written aside, then renamed
    print(f"convert: interrupted; {FLAGS.out} is as it was", file=sys.stderr)
    sys.exit(130)
  logging.info("wrote %s in %.1f s", directory, time.perf_counter() - start)
  print(directory)


if __name__ == "__main__":
  define_flags()
  app.run(ctrl_c_ends_quietly(main, "convert"))
