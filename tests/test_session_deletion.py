"""Deleting a session removes its blocks from every tier, not only the disk.

`DELETE /v1/sessions/{id}?user=T` used to remove the cold tier's blocks and
leave their copies in the hot tier and the pool's cache, served again to
the tenant until they aged out. Now the same ids leave the hot tier and the
pool between two engine steps (`Engine.forget_blocks`, `PDCluster.
forget_blocks`), and the next turn of that prefix recomputes it.
Also the pieces: `BlockPool.forget_cached`, `BlockStore.session_block_ids`.
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from dualpath_jax.cache.block_pool import BlockPool
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from dualpath_jax.server import serve_in_thread
from dualpath_jax.transfer import DualPathConfig, MeshConfig
from server_support import app_for, tiny_chat_model, words
from storage.config import ColdTierConfig

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

BS = 16
CACHE = CacheConfig(block_size=BS, num_blocks=256)
ENGINE = EngineConfig(max_batch_size=4, max_prefill_chunk=256,
                      max_context=1024)


def test_forget_cached_frees_unreferenced_blocks_only():
  pool = BlockPool(4)
  a, b = pool.allocate(2)
  pool.register(a, b"A")
  pool.register(b, b"B")
  pool.release([a])  # A cached and evictable, B still held
  assert pool.forget_cached([b"A", b"B", b"missing"]) == 1
  assert pool.lookup(b"A") is None and pool.lookup(b"B") == b
  assert pool.num_free == 3 and pool.num_evictable == 0
  pool.release([b])  # B is cached as any released block
  assert pool.num_evictable == 1 and pool.forget_cached([b"B"]) == 1
  assert pool.num_cached == 0
  a2, = pool.allocate(1)
  pool.register(a2, b"A")
  pool.release([a2])
  with pytest.raises(ValueError, match="non-empty bytes"):
    pool.forget_cached([b"A", b""])  # refused whole: A stays cached
  assert pool.lookup(b"A") == a2


def _delete(srv, session, user):
  conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
  try:
    conn.request("DELETE", f"/v1/sessions/{session}?user={user}")
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())
  finally:
    conn.close()


def _chat(client, text, session, user):
  return client.chat.completions.create(
      model="tiny-chat", messages=[{"role": "user", "content": text}],
      max_tokens=2, temperature=0, user=user,
      extra_body={"session_id": session})


@pytest.fixture(scope="module")
def tiny_chat(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, 1024)


def test_a_deleted_sessions_blocks_leave_the_hot_tier_and_the_pool(
    tiny_chat, tmp_path):
  from server_support import openai_client
  engine = make_engine(
      tiny_chat, CACHE, ENGINE,
      cold_tier=ColdTierConfig(root=str(tmp_path / "kv"),
                               file_io_mode="default"),
      hot_tier_bytes=64 * CACHE.bytes_per_block(tiny_chat.config))
  srv = serve_in_thread(app_for(engine, tiny_chat.tokenizer))
  try:
    client = openai_client(srv)
    rng = np.random.default_rng(0)
    mine, other = words(rng, 120), words(rng, 120)
    first = _chat(client, mine, "s1", "t")
    engine.cold_tier.flush()  # durable first: s2's write-back does not put
    # the chat template's head again, which s1 put (and owns)
    _chat(client, other, "s2", "t")
    engine.cold_tier.flush()
    store, hot = engine.cold_tier.store, engine.cold_tier.hot
    ids = store.session_block_ids("t", "s1")
    others = store.session_block_ids("t", "s2")
    assert len(ids) >= 120 // BS and not set(ids) & set(others)
    assert all(hot.contains(ids)) and all(
        engine.manager.pool.lookup(i) is not None for i in ids)
    # The same prompt again is served from the pool.
    assert _chat(client, mine, "s1", "t").usage.prompt_tokens_details \
        .cached_tokens > 0
    status, body = _delete(srv, "s1", "t")
    assert status == 200, body
    assert body["cold_tier_blocks"] == len(ids)
    assert body["hot_tier_blocks"] == len(ids)
    assert body["pool_blocks"] == len(ids)
    assert not any(store.contains(ids)) and not any(hot.contains(ids))
    assert all(engine.manager.pool.lookup(i) is None for i in ids)
    # Another session's blocks are untouched.
    assert all(hot.contains(others)) and all(store.contains(others))
    # The next turn of the deleted prefix finds nothing: recomputed.
    again = _chat(client, mine, "s1", "t")
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == first.choices[0].message.content
    # A session with nothing stored: zeros, not an error.
    assert _delete(srv, "nobody", "t")[1] | {"id": None} == {
        "id": None, "object": "session.deleted", "user": "t",
        "deleted": True, "cold_tier_blocks": 0, "hot_tier_blocks": 0,
        "pool_blocks": 0}
  finally:
    srv.close()


def test_the_cluster_forgets_on_every_engine(tmp_path):
  """A P/D cluster: the prefill engine's hot tier and every engine's pool
  cache drop the ids; the next turn of the prefix recomputes it."""
  tiny = load_model("random:tiny-test")
  cluster = make_cluster(
      tiny, CacheConfig(block_size=4, num_blocks=96),
      EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=128),
      ColdTierConfig(root=str(tmp_path / "c"), file_io_mode="default"),
      MeshConfig.parse("1P2D"), DualPathConfig(), hot_tier_bytes=1 << 20)
  try:
    prompt = np.random.default_rng(1).integers(3, 256, size=41).tolist()
    req = TurnRequest("s#0", prompt, 4, session_id="s", tenant="t",
                      stop_on_eos=False)
    cluster.submit(req)
    while cluster.has_work():
      cluster.step()
    cluster.flush()
    ids = cluster.store.session_block_ids("t", "s")
    assert len(ids) == (41 + 4 - 1) // 4
    held = sum(w.manager.pool.lookup(i) is not None
               for w in cluster.workers.values() for i in ids)
    hot = cluster.prefill_workers[0].hot_tier
    in_hot = sum(hot.contains(ids))
    assert held > 0 and in_hot > 0
    assert cluster.store.delete_session("t", "s") == len(ids)
    assert cluster.forget_blocks(ids) == {"hot_tier_blocks": in_hot,
                                          "pool_blocks": held}
    assert not any(hot.contains(ids))
    assert all(w.manager.pool.lookup(i) is None
               for w in cluster.workers.values() for i in ids)
    cluster.submit(TurnRequest("s#1", prompt, 4, session_id="s", tenant="t",
                               stop_on_eos=False))
    out = []
    while cluster.has_work():
      out += cluster.step()
    assert out[0].cached_prompt_tokens == 0
  finally:
    cluster.close()
