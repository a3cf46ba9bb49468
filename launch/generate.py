"""Generates a continuation of one prompt with the paged-cache model.

  python -m launch.generate --prompt="What is the capital of France?" --chat
  python -m launch.generate --prompt="def fib(n):" --max_new_tokens=48 --json
  python -m launch.generate --model=random:tiny-test --prompt_ids=1,2,3 --json

Greedy by default (`--temperature=0`); `--temperature>0` samples, optionally
with nucleus `--top_p`, from `--seed`. One sequence: a contiguous block table,
the prompt prefilled in chunks, then one token per step. The multi-session
engine lives in `dualpath_jax.engine`; this is the smallest end-to-end loop.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import TYPE_CHECKING, Sequence

from absl import app
from absl import flags
import numpy as np

from dualpath_jax.config import (CacheConfig, ModelConfig,
                                 check_attention_impl, check_sampling)
from dualpath_jax.engine.sampling import sample
# JAX-free (the model package imports JAX on first use of its model): the
# checks of a request run before JAX's ~3 s import.
from dualpath_jax.model import describe_model, load_model
from dualpath_jax.interrupts import ctrl_c_ends_quietly
from launch import float_flags, key_flags

if TYPE_CHECKING:
  from dualpath_jax.model.llama import Llama

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers this launcher's flags (only when run as a program, so that
  importing `generate` next to other launchers never collides on names)."""
  flags.DEFINE_string("prompt", None, "Prompt text.")
  flags.DEFINE_list("prompt_ids", None, "Prompt as comma-separated token ids "
                    "(for models without a tokenizer, e.g. random:...).")
  flags.DEFINE_bool("chat", False,
                    "Wrap --prompt as a user message in the chat template.")
  flags.DEFINE_string("system", None, "System message for --chat (default: "
                      "the template's).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.",
                       lower_bound=1)
  float_flags.define_float("temperature", 0.0, "0 = greedy.")
  float_flags.define_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0)
  flags.DEFINE_bool("json", False, "Print one JSON object.")
  flags.DEFINE_string("model", None, "Model source (see load_model).")
  flags.DEFINE_string("dtype", None, "Weight dtype override.")
  flags.DEFINE_integer("block_size", 16, "KV page size.", lower_bound=1)
  flags.DEFINE_integer("prefill_chunk", 512, "Prompt tokens per prefill step.",
                       lower_bound=1)
  flags.DEFINE_string("attention_impl", "auto",
                      "kernels.paged_attention implementation.")


def sample_token(
    logits: np.ndarray,  # [vocab] float32
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
) -> int:
  """Greedy if `temperature == 0`, else temperature + nucleus sampling: the
  engine's sampler (`engine.sampling.sample`) on one row."""
  return int(sample(logits[None], rng, temperature, top_p)[0])


def check_request(
    config: ModelConfig,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    prefill_chunk: int,
    attention_impl: str,
) -> None:
  """ValueError unless `generate` can run this request on a model of
  `config`: a non-empty prompt of ids in the vocabulary, prompt plus new
  tokens within max_position, positive sizes and a known attention
  implementation. It needs only the config, so a launcher refuses a bad
  request before the weights load."""
  if not prompt_ids:
    raise ValueError("the prompt is empty")
  if max_new_tokens < 1 or prefill_chunk < 1:
    raise ValueError("max_new_tokens and prefill_chunk must be >= 1")
  if min(prompt_ids) < 0 or max(prompt_ids) >= config.vocab_size:
    raise ValueError(
        f"prompt ids must lie in the model's vocabulary of "
        f"{config.vocab_size} ids (0-{config.vocab_size - 1}); got "
        f"{min(prompt_ids)}..{max(prompt_ids)}")
  total = len(prompt_ids) + max_new_tokens
  if total > config.max_position:
    raise ValueError(f"{total} tokens exceed max_position "
                     f"{config.max_position}")
  check_attention_impl(attention_impl)  # names the choices if unknown


