"""Shared pieces of the HTTP server tests (test_server*.py).

A tiny random Llama with SmolLM2's vocabulary and chat template (each step
costs milliseconds, the real tokenizer runs), prompts of plain words, the
visible text of token ids, and /metrics parsed into a dict.
"""

from __future__ import annotations

import http.client

from prometheus_client.parser import text_string_to_metric_families

from dualpath_jax.config import TINY
from dualpath_jax.model import LoadedModel
from dualpath_jax.model.llama import random_llama
from dualpath_jax.server import LocalEngineHandle, ServerConfig, create_app

MODEL = "tiny-chat"


def tiny_chat_model(tokenizer, max_context: int) -> LoadedModel:
  """The tiny model named `MODEL`, seed 0, with `tokenizer`'s vocabulary."""
  cfg = TINY.replace(name=MODEL, vocab_size=tokenizer.vocab_size,
                     max_position=max_context, eos_token_ids=tokenizer.eos_ids)
  return LoadedModel(cfg, random_llama(cfg, 0), tokenizer,
                     weights_id="tiny-chat-seed0", source="test")


def words(rng, n: int) -> str:
  """`n` words from a small agent-ish vocabulary."""
  vocab = ["alpha", "beta", "gamma", "delta", "file", "test", "def", "return",
           "error", "patch", "the", "agent", "tool", "output", "42", "x"]
  return " ".join(rng.choice(vocab, size=n))


def visible_text(tok, ids) -> str:
  """What the server returns for generated `ids`: special tokens dropped."""
  return tok.decode([i for i in ids if not tok.is_special(i)],
                    skip_special_tokens=True)


def scrape_metrics(host: str, port: int) -> dict[tuple[str, tuple], float]:
  """GET /metrics as {(sample name, sorted labels): value}."""
  conn = http.client.HTTPConnection(host, port, timeout=30)
  try:
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
  finally:
    conn.close()
  out = {}
  for family in text_string_to_metric_families(body):
    for s in family.samples:
      out[(s.name, tuple(sorted(s.labels.items())))] = s.value
  return out


def app_for(engine, tokenizer, model_names=(MODEL,)):
  """The HTTP app serving `engine` (an `Engine` or a `PDCluster`)."""
  return create_app(LocalEngineHandle(engine), tokenizer,
                    ServerConfig(model_names=tuple(model_names)))


def openai_client(srv, timeout: float = 60):
  """An OpenAI SDK client of the server `srv` (`serve_in_thread`'s), which
  raises at once instead of retrying."""
  import openai  # pylint: disable=g-import-not-at-top
  return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused",
                       max_retries=0, timeout=timeout)
