"""Generated token ids -> text deltas, with stop strings.

`TextStream.push(token)` is called with each generated token and returns the
text that can be shown now. Two things hold text back:

* incomplete UTF-8: byte-level BPE splits characters across tokens; a delta
  is released only when it does not end in U+FFFD. Decoding uses a sliding
  window (the tokens since the last-but-one release) so each push costs
  O(window), not O(generated);
* stop strings: the longest tail of the text that is a prefix of a stop
  string is held until it is disambiguated. When a stop string appears, the
  text before it is released and `stopped` becomes True; the stop string and
  everything after it are dropped (OpenAI semantics). The text is matched
  character by character (`stop_matcher.StopMatcher`, O(1) a character), so
  the first stop string to complete wins, however the tokens split it.
"""

from __future__ import annotations

from typing import Sequence

from dualpath_jax.server.stop_matcher import StopMatcher


class TextStream:
  """Incremental detokenizer of one generation; see the module docstring."""

  def __init__(self, tokenizer, stop: Sequence[str] = (),
               stop_token_ids: Sequence[int] = ()):
    self._tokenizer = tokenizer
    stop = [s for s in stop if s]
    self._matcher = StopMatcher(stop) if stop else None
    self._matched_to = 0  # chars of `_text` fed to the matcher
    self._stop_token_ids = frozenset(int(t) for t in stop_token_ids)
    self._ids: list[int] = []
    self._prefix_offset = 0  # window start: context for the next decode
    self._read_offset = 0  # tokens already turned into `_text`
    self._text = ""  # decoded text of all released tokens
    self._sent = 0  # chars of `_text` handed out
    self.stopped = False

  def fresh(self) -> "TextStream":
    """A stream of another generation with the same tokenizer and stops,
    sharing this one's stop-string automaton (`StopMatcher.fresh`)."""
    other = TextStream(self._tokenizer, (), self._stop_token_ids)
    other._matcher = None if self._matcher is None else self._matcher.fresh()
    return other

  @property
  def text(self) -> str:
    """Everything handed out so far."""
    return self._text[:self._sent]

  def push(self, token: int) -> str:
    """Adds one token; returns the text newly safe to show (may be "")."""
    if self.stopped:
      return ""
    if token in self._stop_token_ids:
      self.stopped = True
      return self._release(len(self._text))
    if self._tokenizer.is_special(token):
      return ""  # EOS and other control tokens are not shown
    self._ids.append(int(token))
    decode = lambda ids: self._tokenizer.decode(  # noqa: E731
        ids, skip_special_tokens=True)
    before = decode(self._ids[self._prefix_offset:self._read_offset])
    after = decode(self._ids[self._prefix_offset:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
      self._text += after[len(before):]
      self._prefix_offset = self._read_offset
      self._read_offset = len(self._ids)
    return self._scan()

  def flush(self) -> str:
    """Releases what is held back (call when the generation has ended)."""
    if self.stopped:
      return ""
    if self._read_offset < len(self._ids):  # an incomplete character
      tail = self._tokenizer.decode(self._ids[self._prefix_offset:],
                                    skip_special_tokens=True)
      head = self._tokenizer.decode(
          self._ids[self._prefix_offset:self._read_offset],
          skip_special_tokens=True)
      self._text += tail[len(head):]
      self._read_offset = len(self._ids)
      out = self._scan()
      if self.stopped:
        return out
      return out + self._release(len(self._text))
    return self._release(len(self._text))

  def _scan(self) -> str:
    if self._matcher is None:
      return self._release(len(self._text))
    start = self._matcher.feed(self._text[self._matched_to:])
    self._matched_to = len(self._text)
    if start is not None:
      self.stopped = True
      return self._release(start)
    return self._release(len(self._text) - self._matcher.held)

  def _release(self, end: int) -> str:
    end = max(end, self._sent)
    out = self._text[self._sent:end]
    self._sent = end
    return out
