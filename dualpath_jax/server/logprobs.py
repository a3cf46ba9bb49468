"""Generated tokens' log-probabilities in OpenAI's two wire formats.

The engine gives each generated token's log-probability and the k most
likely tokens' (`engine.request.TokenLogprob`: the log-softmax of the
model's logits, before temperature and top-p). Here they become:

* chat/completions: `{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}`;
* completions (legacy): `{"tokens", "token_logprobs", "top_logprobs"
  (one {token: logprob} object per token), "text_offset"}`.

Only tokens whose text can be part of the content are listed: special
tokens (EOS) and `stop_token_ids` are left out, as their text is. The
tokens that completed a stop string are listed (their text was cut).
`token` is the token's bytes decoded as UTF-8, a piece of a character
shown as U+FFFD; `bytes` holds them exactly (`Tokenizer.token_bytes`).
`text_offset` is where each token's text starts in the choice's text, in
characters (`TextOffsets`): a character split across tokens is there once,
not once per U+FFFD, and a stream's offsets are the whole response's (the
tokens that completed a stop string may start past the text's end).
Completions' `top_logprobs` maps token text to log-probability: tokens of
the same text (pieces of characters, all U+FFFD) keep the most likely's,
and the sampled token is there too when it is not among the most likely
(OpenAI's up to `logprobs + 1` entries).
A log-probability of -inf is sent as -9999.0 (as OpenAI does: JSON has
no infinity).
"""

from __future__ import annotations

import codecs
import math
from typing import Any, Iterable, Sequence

from dualpath_jax.engine.request import TokenLogprob

FLOOR = -9999.0


def visible(entries: Iterable[TokenLogprob], tokenizer,
            stop_token_ids: Sequence[int] = ()) -> list[TokenLogprob]:
  """The entries of tokens whose text can be shown (see module docstring)."""
  stops = frozenset(int(t) for t in stop_token_ids)
  return [e for e in entries
          if not tokenizer.is_special(e.token) and e.token not in stops]


def _number(logprob: float) -> float:
  return logprob if math.isfinite(logprob) else FLOOR


def _token(tokenizer, token_id: int) -> tuple[str, list[int]]:
  raw = tokenizer.token_bytes(token_id)
  return raw.decode("utf-8", "replace"), list(raw)


def chat_content(entries: Sequence[TokenLogprob],
                 tokenizer) -> list[dict[str, Any]]:
  """The `logprobs.content` list of a chat choice (or a chunk's delta)."""
  out = []
  for e in entries:
    text, raw = _token(tokenizer, e.token)
    top = []
    for token_id, logprob in e.top:
      alt_text, alt_raw = _token(tokenizer, token_id)
      top.append({"token": alt_text, "logprob": _number(logprob),
                  "bytes": alt_raw})
    out.append({"token": text, "logprob": _number(e.logprob), "bytes": raw,
                "top_logprobs": top})
  return out


def _top_by_text(top: Sequence[tuple[int, float]],
                 tokenizer) -> dict[str, float]:
  """Completions' `{token: logprob}` of one step's most likely tokens (most
  likely first). Tokens that are pieces of characters all read U+FFFD: the
  most likely of them keeps the key (the least likely overwrote it, and
  the step's own token, most likely under greedy, showed another's
  log-probability)."""
  out: dict[str, float] = {}
  for token_id, logprob in top:
    out.setdefault(_token(tokenizer, token_id)[0], _number(logprob))
  return out


class TextOffsets:
  """Completions' `text_offset` of one choice: each token's, in order, as
  the index in the choice's text of the character its first byte starts or
  continues. The text is its tokens' bytes decoded as UTF-8 (invalid bytes
  as U+FFFD), so a character split across tokens counts once, where
  counting each token's own decode (one U+FFFD per piece) ran past it.
  Keeps its place between calls: a stream hands it each chunk's tokens, and
  its offsets are the non-streamed response's whatever text the stream held
  back (an incomplete character, a possible stop string)."""

  def __init__(self):
    self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    self._chars = 0  # characters the bytes so far decoded to

  def next(self, raw: bytes) -> int:
    """The offset of the token that comes next, of bytes `raw`."""
    head = self._utf8.decode(raw[:1])
    # The first byte's character: the one after `head` if the decoder holds
    # the byte (it starts or continues a character not yet complete), else
    # `head`'s last (the byte ended it, or was invalid: U+FFFD).
    held = bool(self._utf8.getstate()[0])
    offset = self._chars + len(head) - (1 if head and not held else 0)
    self._chars += len(head) + len(self._utf8.decode(raw[1:]))
    return offset


def completion_logprobs(entries: Sequence[TokenLogprob], tokenizer,
                        offsets: TextOffsets | None = None) -> dict[str, Any]:
  """A completions choice's `logprobs`; `offsets` places the tokens in the
  text (a stream's, fed the tokens of its earlier chunks; default: these
  tokens are the text's first)."""
  offsets = TextOffsets() if offsets is None else offsets
  tokens, logprobs, tops, text_offset = [], [], [], []
  for e in entries:
    raw = tokenizer.token_bytes(e.token)
    tokens.append(raw.decode("utf-8", "replace"))
    logprobs.append(_number(e.logprob))
    top = _top_by_text(e.top, tokenizer)
    if e.top:  # and the sampled token, as OpenAI's (up to logprobs + 1)
      top.setdefault(tokens[-1], _number(e.logprob))
    tops.append(top)
    text_offset.append(offsets.next(raw))
  return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
          "text_offset": text_offset}
