"""Bugs an audit of the log-probabilities feature found, one test each.

* completions' `text_offset` counted each token's own decode, so a
  character split across byte-level tokens (one U+FFFD per piece) pushed
  every later offset past its token's text; a stream counted the text it
  had sent instead, so text held back (a possible stop string, an
  incomplete character) moved its offsets off the non-streamed ones;
* `token_logprobs` of logits that overflowed to +inf: NaN everywhere, and
  the "most likely" tokens were the least likely ones;
* `agent_eval --rollouts` named like `--trace` wrote the rollouts over the
  trace it had read; `--rollouts=` (an unset $VAR) ran without them; a
  Ctrl-C between a turn's rollout and its record left a rollout the report
  does not hold.

The server tests drive a real engine whose logits are raised, per request
(its `seed`), for a scripted list of tokens: greedy then generates exactly
those, so a test chooses the byte splits and the held-back text.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.sampling import token_logprobs
from dualpath_jax.server import (LocalEngineHandle, ServerConfig, create_app,
                                 serve_in_thread)
from server_support import MODEL
from tests import test_server as server_tests
from tests.test_server import CACHE, ENGINE

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

tiny_chat = server_tests.tiny_chat  # the fixture: SmolLM2's vocabulary
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "file", "test", "def", "return", "error",
         "patch", "the", "agent", "tool", "output", "x", "values", "tree"]


def _fresh_rng() -> tuple[np.random.Generator, int]:
  """A generator with a fresh seed, and the seed (for failure messages)."""
  seed = int(np.random.SeedSequence().entropy % (1 << 63))
  return np.random.default_rng(seed), seed


# ------------------------------------------------------ scripted server


@pytest.fixture(scope="module")
def scripted(tiny_chat):
  """A server whose engine, for a request with `seed` s, generates the
  tokens `scripts[s]` (greedy: each one's logit is raised above the rest
  at its step; the other rows' logits are the model's). A step given as a
  tuple generates its first token and makes the others the next most
  likely, in that order."""
  engine = make_engine(tiny_chat, CACHE, ENGINE)
  scripts: dict[int, list[int]] = {}
  real_run = engine._run  # pylint: disable=protected-access

  def run(batch, q_len, pages, work, kind=None):
    logits = real_run(batch, q_len, pages, work, kind)
    if work is None:
      return logits
    logits = np.array(logits, np.float32)
    for b, (seq, _, _) in enumerate(work):
      script = scripts.get(seq.req.seed, ())
      if len(seq.generated) < len(script):
        top = logits[b].max()
        for rank, token in enumerate(np.atleast_1d(script[len(seq.generated)])):
          logits[b, token] = top + 3.0 - rank
    return logits

  engine._run = run  # pylint: disable=protected-access
  app = create_app(LocalEngineHandle(engine), tiny_chat.tokenizer,
                   ServerConfig(model_names=(MODEL,)))
  srv = serve_in_thread(app)
  srv.scripts, srv.tokenizer = scripts, tiny_chat.tokenizer
  srv.client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused",
                             max_retries=0, timeout=60)
  yield srv
  srv.close()


def _byte_tokens(tok) -> dict[int, int]:
  """The id of each single-byte token: byte -> id."""
  out = {}
  for i in range(tok.vocab_size):
    if not tok.is_special(i):
      raw = tok.token_bytes(i)
      if len(raw) == 1:
        out[raw[0]] = i
  return out


def _char_index_of_first_bytes(tok, script: list[int]) -> list[int]:
  """Independently of the server: the index, in the UTF-8 text of the
  tokens' bytes, of the character each token's first byte belongs to
  (the bytes must be valid UTF-8)."""
  pieces = [tok.token_bytes(t) for t in script]
  text = b"".join(pieces).decode("utf-8")
  char_at_byte = []
  for index, char in enumerate(text):
    char_at_byte += [index] * len(char.encode("utf-8"))
  starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
  return [char_at_byte[s] for s in starts]


def _completion(client, seed: int, n: int, stream: bool, *, logprobs=1,
                with_top: bool = False, **kw):
  """(text, tokens, text_offset, finish_reason) of a scripted completion;
  `with_top`: and its token_logprobs and top_logprobs."""
  req = dict(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=n, temperature=0,
             seed=seed, logprobs=logprobs, extra_body={"ignore_eos": True},
             **kw)
  text, tokens, offsets, reason, token_lps, tops = "", [], [], None, [], []
  choices = [r.choices[0] for r in client.completions.create(**req, stream=True)
             ] if stream else [client.completions.create(**req).choices[0]]
  for choice in choices:
    text += choice.text
    if choice.logprobs is not None:
      tokens += choice.logprobs.tokens
      offsets += choice.logprobs.text_offset
      token_lps += choice.logprobs.token_logprobs
      tops += choice.logprobs.top_logprobs
    reason = choice.finish_reason or reason
  return (text, tokens, offsets, reason) + (
      (token_lps, tops) if with_top else ())


def test_text_offsets_index_the_text_across_split_characters(scripted):
  """Multi-byte characters generated one byte-token at a time: each
  token's text_offset is where its character is in the returned text,
  streamed or not (the drift was one per extra U+FFFD, and the stream's
  offsets went backwards)."""
  rng, seed = _fresh_rng()
  tok = scripted.tokenizer
  byte_id = _byte_tokens(tok)
  chars = [chr(int(rng.integers(0xC0, 0x100))),  # 2 bytes
           chr(int(rng.integers(0x4E00, 0x9FA0))),  # 3 bytes
           chr(int(rng.integers(0x1F600, 0x1F640)))]  # 4 bytes
  script, expected_text = [], ""
  for char in rng.permutation(chars):
    words = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
    script += tok.encode(words) + [byte_id[b] for b in char.encode()]
    expected_text += words + char
  script += tok.encode(" done")
  expected_text += " done"
  key = int(rng.integers(1 << 30))
  scripted.scripts[key] = script
  want = _char_index_of_first_bytes(tok, script)
  text, tokens, offsets, reason = _completion(scripted.client, key,
                                              len(script), stream=False)
  assert (text, reason) == (expected_text, "length"), seed
  assert len(tokens) == len(script), seed
  assert offsets == want, (seed, tokens)
  assert _completion(scripted.client, key, len(script), stream=True) == (
      text, tokens, want, reason), seed


def test_streamed_text_offsets_are_the_tokens_when_text_is_held_back(
    scripted):
  """A token whose text ends in the first character of a stop string:
  that character is held back and sent with the next token's text. The
  next token's offset is still where its own text starts (it was the
  held-back character's)."""
  rng, seed = _fresh_rng()
  tok = scripted.tokenizer
  words = [str(w) for w in rng.choice(WORDS, 6)]
  script = tok.encode(" ".join(words))
  pieces = [tok.token_bytes(t).decode() for t in script]
  # A token of several characters, not the last, ends in the stop's start.
  held = int(rng.choice([i for i, p in enumerate(pieces[:-1]) if len(p) > 1]))
  stop = pieces[held][-1] + "\u00a7"  # never generated: not a stop
  key = int(rng.integers(1 << 30))
  scripted.scripts[key] = script
  want = [len("".join(pieces[:i])) for i in range(len(pieces))]
  plain = _completion(scripted.client, key, len(script), stream=False,
                      stop=[stop])
  assert plain == (" ".join(words), pieces, want, "length"), seed
  streamed = _completion(scripted.client, key, len(script), stream=True,
                         stop=[stop])
  assert streamed == plain, (seed, held, stop)


