"""What a launcher's flags name for the run to read or keep, so that its
outputs can be checked against them before the run
(`outputs.check_output_paths(..., inputs=flagged_inputs())`): a report
written over a cold tier's key file, into its index or into a model
checkpoint, or over the trace, destroys what the next run needs."""

from __future__ import annotations

from absl import flags

# Flag name -> kind (outputs.check_outputs_spare_inputs): what it names.
_KINDS = {
    "model": "any",  # a GGUF file or a checkpoint folder (or a keyword)
    "tokenizer": "file",  # a GGUF (or a keyword: bytes)
    "trace": "file",
    "cold_tier_key_file": "file",
    "cold_tier": "dir",
}


def flagged_inputs(
    flag_values: flags.FlagValues = flags.FLAGS,
) -> list[tuple[str, str | None, str]]:
  """`(--flag, value, kind)` for each flag of `_KINDS` the launcher defines
  and was given."""
  return [(f"--{name}", flag_values[name].value, kind)
          for name, kind in _KINDS.items()
          if name in flag_values and flag_values[name].value]
