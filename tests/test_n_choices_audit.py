"""Audit of the server's `n` choices (commit 15bfb23).

A tiny random Llama with SmolLM2's vocabulary behind the HTTP server (as in
tests/test_server.py), driven by the `openai` client and raw HTTP, on an
engine that runs fewer sequences at once than a request asks choices for,
and on a 1P2D cluster. Fixed here: a request refused at submission counted
its choices as aborted generations; each choice built its own stop-string
automaton (n=128 of the longest stop lists: 1 GB, 3 s of the event loop).
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.server import generation
from dualpath_jax.server import (LocalEngineHandle, ServerConfig, create_app,
                                 serve_in_thread)

from server_support import (MODEL, app_for, openai_client, scrape_metrics,
                            tiny_chat_model, visible_text, words)

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

BS = 16
MAX_CONTEXT = 512
CACHE = CacheConfig(block_size=BS, num_blocks=128)
# Fewer sequences may run than a request asks choices for.
ENGINE = EngineConfig(max_batch_size=2, max_prefill_chunk=128,
                      max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def tiny_chat(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, MAX_CONTEXT)


@pytest.fixture(scope="module")
def server(tiny_chat):
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  app = app_for(engine, tiny_chat.tokenizer)
  srv = serve_in_thread(app)
  srv.app, srv.engine = app, engine
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def client(server):
  return openai_client(server)


def _post(server, path, body, timeout=30.0):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
  try:
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()
  finally:
    conn.close()


def _wait_idle(server, timeout_s=10.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    snap = server.app.state.engine_loop.snapshot
    if (snap["num_running"] == 0 and snap["num_waiting"] == 0 and
        server.engine.manager.pool.num_referenced == 0):
      return True
    time.sleep(0.02)
  return False


def _requests_total(server, endpoint: str) -> dict[str, float]:
  m = scrape_metrics(server.host, server.port)
  out = {}
  for (name, labels), value in m.items():
    labels = dict(labels)
    if name == "dualpath_requests_total" and labels["endpoint"] == endpoint:
      out[labels["finish_reason"]] = value
  return out


def _rejected(server, status: str) -> float:
  m = scrape_metrics(server.host, server.port)
  return m.get(("dualpath_rejected_requests_total", (("status", status),)),
               0.0)


def _drain(engine):
  outs = []
  while engine.has_work():
    outs += engine.step()
  return outs


# ------------------------------------------------------------ probes


def test_more_choices_than_batch_slots_match_the_engine(server, client,
                                                        tiny_chat, np_rng):
  tok = tiny_chat.tokenizer
  ids = tok.encode("many: " + words(np_rng, 30))
  n = 5
  r = client.completions.create(model=MODEL, prompt=ids, n=n, max_tokens=6,
                                temperature=0, extra_body={"ignore_eos": True})
  ref = make_engine(tiny_chat, CACHE, ENGINE)
  ref.submit(TurnRequest("r", ids, 6, temperature=0.0, stop_on_eos=False))
  (out,) = _drain(ref)
  assert [c.text for c in r.choices] == [
      visible_text(tok, out.generated_tokens)] * n
  assert r.usage.completion_tokens == 6 * n
  assert _wait_idle(server)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_choice_fails_the_request_and_frees_the_others(
    server, np_rng, monkeypatch, stream):
  """Choice 1's hook raises in the engine: the request fails (500, or a
  stream's error event) and the other choices are aborted."""
  real = generation.ChoiceStream.on_token

  def on_token(self, token):
    if self.index == 1:
      raise RuntimeError("hook failed")
    return real(self, token)
  monkeypatch.setattr(generation.ChoiceStream, "on_token", on_token)
  loop = server.app.state.engine_loop
  aborted = loop.aborted
  before = _requests_total(server, "completions")
  status, body = _post(server, "/v1/completions", {
      "model": MODEL, "prompt": words(np_rng, 10), "n": 3, "stream": stream,
      "max_tokens": MAX_CONTEXT - 50, "ignore_eos": True})
  if stream:
    assert status == 200 and "hook failed" in body and "[DONE]" not in body
  else:
    assert status == 500 and "hook failed" in body, body
  assert _wait_idle(server), loop.snapshot
  assert loop.aborted == aborted + 2
  after = _requests_total(server, "completions")
  assert after.get("error", 0) - before.get("error", 0) == 3  # the request's
  assert after.get("abort", 0) == before.get("abort", 0)  # not the client's


# ------------------------------------------------- refused at submission


def test_a_request_refused_at_submission_is_no_aborted_generation(
    tiny_chat, np_rng):
  """The engine loop has stopped: the request is refused with 503 (counted
  in rejected_requests) and none of its choices ran, so none is a finished
  generation "abort" (= the client went away). The n choices were each
  counted as one, and so was a refused n=1 request, which was not before
  n was served."""
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  app = create_app(LocalEngineHandle(engine), tiny_chat.tokenizer,
                   ServerConfig(model_names=(MODEL,)))
  with serve_in_thread(app) as srv:
    srv.app, srv.engine = app, engine
    app.state.engine_loop.stop()
    for n in (1, 3):
      before = _requests_total(srv, "completions")
      rejected = _rejected(srv, "503")
      status, body = _post(srv, "/v1/completions", {
          "model": MODEL, "prompt": words(np_rng, 5), "n": n,
          "max_tokens": 4})
      assert status == 503, body
      assert _rejected(srv, "503") == rejected + 1
      assert _requests_total(srv, "completions") == before, n