def test_completion_top_logprobs_keep_the_most_likely_of_one_text(scripted):
  """Two likely tokens that are pieces of characters both read U+FFFD, one
  key of completions' top_logprobs: it holds the more likely one's
  log-probability (the step's own token's, under greedy), not the less
  likely one's, streamed or not."""
  rng, seed = _fresh_rng()
  tok = scripted.tokenizer
  byte_id = _byte_tokens(tok)
  n = int(rng.integers(2, 6))
  steps = [tuple(byte_id[int(b)] for b in rng.choice(
      np.arange(0x80, 0xC0), 2, replace=False)) for _ in range(n)]  # pieces
  script = tok.encode(str(rng.choice(WORDS))) + steps
  key = int(rng.integers(1 << 30))
  scripted.scripts[key] = script
  for stream in (False, True):
    *_, token_lps, tops = _completion(scripted.client, key, len(script),
                                      stream, logprobs=2, with_top=True)
    assert len(tops) == len(script), seed
    for lp, top in list(zip(token_lps, tops))[-n:]:
      assert top == {"\ufffd": pytest.approx(lp)}, (seed, stream)


# ------------------------------------------------------ token_logprobs


def test_logits_overflowed_to_inf_hold_all_the_probability():
  """+inf logits (an overflow): they share the probability, the others
  have none; the sampled (greedy: first +inf) token is among the top."""
  rng, seed = _fresh_rng()
  vocab = int(rng.integers(8, 300))
  logits = (rng.standard_normal(vocab) * 5).astype(np.float32)
  infs = rng.choice(vocab, int(rng.integers(1, 4)), replace=False)
  logits[infs] = np.inf
  logits[rng.choice(np.setdiff1d(np.arange(vocab), infs))] = -np.inf
  greedy = int(np.argmax(logits))
  logprob, top = token_logprobs(logits, greedy, len(infs) + 1)
  share = -math.log(len(infs))
  assert logprob == pytest.approx(share), seed
  assert [t for t, _ in top[:len(infs)]] == sorted(infs.tolist()), seed
  assert [lp for _, lp in top[:len(infs)]] == pytest.approx(
      [share] * len(infs)), seed
  assert top[-1][1] == -np.inf, seed
  finite = next(i for i in range(vocab) if i not in infs)
  assert token_logprobs(logits, finite, 0) == (-np.inf, ()), seed


