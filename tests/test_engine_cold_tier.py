"""The engine over a TensorStore cold tier: blocks outlive the process.

A turn's full blocks are written back when it finishes; a new engine (fresh
pool, as after a restart) on the same store loads them instead of
recomputing, and generates exactly the same tokens. A corrupted block is a
miss: recomputed, never served.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.cache import pool_io
from dualpath_jax.cache.block_hash import hash_chain
from dualpath_jax.engine.factory import make_engine, model_fingerprint
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from storage import encryption
from storage.config import ColdTierConfig

BS = 4


@pytest.fixture(scope="module")
def tiny():
  return load_model("random:tiny-test")


def _engine(tiny, root, num_blocks=128, key_file=None):
  return make_engine(
      tiny, CacheConfig(block_size=BS, num_blocks=num_blocks),
      EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=128),
      cold_tier=ColdTierConfig(root=str(root), file_io_mode="default",
                               key_file=key_file))


def _run(engine, req):
  engine.submit(req)
  outs = []
  while engine.has_work():
    outs += engine.step()
  (out,) = outs
  return out


def _prompt(seed, n):
  return np.random.default_rng(seed).integers(3, 256, size=n).tolist()


def test_pool_io_round_trip():
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(3, 10, 2, 2, 4, 8)).astype(np.float32)
  pages = [7, 2, 9]
  got = pool_io.read_blocks(pool, pages)
  np.testing.assert_array_equal(got, np.moveaxis(pool[:, pages], 1, 0))
  new = rng.normal(size=(3, 3, 2, 2, 4, 8)).astype(np.float32)
  out = np.asarray(pool_io.write_blocks(pool.copy(), pages, new))
  want = pool.copy()
  want[:, pages] = np.moveaxis(new, 0, 1)
  np.testing.assert_array_equal(out, want)
  with pytest.raises(ValueError):
    pool_io.write_blocks(pool, [1], new)


@pytest.mark.parametrize("encrypted", [False, True])
def test_blocks_survive_a_restart_and_outputs_match(tiny, tmp_path, encrypted):
  key_file = None
  if encrypted:  # sealed blocks (storage.encryption) load the same
    key_file = str(tmp_path / "kv.key")
    encryption.write_key_file(key_file)
  root = tmp_path / "kv"
  prompt = _prompt(1, 37)
  first = _engine(tiny, root, key_file=key_file)
  a = _run(first, TurnRequest("a", prompt, 6, stop_on_eos=False,
                              session_id="s", tenant="t"))
  first.close()
  assert first.cold_tier.stats.written_blocks == (37 + 6 - 1) // BS

  second = _engine(tiny, root, key_file=key_file)  # empty pool: only the
  # store remembers
  nxt = prompt + a.generated_tokens + _prompt(2, 9)
  b = _run(second, TurnRequest("b", nxt, 5, stop_on_eos=False,
                               session_id="s", tenant="t"))
  loaded = second.cold_tier.stats.loaded_tokens
  assert loaded == ((37 + 6 - 1) // BS) * BS
  assert b.cached_prompt_tokens == loaded

  fresh = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=128),
                      EngineConfig(max_batch_size=4, max_prefill_chunk=16,
                                   max_context=128))
  c = _run(fresh, TurnRequest("c", nxt, 5, stop_on_eos=False))
  assert c.cached_prompt_tokens == 0
  assert b.generated_tokens == c.generated_tokens  # loaded == recomputed
  second.close()


def test_other_tenant_does_not_load(tiny, tmp_path):
  prompt = _prompt(3, 30)
  e = _engine(tiny, tmp_path)
  _run(e, TurnRequest("a", prompt, 2, tenant="t1"))
  e.close()
  e2 = _engine(tiny, tmp_path)
  out = _run(e2, TurnRequest("b", prompt + [5, 6], 2, tenant="t2"))
  assert out.cached_prompt_tokens == 0 and e2.cold_tier.stats.loaded_blocks == 0
  e2.close()


def test_corrupt_block_is_recomputed_not_served(tiny, tmp_path):
  prompt = _prompt(4, 33)
  e = _engine(tiny, tmp_path)
  a = _run(e, TurnRequest("a", prompt, 3, stop_on_eos=False))
  e.close()
  files = sorted(f for f in glob.glob(str(tmp_path / "**" / "*"), recursive=True)
                 if os.path.isfile(f) and "/data/c/" in f)
  assert files
  for f in files:  # flip a byte in the middle of every chunk
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(f, "wb").write(bytes(data))
  e2 = _engine(tiny, tmp_path)
  b = _run(e2, TurnRequest("b", prompt, 3, stop_on_eos=False))
  assert e2.cold_tier.stats.loaded_blocks == 0
  assert e2.cold_tier.stats.missed_blocks > 0
  assert b.generated_tokens == a.generated_tokens
  e2.close()


def test_a_corrupt_block_ends_the_loaded_run(tiny, tmp_path):
  """One corrupt chunk in the middle of a stored prefix (block 3 of 8): the
  three blocks before it load, it and every block after it are recomputed
  (a prefix is usable only up to its first missing block), and the tokens
  are a fresh engine's."""
  prompt = _prompt(4, 33)
  e = _engine(tiny, tmp_path)
  a = _run(e, TurnRequest("a", prompt, 3, stop_on_eos=False))
  context = prompt + a.generated_tokens
  ids = hash_chain(context[:(len(context) - 1) // BS * BS], BS,
                   model_fingerprint(tiny), "")
  assert len(ids) == 8
  e.cold_tier.flush()  # the write-back is asynchronous
  (ref,) = e.cold_tier.store.index.lookup([ids[3]])
  e.close()
  chunk = tmp_path / "data" / "c" / str(ref.slot) / "0"
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0xFF
  chunk.write_bytes(bytes(data))
  nxt = context + _prompt(5, 3)
  e2 = _engine(tiny, tmp_path)
  b = _run(e2, TurnRequest("b", nxt, 3, stop_on_eos=False))
  assert e2.cold_tier.stats.loaded_blocks == 3
  assert e2.cold_tier.stats.missed_blocks == 5
  assert b.cached_prompt_tokens == 3 * BS
  e2.close()
  fresh = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=128),
                      EngineConfig(max_batch_size=4, max_prefill_chunk=16,
                                   max_context=128))
  c = _run(fresh, TurnRequest("c", nxt, 3, stop_on_eos=False))
  assert b.generated_tokens == c.generated_tokens


