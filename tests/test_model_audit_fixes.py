"""Regression tests of an audit of `dualpath_jax/model/`.

Each test failed before its fix: bad input that crashed deep inside numpy,
`tokenizers` or jinja (or loaded a model computing garbage) instead of a
ValueError naming what and where, a cache served a replaced file's parse,
a checkpoint that saved but never loaded, one whose tokenizer file was
swapped underneath it, and a save that deleted files put in its target
meanwhile. Small synthetic GGUF files and tiny random models only.
"""

from __future__ import annotations

import os
import pathlib
import struct

import gguf
import numpy as np
import pytest

from dualpath_jax import config
from dualpath_jax.model import (checkpoint, describe_model, gguf_file,
                                gguf_loader, load_model)
from dualpath_jax.model.tokenizer import _BYTE_OF_CHAR, Tokenizer

# Byte-level BPE's 256 one-byte tokens, in byte order.
_ALPHABET = sorted(_BYTE_OF_CHAR, key=_BYTE_OF_CHAR.get)
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write_llama_gguf(path: pathlib.Path, rng: np.random.Generator, *,
                      head_dim: int = 4, name: str = "tiny",
                      extra_tokens: tuple[str, ...] = ("Ġt",),
                      **floats: float) -> None:
  """A one-layer llama GGUF (hidden 8, 2 heads, 1 KV head, F32 tensors) with
  a byte-level tokenizer of the special tokens, the alphabet and
  `extra_tokens`; `floats` overrides `llama.*` float metadata (dots as
  double underscores)."""
  hidden, heads, kv_heads, ffn = 2 * head_dim, 2, 1, 16
  tokens = _SPECIAL + _ALPHABET + list(extra_tokens)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_string("general.name", name)
  for key, value in {"embedding_length": hidden, "block_count": 1,
                     "feed_forward_length": ffn, "context_length": 64,
                     "attention.head_count": heads,
                     "attention.head_count_kv": kv_heads,
                     "attention.key_length": head_dim,
                     "rope.dimension_count": head_dim}.items():
    writer.add_uint32(f"llama.{key}", value)
  defaults = {"rope.freq_base": 10000.0,
              "attention.layer_norm_rms_epsilon": 1e-5}
  defaults.update({k.replace("__", "."): v for k, v in floats.items()})
  for key, value in defaults.items():
    writer.add_float32(f"llama.{key}", value)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3] * len(_SPECIAL) + [1] * (len(tokens) - 3))
  writer.add_token_merges(["Ġ t"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  shapes = {"token_embd": (len(tokens), hidden), "output_norm": (hidden,),
            "blk.0.attn_norm": (hidden,), "blk.0.ffn_norm": (hidden,),
            "blk.0.attn_q": (heads * head_dim, hidden),
            "blk.0.attn_k": (kv_heads * head_dim, hidden),
            "blk.0.attn_v": (kv_heads * head_dim, hidden),
            "blk.0.attn_output": (hidden, heads * head_dim),
            "blk.0.ffn_gate": (ffn, hidden), "blk.0.ffn_up": (ffn, hidden),
            "blk.0.ffn_down": (hidden, ffn)}
  for tensor, shape in shapes.items():
    writer.add_tensor(f"{tensor}.weight",
                      rng.standard_normal(shape).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _tokenizer(merges=(), chat_template=None) -> Tokenizer:
  tokens = _SPECIAL + _ALPHABET + ["he"]
  return Tokenizer(tokens, list(merges), [3, 3, 3] + [1] * (len(tokens) - 3),
                   pre="gpt2", bos_id=None, eos_ids=[2],
                   chat_template=chat_template)


# ------------------------------------------------------------ GGUF reading


def test_an_empty_tensor_of_huge_dimensions_names_the_file(tmp_path):
  """A zero dimension passed the end-of-file check whatever the other one
  was, and numpy's reshape then raised 'Maximum allowed dimension
  exceeded', naming neither the file nor the tensor."""
  path = tmp_path / "huge.gguf"
  table = (struct.pack("<Q", 1) + b"w"  # name
           + struct.pack("<IQQIQ", 2, 2**62, 0, 0, 0))  # dims, F32, offset
  path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + table
                   + bytes(64))
  with pytest.raises(ValueError, match=f"^{path}: malformed GGUF file: "
                     r"tensor 'w': dimensions \[4611686018427387904, 0\] "
                     r"are too large"):
    gguf_file.read_gguf(path)


def test_a_replaced_gguf_of_the_same_size_and_mtime_is_parsed_again(
    tmp_path, np_rng):
  """`open_gguf` cached its parse per (path, size, mtime): another file of
  the same size renamed over the path with the old mtime (a same-size
  fine-tune copied with its times kept, or written within the clock's
  tick) was served the old file's metadata and tensors."""
  path, other = tmp_path / "m.gguf", tmp_path / "other.gguf"
  _write_llama_gguf(path, np_rng, name="model-a")
  assert gguf_loader.open_gguf(path).metadata["general.name"] == "model-a"
  _write_llama_gguf(other, np_rng, name="model-b")
  before = path.stat()
  assert other.stat().st_size == before.st_size
  os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
  os.replace(other, path)
  assert path.stat().st_mtime_ns == before.st_mtime_ns
  assert gguf_loader.open_gguf(path).metadata["general.name"] == "model-b"


# ------------------------------------------------------------ GGUF config


def test_an_odd_head_dim_is_refused_before_the_weights_load(tmp_path,
                                                            np_rng):
  """RoPE rotates dimensions in pairs: a head_dim of 3 passed
  describe_model and then failed inside the weight loading with numpy's
  'cannot reshape array of size 36 into shape (2,1,2,6)'."""
  path = tmp_path / "odd.gguf"
  _write_llama_gguf(path, np_rng, head_dim=3)
  with pytest.raises(ValueError, match="head_dim 3 .* must be even"):
    describe_model(str(path))


@pytest.mark.parametrize("key", ["rope__freq_base",
                                 "attention__layer_norm_rms_epsilon"])
def test_an_infinite_rope_base_or_norm_epsilon_is_refused(tmp_path, np_rng,
                                                          key):
  """inf passed the 'positive number' check: a rope base of inf leaves
  every dimension but the first unrotated, an epsilon of inf zeroes every
  normalised activation; the model loaded and computed garbage."""
  path = tmp_path / "inf.gguf"
  _write_llama_gguf(path, np_rng, **{key: float("inf")})
  dotted = key.replace("__", ".")
  with pytest.raises(ValueError, match=f"llama.{dotted} must be a positive "
                     "number, got inf"):
    describe_model(str(path))


# ------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("merge,reason", [
    ("he", r"merges\[1\] = 'he' is not two tokens separated by a space"),
    ("h zz", "merges does not fit the vocabulary: .*zz"),
    ("e h", "merges does not fit the vocabulary: .*eh"),  # no "eh" token
])
def test_merges_that_do_not_fit_the_vocabulary_are_value_errors(merge,
                                                                reason):
  """`tokenizers` raised a TypeError (a merge without a space) or a bare
  Exception (a token not in the vocabulary) from a GGUF's merge list: a
  launcher's describe_model printed a traceback."""
  with pytest.raises(ValueError, match=reason):
    _tokenizer(merges=["h e", merge])