def test_a_submission_failing_halfway_withdraws_the_turns_submitted(
    server, np_rng, monkeypatch):
  """The loop stops while a request's choices are being submitted: those
  submitted are aborted in the engine (their blocks freed), and the
  request counts as refused only."""
  loop = server.app.state.engine_loop
  real = loop.submit
  calls = []

  def submit(turn, on_finish, on_error):
    calls.append(turn.request_id)
    if len(calls) > 1:
      raise RuntimeError("the engine loop is not running")
    real(turn, on_finish, on_error)
  monkeypatch.setattr(loop, "submit", submit)
  aborted = loop.aborted
  decoded = server.engine.stats.decode_tokens
  before = _requests_total(server, "completions")
  status, body = _post(server, "/v1/completions", {
      "model": MODEL, "prompt": words(np_rng, 5), "n": 3,
      "max_tokens": MAX_CONTEXT - 50, "ignore_eos": True})
  assert status == 503, body
  # The submit and the abort are commands the engine thread takes in
  # order: the loop looks idle before it has taken either, so wait for
  # the abort itself (waiting for idle alone failed 3 runs in 10).
  deadline = time.monotonic() + 10
  while loop.aborted == aborted and time.monotonic() < deadline:
    time.sleep(0.01)
  assert loop.aborted == aborted + 1  # the one submitted, not run to its end
  assert _wait_idle(server), loop.snapshot
  assert server.engine.stats.decode_tokens - decoded < MAX_CONTEXT - 60
  assert _requests_total(server, "completions") == before


# --------------------------------------------------------- stop strings


def test_choices_share_one_stop_string_automaton(server, np_rng,
                                                 monkeypatch):
  """Each choice built its own Aho-Corasick automaton of the request's stop
  strings: with n=128 and the most stop strings allowed (64 of 512
  characters) that was 128 identical automata, about 1 GB and 3 s of the
  event loop (every other client stalled) before the request was queued.
  They are built once per request now."""
  from dualpath_jax.server import text_stream
  built = []

  class Counting(text_stream.StopMatcher):
    def __init__(self, stops):
      built.append(len(stops))
      super().__init__(stops)
  monkeypatch.setattr(text_stream, "StopMatcher", Counting)
  stops = ["".join(np_rng.choice(list("abcdefgh"), size=64))
           for _ in range(8)]
  status, body = _post(server, "/v1/completions", {
      "model": MODEL, "prompt": words(np_rng, 5), "n": 16,
      "max_tokens": 2, "stop": stops})
  assert status == 200, body
  assert built == [8]


def test_stop_strings_cut_each_choice_on_its_own(client, np_rng):
  """The choices share the automaton, not its state: a stop string that
  appears in some choices' text cuts those only, each where it appears."""
  n = 6
  kw = dict(model=MODEL, prompt=words(np_rng, 8), n=n, max_tokens=16,
            temperature=1.0, seed=5, extra_body={"ignore_eos": True})
  full = [c.text for c in client.completions.create(**kw).choices]
  stop = full[0][4:7]
  want = [t[:t.find(stop)] if stop in t else t for t in full]
  assert sum(stop in t for t in full) < n  # some choices do not contain it
  for stream in (False, True):
    if stream:
      texts = [""] * n
      for c in client.completions.create(**kw, stop=stop, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    else:
      texts = [c.text for c in client.completions.create(
          **kw, stop=stop).choices]
    assert texts == want, stream


# ------------------------------------------------------ P/D cluster


def test_n_choices_on_a_prefill_decode_cluster(tiny_chat, tmp_path, np_rng):
  """The cluster does not share a prefill between choices, but serves
  them: greedy choices are the engine's one answer, seeded ones differ,
  and a stream ends each choice."""
  from dualpath_jax.engine.cluster import make_cluster
  from dualpath_jax.transfer import DualPathConfig, MeshConfig
  from storage.config import ColdTierConfig
  cluster = make_cluster(
      tiny_chat, CACHE, ENGINE,
      ColdTierConfig(root=str(tmp_path), file_io_mode="default"),
      MeshConfig.parse("1P2D"),
      DualPathConfig(policy="dualpath", storage_nic_gbps=10.0,
                     nic_burst_bytes=4096, prefill_keeps_prefix=False))
  app = app_for(cluster, tiny_chat.tokenizer)
  tok = tiny_chat.tokenizer
  ids = tok.encode("cluster: " + words(np_rng, 30))
  ref = make_engine(tiny_chat, CACHE, ENGINE)
  ref.submit(TurnRequest("r", ids, 6, temperature=0.0, stop_on_eos=False))
  (out,) = _drain(ref)
  with serve_in_thread(app) as srv:
    client = openai_client(srv, timeout=120)
    r = client.completions.create(model=MODEL, prompt=ids, n=3, max_tokens=6,
                                  temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [
        visible_text(tok, out.generated_tokens)] * 3
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 18
    kw = dict(model=MODEL, prompt=ids, n=3, max_tokens=6, temperature=1.0,
              seed=9, extra_body={"ignore_eos": True})
    assert len({c.text for c in client.completions.create(**kw).choices}) == 3
    reasons = [c.choices[0].finish_reason for c in client.completions.create(
        **kw, stream=True) if c.choices[0].finish_reason]
    assert reasons == ["length"] * 3
    deadline = time.monotonic() + 10
    snap = lambda: app.state.engine_loop.snapshot  # noqa: E731
    while snap()["num_running"] or snap()["num_waiting"]:
      assert time.monotonic() < deadline, snap()
      time.sleep(0.02)