@pytest.mark.parametrize("failing", ["contains", "get", "put"])
def test_a_failing_store_is_a_miss_and_the_engine_serves_on(
    tiny, tmp_path, monkeypatch, failing):
  """The cold tier is a cache: a store call that raises (its disk full, its
  index damaged) used to raise out of `engine.step()`. Now a load is a
  miss, a write-back is skipped, the error is counted, and the turn's
  tokens equal a store-less engine's."""
  prompt = _prompt(5, 30)
  e = _engine(tiny, tmp_path)
  _run(e, TurnRequest("a", prompt, 3, stop_on_eos=False))  # stores its blocks
  e.close()
  e = _engine(tiny, tmp_path)
  store = e.cold_tier.store

  def broken(*_args, **_kwargs):
    raise OSError(28, "No space left on device")
  if failing == "put":  # the write pool's task raises: the future holds it
    monkeypatch.setattr(store._writer, "put", broken)  # pylint: disable=protected-access
  else:
    monkeypatch.setattr(store, failing, broken)
  nxt = prompt + _prompt(6, 6)
  out = _run(e, TurnRequest("b", nxt, 4, stop_on_eos=False))
  store.flush()
  fresh = make_engine(tiny, CacheConfig(block_size=BS, num_blocks=128),
                      EngineConfig(max_batch_size=4, max_prefill_chunk=16,
                                   max_context=128))
  want = _run(fresh, TurnRequest("c", nxt, 4, stop_on_eos=False))
  assert out.generated_tokens == want.generated_tokens
  stats = e.cold_tier.stats
  if failing == "put":
    assert stats.loaded_blocks > 0
  else:
    assert stats.loaded_blocks == 0 and out.cached_prompt_tokens == 0
  # contains fails at the load and again at the write-back
  assert stats.store_errors == (2 if failing == "contains" else 1)
  monkeypatch.undo()
  e.close()