def generate(
    model: Llama,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    block_size: int = 16,
    prefill_chunk: int = 512,
    attention_impl: str = "auto",
) -> tuple[list[int], dict[str, float]]:
  """(generated ids, timings) for one prompt; stops after an EOS id.

  Raises:
    ValueError: what `check_request` refuses.
  """
  check_request(model.config, prompt_ids, max_new_tokens=max_new_tokens,
                prefill_chunk=prefill_chunk, attention_impl=attention_impl)
  from dualpath_jax.model.runner import ModelRunner  # pylint: disable=g-import-not-at-top
  total = len(prompt_ids) + max_new_tokens
  num_blocks = math.ceil(total / block_size)
  runner = ModelRunner(model, CacheConfig(block_size=block_size,
                                          num_blocks=num_blocks,
                                          dtype=model.config.dtype),
                       attention_impl=attention_impl)
  kv = runner.new_kv_cache()
  block_table = np.arange(num_blocks, dtype=np.int32)[None]  # contiguous
  rng = np.random.default_rng(seed)

  start = time.perf_counter()
  chunk = min(prefill_chunk, len(prompt_ids))
  for begin in range(0, len(prompt_ids), chunk):
    piece = list(prompt_ids[begin:begin + chunk])
    tokens = np.zeros((1, chunk), np.int32)
    tokens[0, :len(piece)] = piece
    slots = np.full((1, chunk), -1, np.int32)
    slots[0, :len(piece)] = np.arange(begin, begin + len(piece))
    logits, kv = runner.step(kv, tokens, block_table,
                             np.array([begin + len(piece)], np.int32),
                             np.array([len(piece)], np.int32), slots)
  out = [sample_token(np.asarray(logits[0]), temperature, top_p, rng)]
  prefill_s = time.perf_counter() - start

  start = time.perf_counter()
  while len(out) < max_new_tokens and out[-1] not in eos_ids:
    pos = len(prompt_ids) + len(out) - 1  # position of the token we feed
    logits, kv = runner.step(kv, np.array([[out[-1]]], np.int32), block_table,
                             np.array([pos + 1], np.int32),
                             np.array([1], np.int32),
                             np.array([[pos]], np.int32))
    out.append(sample_token(np.asarray(logits[0]), temperature, top_p, rng))
  decode_s = time.perf_counter() - start
  steps = len(out) - 1
  return out, {"prefill_s": prefill_s, "decode_s": decode_s,
               "decode_tokens_per_s": steps / decode_s if steps else 0.0}


def _usage_error(message: str) -> None:
  """Ends the run with `generate: message` and exit status 1: absl's
  `UsageError` printed the whole module docstring before the one line."""
  sys.exit(f"generate: {message} (--help lists the flags)")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage_error(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.prompt is None) == (FLAGS.prompt_ids is None):
    _usage_error("give exactly one of --prompt and --prompt_ids")
  if FLAGS.prompt_ids is not None and (FLAGS.chat or FLAGS.system is not None):
    # They were ignored: the ids are the whole prompt.
    _usage_error("--chat and --system template a --prompt's text; "
                 "--prompt_ids are the prompt as given")
  if FLAGS.system is not None and not FLAGS.chat:
    _usage_error("--system is a chat message: add --chat")
  try:
    check_sampling(FLAGS.temperature, FLAGS.top_p)
  except ValueError:
    _usage_error(f"need --temperature >= 0 and 0 < --top_p <= 1; got "
                 f"{FLAGS.temperature}, {FLAGS.top_p}")
  if FLAGS.prompt_ids is not None and not all(
      i.strip().isdigit() for i in FLAGS.prompt_ids):
    _usage_error("--prompt_ids: give non-negative integers, e.g. "
                 f"1,2,3; got {','.join(FLAGS.prompt_ids)!r}")
  try:  # config and tokenizer only: a bad request is refused before the load
    config, tok = describe_model(FLAGS.model, dtype=FLAGS.dtype)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"generate: {e}")
  if FLAGS.prompt_ids is not None:
    prompt_ids = [int(i) for i in FLAGS.prompt_ids]
  elif tok is None:
    _usage_error(f"{FLAGS.model} has no tokenizer: use --prompt_ids")
  elif FLAGS.chat:
    messages = [{"role": "user", "content": FLAGS.prompt}]
    if FLAGS.system is not None:
      messages.insert(0, {"role": "system", "content": FLAGS.system})
    prompt_ids = tok.encode_chat(messages, add_generation_prompt=True)
  else:
    prompt_ids = tok.encode(FLAGS.prompt)
  request = dict(max_new_tokens=FLAGS.max_new_tokens,
                 prefill_chunk=FLAGS.prefill_chunk,
                 attention_impl=FLAGS.attention_impl)
  try:  # ids outside the vocabulary, a context past max_position, an
    # unknown kernel: refused before the load; then a source's bad weights
    check_request(config, prompt_ids, **request)
    print(f"loading {FLAGS.model or 'the embedded SmolLM2'} ...",
          file=sys.stderr, flush=True)
    loaded = load_model(FLAGS.model, dtype=FLAGS.dtype)
    eos_ids = tok.eos_ids if tok is not None else config.eos_token_ids
    ids, timing = generate(
        loaded.model, prompt_ids, eos_ids=eos_ids,
        temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
        block_size=FLAGS.block_size, **request)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"generate: {e}")
  text = tok.decode(ids, skip_special_tokens=True) if tok is not None else ""
  if FLAGS.json:
    print(json.dumps({"model": loaded.source, "weights_id": loaded.weights_id,
                      "prompt_token_ids": prompt_ids,
                      "generated_token_ids": ids, "text": text,
                      "timing": timing}))
  else:
    print(text)


if __name__ == "__main__":
  define_flags()
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "generate"))
