"""`StopMatcher` against brute force on random strings over small alphabets
(many overlaps, stop strings inside others), fed in random pieces."""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.server.stop_matcher import StopMatcher
from dualpath_jax.server.text_stream import TextStream


def _brute_first_stop(text: str, stops: list[str]) -> int | None:
  """Start of the first stop string to complete, char by char (the longest
  of those completing at the same character)."""
  for end in range(1, len(text) + 1):
    done = [s for s in stops if text[:end].endswith(s)]
    if done:
      return end - max(map(len, done))
  return None


def _brute_held(text: str, stops: list[str]) -> int:
  return max((n for n in range(1, len(text) + 1)
              if any(s.startswith(text[-n:]) for s in stops)), default=0)


@pytest.mark.parametrize("seed", range(40))
def test_first_match_and_held_tail_equal_brute_force(seed):
  rng = np.random.default_rng(seed)
  alphabet = "ab" if seed % 2 else "abc"
  rand = lambda n: "".join(rng.choice(list(alphabet), size=n))  # noqa: E731
  stops = [rand(int(rng.integers(1, 6))) for _ in range(int(rng.integers(1, 5)))]
  text = rand(int(rng.integers(0, 40)))
  matcher = StopMatcher(stops)
  want = _brute_first_stop(text, stops)
  fed, got = 0, None
  while fed < len(text) and got is None:  # random pieces, like tokens
    piece = text[fed:fed + int(rng.integers(1, 5))]
    got = matcher.feed(piece)
    fed += len(piece)
    if got is None:
      assert matcher.held == _brute_held(text[:fed], stops), (stops, text[:fed])
  assert got == want, (stops, text)


def test_many_long_stop_strings_find_the_one_planted():
  """5,000 stop strings of 200 characters (random: none occurs by chance in
  the random text, 8^-200), one planted at character 12,345."""
  rng = np.random.default_rng(0)
  rand = lambda n: "".join(rng.choice(list("abcdefgh"), size=n))  # noqa: E731
  stops = [rand(200) for _ in range(5000)]
  text = rand(12345) + stops[2718] + rand(5000)
  matcher = StopMatcher(stops)
  assert matcher.feed(text[:12345 + 199]) is None
  assert matcher.held == 199
  assert matcher.feed(text[12345 + 199:]) == 12345


def test_empty_stop_strings_are_refused():
  with pytest.raises(ValueError, match="non-empty"):
    StopMatcher(["a", ""])


class _CharTokenizer:
  """One token per character (ids are code points): the stream's behaviour
  without a real tokenizer."""

  def is_special(self, token):
    return token == 0

  def decode(self, ids, skip_special_tokens=True):
    del skip_special_tokens
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("seed", range(10))
def test_text_stream_releases_what_brute_force_allows(seed):
  rng = np.random.default_rng(100 + seed)
  rand = lambda n: "".join(rng.choice(list("xyz"), size=n))  # noqa: E731
  stops = [rand(int(rng.integers(1, 5))) for _ in range(3)]
  text = rand(30)
  stream = TextStream(_CharTokenizer(), stops)
  shown = ""
  for i, char in enumerate(text):
    shown += stream.push(ord(char))
    if stream.stopped:
      break
    # everything not held back is shown
    assert shown == text[:i + 1][:i + 1 - _brute_held(text[:i + 1], stops)]
  shown += stream.flush()
  first = _brute_first_stop(text, stops)
  assert stream.stopped == (first is not None)
  assert shown == (text if first is None else text[:first])


def test_a_fresh_matcher_shares_the_tables_not_the_state():
  first = StopMatcher(["stop", "top!"])
  assert first.feed("xx sto") is None and first.held == 3
  other = first.fresh()
  assert other.held == 0 and other._next is first._next  # pylint: disable=protected-access
  assert other.feed("a top!") == 2  # its own offsets, from its own start
  assert first.feed("p") == 3  # its own text went on where it was
