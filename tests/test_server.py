"""The OpenAI-compatible server, driven by the official `openai` client.

The model is a tiny random Llama with SmolLM2's vocabulary, so the real
tokenizer and chat template run but each step costs milliseconds; fidelity
on the real weights is in test_server_smollm2.py. Reference outputs come
from a separate engine fed the same token ids directly.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import time

import numpy as np
import pytest

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.server import protocol
from dualpath_jax.server import (LocalEngineHandle, ServerConfig, create_app,
                                 serve_in_thread)

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
def server(tiny_chat):
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  app = app_for(engine, tiny_chat.tokenizer, (MODEL, "alias"))
  srv = serve_in_thread(app)
  srv.app, srv.engine = app, engine
  yield srv
  srv.close()
  assert not srv.thread.is_alive()
  assert not app.state.engine_loop.running


@pytest.fixture(scope="module")
def client(server):
  return openai_client(server)


@pytest.fixture(scope="module")
def reference(tiny_chat):
  """Tokens the engine itself generates for (prompt ids, budget, sampling)."""
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  count = iter(range(10**6))

  def generate(prompt, max_new, *, seeds=None, **kw):
    """One turn; with `seeds`, one per seed, submitted together (as the
    server submits a request's n choices), in seed order."""
    ids = []
    for seed in [kw.pop("seed", None)] if seeds is None else seeds:
      ids.append(f"ref{next(count)}")
      engine.submit(TurnRequest(ids[-1], list(prompt), max_new, seed=seed,
                                **kw))
    outs = {o.request.request_id: o for o in _drain(engine)}
    return outs[ids[0]] if seeds is None else [outs[i] for i in ids]
  return generate


class _Reply:
  """Status and body of one raw HTTP exchange (stdlib only)."""

  def __init__(self, status: int, body: bytes):
    self.status_code = status
    self.text = body.decode()

  def json(self):
    return json.loads(self.text)


def _http(server, method, path, body=None, *, raw=None, timeout=30.0):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
  try:
    payload = raw if raw is not None else (
        None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=payload,
                 headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return _Reply(resp.status, resp.read())
  finally:
    conn.close()


def _drain(engine):
  outs = []
  while engine.has_work():
    outs += engine.step()
  return outs






def _wait_idle(server, timeout_s=10.0) -> bool:
  engine = server.engine
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    snap = server.app.state.engine_loop.snapshot
    if (snap["num_running"] == 0 and snap["num_waiting"] == 0 and
        snap["kv_blocks_referenced"] == 0 and
        engine.manager.pool.num_referenced == 0):
      return True
    time.sleep(0.02)
  return False




# ---------------------------------------------------------------- basics


def test_models_and_health(server, client):
  models = client.models.list().data
  assert [m.id for m in models] == [MODEL, "alias"]
  assert all(m.max_model_len == MAX_CONTEXT for m in models)
  assert client.models.retrieve("alias").id == "alias"
  health = _http(server, "GET", "/health")
  assert health.status_code == 200


@pytest.mark.parametrize("num_words,max_tokens", [(5, 7), (60, 20)])
def test_chat_matches_the_engine_streamed_or_not(client, tiny_chat, reference,
                                                 np_rng, num_words,
                                                 max_tokens):
  tok = tiny_chat.tokenizer
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": words(np_rng, num_words)}]
  prompt = tok.encode_chat(messages)
  ref = reference(prompt, max_tokens, temperature=0.0)
  r = client.chat.completions.create(model=MODEL, messages=messages,
                                     max_tokens=max_tokens, temperature=0)
  assert r.choices[0].message.content == visible_text(tok, ref.generated_tokens)
  assert r.choices[0].finish_reason == (
      "length" if ref.finish_reason == "length" else "stop")
  assert r.usage.prompt_tokens == len(prompt)
  assert r.usage.completion_tokens == len(ref.generated_tokens)
  assert r.usage.total_tokens == len(prompt) + len(ref.generated_tokens)

  chunks = list(client.chat.completions.create(
      model=MODEL, messages=messages, max_completion_tokens=max_tokens,
      temperature=0, stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert chunks[-1].choices == [] and chunks[-1].usage is not None
  assert all(c.usage is None for c in chunks[:-1])
  streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
  assert streamed == r.choices[0].message.content
  assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
  usage = chunks[-1].usage
  assert usage.prompt_tokens == len(prompt)
  assert usage.completion_tokens == len(ref.generated_tokens)
  # The second identical request finds the first one's full blocks.
  assert usage.prompt_tokens_details.cached_tokens >= (
      (len(prompt) - 1) // BS) * BS


@pytest.mark.parametrize("as_ids", [False, True])
def test_completions_text_and_token_prompts(client, tiny_chat, reference,
                                            np_rng, as_ids):
  tok = tiny_chat.tokenizer
  text = words(np_rng, 12)
  ids = tok.encode(text)
  ref = reference(ids, 9, temperature=0.0, stop_on_eos=False)
  r = client.completions.create(model=MODEL, prompt=ids if as_ids else text,
                                max_tokens=9, temperature=0,
                                extra_body={"ignore_eos": True})
  assert r.object == "text_completion"
  assert r.choices[0].text == visible_text(tok, ref.generated_tokens)
  assert r.choices[0].finish_reason == "length"
  assert r.usage.prompt_tokens == len(ids)
  assert r.usage.completion_tokens == 9
  stream = client.completions.create(
      model=MODEL, prompt=ids if as_ids else text, max_tokens=9,
      temperature=0, stream=True, extra_body={"ignore_eos": True})
  assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(client,
                                                              np_rng):
  kw = dict(model=MODEL, prompt=words(np_rng, 8), max_tokens=40,
            temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
  full = client.completions.create(**kw).choices[0].text
  assert client.completions.create(**kw).choices[0].text == full
  assert client.completions.create(**(kw | {"seed": 99})).choices[0].text \
      != full
  # A stop string taken from the middle of the text: output ends before it.
  cut = len(full) // 2
  stop = full[cut:cut + 3]
  expected = full[:full.find(stop)]
  r = client.completions.create(**kw, stop=[stop, "\x00never"])
  assert r.choices[0].text == expected
  assert r.choices[0].finish_reason == "stop"
  assert r.usage.completion_tokens < 40
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      **kw, stop=stop, stream=True))
  assert streamed == expected


# ---------------------------------------------------------- n choices


def test_n_completions_are_seeded_turns_that_prefill_the_prompt_once(
    server, client, tiny_chat, reference, np_rng):
  """Choice i is the engine's turn with seed `choice_seed(seed, i)`, and
  the prompt is prefilled once for all n."""
  tok = tiny_chat.tokenizer
  ids = tok.encode("n choices: " + words(np_rng, 40))
  n, seed = 3, 77
  kw = dict(model=MODEL, prompt=ids, max_tokens=12, temperature=1.0,
            seed=seed, extra_body={"ignore_eos": True})
  stats = server.engine.stats
  prefilled, shared = stats.prefill_tokens, stats.shared_prefill_tokens
  r = client.completions.create(n=n, **kw)
  assert stats.prefill_tokens - prefilled == len(ids) + (n - 1) * (
      len(ids) - (len(ids) - 1) // BS * BS)
  assert stats.shared_prefill_tokens - shared == (n - 1) * (
      (len(ids) - 1) // BS * BS)
  # The same turns on an engine of their own, batched as the server's were
  # (a lone turn decodes in other shapes: sampling may differ by rounding).
  refs = reference(ids, 12, temperature=1.0, stop_on_eos=False,
                   seeds=[protocol.choice_seed(seed, i) for i in range(n)])
  assert [c.index for c in r.choices] == list(range(n))
  texts = [c.text for c in r.choices]
  assert texts == [visible_text(tok, ref.generated_tokens) for ref in refs]
  assert len(set(texts)) == n  # the seeds differ
  assert r.usage.prompt_tokens == len(ids)  # once, as OpenAI counts it
  assert r.usage.completion_tokens == n * 12
  assert r.usage.prompt_tokens_details.cached_tokens == 0

  chunks = list(client.completions.create(
      n=n, stream=True, stream_options={"include_usage": True}, **kw))
  streamed = [""] * n
  reasons = [None] * n
  for c in chunks[:-1]:
    (choice,) = c.choices
    streamed[choice.index] += choice.text
    if choice.finish_reason is not None:
      assert reasons[choice.index] is None
      reasons[choice.index] = choice.finish_reason
  assert streamed == texts and reasons == ["length"] * n
  assert chunks[-1].choices == []
  assert chunks[-1].usage.completion_tokens == n * 12
  assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (
      (len(ids) - 1) // BS * BS)  # the first request's blocks


def test_n_chat_choices_stream_their_own_roles_and_logprobs(client, tiny_chat,
                                                            reference, np_rng):
  tok = tiny_chat.tokenizer
  messages = [{"role": "user", "content": "two of them: " + words(np_rng, 20)}]
  ref = reference(tok.encode_chat(messages), 8, temperature=0.0, logprobs=2)
  want = [round(e.logprob, 4) for e in _engine_logprobs(tok, ref)]
  r = client.chat.completions.create(model=MODEL, messages=messages, n=2,
                                     max_tokens=8, temperature=0,
                                     logprobs=True, top_logprobs=2)
  for choice in r.choices:  # greedy: both are the engine's one answer
    assert choice.message.content == visible_text(tok, ref.generated_tokens)
    assert [round(e.logprob, 4) for e in choice.logprobs.content] == want
  chunks = list(client.chat.completions.create(
      model=MODEL, messages=messages, n=2, max_tokens=8, temperature=0,
      logprobs=True, top_logprobs=2, stream=True))
  roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role]
  assert sorted(roles) == [0, 1]
  for index in (0, 1):
    mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
    assert "".join(c.delta.content or "" for c in mine) == \
        r.choices[index].message.content
    got = [round(e.logprob, 4) for c in mine if c.logprobs
           for e in c.logprobs.content]
    assert got == want


# ------------------------------------------------------------- logprobs


def _engine_logprobs(tok, out):
  """The engine's entries of the tokens the server shows (no EOS)."""
  return [e for e in out.logprobs if not tok.is_special(e.token)]


@pytest.mark.parametrize("max_tokens", [6, 30])
def test_chat_logprobs_are_the_engines_streamed_or_not(client, tiny_chat,
                                                       reference, np_rng,
                                                       max_tokens):
  tok = tiny_chat.tokenizer
  messages = [{"role": "user", "content": words(np_rng, 9)}]
  ref = reference(tok.encode_chat(messages), max_tokens, temperature=0.0,
                  logprobs=3)
  want = _engine_logprobs(tok, ref)
  kw = dict(model=MODEL, messages=messages, max_tokens=max_tokens,
            temperature=0, logprobs=True, top_logprobs=3)
  r = client.chat.completions.create(**kw)
  content = r.choices[0].logprobs.content
  assert [c.bytes for c in content] == [list(tok.token_bytes(e.token))
                                        for e in want]
  # The tokens' bytes are the message, whatever splits its characters
  # (a random model's bytes need not be valid UTF-8: U+FFFD, as decoded).
  assert b"".join(bytes(c.bytes) for c in content).decode(
      "utf-8", "replace") == r.choices[0].message.content
  for c, e in zip(content, want):
    assert c.logprob == pytest.approx(e.logprob, abs=1e-5)
    assert [t.logprob for t in c.top_logprobs] == pytest.approx(
        [lp for _, lp in e.top], abs=1e-5)
    assert c.top_logprobs[0].bytes == c.bytes  # greedy: the most likely
  chunks = list(client.chat.completions.create(**kw, stream=True))
  streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
              for c in ch.choices[0].logprobs.content]
  # (float32 noise: the stream's prompt hits the first request's blocks)
  assert [c.bytes for c in streamed] == [c.bytes for c in content]
  assert [c.logprob for c in streamed] == pytest.approx(
      [c.logprob for c in content], abs=1e-5)
  plain = client.chat.completions.create(model=MODEL, messages=messages,
                                         max_tokens=3, temperature=0)
  assert plain.choices[0].logprobs is None


def test_completion_logprobs_offsets_and_stream(client, tiny_chat, reference,
                                                np_rng):
  tok = tiny_chat.tokenizer
  ids = tok.encode(words(np_rng, 10))
  ref = reference(ids, 12, temperature=0.0, stop_on_eos=False, logprobs=2)
  want = _engine_logprobs(tok, ref)
  kw = dict(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
            logprobs=2, extra_body={"ignore_eos": True})
  r = client.completions.create(**kw)
  lp = r.choices[0].logprobs
  assert lp.token_logprobs == pytest.approx([e.logprob for e in want],
                                            abs=1e-5)
  assert lp.tokens == [tok.token_bytes(e.token).decode("utf-8", "replace")
                       for e in want]
  # Each token's offset is where its text starts in the choice's text:
  # checked where the bytes before it are whole characters (a token that
  # continues a split character starts inside one; test_logprobs_audit_fixes).
  text, prefix = r.choices[0].text, b""
  for token, offset in zip(want, lp.text_offset):
    raw = tok.token_bytes(token.token)
    try:
      before = prefix.decode()
    except UnicodeDecodeError:
      before = None
    if before is not None:
      assert offset == len(before)
      assert text.startswith(before)
    prefix += raw
  assert lp.text_offset == sorted(lp.text_offset)
  assert all(len(top) <= 2 for top in lp.top_logprobs)
  chunks = list(client.completions.create(**kw, stream=True))
  tokens, offsets = [], []
  for ch in chunks:
    if ch.choices[0].logprobs:
      tokens += ch.choices[0].logprobs.tokens
      offsets += ch.choices[0].logprobs.text_offset
  assert tokens == lp.tokens and offsets == lp.text_offset


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
])
def test_bad_logprob_requests_get_openai_errors(server, path, body, param):
  req = {"model": MODEL, "max_tokens": 2}
  req |= ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
          else {"prompt": "hi"})
  r = _http(server, "POST", path, req | body)
  assert r.status_code == 400, r.text
  assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"n": True}, "n"),
    ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"seed": False}, "seed"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"max_tokens": 2.0}, "max_tokens"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"stream": 1}, "stream"),
    ("/v1/completions", {"ignore_eos": "true"}, "ignore_eos"),
])
def test_booleans_and_floats_are_not_integers(server, path, body, param):
  """`n: true` used to be one choice, `prompt: [true, false]` token ids 1
  and 0: lax integers; `stream: "yes"` streamed: lax booleans. JSON
  integers and booleans only, as OpenAI's API takes."""
  req = {"model": MODEL, "max_tokens": 2}
  req |= ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
          else {"prompt": "hi"})
  r = _http(server, "POST", path, req | body)
  assert r.status_code == 400, r.text
  assert r.json()["error"]["param"].split(".")[0] == param, r.text


