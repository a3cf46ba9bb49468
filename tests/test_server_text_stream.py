"""`TextStream`: incremental detokenization and stop strings, vs whole-text
references computed with plain `str` operations on the full decode."""

from __future__ import annotations

import pytest

from dualpath_jax.server.text_stream import TextStream

TEXTS = [
    "def f(x):\n    return x * 42  # done",
    "naïve café — 漢字 and emoji 🙂🚀 mixed",
    "   leading spaces, then\n\n\nnewlines\tand tabs",
]


def _stream_all(tok, ids, **kw):
  ts = TextStream(tok, **kw)
  pieces = [ts.push(i) for i in ids]
  if not ts.stopped:
    pieces.append(ts.flush())
  return pieces, ts


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode(smollm2_tokenizer, text):
  ids = smollm2_tokenizer.encode(text)
  pieces, ts = _stream_all(smollm2_tokenizer, ids)
  assert "".join(pieces) == smollm2_tokenizer.decode(ids) == text
  assert not any("\ufffd" in p for p in pieces)
  assert ts.text == text and not ts.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_stop_string_cuts_before_its_first_occurrence(smollm2_tokenizer,
                                                      np_rng, text):
  start = int(np_rng.integers(1, len(text) - 4))
  stop = text[start:start + int(np_rng.integers(1, 4))]
  ids = smollm2_tokenizer.encode(text)
  pieces, ts = _stream_all(smollm2_tokenizer, ids,
                           stop=["\x01absent", stop])
  assert ts.stopped
  assert "".join(pieces) == text[:text.find(stop)]


@pytest.mark.parametrize("text", TEXTS)
def test_partial_stop_match_is_held_then_released(smollm2_tokenizer, text):
  # Every prefix of the text's tail begins this stop string, which never
  # completes: text is held back while ambiguous and released by flush().
  stop = text[-3:] + "\x02"
  ids = smollm2_tokenizer.encode(text)
  ts = TextStream(smollm2_tokenizer, stop=[stop])
  shown = "".join(ts.push(i) for i in ids)
  assert text.startswith(shown) and len(shown) <= len(text) - 3
  assert shown + ts.flush() == text and not ts.stopped


def test_special_and_stop_token_ids(smollm2_tokenizer):
  tok = smollm2_tokenizer
  ids = tok.encode("hello world, again")
  eos = tok.eos_ids[0]
  pieces, ts = _stream_all(tok, ids[:2] + [eos] + ids[2:])
  assert "".join(pieces) == tok.decode(ids)  # the control token is hidden
  pieces, ts = _stream_all(tok, ids, stop_token_ids=[ids[2]])
  assert ts.stopped and "".join(pieces) == tok.decode(ids[:2])
  assert ts.push(ids[0]) == "" and ts.flush() == ""
