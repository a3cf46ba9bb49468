"""Block identities: a hash chain over full blocks of tokens.

A block's identity is a digest of (its parent's identity, its tokens, the model
fingerprint, the tenant salt). Because the parent's identity is folded in, an
identity names the whole prefix up to and including the block: two sequences
share a block only when every earlier token matches too. The fingerprint keeps
KV from one model (or one architecture change) from ever being served to
another; the salt keeps tenants apart, so one tenant can never probe whether
another tenant's prompt is cached.

The encoding is unambiguous: a domain tag, a presence byte and the 32-byte
parent digest, length-prefixed UTF-8 fingerprint and salt, the token count,
then the tokens packed as little-endian int32. SHA-256 gives the digest.

Only FULL blocks get identities; a partially filled block is never shared.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

BlockHash = bytes  # 32-byte SHA-256 digest
DIGEST_SIZE = 32

_DOMAIN_TAG = b"dualpath-jax/kv-block/v1\x00"
_MAX_TOKEN_ID = 2**31 - 1


def token_array(tokens: Sequence[int]) -> np.ndarray:
  """Validates token ids and returns them as a 1-D little-endian int32 array.

  Raises:
    ValueError: `tokens` is not 1-D, not integer, or holds an id outside
      [0, 2**31).
  """
  array = np.asarray(tokens)
  if array.ndim != 1:
    raise ValueError(f"tokens must be a 1-D sequence, got shape {array.shape}")
  if array.size == 0:
    return np.zeros((0,), dtype="<i4")
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got dtype {array.dtype}")
  low, high = int(array.min()), int(array.max())
  if low < 0 or high > _MAX_TOKEN_ID:
    raise ValueError(
        f"token ids must lie in [0, {_MAX_TOKEN_ID}], "
        f"got range [{low}, {high}]")
  return array.astype("<i4", copy=False)


def _check_parent(parent: BlockHash | None) -> None:
  if parent is None:
    return
  if not isinstance(parent, bytes) or len(parent) != DIGEST_SIZE:
    raise ValueError(
        f"parent must be None or a {DIGEST_SIZE}-byte digest, got {parent!r}")


def _context_suffix(model_fingerprint: str, tenant_salt: str) -> bytes:
  """Length-prefixed encoding of the fingerprint and the salt."""
  if not isinstance(model_fingerprint, str) or not model_fingerprint:
    raise ValueError(
        f"model_fingerprint must be a non-empty str, got {model_fingerprint!r}")
  if not isinstance(tenant_salt, str):
    raise ValueError(f"tenant_salt must be a str, got {tenant_salt!r}")
  fingerprint = model_fingerprint.encode("utf-8")
  salt = tenant_salt.encode("utf-8")
  return (struct.pack("<I", len(fingerprint)) + fingerprint +
          struct.pack("<I", len(salt)) + salt)


def _digest(parent: BlockHash | None, packed_tokens: np.ndarray,
            suffix: bytes) -> BlockHash:
  hasher = hashlib.sha256(_DOMAIN_TAG)
  if parent is None:
    hasher.update(b"\x00")
  else:
    hasher.update(b"\x01")
    hasher.update(parent)
  hasher.update(suffix)
  hasher.update(struct.pack("<I", packed_tokens.size))
  hasher.update(packed_tokens.tobytes())
  return hasher.digest()


def hash_block(parent: BlockHash | None, tokens: Sequence[int],
               model_fingerprint: str, tenant_salt: str) -> BlockHash:
  """Identity of one block given its parent's identity.

  Args:
    parent: identity of the previous block in the sequence, None for the first.
    tokens: the block's token ids (non-empty, each in [0, 2**31)).
    model_fingerprint: `ModelConfig.fingerprint()` of the model that made
      the KV.
    tenant_salt: per-tenant salt; different salts never share blocks.

  Returns:
    A 32-byte digest.
  """
  _check_parent(parent)
  packed = token_array(tokens)
  if packed.size == 0:
    raise ValueError("a block must hold at least one token")
  suffix = _context_suffix(model_fingerprint, tenant_salt)
  return _digest(parent, packed, suffix)


def hash_chain(tokens: Sequence[int], block_size: int, model_fingerprint: str,
               tenant_salt: str,
               parent: BlockHash | None = None) -> list[BlockHash]:
  """Identities of every FULL block of `tokens`, chained from `parent`.

  A trailing partial block (len(tokens) % block_size tokens) gets no identity.

  Args:
    tokens: token ids of consecutive blocks, starting at a block boundary.
    block_size: tokens per block (> 0).
    model_fingerprint: see `hash_block`.
    tenant_salt: see `hash_block`.
    parent: identity of the block before `tokens[0]`; None at the start of
      the sequence.

  Returns:
    len(tokens) // block_size digests, one per full block, in order.
  """
  if (isinstance(block_size, bool) or
      not isinstance(block_size, (int, np.integer)) or block_size <= 0):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  _check_parent(parent)
  packed = token_array(tokens)
  suffix = _context_suffix(model_fingerprint, tenant_salt)
  hashes: list[BlockHash] = []
  for start in range(0, packed.size - block_size + 1, block_size):
    parent = _digest(parent, packed[start:start + block_size], suffix)
    hashes.append(parent)
  return hashes


def loadable_chain(tokens: Sequence[int], num_tokens: int, block_size: int,
                   model_fingerprint: str, tenant_salt: str) -> list[BlockHash]:
  """Identities of the blocks a turn whose context is `tokens[:num_tokens]`
  may take from a cache: the full blocks before its last token, which is
  always computed (its logits give the next token).

  The one rule for the pool's prefix lookup (`KVCacheManager.begin`), the
  tiers' loads (`engine.cold_tier`) and the engines' and cluster's
  placement: if two of them counted differently, a turn could be promised
  blocks its load never takes.
  """
  full = (num_tokens - 1) // block_size
  return hash_chain(tokens[:full * block_size], block_size, model_fingerprint,
                    tenant_salt)