def test_deleting_a_session_without_a_cold_tier_says_so(server):
  r = _http(server, "DELETE", "/v1/sessions/agent%2F7?user=t")
  assert r.status_code == 200, r.text
  assert r.json() == {"id": "agent/7", "object": "session.deleted",
                      "user": "t", "deleted": True, "cold_tier_blocks": None,
                      "hot_tier_blocks": None, "pool_blocks": None}
  bad = _http(server, "DELETE", "/v1/sessions/" + "s" * 257)
  assert bad.status_code == 400 and bad.json()["error"]["param"] == \
      "session_id"
  # The empty id is every request's sent without one: a client's unset id
  # deleted their blocks.
  for path in ("/v1/sessions/", "/v1/sessions/?user=t"):
    empty = _http(server, "DELETE", path)
    assert empty.status_code == 400, empty.text
    assert empty.json()["error"]["param"] == "session_id"


def test_a_session_delete_the_store_cannot_finish_is_a_503(server,
                                                           monkeypatch):
  def failing(self, tenant, session):
    raise OSError("removing 3 deleted blocks failed; they are no longer served")
  monkeypatch.setattr(LocalEngineHandle, "delete_session", failing)
  r = _http(server, "DELETE", "/v1/sessions/s1")
  assert r.status_code == 503, r.text
  assert "no longer served" in r.json()["error"]["message"]
  assert r.json()["error"]["type"] == "server_error"


