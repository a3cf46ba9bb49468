"""The SmolLM2 tokenizer rebuilt from the GGUF: BPE, special tokens, chat.

Token-by-token agreement with llama.cpp itself is checked against a stored
reference in tests/test_reference_llamacpp.py; here: invariants that hold
whatever the reference says (round trips, single-id special tokens, digit
splitting, template text, prefix stability of multi-turn encodings).
"""

from __future__ import annotations

import numpy as np
import pytest

from dualpath_jax.model import gguf_loader
from dualpath_jax.model.tokenizer import Tokenizer

CONTROL_TOKENS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
                  "<file_sep>": 5, "<empty_output>": 16}
DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named "
                  "SmolLM, trained by Hugging Face<|im_end|>\n")

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "def add(a, b):\n    return a + b  # 2 spaces\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 3.14159; }",
    "Numbers: 1234567890, -42, 3.0e-8, 0x1F, 2026-11-26",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀👩‍💻 and symbols ∑∫√≠ ©®",
    "mixed <|im_start|>user\nhi<|im_end|> specials <|endoftext|>",
    "<|im_end|><|im_end|>back to back",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
]


def _random_text(rng: np.random.Generator, length: int) -> str:
  pool = list("abcXYZ 019 \t\n.,;:'\"()[]{}<>|!?-_=+*/\\#@$%^&~`") + [
      "é", "ß", "日", "本", "🙂", "\u200d", "Ω", "<|im_end|>", "'s", " the"]
  return "".join(pool[i] for i in rng.integers(0, len(pool), length))


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer) -> Tokenizer:
  return smollm2_tokenizer


def test_vocabulary_metadata(tok):
  assert tok.vocab_size == 49152
  assert tok.bos_id == 1 and tok.eos_ids == (2,)
  assert tok.token_to_id("<|im_end|>") == 2


