"""Tests of dualpath_jax.cache.block_hash: block identities as a hash chain."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_jax.cache import block_hash
from dualpath_jax.cache.block_hash import hash_block, hash_chain

FINGERPRINT = "0123456789abcdef"
_SETTINGS = settings(max_examples=60, deadline=None, database=None)


def _reference_hash(parent, tokens, fingerprint, salt):
  """The documented encoding, rebuilt field by field with struct."""
  fp = fingerprint.encode()
  sa = salt.encode()
  blob = b"dualpath-jax/kv-block/v1\x00"
  blob += b"\x00" if parent is None else b"\x01" + parent
  blob += struct.pack("<I", len(fp)) + fp + struct.pack("<I", len(sa)) + sa
  blob += struct.pack("<I", len(tokens))
  blob += b"".join(struct.pack("<i", int(t)) for t in tokens)
  return hashlib.sha256(blob).digest()


def _random_tokens(rng, n, vocab=50_000):
  return rng.integers(0, vocab, size=n).tolist()


@pytest.mark.parametrize("num_tokens,block_size", [(1, 1), (16, 16), (37, 8),
                                                   (64, 16), (5, 7)])
def test_chain_matches_reference_encoding(num_tokens, block_size):
  rng = np.random.default_rng(num_tokens * 100 + block_size)
  tokens = _random_tokens(rng, num_tokens)
  salt = "tenant-\u00e9"
  expected, parent = [], None
  for start in range(0, num_tokens - block_size + 1, block_size):
    parent = _reference_hash(parent, tokens[start:start + block_size],
                             FINGERPRINT, salt)
    expected.append(parent)
  chain = hash_chain(tokens, block_size, FINGERPRINT, salt)
  assert chain == expected
  assert len(chain) == num_tokens // block_size
  assert all(len(h) == block_hash.DIGEST_SIZE for h in chain)


def test_hash_block_matches_reference_and_accepts_numpy():
  rng = np.random.default_rng(1)
  tokens = _random_tokens(rng, 16)
  parent = hashlib.sha256(b"parent").digest()
  expected = _reference_hash(parent, tokens, FINGERPRINT, "s")
  assert hash_block(parent, tokens, FINGERPRINT, "s") == expected
  assert hash_block(parent, np.asarray(tokens, np.int64), FINGERPRINT,
                    "s") == expected
  assert hash_block(parent, tuple(tokens), FINGERPRINT, "s") == expected


@_SETTINGS
@given(data=st.data(), block_size=st.integers(1, 8),
       num_blocks=st.integers(1, 6))
def test_changing_a_token_changes_its_block_and_all_later(data, block_size,
                                                         num_blocks):
  min_size = block_size * num_blocks
  tokens = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=min_size,
                              max_size=min_size + block_size - 1))
  position = data.draw(st.integers(0, len(tokens) - 1))
  changed = list(tokens)
  changed[position] = data.draw(
      st.integers(0, 2**31 - 1).filter(lambda t: t != tokens[position]))
  before = hash_chain(tokens, block_size, FINGERPRINT, "")
  after = hash_chain(changed, block_size, FINGERPRINT, "")
  first_changed = position // block_size
  assert before[:first_changed] == after[:first_changed]
  for old, new in zip(before[first_changed:], after[first_changed:]):
    assert old != new
  assert len(set(before)) == len(before)  # the parent makes positions unique


@pytest.mark.parametrize("field", ["fingerprint", "salt", "parent"])
def test_context_changes_every_identity(field):
  rng = np.random.default_rng(7)
  tokens = _random_tokens(rng, 48)
  base = dict(model_fingerprint=FINGERPRINT, tenant_salt="tenant-a",
              parent=None)
  other = dict(base)
  if field == "fingerprint":
    other["model_fingerprint"] = FINGERPRINT[:-1] + "0"
  elif field == "salt":
    other["tenant_salt"] = "tenant-b"
  else:
    other["parent"] = hashlib.sha256(b"x").digest()
  a = hash_chain(tokens, 16, **base)
  b = hash_chain(tokens, 16, **other)
  assert len(a) == len(b) == 3
  assert not set(a) & set(b)


def test_chain_continues_from_parent():
  rng = np.random.default_rng(3)
  tokens = _random_tokens(rng, 80)
  whole = hash_chain(tokens, 16, FINGERPRINT, "s")
  head = hash_chain(tokens[:32], 16, FINGERPRINT, "s")
  tail = hash_chain(tokens[32:], 16, FINGERPRINT, "s", parent=head[-1])
  assert head + tail == whole
  assert hash_block(whole[1], tokens[32:48], FINGERPRINT, "s") == whole[2]


def test_encoding_is_unambiguous():
  tokens = [5, 6, 7, 8]
  # Moving bytes between the fingerprint and the salt must not collide.
  assert (hash_block(None, tokens, "ab", "c") !=
          hash_block(None, tokens, "a", "bc"))
  # A missing parent is not the same as some parent.
  assert (hash_block(None, tokens, "fp", "") !=
          hash_block(b"\x00" * 32, tokens, "fp", ""))
  # Token values are packed at fixed width: [256] is not [0, 1] or [1, 0].
  assert len({hash_block(None, t, "fp", "") for t in ([256], [0, 1], [1, 0],
                                                      [1], [0])}) == 5


def test_partial_and_empty_inputs():
  assert hash_chain([], 4, FINGERPRINT, "") == []
  assert hash_chain([1, 2, 3], 4, FINGERPRINT, "") == []
  assert len(hash_chain(list(range(9)), 4, FINGERPRINT, "")) == 2


@pytest.mark.parametrize("tokens,match", [
    ([1, -1], r"\[0, 2147483647\]"),
    ([2**31], r"\[0, 2147483647\]"),
    ([1.0, 2.0], "integers"),
    ([[1, 2]], "1-D"),
    ([], "at least one token"),
])
def test_hash_block_rejects_bad_tokens(tokens, match):
  with pytest.raises(ValueError, match=match):
    hash_block(None, tokens, FINGERPRINT, "")


@pytest.mark.parametrize("kwargs,match", [
    (dict(parent=b"short"), "32-byte"),
    (dict(parent="0" * 32), "32-byte"),
    (dict(model_fingerprint=""), "model_fingerprint"),
    (dict(tenant_salt=None), "tenant_salt"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=-4), "block_size"),
    (dict(block_size=True), "block_size"),
    (dict(block_size=2.0), "block_size"),
])
def test_hash_chain_rejects_bad_arguments(kwargs, match):
  args = dict(tokens=[1, 2, 3, 4], block_size=2,
              model_fingerprint=FINGERPRINT, tenant_salt="", parent=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    hash_chain(**args)


@pytest.mark.parametrize("num_tokens,blocks", [(1, 0), (4, 0), (5, 1), (8, 1),
                                               (9, 2), (11, 2)])
def test_loadable_chain_leaves_the_last_token_to_compute(num_tokens, blocks):
  """The full blocks before a context's last token: a context of exactly
  two blocks may take one (its last token is computed for its logits)."""
  tokens = list(range(100, 112))
  chain = block_hash.loadable_chain(tokens, num_tokens, 4, "fp", "t")
  assert chain == hash_chain(tokens[:blocks * 4], 4, "fp", "t")
  assert len(chain) == blocks