def test_concurrent_requests_batch_and_match_sequential(client, tiny_chat,
                                                        reference, np_rng):
  tok = tiny_chat.tokenizer
  convs = [[{"role": "user", "content": words(np_rng, 10 + 7 * i)}]
           for i in range(4)]
  refs = [visible_text(tok, reference(tok.encode_chat(m), 12, temperature=0.0,
                               stop_on_eos=False).generated_tokens)
          for m in convs]

  def ask(messages):
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].message.content
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(ask, convs))
  assert got == refs


# -------------------------------------------------------- prefix caching


def test_cached_tokens_grow_across_a_sessions_turns(client, np_rng):
  messages = [{"role": "system", "content": words(np_rng, 40)}]
  cached, prompts = [], []
  for _ in range(4):
    messages.append({"role": "user", "content": words(np_rng, 25)})
    r = client.chat.completions.create(model=MODEL, messages=messages,
                                       max_tokens=8, temperature=0,
                                       user="tenant-a")
    messages.append({"role": "assistant",
                     "content": r.choices[0].message.content})
    cached.append(r.usage.prompt_tokens_details.cached_tokens)
    prompts.append(r.usage.prompt_tokens)
  assert cached[0] == 0  # a fresh tenant and system prompt
  for k in range(1, 4):
    assert cached[k] > cached[k - 1]
    # All of the previous prompt's full blocks but possibly the one where
    # the assistant reply was re-tokenized.
    assert cached[k] >= (prompts[k - 1] // BS - 1) * BS
    assert cached[k] % BS == 0 and cached[k] < prompts[k]
  # Another tenant (`user`) never sees tenant-a's blocks.
  r = client.chat.completions.create(model=MODEL, messages=messages[:-1],
                                     max_tokens=2, temperature=0,
                                     user="tenant-b")
  assert r.usage.prompt_tokens_details.cached_tokens == 0


# ---------------------------------------------------------------- metrics


def test_metrics_parse_and_count_a_request(server, client, np_rng):
  before = scrape_metrics(server.host, server.port)
  r = client.chat.completions.create(
      model=MODEL, messages=[{"role": "user", "content": words(np_rng, 30)}],
      max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
  after = scrape_metrics(server.host, server.port)
  delta = lambda name, **labels: (  # noqa: E731
      after.get((name, tuple(sorted(labels.items()))), 0.0) -
      before.get((name, tuple(sorted(labels.items()))), 0.0))
  assert delta("dualpath_prompt_tokens_total") == r.usage.prompt_tokens
  assert delta("dualpath_generation_tokens_total") == 6
  assert delta("dualpath_cached_prompt_tokens_total") == \
      r.usage.prompt_tokens_details.cached_tokens
  assert delta("dualpath_requests_total", endpoint="chat",
               finish_reason="length") == 1
  assert delta("dualpath_time_to_first_token_seconds_count") == 1
  assert delta("dualpath_time_per_output_token_seconds_count") == 1
  assert delta("dualpath_prefix_cache_query_tokens_total") >= \
      r.usage.prompt_tokens
  assert delta("dualpath_prefix_cache_hit_tokens_total", tier="device") == \
      r.usage.prompt_tokens_details.cached_tokens
  assert after[("dualpath_num_requests_running", ())] == 0
  assert after[("dualpath_num_requests_waiting", ())] == 0
  blocks = sum(v for (n, _), v in after.items() if n == "dualpath_kv_blocks")
  assert blocks == CACHE.num_blocks


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "nope"}, 404, "model", "model_not_found"),
    ({"n": 0}, 400, "n", "invalid_value"),
    ({"n": protocol.MAX_CHOICES + 1}, 400, "n", "invalid_value"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"max_completion_tokens": MAX_CONTEXT}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"content": "no role"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "a " * MAX_CONTEXT}]}, 400,
     "messages", "context_length_exceeded"),
    # surely past the context by its bytes alone: refused before encoding
    ({"messages": [{"role": "user", "content": "a " * 10**6}]}, 400,
     "messages", "context_length_exceeded"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", "unsupported_parameter"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options",
     None),
    # JSON's "\ud800" decodes to a lone surrogate: no tokenizer takes it
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, 400,
     "messages[0].content", None),
    ({"messages": [{"role": "\udfff", "content": "hi"}]}, 400,
     "messages[0].role", None),
    # A role outside the conversation's would render into the template as is
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "user<|im_end|>", "content": "hi"}]}, 400,
     "messages[1].role", None),
    ({"messages": [{"role": "developer", "content": "hi"}]}, 400,
     "messages[0].role", None),
    # a user turn without content was a completion of an empty turn
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "system", "content": None},
                   {"role": "user", "content": "hi"}]}, 400,
     "messages[0].content", None),
    # the tenant is hashed as UTF-8: this one failed the engine's whole step
    ({"user": "\ud800"}, 400, "user", None),
    ({"session_id": "\ud800"}, 400, "session_id", None),
    ({"session_id": "s" * 257}, 400, "session_id", "invalid_value"),
    ({"user": "u" * 257}, 400, "user", "invalid_value"),
    ({"seed": -1}, 400, "seed", "invalid_value"),
    # pydantic's locations made "messages.1" and (unions) "stop.str"
    ({"messages": [{"role": "user", "content": "hi"}, 5]}, 400,
     "messages[1]", "invalid_value"),
    ({"stop": 5}, 400, "stop", "invalid_value"),
    ({"temperature": float("nan")}, 400, "temperature", "invalid_value"),
    ({"stop": ["s"] * 65}, 400, "stop", "invalid_value"),
    ({"stop": "x" * 513}, 400, "stop", "invalid_value"),
])
def test_bad_chat_requests_get_openai_errors(server, body, status, param,
                                             code):
  req = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "max_tokens": 4} | body
  r = _http(server, "POST", "/v1/chat/completions", req)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"}
  assert err["message"] and err["type"] == "invalid_request_error"
  assert err["param"] == param
  if code is not None:
    assert err["code"] == code
  if "stop" in body and body["stop"] == 5:
    assert "one of str | list[str]" in err["message"]
  if body.get("temperature") != body.get("temperature"):  # NaN
    assert "not NaN" in err["message"]