def test_a_chat_template_that_fails_is_a_value_error():
  """The template is the GGUF's: one that does not parse raised jinja's
  TemplateSyntaxError while the tokenizer was built, and one failing on
  the messages it was given (jinja's UndefinedError, SecurityError, a
  TypeError) escaped the server's ValueError -> 400 handling."""
  with pytest.raises(ValueError, match="chat_template.* does not parse: "):
    _tokenizer(chat_template="{% for m in messages %}{{ m.content }")
  messages = [{"role": "user", "content": "hi"}]
  for template, error in [("{{ messages[3].content }}", "UndefinedError"),
                          ("{{ messages.__class__.__mro__ }}",
                           "SecurityError"),
                          ("{{ messages + 1 }}", "TypeError")]:
    tok = _tokenizer(chat_template=template)
    with pytest.raises(ValueError, match=f"chat template error: {error}: "):
      tok.apply_chat_template(messages)
  ok = _tokenizer(chat_template="{{ messages[0].content }}")
  assert ok.apply_chat_template(messages) == "hi"


# ------------------------------------------------------------ checkpoints


def _model(cfg: config.ModelConfig):
  from dualpath_jax.model.llama import random_llama  # pylint: disable=g-import-not-at-top
  return random_llama(cfg, 0)


def test_a_checkpoint_of_a_model_whose_bos_is_token_0_loads(tmp_path):
  """The metadata check took bos_token_id for a count (> 0): a GGUF whose
  BOS is token 0 converted and saved, and its checkpoint never loaded
  ('config.bos_token_id = 0 is not a valid int')."""
  cfg = config.TINY.replace(bos_token_id=0)
  checkpoint.save_checkpoint(tmp_path / "ckpt", _model(cfg), weights_id="w",
                             tokenizer_gguf=None)
  assert describe_model(str(tmp_path / "ckpt")) == (cfg, None)
  assert load_model(str(tmp_path / "ckpt")).config.bos_token_id == 0


