"""Byte-level BPE tokenizer and chat template, rebuilt from a GGUF file.

The GGUF carries the vocabulary (`tokenizer.ggml.tokens`), the merge list,
token types (3 = control, 4 = user-defined: matched as whole tokens in text)
and a jinja chat template. We rebuild a `tokenizers.Tokenizer` from them:

* model: byte-level BPE (`tokenizer.ggml.model == "gpt2"`);
* pre-tokenizer: llama.cpp picks its split regexes from
  `tokenizer.ggml.pre`. For "smollm" (like "starcoder", "refact",
  "command-r") it first isolates every single digit (`\\p{N}`), then applies
  the GPT-2 regex. That is `Digits(individual_digits=True)` followed by
  `ByteLevel(add_prefix_space=False)` here. Plain "gpt2" has no digit split.
* control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) are
  added as special tokens, so they are recognised as single ids in text.

Prefix stability. A multi-turn session's KV cache is keyed by its token
prefix, so the tokens of turn k+1 must extend those of turn k.
`encode_chat_delta` returns only the appended tokens and raises if the
template or a tokenisation across the boundary would break that property.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dualpath_jax.model import gguf_loader
from dualpath_jax.model.gguf_file import GGUFFile
from dualpath_jax.text import CHAT_ROLES, check_unicode

_CONTROL = 3
_USER_DEFINED = 4
# `tokenizer.ggml.pre` values whose llama.cpp regex isolates single digits
# before the GPT-2 split.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell",
                    "exaone", "minerva-7b"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}

Message = dict[str, Any]


class Tokenizer:
  """Text <-> token ids, plus the model's chat template."""

  def __init__(
      self,
      tokens: Sequence[str],
      merges: Sequence[str],
      token_types: Sequence[int],
      *,
      pre: str,
      bos_id: int | None,
      eos_ids: Sequence[int],
      chat_template: str | None,
      add_bos: bool = False,
  ):
    if len(token_types) != len(tokens):
      raise ValueError(f"{len(tokens)} tokens but {len(token_types)} types")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    self._tok = tokenizers.Tokenizer(_bpe(vocab, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                          use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
      self._tok.pre_tokenizer = pre_tokenizers.Sequence(
          [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
      self._tok.pre_tokenizer = byte_level
    else:
      raise ValueError(f"unsupported pre-tokenizer {pre!r}: known are "
                       f"{sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)}")
    self._tok.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types)
               if t in (_CONTROL, _USER_DEFINED)]
    self._tok.add_special_tokens(special)
    self.special_tokens: tuple[str, ...] = tuple(t.content for t in special)
    self._special_ids = frozenset(vocab[s] for s in self.special_tokens)
    self._tokens = list(tokens)
    self._max_token_bytes: int | None = None  # see min_tokens
    self.bos_id = bos_id
    self.eos_ids: tuple[int, ...] = tuple(eos_ids)
    self.add_bos = add_bos
    self.chat_template = chat_template
    self._template = None
    if chat_template is not None:
      env = jinja2.sandbox.ImmutableSandboxedEnvironment(
          trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = _raise_template_error
      try:
        self._template = env.from_string(chat_template)
      except jinja2.TemplateError as e:  # was jinja's TemplateSyntaxError
        raise ValueError(f"the chat template (GGUF metadata tokenizer."
                         f"chat_template) does not parse: {e}") from None

  @classmethod
  def from_gguf(cls, source: str | os.PathLike | GGUFFile) -> "Tokenizer":
    """Builds the tokenizer of a GGUF file (a path or a parsed GGUFFile)."""
    reader = (source if isinstance(source, GGUFFile)
              else gguf_loader.open_gguf(source))
    get = reader.metadata.get
    model = get("tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(f"only byte-level BPE (tokenizer.ggml.model 'gpt2') "
                       f"is supported, got {model!r}")
    tokens = get("tokenizer.ggml.tokens")
    merges = get("tokenizer.ggml.merges")
    if not tokens or merges is None:
      raise ValueError("GGUF file has no tokenizer vocabulary or merges")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    for key, value, kind in (("tokens", tokens, str), ("merges", merges, str),
                             ("token_type", types, int)):
      if not isinstance(value, list) or not all(
          isinstance(v, kind) for v in value):
        raise ValueError(f"GGUF metadata tokenizer.ggml.{key} must be a list "
                         f"of {kind.__name__}")
    bos, eos_ids = gguf_loader.special_token_ids(reader, len(tokens))
    template = get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
      raise ValueError("GGUF metadata tokenizer.chat_template must be a "
                       "string")
    return cls(tokens, merges, types,
               pre=str(get("tokenizer.ggml.pre", "default")),
               bos_id=bos, eos_ids=eos_ids, chat_template=template,
               add_bos=bool(get("tokenizer.ggml.add_bos_token", False)))

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  def min_tokens(self, text: str) -> int:
    """A lower bound on the number of tokens `text` encodes to, without
    encoding it: every byte of the text belongs to one token, and no token
    holds more than the vocabulary's longest entry's bytes. It lets a
    server refuse a prompt far past its context before spending the
    encode (a 4 MB prompt held the GIL for 0.6 s)."""
    if self._max_token_bytes is None:
      self._max_token_bytes = max(len(t.encode("utf-8", "surrogatepass"))
                                  for t in self._tokens)
    return -(-len(text.encode("utf-8", "surrogatepass"))
             // self._max_token_bytes)

  def token_to_id(self, token: str) -> int:
    """Id of a vocabulary entry (e.g. "<|im_end|>"); KeyError if absent."""
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"{token!r} is not in the vocabulary")
    return i

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special tokens written in it become single ids.

    `add_bos` defaults to the GGUF's `tokenizer.ggml.add_bos_token` (False for
    SmolLM2, whose chat template starts with `<|im_start|>` instead).
    """
    if not isinstance(text, str):
      raise ValueError(f"encode expects str, got {type(text).__name__}")
    check_unicode(text)
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], *,
             skip_special_tokens: bool = False) -> str:
    """Text of `ids` (special tokens kept unless `skip_special_tokens`)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids out of range [0, {self.vocab_size}): "
                       f"{bad[:5]}")
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def is_special(self, token_id: int) -> bool:
    return int(token_id) in self._special_ids

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one token stands for (a special token's text in UTF-8).
    `decode([id])` cannot say: byte-level BPE splits characters across
    tokens, and a piece of one decodes to U+FFFD. What a server's logprobs
    report as each token's `bytes`."""
    token_id = int(token_id)
    if not 0 <= token_id < self.vocab_size:
      raise ValueError(f"token id {token_id} out of range [0, "
                       f"{self.vocab_size})")
    text = self._tokens[token_id]
    if token_id in self._special_ids:
      return text.encode("utf-8", "surrogatepass")
    # A character outside the byte-level alphabet (a GGUF whose vocabulary
    # holds plain text entries) stands for its own UTF-8, as decode reads it.
    return b"".join(bytes((_BYTE_OF_CHAR[c],)) if c in _BYTE_OF_CHAR
                    else c.encode("utf-8", "surrogatepass") for c in text)

  # ---------------------------------------------------------------- chat

  def apply_chat_template(self, messages: Sequence[Message],
                          add_generation_prompt: bool = True) -> str:
    """Renders `messages` ([{"role", "content"}]) with the GGUF template."""
    if self._template is None:
      raise ValueError("this model's GGUF has no tokenizer.chat_template")
    for m in messages:
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"each message needs 'role' and 'content': {m!r}")
      if not (isinstance(m["role"], str) and isinstance(m["content"], str)):
        raise ValueError(f"a message's role and content must be strings: "
                         f"{m!r}")  # the template failed with jinja's error
      if m["role"] not in CHAT_ROLES:
        raise ValueError(f"role {m['role']!r} is not one of {CHAT_ROLES}")
    bos = self._tokens[self.bos_id] if self.bos_id is not None else ""
    eos = self._tokens[self.eos_ids[0]] if self.eos_ids else ""
    try:
      return self._template.render(
          messages=list(messages),
          add_generation_prompt=add_generation_prompt, bos_token=bos,
          eos_token=eos)
    except ValueError:  # raise_exception's, or the template's own
      raise
    except Exception as e:  # pylint: disable=broad-except
      # The template is the GGUF's code: whatever it fails with on these
      # messages (jinja's UndefinedError or SecurityError, a TypeError) is
      # bad input, which a server answers with a 400, not a 500.
      raise ValueError(f"chat template error: {type(e).__name__}: {e}"
                       ) from e

  def encode_chat(self, messages: Sequence[Message],
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (no extra BOS)."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                       add_bos=False)

  def encode_chat_delta(self, prev_messages: Sequence[Message],
                        new_messages: Sequence[Message],
                        add_generation_prompt: bool = True) -> list[int]:
    """Tokens appended when `prev_messages` grows by `new_messages`.

    Guarantees `encode_chat(prev, add_generation_prompt=False) + delta ==
    encode_chat(prev + new, add_generation_prompt)`. `prev_messages` is
    rendered without a generation prompt: it should end with the assistant's
    reply as a message. Raises ValueError if the template does not render
    `prev` as a text prefix of `prev + new`, or if tokenising across the
    boundary would merge tokens (impossible when the boundary touches a
    special token, as ChatML's `<|im_start|>` / `<|im_end|>` do; otherwise
    checked by encoding the full text).
    """
    prev_text = self.apply_chat_template(prev_messages, False)
    full_text = self.apply_chat_template(
        list(prev_messages) + list(new_messages), add_generation_prompt)
    if not full_text.startswith(prev_text):
      raise ValueError(
          "the chat template is not prefix-stable: rendering the longer "
          "conversation changes the text of the earlier messages")
    delta_text = full_text[len(prev_text):]
    delta = self.encode(delta_text, add_bos=False)
    if not self._boundary_is_special(prev_text, delta_text):
      prev_ids = self.encode(prev_text, add_bos=False)
      if prev_ids + delta != self.encode(full_text, add_bos=False):
        raise ValueError(
            "tokenising the appended messages separately differs from "
            "tokenising the whole conversation (a BPE merge crosses the "
            "turn boundary); the cached prefix cannot be reused")
    return delta

  def _boundary_is_special(self, left: str, right: str) -> bool:
    """True if a special token starts `right` or ends `left`, none straddles."""
    if not left or not right:
      return True
    touches = any(right.startswith(s) or left.endswith(s)
                  for s in self.special_tokens)
    if not touches:
      return False
    width = max(len(s) for s in self.special_tokens)
    window = left[-width:] + right[:width]
    cut = min(len(left), width)
    for s in self.special_tokens:
      start = window.find(s)
      while start != -1:
        if start < cut < start + len(s):
          return False
        start = window.find(s, start + 1)
    return True


def _bpe(vocab: dict[str, int], merges: Sequence[str]) -> models.BPE:
  """The byte-level BPE model of a vocabulary and its merges ("left right").

  ValueError naming the merge for one that is not two tokens separated by
  a space, and naming the token for one whose tokens or concatenation the
  vocabulary lacks: `tokenizers` raised a TypeError, or a bare Exception,
  from a GGUF holding one.
  """
  pairs = []
  for i, merge in enumerate(merges):
    pair = tuple(merge.split(" ", 1))
    if len(pair) != 2 or not all(pair):
      raise ValueError(f"GGUF metadata tokenizer.ggml.merges[{i}] = "
                       f"{merge!r} is not two tokens separated by a space")
    pairs.append(pair)
  try:
    return models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                      byte_fallback=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError("GGUF metadata tokenizer.ggml.merges does not fit the "
                     f"vocabulary: {e}") from None


def _byte_level_chars() -> dict[str, int]:
  """Byte-level BPE's alphabet: each byte is a printable character, itself
  where it is one (`!`..`~`, `¡`..`¬`, `®`..`ÿ`), else U+0100 onwards in
  byte order. Maps each character back to its byte."""
  printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  chars = {chr(b): b for b in printable}
  others = [b for b in range(256) if b not in set(printable)]
  chars.update({chr(0x100 + k): b for k, b in enumerate(others)})
  return chars


_BYTE_OF_CHAR = _byte_level_chars()


def _raise_template_error(message: str) -> None:
  raise ValueError(f"chat template error: {message}")