# ------------------------------------------------------ agent_eval


def _agent_eval(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "launch.agent_eval", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _trace(path, rng) -> str:
  """A one-session trace of two short turns, random text."""
  turns = [{"input_delta": [{"role": "user", "content": " ".join(
      rng.choice(WORDS, 4))}], "output_tokens": 2} for _ in range(2)]
  path.write_text(json.dumps({"session_id": "s", "turns": turns}) + "\n")
  return str(path)


@pytest.mark.parametrize("flag", ["--rollouts", "--report"])
def test_an_output_named_like_the_trace_is_refused_before_the_run(
    tmp_path, flag):
  """`--trace=x.jsonl --rollouts=x.jsonl` wrote the rollouts over the
  trace it replayed (exit 0). Refused, and nothing is written."""
  rng, seed = _fresh_rng()
  trace = _trace(tmp_path / "sessions.jsonl", rng)
  before = (tmp_path / "sessions.jsonl").read_bytes()
  outputs = {"--report": str(tmp_path / "r.json"),
             "--rollouts": str(tmp_path / "rollouts.jsonl")}
  outputs[flag] = os.path.join(str(tmp_path), ".", "sessions.jsonl")
  proc = _agent_eval("--model=random:tiny-test", "--tokenizer=bytes",
                     "--max_context=1024", f"--trace={trace}", "--nowarmup",
                     "--noprogress", *(f"{k}={v}" for k, v in outputs.items()))
  assert proc.returncode != 0, (seed, proc.stdout[-2000:])
  assert f"--trace and {flag} are the same file" in proc.stderr, proc.stderr
  assert (tmp_path / "sessions.jsonl").read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["sessions.jsonl"]


def test_an_empty_rollouts_path_is_refused_before_the_run(tmp_path):
  """`--rollouts=$OUT` with OUT unset ran to its end and wrote no
  rollouts, silently."""
  rng, _ = _fresh_rng()
  trace = _trace(tmp_path / "t.jsonl", rng)
  proc = _agent_eval("--model=random:tiny-test", "--tokenizer=bytes",
                     "--max_context=1024", f"--trace={trace}", "--nowarmup",
                     "--noprogress", "--rollouts=", "--rollout_logprobs=1",
                     f"--report={tmp_path / 'r.json'}")
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "--rollouts: empty path" in proc.stderr, proc.stderr
  assert not (tmp_path / "r.json").exists()


# A Ctrl-C that lands after a turn's rollout is taken and before its record
# is (`replay_sessions` calls `on_rollout`, then `on_turn`): here the
# first turn's `on_rollout` sends SIGINT to its own process, then waits
# for it, as a signal lands between two bytecodes.
_INTERRUPT_AFTER_A_ROLLOUT = """
import os, signal, sys, time
from absl import app
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from dualpath_jax.workload import replay
from launch import agent_eval

real = replay.replay_sessions

def interrupted(*args, on_rollout, **kw):
  def take(rollout):
    on_rollout(rollout)
    print("rollout taken", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # the KeyboardInterrupt comes first
  return real(*args, on_rollout=take, **kw)

replay.replay_sessions = interrupted
sys.argv = ["agent_eval", *sys.argv[1:]]
app.run(ctrl_c_ends_quietly(agent_eval.main, "agent_eval"))
"""


def test_ctrl_c_after_a_rollout_keeps_the_rollouts_the_reports(tmp_path):
  rng, seed = _fresh_rng()
  trace = _trace(tmp_path / "t.jsonl", rng)
  rollouts, report = tmp_path / "r.jsonl", tmp_path / "r.json"
  proc = subprocess.run(
      [sys.executable, "-c", _INTERRUPT_AFTER_A_ROLLOUT,
       "--model=random:tiny-test", "--tokenizer=bytes", "--max_context=1024",
       f"--trace={trace}", "--nowarmup", "--noprogress",
       f"--rollouts={rollouts}", "--rollout_logprobs=0", f"--report={report}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert "rollout taken" in proc.stdout, proc.stderr[-3000:]
  assert proc.returncode == 130, proc.stderr[-3000:]
  data = json.loads(report.read_text())
  assert data["complete"] is False
  rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
  assert [(r["session_id"], r["turn_index"]) for r in rows] == [
      (t["session_id"], t["turn_index"]) for t in data["turns_detail"]], seed
