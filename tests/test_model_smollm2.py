"""The real SmolLM2-135M-Instruct from the embedded GGUF.

* Dequantisation is checked against numpy decoders of the Q8_0 / Q4_1 block
  formats written here from the ggml spec.
* The q/k un-permutation is checked two ways: as the inverse of llama.cpp's
  converter permutation, and end to end against a float64 numpy forward pass
  that uses the RAW GGUF weights with ggml's adjacent-pair RoPE (what
  llama.cpp computes), so a wrong un-permutation cannot cancel out.
* Paged incremental decoding equals one full recomputation, and the greedy
  chat answer about France says "Paris".

Tests that load the weights are `slow` (the session fixture loads them once).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dualpath_jax import config
from dualpath_jax.config import CacheConfig
from dualpath_jax.model import describe_model, gguf_loader, load_model
from dualpath_jax.model.runner import ModelRunner
from launch import convert, generate


@pytest.fixture(scope="module")
def reader(smollm2_gguf_path):
  return gguf_loader.open_gguf(smollm2_gguf_path)


# ---------------------------------------------------------- no weights


def test_config_from_gguf_equals_preset(reader):
  cfg = gguf_loader.config_from_gguf(reader, name=config.SMOLLM2_135M.name)
  assert cfg == config.SMOLLM2_135M
  assert cfg.fingerprint() == config.SMOLLM2_135M.fingerprint()


@pytest.mark.slow
def test_describe_model_reads_the_embedded_gguf_without_weights(smollm2):
  cfg, tokenizer = describe_model()
  assert cfg == smollm2.config
  chat = [{"role": "user", "content": "What is the capital of France?"}]
  assert tokenizer.encode_chat(chat) == smollm2.tokenizer.encode_chat(chat)
  assert describe_model(dtype="bfloat16")[0] == cfg.replace(dtype="bfloat16")


def _q8_0(raw: np.ndarray, cols: int) -> np.ndarray:
  """Q8_0 block of 32: float16 scale d, 32 int8 q; value = d * q."""
  blocks = raw.reshape(-1, 34)
  d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
  q = blocks[:, 2:].view(np.int8).astype(np.float32)
  return (d * q).reshape(-1, cols)


def _q4_1(raw: np.ndarray, cols: int) -> np.ndarray:
  """Q4_1 block of 32: f16 scale d, f16 min m, 16 bytes of nibbles.

  Byte j holds element j (low nibble) and element j + 16 (high nibble);
  value = d * nibble + m.
  """
  blocks = raw.reshape(-1, 20)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
  qs = blocks[:, 4:]
  nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
  return (d * nibbles + m).reshape(-1, cols)


@pytest.mark.parametrize("name,decoder", [
    ("token_embd.weight", _q8_0),
    ("blk.0.attn_q.weight", _q4_1),
    ("blk.17.ffn_down.weight", _q4_1),
])
def test_dequantize_matches_block_format(reader, name, decoder):
  tensor = reader.tensors[name]
  got = gguf_loader.dequantize_tensor(tensor)
  rows, cols = tensor.shape  # numpy order: the file lists (cols, rows)
  want = decoder(np.asarray(tensor.data), cols)
  assert got.shape == want.shape == (rows, cols)
  np.testing.assert_array_equal(got, want)
  assert np.std(got) > 0.01  # real weights, not zeros


def test_unpermute_inverts_the_converter_permutation(np_rng):
  heads, head_dim, cols = 3, 8, 5
  hf = np_rng.standard_normal((heads * head_dim, cols))
  # llama.cpp convert_hf_to_gguf: rows (head, half, j) -> (head, j, half).
  ggml = (hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2)
          .reshape(hf.shape))
  assert not np.array_equal(ggml, hf)
  np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(ggml, heads),
                                hf)


# ---------------------------------------------------------- real weights


def _ggml_reference_logits(reader, cfg, tokens) -> np.ndarray:
  """float64 forward pass on the raw GGUF weights, llama.cpp style.

  q/k stay in GGUF row order and RoPE rotates ADJACENT pairs (2i, 2i+1) of
  each head, as ggml's "normal" rope mode does for the llama architecture.
  """
  def w(name):
    return gguf_loader.dequantize_tensor(reader.tensors[name]).astype(
        np.float64)

  def norm(x, weight):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True)
                       + cfg.rms_norm_eps) * weight

  def rope(x):  # [T, heads, D], adjacent pairs
    t, _, d = x.shape
    freq = cfg.rope_theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None, None] * freq[None, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(ang) - odd * np.sin(ang)
    out[..., 1::2] = even * np.sin(ang) + odd * np.cos(ang)
    return out

  t = len(tokens)
  emb = w("token_embd.weight")
  h = emb[tokens]
  group = cfg.num_heads // cfg.num_kv_heads
  mask = np.tril(np.ones((t, t), bool))
  for i in range(cfg.num_layers):
    x = norm(h, w(f"blk.{i}.attn_norm.weight"))
    q = rope((x @ w(f"blk.{i}.attn_q.weight").T).reshape(t, cfg.num_heads, -1))
    k = rope((x @ w(f"blk.{i}.attn_k.weight").T).reshape(
        t, cfg.num_kv_heads, -1))
    v = (x @ w(f"blk.{i}.attn_v.weight").T).reshape(t, cfg.num_kv_heads, -1)
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = h + np.einsum("hqk,khd->qhd", p, v).reshape(t, -1) @ w(
        f"blk.{i}.attn_output.weight").T
    x = norm(h, w(f"blk.{i}.ffn_norm.weight"))
    g = x @ w(f"blk.{i}.ffn_gate.weight").T
    u = x @ w(f"blk.{i}.ffn_up.weight").T
    h = h + (g / (1 + np.exp(-g)) * u) @ w(f"blk.{i}.ffn_down.weight").T
  return norm(h, w("output_norm.weight")) @ emb.T


def _prefill(runner, kv, tokens, table, start=0):
  n = len(tokens)
  block = runner.cache.block_size
  pos = np.arange(start, start + n)
  slots = (table[pos // block] * block + pos % block)[None].astype(np.int32)
  return runner.step_all_logits(kv, np.asarray([tokens], np.int32),
                                table[None], np.array([start + n]),
                                np.array([n]), slots)


@pytest.mark.slow
def test_logits_match_llamacpp_style_reference(smollm2, reader):
  tok = smollm2.tokenizer
  tokens = tok.encode("The capital of France is Paris, and 2+2=4.")
  runner = ModelRunner(smollm2.model, CacheConfig(block_size=16,
                                                  num_blocks=4))
  logits, _ = _prefill(runner, runner.new_kv_cache(), tokens,
                       np.array([2, 0, 3, 1], np.int32))
  got = np.asarray(logits[0])
  want = _ggml_reference_logits(reader, smollm2.config, np.array(tokens))
  # float32 model vs float64 reference through 30 layers, logits up to ~34:
  # measured max |diff| 1.5e-4.
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_incremental_paged_decode_matches_full_recompute(smollm2, np_rng):
  tok = smollm2.tokenizer
  prompt = tok.encode_chat([{"role": "user",
                             "content": "List three prime numbers."}])
  runner = ModelRunner(smollm2.model, CacheConfig(block_size=16,
                                                  num_blocks=24))
  table = np_rng.permutation(24)[:8].astype(np.int32)  # shuffled pages
  kv = runner.new_kv_cache()
  got, seq, chunks = [], list(prompt), [13, 17, len(prompt) - 30]
  assert chunks[-1] > 0
  start = 0
  for n in chunks:
    logits, kv = _prefill(runner, kv, seq[start:start + n], table, start)
    got.append(np.asarray(logits[0]))
    start += n
  for _ in range(6):  # greedy decode, one token per step
    seq.append(int(got[-1][-1].argmax()))
    logits, kv = _prefill(runner, kv, seq[-1:], table, len(seq) - 1)
    got.append(np.asarray(logits[0]))
  got = np.concatenate(got)

  other = np.arange(24, dtype=np.int32)[::-1][:8].copy()  # other pages
  full, _ = _prefill(runner, runner.new_kv_cache(), seq, other)
  full = np.asarray(full[0])
  assert got.shape == full.shape == (len(seq), config.SMOLLM2_135M.vocab_size)
  # Same float32 math, different chunking and pages: reduction order only.
  np.testing.assert_allclose(got, full, atol=1e-3, rtol=0)
  assert (got.argmax(-1) == full.argmax(-1)).all()


@pytest.mark.slow
def test_greedy_chat_answers_paris(smollm2):
  tok = smollm2.tokenizer
  prompt = tok.encode_chat([{"role": "user",
                             "content": "What is the capital of France?"}])
  ids, _ = generate.generate(smollm2.model, prompt, max_new_tokens=24,
                             eos_ids=tok.eos_ids, prefill_chunk=16)
  text = tok.decode(ids, skip_special_tokens=True)
  assert "Paris" in text, text
  assert ids[-1] in tok.eos_ids  # it ends its answer


@pytest.mark.slow
def test_convert_writes_a_checkpoint_load_model_restores(smollm2, tmp_path):
  out = convert.convert(None, str(tmp_path / "ckpt"), "bfloat16")
  loaded = load_model(out)
  assert loaded.config == smollm2.config.replace(dtype="bfloat16")
  assert loaded.weights_id == gguf_loader.file_weights_id(
      gguf_loader.find_smollm2_gguf(), "bfloat16") != smollm2.weights_id
  assert loaded.tokenizer is not None
  assert loaded.tokenizer.encode("Paris") == smollm2.tokenizer.encode("Paris")
  want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(smollm2.model)))
  got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded.model)))
  assert len(want) == len(got)
  for a, b in zip(want, got):
    assert b.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(a.astype(b.dtype)),
                                  np.asarray(b))
  meta = json.loads((tmp_path / "ckpt" / "dualpath_model.json").read_text())
  assert meta["tokenizer"]["embedded"] is True