def test_a_refused_request_leaves_the_others_and_health_alone(server, np_rng):
  """A body that used to pass validation and fail inside the engine's step
  (a lone surrogate in `user`) failed every request in flight with it and
  left /health at 503. Refused at the door now, while another streams."""
  conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
  conn.request("POST", "/v1/completions", body=json.dumps({
      "model": MODEL, "prompt": words(np_rng, 10), "max_tokens": 40,
      "temperature": 0, "ignore_eos": True, "stream": True}).encode(),
      headers={"content-type": "application/json"})
  streaming = conn.getresponse()
  assert streaming.status == 200
  bad = _http(server, "POST", "/v1/completions", {
      "model": MODEL, "prompt": "hi", "max_tokens": 2, "user": "\ud800"})
  assert bad.status_code == 400 and bad.json()["error"]["param"] == "user"
  events = streaming.read().decode()
  conn.close()
  assert "error" not in events and events.endswith("data: [DONE]\n\n")
  assert _http(server, "GET", "/health").status_code == 200


@pytest.mark.parametrize("content_type,raw,says", [
    ("application/x-www-form-urlencoded", b'{"model": "m"}', "not JSON"),
    (None, b'{"model": "m"}', "not JSON"),
    ("application/json", b"", "empty"),
    ("application/json", b"[1, 2]", "must be a JSON object")])
