"""The server on the real SmolLM2-135M-Instruct, driven by the `openai` client.

One multi-turn chat session, streamed: every turn's text must equal what the
engine generates greedily for the same token ids (a reference engine sharing
the server engine's compiled runner but with its own KV pool), and the
prefix cache must serve a growing share of each turn's prompt.
"""

from __future__ import annotations

import pytest

from dualpath_jax.cache.block_pool import BlockPool
from dualpath_jax.cache.kv_cache_manager import KVCacheManager
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.engine import Engine
from dualpath_jax.engine.factory import make_engine, model_fingerprint
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.server import (LocalEngineHandle, ServerConfig, create_app,
                                 serve_in_thread)

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

BS = 16
CACHE = CacheConfig(block_size=BS, num_blocks=96)
ENGINE = EngineConfig(max_batch_size=2, max_prefill_chunk=256, max_context=512)
MAX_NEW = 12


def _reference_engine(server_engine, loaded):
  manager = KVCacheManager(BlockPool(CACHE.num_blocks), BS,
                           model_fingerprint(loaded),
                           max_blocks_per_seq=ENGINE.max_context // BS)
  return Engine(server_engine.runner, manager, ENGINE,
                eos_ids=loaded.config.eos_token_ids, block_size=BS)


@pytest.mark.slow
def test_streamed_session_matches_engine_and_reuses_its_prefix(smollm2):
  tok = smollm2.tokenizer
  engine = make_engine(smollm2, CACHE, ENGINE)
  ref_engine = _reference_engine(engine, smollm2)
  app = create_app(LocalEngineHandle(engine), tok,
                   ServerConfig(model_names=("smollm2",)))
  messages = [{"role": "system", "content": "You are a helpful coding "
               "assistant. Answer in one short sentence."}]
  users = ["What does the Python function len() return?",
           "And for a dict?", "Name one more built-in function."]
  cached, prompt_lens = [], []
  with serve_in_thread(app) as srv:
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    for k, user in enumerate(users):
      messages.append({"role": "user", "content": user})
      prompt = tok.encode_chat(messages)
      ref_engine.submit(TurnRequest(f"ref{k}", prompt, MAX_NEW,
                                    temperature=0.0))
      (ref,) = _drain(ref_engine)
      ids = [t for t in ref.generated_tokens if not tok.is_special(t)]
      expected = tok.decode(ids, skip_special_tokens=True)
      chunks = list(client.chat.completions.create(
          model="smollm2", messages=messages, max_tokens=MAX_NEW,
          temperature=0, stream=True, stream_options={"include_usage": True}))
      text = "".join(c.choices[0].delta.content or "" for c in chunks
                     if c.choices)
      usage = chunks[-1].usage
      assert text == expected and text.strip()
      assert usage.prompt_tokens == len(prompt)
      assert usage.completion_tokens == len(ref.generated_tokens)
      cached.append(usage.prompt_tokens_details.cached_tokens)
      prompt_lens.append(len(prompt))
      messages.append({"role": "assistant", "content": text})
  assert cached[0] == 0
  for k in (1, 2):
    assert cached[k] > cached[k - 1]
    assert cached[k] >= (prompt_lens[k - 1] // BS - 1) * BS


def _drain(engine):
  outs = []
  while engine.has_work():
    outs += engine.step()
  return outs
