"""Checks of text from outside (requests, traces) before it reaches a tokenizer.

Kept apart from `dualpath_jax.model.tokenizer` so that the trace reader and
the server's protocol can use them without importing the model stack.
"""

from __future__ import annotations

# Message roles of a conversation, in traces and chat requests: what an
# agent's turn holds. A role outside these would render into the chat
# template verbatim (SmolLM2's writes `<|im_start|>{role}`), as text the
# model never saw in training, so it is refused instead.
CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_unicode(text: str) -> None:
  """ValueError unless `text` is valid Unicode. A Python str may hold lone
  surrogates (JSON's "\\ud800" decodes to one); the `tokenizers` library
  refuses them with a bare TypeError, so they are named here instead."""
  if text.isascii():
    return
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(
        f"text is not valid Unicode: U+{ord(text[e.start]):04X} at character "
        f"{e.start} is a lone surrogate") from None