def test_a_body_that_is_no_json_object_says_why(server, content_type, raw,
                                                says):
  """`curl -d` without `-H` sends a form content type: the error used to be
  pydantic's "Input should be a valid dictionary or object"."""
  conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
  headers = {} if content_type is None else {"content-type": content_type}
  conn.request("POST", "/v1/completions", body=raw, headers=headers)
  resp = conn.getresponse()
  body = json.loads(resp.read())
  conn.close()
  assert resp.status == 400 and says in body["error"]["message"], body
  assert body["error"]["code"] == "invalid_json"


def test_openai_client_raises_typed_errors(client):
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(
        model="nope", messages=[{"role": "user", "content": "hi"}])
  with pytest.raises(openai.BadRequestError, match="n: "):
    client.completions.create(model=MODEL, prompt="hi", n=0)
  with pytest.raises(openai.BadRequestError, match="one prompt"):
    client.completions.create(model=MODEL, prompt=["a", "b"])
  with pytest.raises(openai.BadRequestError, match="out of range"):
    client.completions.create(model=MODEL, prompt=[1, 10**6])


def test_malformed_json_and_unknown_route(server):
  r = _http(server, "POST", "/v1/completions", raw=b"{not json")
  assert r.status_code == 400
  assert r.json()["error"]["message"].startswith(
      "the request body is not valid JSON (Expecting property name"), r.text
  assert r.json()["error"]["code"] == "invalid_json"
  r = _http(server, "POST", "/v1/completions",
            {"model": MODEL, "prompt": "x\ud800", "max_tokens": 2})
  assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
  assert "lone surrogate" in r.json()["error"]["message"]
  r = _http(server, "GET", "/v1/nothing")
  assert r.status_code == 404 and set(r.json()["error"]) == {
      "message", "type", "param", "code"}
  # Bytes that are not UTF-8: FastAPI's "There was an error parsing the
  # body", code null; the JSON error it is, by name, now.
  r = _http(server, "POST", "/v1/chat/completions",
            raw=b'{"model": "m", "messages": [{"role": "user", "content": '
            b'"\xff\xfe"}]}')
  assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
  assert "not UTF-8" in r.json()["error"]["message"], r.text


