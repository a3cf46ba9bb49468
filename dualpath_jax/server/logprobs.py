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
A log-probability of -inf is sent as -9999.0 (as OpenAI does: JSON has
no infinity).
"""

from __future__ import annotations

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


def completion_logprobs(entries: Sequence[TokenLogprob], tokenizer,
                        offset: int = 0) -> dict[str, Any]:
  """A completions choice's `logprobs`; `text_offset` counts characters from
  `offset` (a stream's text sent before these tokens)."""
  tokens, logprobs, tops, offsets = [], [], [], []
  for e in entries:
    text, _ = _token(tokenizer, e.token)
    tokens.append(text)
    logprobs.append(_number(e.logprob))
    tops.append({_token(tokenizer, t)[0]: _number(lp) for t, lp in e.top})
    offsets.append(offset)
    offset += len(text)
  return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
          "text_offset": offsets}
