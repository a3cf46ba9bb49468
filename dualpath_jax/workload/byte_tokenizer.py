"""A stand-in chat tokenizer for models without one (random weights).

Replaying agent sessions needs `encode_chat(messages)` and `decode(ids)`;
random-weight presets (`random:llama3-8b`, `random:tiny-test`) have no
tokenizer. This one makes one token per UTF-8 byte of a plain role-tagged
rendering, so contexts have realistic lengths in tokens (a few times a BPE
tokenizer's) and a session's context still grows by exactly its messages.
`decode` turns each id into one letter, so a generated reply re-encodes to
as many tokens as were generated. Not a real tokenizer: for load tests only.
"""

from __future__ import annotations

from typing import Sequence

_FIRST_ID = 3  # ids 0..2 are pad / BOS / EOS in the presets


class ByteChatTokenizer:
  """One token per byte of `<role>content...` (ids folded into the vocabulary)."""

  def __init__(self, vocab_size: int):
    if vocab_size <= _FIRST_ID + 1:
      raise ValueError(f"vocab_size must be > {_FIRST_ID + 1}, got {vocab_size}")
    self.span = min(256, vocab_size - _FIRST_ID)

  def encode(self, text: str) -> list[int]:
    return [_FIRST_ID + b % self.span for b in text.encode("utf-8")]

  def encode_chat(self, messages: Sequence[dict[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    if add_generation_prompt:
      text += "<assistant>"
    return self.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(chr(97 + int(i) % 26) for i in ids)