def test_a_body_declared_past_the_limit_is_refused_unread(server):
  """`Content-Length: 10000000000` and two bytes sent held the connection
  (and a shutdown's grace) while the rest was awaited: 413 at once now,
  and the server serves on."""
  with socket.create_connection((server.host, server.port), timeout=10) as s:
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\n"
              b"Content-Length: 10000000000\r\n\r\n{}")
    head = s.recv(65536).decode(errors="replace")
  assert head.startswith("HTTP/1.1 413"), head[:200]
  assert "at most 33554432 bytes" in head and "invalid_request_error" in head
  assert _http(server, "GET", "/health").status_code == 200


# ------------------------------------------------------------- disconnect


@pytest.mark.parametrize("n", [1, 3])
def test_dropped_stream_frees_its_blocks(server, client, np_rng, n):
  loop = server.app.state.engine_loop
  aborted = loop.aborted
  before = scrape_metrics(server.host, server.port)
  stream = client.chat.completions.create(
      model=MODEL, messages=[{"role": "user", "content": words(np_rng, 50)}],
      max_tokens=MAX_CONTEXT - 200, temperature=0, stream=True, n=n,
      extra_body={"ignore_eos": True})
  for i, _ in enumerate(stream):
    if i == 3 * n:
      break
  assert loop.snapshot["kv_blocks_referenced"] > 0  # still generating
  stream.close()
  assert _wait_idle(server), loop.snapshot
  assert loop.aborted == aborted + n
  after = scrape_metrics(server.host, server.port)
  key = ("dualpath_requests_total",
         (("endpoint", "chat"), ("finish_reason", "abort")))
  assert after[key] - before.get(key, 0.0) == n


