"""Shared pieces of the tests of one engine's asynchronous cold loads
(test_engine_async_loads.py, test_async_loads_audit.py).

`Gate` holds the reader's `BlockStore.get` until a test opens it, so what
the engine does while a read is out is deterministic; `stored_session`
(`store_two_sessions`) writes a session's (two sessions') first turn to a
cold tier and returns its second turn's prompt; `submit_turn` and
`start_b` are the tests' usual submissions.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from storage.config import ColdTierConfig

BS = 4
STORED = (37 + 4 - 1) // BS  # turn 1's full blocks: its prompt and 3 of 4
# generated tokens have KV (the last one is never fed back)
ENGINE = EngineConfig(max_batch_size=4, max_prefill_chunk=16, max_context=128)


def prompt_tokens(seed: int, n: int) -> list[int]:
  return np.random.default_rng(seed).integers(3, 256, size=n).tolist()


def engine_on(tiny, root, *, num_blocks=64, async_loads=True, max_batch=4,
              **kw):
  """An engine of the tiny model over the cold tier at `root`."""
  return make_engine(
      tiny, CacheConfig(block_size=BS, num_blocks=num_blocks),
      dataclasses.replace(ENGINE, async_cold_loads=async_loads,
                          max_batch_size=max_batch),
      cold_tier=ColdTierConfig(root=str(root), file_io_mode="default"), **kw)


def drain(engine, outs: dict) -> dict:
  """Steps `engine` until idle; its outputs into `outs`, by request id."""
  while engine.has_work():
    for out in engine.step():
      outs[out.request.request_id] = out
  return outs


class Gate:
  """Wraps a store's `get`: each call records its thread and, while
  closed, waits until the test opens it (or `fail` makes it raise);
  `timed_out` counts the calls nothing opened it for in `timeout_s`."""

  def __init__(self, store, timeout_s: float = 60):
    self.opened = threading.Event()
    self.threads: list[str] = []
    self.fail: BaseException | None = None
    self.timed_out = 0
    self._timeout_s = timeout_s
    self._get = store.get
    store.get = self.get

  def get(self, ids, out=None):
    self.threads.append(threading.current_thread().name)
    if not self.opened.wait(timeout=self._timeout_s):
      self.timed_out += 1
      raise TimeoutError("the test never opened the gate")
    if self.fail is not None:
      raise self.fail
    return self._get(ids, out=out)


def submit_turn(engine, rid: str, prompt: list[int],
                new_tokens: int = 4) -> None:
  engine.submit(TurnRequest(rid, prompt, new_tokens, stop_on_eos=False,
                            tenant="t"))


def start_b(engine) -> None:
  """b runs first, 12 tokens to decode: the turns after it find it running."""
  submit_turn(engine, "b", prompt_tokens(3, 9), 12)
  engine.step()


def store_two_sessions(tiny, root) -> dict[str, list[int]]:
  """Turn 1 of sessions s and u written to the cold tier at `root`;
  returns each one's turn-2 prompt (turn 1's context + 5 tokens)."""
  first = engine_on(tiny, root)
  prompts = {"s": prompt_tokens(1, 37), "u": prompt_tokens(5, 37)}
  for name, prompt in prompts.items():
    submit_turn(first, f"{name}#0", prompt)
  outs = drain(first, {})
  first.close()
  return {name: prompt + outs[f"{name}#0"].generated_tokens +
          prompt_tokens(2, 5) for name, prompt in prompts.items()}


def engine_admitting(tiny, root, admit: bool, **kw):
  """`engine_on` with batches of 4 and `admit_while_reading=admit`."""
  engine = engine_on(tiny, root, max_batch=4, **kw)
  engine.config = dataclasses.replace(engine.config, admit_while_reading=admit)
  return engine


def stored_session(tiny, root) -> list[int]:
  """Turn 1 of session s (37 tokens + 4 generated: `STORED` full blocks),
  written to the cold tier at `root` by an engine that then goes away;
  returns turn 2's prompt (turn 1's context + 5)."""
  first = engine_on(tiny, root)
  prompt = prompt_tokens(1, 37)
  first.submit(TurnRequest("s#0", prompt, 4, stop_on_eos=False, tenant="t"))
  out = drain(first, {})["s#0"]
  first.close()
  return prompt + out.generated_tokens + prompt_tokens(2, 5)
