"""The OpenAI-compatible server on a 1P2D prefill/decode cluster.

Same front end as tests/test_server.py, but the engine behind it is a
`PDCluster` (one prefill and two decode engines on the CPU device) over a
TensorStore cold tier whose prefill engine keeps no prefix between turns
(DualPath's setting): every cached prefix of a later turn comes back from
the cold tier through the dualpath load paths. Driven by the official
`openai` client; reference tokens come from a plain `Engine` fed the same
token ids.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.cluster import make_cluster
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.server import serve_in_thread
from dualpath_jax.transfer import DualPathConfig, MeshConfig
from storage.config import ColdTierConfig

from server_support import (MODEL, app_for, openai_client, scrape_metrics,
                            tiny_chat_model, visible_text, words)

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

BS = 16
MAX_CONTEXT = 1024
CACHE = CacheConfig(block_size=BS, num_blocks=256)
ENGINE = EngineConfig(max_batch_size=4, max_prefill_chunk=256,
                      max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def tiny_chat(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, MAX_CONTEXT)


@pytest.fixture(scope="module")
def server(tiny_chat, tmp_path_factory):
  root = tmp_path_factory.mktemp("cold")
  cluster = make_cluster(
      tiny_chat, CACHE, ENGINE,
      ColdTierConfig(root=str(root), file_io_mode="default"),
      MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=10.0,
                     nic_burst_bytes=4096, prefill_keeps_prefix=False))
  app = app_for(cluster, tiny_chat.tokenizer)
  srv = serve_in_thread(app)
  srv.app, srv.engine = app, cluster
  yield srv
  srv.close()
  assert not app.state.engine_loop.running


@pytest.fixture(scope="module")
def client(server):
  return openai_client(server, timeout=120)


def _reference(tiny_chat, prompt, max_new):
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  engine.submit(TurnRequest("ref", list(prompt), max_new, temperature=0.0))
  outs = []
  while engine.has_work():
    outs += engine.step()
  return outs[0].generated_tokens








def _wait_idle(cluster, timeout_s=20.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if not cluster.has_work() and all(
        w.manager.pool.num_referenced == 0 for w in cluster.workers.values()):
      return True
    time.sleep(0.02)
  return False


def test_session_on_the_cluster_matches_the_engine_and_loads_from_cold(
    server, client, tiny_chat, np_rng):
  """Four turns, streamed and not: exact text, cached_tokens growing."""
  tok = tiny_chat.tokenizer
  messages = [{"role": "system", "content": words(np_rng, 40)}]
  cached, prompts = [], []
  for turn in range(4):
    messages.append({"role": "user", "content": words(np_rng, 25)})
    prompt = tok.encode_chat(messages)
    want = visible_text(tok, _reference(tiny_chat, prompt, 8))
    if turn % 2:
      chunks = list(client.chat.completions.create(
          model=MODEL, messages=messages, max_tokens=8, temperature=0,
          stream=True, stream_options={"include_usage": True},
          extra_body={"ignore_eos": True}))
      text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
      usage = chunks[-1].usage
    else:
      r = client.chat.completions.create(
          model=MODEL, messages=messages, max_tokens=8, temperature=0,
          extra_body={"ignore_eos": True})
      text, usage = r.choices[0].message.content, r.usage
    assert text == want, turn
    assert usage.prompt_tokens == len(prompt)
    messages.append({"role": "assistant", "content": text})
    cached.append(usage.prompt_tokens_details.cached_tokens)
    prompts.append(usage.prompt_tokens)
    server.engine.flush()  # the write-back lands before the next turn
  assert cached[0] == 0
  for k in range(1, 4):
    assert cached[k] > cached[k - 1]
    assert cached[k] >= (prompts[k - 1] // BS - 1) * BS
  m = scrape_metrics(server.host, server.port)
  # The prefill engine kept nothing: the hits came back from the cold tier,
  # through both paths.
  assert m[("dualpath_prefix_cache_hit_tokens_total", (("tier", "cold"),))] \
      >= sum(cached)
  path_bytes = {p: m.get(("dualpath_load_path_bytes_total", (("path", p),)), 0)
                for p in ("path1", "path2")}
  assert path_bytes["path1"] + path_bytes["path2"] > 0
  nic = {e: m[("dualpath_storage_nic_bytes_total", (("engine", e),))]
         for e in ("P0", "D0", "D1")}
  assert sum(nic.values()) == path_bytes["path1"] + path_bytes["path2"]
  assert ("dualpath_engine_queued_turns", (("engine", "P0"),
                                           ("role", "prefill"))) in m


def test_a_requests_session_id_and_user_name_its_cold_tier_blocks(
    server, client, np_rng):
  """The `session_id` extension (and `user`, the tenant) reach the cold
  tier: its blocks are the session's, so deleting the session removes them;
  an over-long one is a 400 naming the field (test_server: invalid ones)."""
  store = server.engine.store
  messages = [{"role": "user", "content": words(np_rng, 60)}]
  client.chat.completions.create(
      model=MODEL, messages=messages, max_tokens=2, temperature=0,
      user="tenant-s", extra_body={"session_id": "agent-7"})
  server.engine.flush()
  ids = [r.block_id for r in store.index.all_ready()]
  mine = [i for i, owners in zip(ids, store.index.owners(ids))
          if ("tenant-s", "agent-7") in owners]
  assert len(mine) >= 60 // BS - 1
  # DELETE /v1/sessions/{id}?user=tenant removes them.
  conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
  try:
    conn.request("DELETE", "/v1/sessions/agent-7?user=tenant-s")
    reply = conn.getresponse()
    body = json.loads(reply.read())
  finally:
    conn.close()
  assert reply.status == 200, body
  assert body["cold_tier_blocks"] == len(mine) and body["deleted"]
  assert store.contains(mine) == [False] * len(mine)
  with pytest.raises(openai.BadRequestError) as err:
    client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2,
        extra_body={"session_id": "x" * 257})
  assert err.value.body["param"] == "session_id"


def test_dropped_stream_on_the_cluster_frees_every_engines_pages(
    server, client, np_rng):
  loop = server.app.state.engine_loop
  aborted = loop.aborted
  stream = client.chat.completions.create(
      model=MODEL, messages=[{"role": "user", "content": words(np_rng, 50)}],
      max_tokens=MAX_CONTEXT - 200, temperature=0, stream=True,
      extra_body={"ignore_eos": True})
  for i, _ in enumerate(stream):
    if i == 3:
      break
  assert server.engine.num_running > 0  # still decoding
  stream.close()
  assert _wait_idle(server.engine)
  assert loop.aborted == aborted + 1


def test_abort_of_a_turn_still_loading(tiny_chat, tmp_path, np_rng):
  """`abort` while the turn's cold reads are in flight frees its pages."""
  cluster = make_cluster(
      tiny_chat, CACHE, ENGINE,
      ColdTierConfig(root=str(tmp_path), file_io_mode="default"),
      MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=1e-3,
                     nic_burst_bytes=1, prefill_keeps_prefix=False))
  try:
    prompt = np_rng.integers(3, 1000, size=70).tolist()
    cluster.submit(TurnRequest("a", prompt, 2, temperature=0.0))
    while cluster.has_work():
      cluster.step()
    cluster.flush()
    cluster.submit(TurnRequest("b", prompt + [5, 6, 7], 2, temperature=0.0))
    cluster.step()  # placed: its reads crawl at 125 B/s
    assert cluster.num_running == 1 and cluster._loads_in_flight()
    assert cluster.abort("b") and not cluster.abort("b")
    assert not cluster.has_work()
    assert all(w.manager.pool.num_referenced == 0
               for w in cluster.workers.values())
  finally:
    t0 = time.monotonic()
    cluster.close()  # releases the crawling read instead of sitting it out
    assert time.monotonic() - t0 < 30
