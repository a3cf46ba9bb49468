"""Stop strings found in generated text as it grows, in O(1) per character.

`TextStream` needs two answers after every token: did a stop string just
appear, and how long is the longest tail of the text that could still grow
into one (that tail is held back, not shown). Scanning every stop string
against the text's tail each time costs (stop strings) x (their length)^2
per token, on the engine's thread: one request with thousands of long stop
strings slowed every other request's decoding. An Aho-Corasick automaton
answers both from its state, one transition per new character: the state
is the longest suffix of the text that is a prefix of some stop string.
"""

from __future__ import annotations

import collections
import copy
from typing import Sequence


class StopMatcher:
  """An Aho-Corasick automaton over non-empty stop strings."""

  def __init__(self, stops: Sequence[str]):
    if not stops or not all(stops):
      raise ValueError("StopMatcher needs non-empty stop strings")
    self._next: list[dict[str, int]] = [{}]  # trie edges, then goto
    self._fail = [0]
    self._depth = [0]
    # Longest stop string that ends at a node's string (0: none).
    self._match = [0]
    for stop in stops:
      node = 0
      for char in stop:
        child = self._next[node].get(char)
        if child is None:
          child = len(self._next)
          self._next[node][char] = child
          self._next.append({})
          self._fail.append(0)
          self._depth.append(self._depth[node] + 1)
          self._match.append(0)
        node = child
      self._match[node] = len(stop)
    queue = collections.deque(self._next[0].values())
    while queue:  # breadth first: a node's fail link is shallower
      node = queue.popleft()
      self._match[node] = max(self._match[node],
                              self._match[self._fail[node]])
      for char, child in self._next[node].items():
        fail = self._fail[node]
        while fail and char not in self._next[fail]:
          fail = self._fail[fail]
        target = self._next[fail].get(char, 0)
        self._fail[child] = target if target != child else 0
        queue.append(child)
    self._state = 0
    self._fed = 0  # characters fed so far

  def fresh(self) -> "StopMatcher":
    """A matcher over the same stop strings at the start of a text,
    sharing this one's tables (read-only once built): the n choices of a
    request build the automaton once."""
    other = copy.copy(self)
    other._state = 0
    other._fed = 0
    return other

  @property
  def held(self) -> int:
    """Length of the longest tail of the text fed that begins a stop
    string (and is not one yet)."""
    return self._depth[self._state]

  def feed(self, text: str) -> int | None:
    """Feeds more text; the offset, in all the text fed, where the first
    stop string to complete begins (the longest one ending there), or None.
    After a match the matcher must not be fed again."""
    for char in text:
      state = self._state
      while state and char not in self._next[state]:
        state = self._fail[state]
      state = self._next[state].get(char, 0)
      self._state = state
      self._fed += 1
      if self._match[state]:
        return self._fed - self._match[state]
    return None