def _put_during_write(monkeypatch, put):
  """Makes `checkpoint._write` call `put(target)` once the staged write is
  done, as another program acting on the target meanwhile would."""
  real_write = checkpoint._write  # pylint: disable=protected-access

  def write(directory, model, **kw):
    real_write(directory, model, **kw)
    target = directory.parent / directory.name.split(".")[1]
    put(target)
  monkeypatch.setattr(checkpoint, "_write", write)
  return real_write


def test_a_save_keeps_what_appeared_in_its_target_during_the_write(
    tmp_path, monkeypatch):
  """The target was checked only before the (slow) write: files put into
  the empty target meanwhile were renamed aside with it and deleted, and
  a checkpoint another process saved there meanwhile was replaced
  without overwrite. Both are kept now, with an error naming why."""
  model = _model(config.TINY)
  target = tmp_path / "ckpt"
  target.mkdir()

  def add_notes(where):
    (where / "notes.txt").write_text("keep me")
  _put_during_write(monkeypatch, add_notes)
  for overwrite in (False, True):
    with pytest.raises(ValueError, match="given files other than a "
                       "checkpoint .* left alone"):
      checkpoint.save_checkpoint(target, model, weights_id="mine",
                                 tokenizer_gguf=None, overwrite=overwrite)
    assert (target / "notes.txt").read_text() == "keep me"
    (target / "notes.txt").unlink()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

  monkeypatch.undo()
  target.rmdir()
  real_write = checkpoint._write  # pylint: disable=protected-access

  def other_save(where):
    where.mkdir()
    real_write(where, model, weights_id="theirs", tokenizer_gguf=None,
               tokenizer_embedded=False, tokenizer_digest=None, source="")
  _put_during_write(monkeypatch, other_save)
  with pytest.raises(FileExistsError, match="was given a checkpoint"):
    checkpoint.save_checkpoint(target, model, weights_id="mine",
                               tokenizer_gguf=None)
  monkeypatch.undo()
  assert checkpoint.read_metadata(target)["weights_id"] == "theirs"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_checkpoint_refuses_a_tokenizer_gguf_replaced_since(tmp_path,
                                                              np_rng):
  """A checkpoint reads its tokenizer from the GGUF file it was converted
  from, by path: that file replaced by another model's, the weights loaded
  with another vocabulary's ids without a word. The tokenizer's digest,
  recorded at save, is checked; another file with the same tokenizer (a
  re-download, another quantisation) still loads."""
  gguf_path = tmp_path / "m.gguf"
  _write_llama_gguf(gguf_path, np_rng)
  ckpt = tmp_path / "ckpt"
  checkpoint.save_checkpoint(ckpt, _model(config.TINY), weights_id="w",
                             tokenizer_gguf=gguf_path)
  assert describe_model(str(ckpt))[1].vocab_size == 260
  _write_llama_gguf(gguf_path, np_rng, name="same tokenizer, new weights")
  assert describe_model(str(ckpt))[1].vocab_size == 260
  _write_llama_gguf(gguf_path, np_rng, extra_tokens=("Ġt", "xyz"))
  for read in (describe_model, load_model):
    with pytest.raises(ValueError, match=f"the tokenizer in {gguf_path} is "
                       "not the one this checkpoint was written with"):
      read(str(ckpt))