@pytest.mark.parametrize("text,token_id", sorted(CONTROL_TOKENS.items()))
def test_control_tokens_are_single_ids(tok, text, token_id):
  assert tok.encode(text) == [token_id]
  assert tok.decode([token_id]) == text
  assert tok.is_special(token_id)
  ids = tok.encode(f"before{text}after")
  assert ids.count(token_id) == 1
  assert tok.decode(ids) == f"before{text}after"
  assert tok.decode(ids, skip_special_tokens=True) == "beforeafter"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_fixed_texts(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_texts(tok, np_rng):
  for _ in range(50):
    text = _random_text(np_rng, int(np_rng.integers(1, 80)))
    assert tok.decode(tok.encode(text)) == text, repr(text)


def test_digits_are_split_one_per_token(tok, np_rng):
  digits = "".join(str(d) for d in np_rng.integers(0, 10, 12))
  ids = tok.encode(f"total {digits} items")
  pieces = [tok.decode([i]) for i in ids]
  assert pieces[-1] == " items" and pieces[0] == "total"
  # The space before a digit run is its own piece (digits are split first).
  assert pieces[1:-1] == [" "] + list(digits)


def test_common_words_merge(tok):
  # BPE merges really happen: a frequent word with its leading space is one id.
  assert len(tok.encode(" the")) == 1
  assert len(tok.encode("Hello world")) == 2


def test_chat_template_with_and_without_system(tok):
  user = {"role": "user", "content": "What is 2+2?"}
  system = {"role": "system", "content": "Be brief."}
  assert tok.apply_chat_template([user], add_generation_prompt=True) == (
      DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert tok.apply_chat_template([system, user],
                                 add_generation_prompt=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n"
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
  ids = tok.encode_chat([system, user], add_generation_prompt=True)
  assert ids[0] == tok.bos_id and ids.count(2) == 2 and ids.count(1) == 3
  assert tok.decode(ids) == tok.apply_chat_template([system, user], True)
  with pytest.raises(ValueError, match="role"):
    tok.apply_chat_template([{"content": "no role"}])


@pytest.mark.parametrize("with_system", [False, True])
def test_chat_delta_is_prefix_stable(tok, np_rng, with_system):
  conversation = [{"role": "system", "content": "You answer in JSON."}] if (
      with_system) else []
  for turn in range(4):
    user = {"role": "user",
            "content": f"turn {turn}: " + _random_text(np_rng, 30)}
    reply = {"role": "assistant", "content": _random_text(np_rng, 20)}
    for add_prompt in (True, False):
      delta = tok.encode_chat_delta(conversation, [user], add_prompt)
      full = tok.encode_chat(conversation + [user], add_prompt)
      prev = tok.encode_chat(conversation, False) if conversation else []
      assert prev + delta == full
      assert delta[0] == tok.bos_id  # starts at <|im_start|>
    conversation += [user, reply]
  # Tool output appended as its own message grows the context the same way.
  tool = {"role": "tool", "content": "exit code 0\n  "}
  assert (tok.encode_chat(conversation, False)
          + tok.encode_chat_delta(conversation, [tool], True)
          == tok.encode_chat(conversation + [tool], True))


def _variant(template: str) -> Tokenizer:
  """The SmolLM2 vocabulary with another chat template."""
  field = gguf_loader.open_gguf(gguf_loader.find_smollm2_gguf()).metadata.get
  return Tokenizer(field("tokenizer.ggml.tokens"),
                   field("tokenizer.ggml.merges"),
                   field("tokenizer.ggml.token_type"), pre="smollm",
                   bos_id=1, eos_ids=(2,), chat_template=template)


def test_chat_delta_rejects_unstable_templates(tok):
  del tok  # only for the GGUF skip
  counted = _variant("{{ messages|length }}:{% for m in messages %}"
                     "{{ m['content'] }}{% endfor %}")
  with pytest.raises(ValueError, match="prefix-stable"):
    counted.encode_chat_delta([{"role": "user", "content": "a"}],
                              [{"role": "user", "content": "b"}], False)
  plain = _variant("{% for m in messages %}{{ m['content'] }}{% endfor %}")
  hel = [{"role": "user", "content": "hel"}]
  with pytest.raises(ValueError, match="merge crosses"):
    plain.encode_chat_delta(hel, [{"role": "user", "content": "lo"}], False)
  # Without a special token at the boundary, a safe split still works.
  delta = plain.encode_chat_delta(hel, [{"role": "user", "content": "\n"}],
                                  False)
  assert plain.encode("hel") + delta == plain.encode("hel\n")


def test_bad_input_raises(tok):
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="str"):
    tok.encode(b"bytes")  # type: ignore[arg-type]


def test_min_tokens_is_a_lower_bound_that_refuses_only_what_is_too_long(
    tok, np_rng):
  """`min_tokens` never exceeds the real count (random texts, whitespace
  runs, multi-byte characters, special tokens written out), and it grows
  with the text: a server refuses a prompt far past its context on it
  without encoding it."""
  pieces = [" ", "    ", "\n\n", "def ", "é", "字", "🙂", "<|im_end|>", "x",
            "0123456789", "=" * 40, "\t"]
  for _ in range(200):
    text = "".join(np_rng.choice(pieces, size=int(np_rng.integers(0, 60))))
    assert tok.min_tokens(text) <= len(tok.encode(text)), repr(text)
  assert tok.min_tokens("") == 0
  assert tok.min_tokens("x" * 10**6) > 1000


@pytest.mark.parametrize("message,msg", [
    ({"role": "user", "content": None}, "must be strings"),
    ({"role": 3, "content": "hi"}, "must be strings"),
    ({"role": "user", "content": ["hi"]}, "must be strings"),
    ({"role": "bogus", "content": "hi"}, "role 'bogus' is not one of"),
])
def test_chat_messages_of_the_wrong_kind_are_refused(tok, message, msg):
  """They gave jinja's TypeError, or (an unknown role) rendered as is."""
  with pytest.raises(ValueError, match=msg):
    tok.apply_chat_template([message])


def test_token_bytes_spell_the_text_whatever_splits_its_characters(
    tok, np_rng):
  # Random code points from ASCII to emoji: byte-level BPE splits multi-byte
  # characters across tokens, which decode([id]) shows as U+FFFD.
  points = np.concatenate([np_rng.integers(0x20, 0x7F, 200),
                           np_rng.integers(0xA0, 0x3000, 100),
                           np_rng.integers(0x1F300, 0x1F600, 50)])
  text = "".join(map(chr, np_rng.permutation(points)))
  ids = tok.encode(text)
  assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
  assert any("\ufffd" in tok.decode([i]) for i in ids)  # some were split
  for i in np_rng.integers(0, tok.vocab_size, 500):
    raw = tok.token_bytes(i)
    try:
      shown = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue
    assert tok.decode([i]) == shown
  eos = tok.eos_ids[0]
  assert tok.token_bytes(eos) == tok.decode([eos]).encode()
  with pytest.raises(ValueError, match="out of range"):
    tok.token_bytes(tok.vocab_size)


def test_token_bytes_of_plain_text_entries_are_their_utf8():
  """A vocabulary entry outside the byte-level alphabet (some GGUFs hold
  plain text ones) stands for its own UTF-8, as decode reads it; it raised
  KeyError, a 500 for a logprobs request."""
  from dualpath_jax.model.tokenizer import _BYTE_OF_CHAR
  alphabet = sorted(_BYTE_OF_CHAR, key=_BYTE_OF_CHAR.get)
  tokens = alphabet + ["中", " x", "a中", "<eos>"]
  toy = Tokenizer(tokens, [], [1] * (len(tokens) - 1) + [3], pre="default",
                  bos_id=None, eos_ids=[len(tokens) - 1], chat_template=None)
  assert [toy.token_bytes(i) for i in range(256)] == [bytes([b])
                                                      for b in range(256)]
  for i in range(256, len(tokens)):
    assert toy.token_bytes(i) == toy.decode([i]).encode(), tokens[i]