def test_client_timeout_on_a_plain_request_frees_its_blocks(server, np_rng):
  loop = server.app.state.engine_loop
  aborted = loop.aborted
  with pytest.raises(socket.timeout):
    _http(server, "POST", "/v1/completions", {
        "model": MODEL, "prompt": words(np_rng, 20),
        "max_tokens": MAX_CONTEXT - 100, "ignore_eos": True}, timeout=0.5)
  assert _wait_idle(server), loop.snapshot
  assert loop.aborted == aborted + 1


@pytest.mark.parametrize("stream", [False, True])
def test_stopping_the_server_answers_generations_in_flight(tiny_chat, stream):
  """Told to stop, uvicorn waited for every open request, so a generation
  with thousands of tokens left kept the server up until it ended. Now its
  request is answered at once with 503 `shutting_down` (a stream: that
  error event), and the server stops."""
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  app = create_app(LocalEngineHandle(engine), tiny_chat.tokenizer,
                   ServerConfig(model_names=(MODEL,)))
  srv = serve_in_thread(app)
  conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
  conn.request("POST", "/v1/completions", body=json.dumps({
      "model": MODEL, "prompt": "x", "max_tokens": MAX_CONTEXT - 10,
      "temperature": 0, "ignore_eos": True, "stream": stream}).encode(),
      headers={"content-type": "application/json"})
  deadline = time.monotonic() + 30
  while engine.stats.decode_tokens < 5:  # it is generating
    assert time.monotonic() < deadline
    time.sleep(0.01)
  srv.close()
  resp = conn.getresponse()
  body = resp.read().decode()
  conn.close()
  assert engine.stats.decode_tokens < MAX_CONTEXT - 20  # not run to the end
  if stream:
    assert resp.status == 200 and '"code": "shutting_down"' in body, body
  else:
    assert resp.status == 503, body
    assert json.loads(body)["error"]["code"] == "shutting_down"
  assert not app.state.engine_loop.running


def test_server_restart_on_a_fresh_port(tiny_chat):
  """Start, serve one request, stop: the engine loop and port go away."""
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  app = create_app(LocalEngineHandle(engine), tiny_chat.tokenizer,
                   ServerConfig(model_names=(MODEL,)))
  with serve_in_thread(app) as srv:
    r = _http(srv, "POST", "/v1/completions", {
        "model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
  assert not app.state.engine_loop.running
  with pytest.raises(ConnectionRefusedError):
    _http(srv, "GET", "/health", timeout=2)
  np.testing.assert_equal(engine.has_work(), False)


def test_a_prompt_surely_past_the_context_is_refused_unencoded(
    server, monkeypatch):
  """A multi-megabyte prompt is refused on its size (`min_tokens`), before
  the encode that held the GIL (0.6 s for 4 MB, every client stalled)."""
  tokenizer = server.app.state.tokenizer
  calls = []
  monkeypatch.setattr(tokenizer, "encode",
                      lambda *a, **k: calls.append(a) or [1])
  r = _http(server, "POST", "/v1/completions",
            {"model": MODEL, "prompt": "word " * 10**6, "max_tokens": 2})
  assert r.status_code == 400, r.text
  assert "at least" in r.json()["error"]["message"] and not calls
