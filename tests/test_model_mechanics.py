"""The Llama model and ModelRunner on small random configs.

Every test compares the paged, incremental computation with an independent
dense recomputation written here in float64 numpy (no `kernels` import, RoPE
as complex rotation rather than rotate-half). Tolerance: float32 model vs
float64 reference, `atol = rtol = 2e-5` on logits of magnitude ~1-10.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from dualpath_jax import config
from dualpath_jax.config import CacheConfig
from dualpath_jax.model import (checkpoint, checkpoint_layout,
                                describe_model, load_model,
                                parse_random_source, pure_dict)
from dualpath_jax.model.llama import Llama, random_llama
from dualpath_jax.model.runner import ModelRunner
from launch import generate

from import_record import (imported_jax, run_recording_imports,
                           without_import_times)
from launcher_interrupt import interrupt_after

ATOL = RTOL = 2e-5


# ------------------------------------------------------------ reference


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
  """x: [T, heads, D]; rotates the pair (j, j + D/2) as one complex number."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
  phase = np.exp(1j * positions[:, None] * inv_freq[None, :])[:, None, :]
  z = (x[..., :half] + 1j * x[..., half:]) * phase
  return np.concatenate([z.real, z.imag], axis=-1)


def reference_logits(params: dict, cfg: config.ModelConfig,
                     tokens: np.ndarray,
                     mask: np.ndarray | None = None) -> np.ndarray:
  """[T, V] float64 logits of `tokens` (positions 0..T-1), dense causal,
  or with `mask` ([T, T] bool: which keys each query reads) instead."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  lay = p["layers"]
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)
  group = cfg.num_heads // cfg.num_kv_heads
  causal = np.tril(np.ones((t, t), bool)) if mask is None else mask
  h = p["embed_tokens"][tokens]
  for i in range(cfg.num_layers):
    x = _rms_norm(h, lay["attn_norm"]["weight"][i], cfg.rms_norm_eps)
    attn = lay["attn"]
    q = (x @ attn["q_proj"]["kernel"][i]).reshape(t, cfg.num_heads, -1)
    k = (x @ attn["k_proj"]["kernel"][i]).reshape(t, cfg.num_kv_heads, -1)
    v = (x @ attn["v_proj"]["kernel"][i]).reshape(t, cfg.num_kv_heads, -1)
    q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
    s = np.where(causal[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", w, v).reshape(t, -1)
    h = h + o @ attn["o_proj"]["kernel"][i]
    x = _rms_norm(h, lay["mlp_norm"]["weight"][i], cfg.rms_norm_eps)
    mlp = lay["mlp"]
    g = x @ mlp["gate_proj"]["kernel"][i]
    u = x @ mlp["up_proj"]["kernel"][i]
    h = h + (g / (1 + np.exp(-g)) * u) @ mlp["down_proj"]["kernel"][i]
  h = _rms_norm(h, p["final_norm"]["weight"], cfg.rms_norm_eps)
  head = p["embed_tokens"].T if cfg.tie_embeddings else p["lm_head"]
  return h @ head


# ------------------------------------------------------------ helpers


def make_model(cfg: config.ModelConfig, rng: np.random.Generator) -> Llama:
  """Random model whose norm weights are random too (not all ones)."""
  model = random_llama(cfg, int(rng.integers(1 << 30)))
  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  dtype = jnp.dtype(cfg.dtype)
  for norm in (pure["layers"]["attn_norm"], pure["layers"]["mlp_norm"],
               pure["final_norm"]):
    norm["weight"] = jnp.asarray(
        rng.uniform(0.5, 1.5, norm["weight"].shape), dtype)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def params_of(model: Llama) -> dict:
  return nnx.to_pure_dict(nnx.state(model))


class Sequence:
  """One sequence's pages in a shared pool: a shuffled block table."""

  def __init__(self, tokens, pages: np.ndarray, width: int, block_size: int):
    self.tokens = np.asarray(tokens, np.int32)
    self.table = np.zeros(width, np.int32)  # unused entries: page 0
    self.table[:len(pages)] = pages
    self.block_size = block_size
    self.done = 0  # tokens already in the cache

  def slots(self, start: int, stop: int) -> np.ndarray:
    pos = np.arange(start, stop)
    return self.table[pos // self.block_size] * self.block_size + (
        pos % self.block_size)


def run_step(runner, kv, seqs, counts, q_len, *, all_logits=True):
  """Feeds `counts[b]` next tokens of `seqs[b]` (None = empty batch row)."""
  batch = len(seqs)
  width = max(len(s.table) for s in seqs if s is not None)
  tokens = np.zeros((batch, q_len), np.int32)
  slots = np.full((batch, q_len), -1, np.int32)
  tables = np.zeros((batch, width), np.int32)
  kv_lens = np.zeros(batch, np.int32)
  q_lens = np.zeros(batch, np.int32)
  for b, (s, n) in enumerate(zip(seqs, counts)):
    if s is None or n == 0:
      continue
    tokens[b, :n] = s.tokens[s.done:s.done + n]
    slots[b, :n] = s.slots(s.done, s.done + n)
    tables[b] = s.table
    s.done += n
    kv_lens[b], q_lens[b] = s.done, n
  fn = runner.step_all_logits if all_logits else runner.step
  logits, kv = fn(kv, tokens, tables, kv_lens, q_lens, slots)
  return np.asarray(logits), kv, q_lens


def stale_pool(runner: ModelRunner, rng: np.random.Generator,
               scale: float = 50.0) -> jax.Array:  # [L, N, 2, Hkv, P, D]
  """A KV pool full of large finite junk, as a reused pool holds: a step
  that read a slot it had not written (a masking bug) would see it, where a
  zeroed pool's slots only shift the softmax a little (`write_kv` zeroes the
  pages a step starts, so this holds for the slots of pages not started).
  Never NaN: every implementation multiplies masked slots by 0, and NaN
  times 0 is NaN (tests/test_engine.py keeps NaN pages from other
  sequences away)."""
  return jnp.asarray(rng.normal(0, scale, runner.kv_cache_shape),
                     jnp.dtype(runner.cache.dtype))


def shuffled_pages(rng, num_blocks, counts):
  perm = rng.permutation(num_blocks)
  out, start = [], 0
  for n in counts:
    out.append(perm[start:start + n])
    start += n
  return out


# ------------------------------------------------------------ tests


@pytest.mark.parametrize("q_per_kv,block_size", [(1, 4), (2, 8), (3, 4)])
def test_incremental_paged_decode_matches_dense_recompute(
    q_per_kv, block_size, np_rng):
  cfg = config.TINY.replace(num_kv_heads=2, num_heads=2 * q_per_kv)
  model = make_model(cfg, np_rng)
  total = 23  # prefill 5 + 7 + 3 (odd chunks across pages), 8 decodes
  pages_needed = -(-total // block_size)
  runner = ModelRunner(model, CacheConfig(block_size=block_size,
                                          num_blocks=3 * pages_needed + 1))
  tokens = np_rng.integers(0, cfg.vocab_size, total)
  (pages,) = shuffled_pages(np_rng, runner.cache.num_blocks, [pages_needed])
  seq = Sequence(tokens, pages, pages_needed + 2, block_size)
  kv = stale_pool(runner, np_rng)
  got = []
  for n in (5, 7, 3):
    logits, kv, _ = run_step(runner, kv, [seq], [n], q_len=8)
    got.append(logits[0, :n])
  for _ in range(total - 15):
    logits, kv, _ = run_step(runner, kv, [seq], [1], q_len=1)
    got.append(logits[0, :1])
  got = np.concatenate(got)
  want = reference_logits(params_of(model), cfg, tokens)
  assert got.shape == want.shape == (total, cfg.vocab_size)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_layerwise_step_matches_reference_and_runs_the_hook_per_layer(np_rng):
  """`step_layerwise` (one call per layer) against the numpy reference.

  The hook writes each layer's pages of a prefix computed by `step` on a
  second pool just before that layer runs (what the DualPath prefill engine
  does with a loaded prefix); the suffix prefilled layer-wise on top of it
  must give the reference's last-token logits, and the hook must see the
  layers in order, once each.
  """
  cfg = config.TINY.replace(num_kv_heads=2, num_heads=6)
  model = make_model(cfg, np_rng)
  bs = 4
  runner = ModelRunner(model, CacheConfig(block_size=bs, num_blocks=24))
  tokens = np_rng.integers(0, cfg.vocab_size, 19)
  (pages,) = shuffled_pages(np_rng, runner.cache.num_blocks, [5])
  prefix = Sequence(tokens, pages, 6, bs)
  _, donor, _ = run_step(runner, runner.new_kv_cache(), [prefix], [12], q_len=16)
  donor = np.asarray(donor)
  seen = []

  def put_layer(layer, pool):
    seen.append(layer)
    return pool.at[layer, pages[:3]].set(donor[layer, pages[:3]])

  kv = stale_pool(runner, np_rng)
  seq = Sequence(tokens, pages, 6, bs)
  seq.done = 12
  q = np.zeros((1, 8), np.int32)
  q[0, :7] = tokens[12:]
  slots = np.full((1, 8), -1, np.int32)
  slots[0, :7] = seq.slots(12, 19)
  logits, kv = runner.step_layerwise(
      kv, q, seq.table[None], np.array([19], np.int32), np.array([7], np.int32),
      slots, before_layer=put_layer)
  assert seen == list(range(cfg.num_layers))
  want = reference_logits(params_of(model), cfg, tokens)[-1]
  np.testing.assert_allclose(np.asarray(logits)[0], want, atol=ATOL, rtol=RTOL)
  # and without a hook it equals `step` on the same inputs
  kv2 = runner.new_kv_cache()
  seq2 = Sequence(tokens, pages, 6, bs)
  _, kv2, _ = run_step(runner, kv2, [seq2], [12], q_len=16)
  a, _ = runner.step(jnp.array(kv2), q, seq.table[None], np.array([19], np.int32),
                     np.array([7], np.int32), slots)
  b, _ = runner.step_layerwise(kv2, q, seq.table[None],
                               np.array([19], np.int32),
                               np.array([7], np.int32), slots)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_each_sequence_alone(np_rng):
  cfg = config.TINY.replace(num_heads=6, num_kv_heads=2)  # GQA 3
  model = make_model(cfg, np_rng)
  block_size, width = 4, 6
  runner = ModelRunner(model, CacheConfig(block_size=block_size,
                                          num_blocks=40))
  lengths = [17, 11, 20]
  schedule = [[5, 8, 2], [1, 3, 6], [8, 0, 7], [1, 0, 5]]  # rows sum <= len
  tokens = [np_rng.integers(0, cfg.vocab_size, n) for n in lengths]
  pages = shuffled_pages(np_rng, 40, [width] * 3)

  def fresh(b):
    return Sequence(tokens[b], pages[b], width, block_size)

  batched = [fresh(0), None, fresh(1), fresh(2)]  # row 1: batch padding
  kv = stale_pool(runner, np_rng)
  got_batched = {0: [], 2: [], 3: []}
  for counts in schedule:
    row_counts = [counts[0], 0, counts[1], counts[2]]
    logits, kv, q_lens = run_step(runner, kv, batched, row_counts, q_len=8)
    for b in got_batched:
      got_batched[b].append(logits[b, :q_lens[b]])

  for b, seq_index in ((0, 0), (2, 1), (3, 2)):
    alone = fresh(seq_index)
    kv_alone = stale_pool(runner, np_rng)
    got_alone = []
    for counts in schedule:
      logits, kv_alone, _ = run_step(runner, kv_alone, [alone],
                                     [counts[seq_index]], q_len=8)
      got_alone.append(logits[0, :counts[seq_index]])
    batched_rows = np.concatenate(got_batched[b])
    np.testing.assert_allclose(batched_rows, np.concatenate(got_alone),
                               atol=1e-5, rtol=1e-5)
    done = alone.done
    want = reference_logits(params_of(model), cfg, tokens[seq_index][:done])
    np.testing.assert_allclose(batched_rows, want, atol=ATOL, rtol=RTOL)


def test_step_returns_logits_of_each_rows_last_valid_token(np_rng):
  cfg = config.TINY
  model = make_model(cfg, np_rng)
  runner = ModelRunner(model, CacheConfig(block_size=4, num_blocks=12))
  tokens = [np_rng.integers(0, cfg.vocab_size, 8) for _ in range(2)]
  pages = shuffled_pages(np_rng, 12, [2, 2])
  results = []
  for all_logits in (True, False):
    seqs = [Sequence(t, p, 2, 4) for t, p in zip(tokens, pages)]
    logits, _, q_lens = run_step(runner, runner.new_kv_cache(), seqs, [6, 3],
                                 q_len=6, all_logits=all_logits)
    results.append(logits)
  all_rows, last = results
  assert last.shape == (2, cfg.vocab_size)
  for b in range(2):
    np.testing.assert_array_equal(last[b], all_rows[b, q_lens[b] - 1])


def test_bfloat16_model_tracks_float32_reference(np_rng):
  cfg = config.TINY.replace(dtype="bfloat16")
  model = make_model(cfg, np_rng)
  runner = ModelRunner(model, CacheConfig(block_size=4, num_blocks=8,
                                          dtype="bfloat16"))
  tokens = np_rng.integers(0, cfg.vocab_size, 10)
  seq = Sequence(tokens, np_rng.permutation(8)[:3], 3, 4)
  kv = runner.new_kv_cache()
  logits, kv, _ = run_step(runner, kv, [seq], [10], q_len=10)
  assert kv.dtype == jnp.bfloat16 and logits.dtype == np.float32
  params = jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32)),
                        params_of(model))
  want = reference_logits(params, cfg, tokens)
  # bf16 activations: ~3 significant digits through 2 layers.
  scale = np.abs(want).max()
  assert np.abs(logits[0] - want).max() < 0.05 * scale
  assert np.mean(logits[0].argmax(-1) == want.argmax(-1)) >= 0.8


def test_large_preset_shapes_without_allocating():
  cfg = config.LLAMA3_8B.replace(num_layers=2)
  model = pure_dict.abstract_model(cfg)
  pure = nnx.to_pure_dict(nnx.state(model))
  assert pure["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 4096, 4096)
  assert pure["layers"]["attn"]["k_proj"]["kernel"].shape == (2, 4096, 1024)
  assert pure["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 14336, 4096)
  assert pure["lm_head"].shape == (4096, 128256)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(pure))
  graphdef, state = nnx.split(model)

  def forward(state, kv):
    m = nnx.merge(graphdef, state)
    hidden, kv = m(jnp.zeros((2, 3), jnp.int32), kv,
                   jnp.zeros((2, 4), jnp.int32), jnp.array([3, 1]),
                   jnp.array([3, 1]), jnp.zeros((2, 3), jnp.int32))
    return m.logits(hidden), kv

  kv = jax.ShapeDtypeStruct((2, 16, 2, 8, 16, 128), jnp.bfloat16)
  logits, kv_out = jax.eval_shape(forward, state, kv)
  assert logits.shape == (2, 3, 128256) and logits.dtype == jnp.float32
  assert kv_out.shape == kv.shape and kv_out.dtype == jnp.bfloat16


def test_runners_of_one_model_structure_share_compiled_steps(np_rng):
  """Two models of one config (different weights) share their runners'
  jitted steps: the second runner compiles nothing for a shape the first
  ran, and each still computes with its own weights. Another config or
  attention implementation gets its own steps."""
  cfg = config.TINY
  cache = CacheConfig(block_size=4, num_blocks=12)
  models = [make_model(cfg, np_rng) for _ in range(2)]
  runners = [ModelRunner(m, cache) for m in models]
  assert runners[0]._fns is runners[1]._fns  # pylint: disable=protected-access
  step = runners[0]._fns.all_logits  # pylint: disable=protected-access
  tokens = np_rng.integers(0, cfg.vocab_size, 9)
  sizes = []
  for model, runner in zip(models, runners):
    seq = Sequence(tokens, np.arange(1, 4), 4, cache.block_size)
    logits, _, _ = run_step(runner, stale_pool(runner, np_rng), [seq], [9],
                            q_len=9)
    sizes.append(step._cache_size())  # pylint: disable=protected-access
    np.testing.assert_allclose(
        logits[0], reference_logits(params_of(model), cfg, tokens),
        atol=ATOL, rtol=RTOL)
  assert sizes[0] >= 1 and sizes[1] == sizes[0]
  other_cfg = ModelRunner(make_model(cfg.replace(num_layers=1), np_rng), cache)
  other_impl = ModelRunner(models[0], cache, attention_impl="xla_chunked")
  for other in (other_cfg, other_impl):
    assert other._fns is not runners[0]._fns  # pylint: disable=protected-access


def test_runner_rejects_bad_inputs(np_rng):
  model = make_model(config.TINY, np_rng)
  runner = ModelRunner(model, CacheConfig(block_size=4, num_blocks=4))
  kv = runner.new_kv_cache()
  ok = dict(tokens=np.ones((1, 2), np.int32),
            block_tables=np.zeros((1, 1), np.int32),
            kv_lens=np.array([2]), q_lens=np.array([2]),
            slot_mapping=np.array([[0, 1]], np.int32))
  with pytest.raises(ValueError, match="kv_cache shape"):
    runner.step(jnp.zeros((2, 4, 2, 2, 4, 8)), **ok)
  with pytest.raises(ValueError, match="slot_mapping"):
    runner.step(kv, **{**ok, "slot_mapping": np.zeros((1, 3), np.int32)})
  with pytest.raises(ValueError, match="integer"):
    runner.step(kv, **{**ok, "tokens": np.ones((1, 2), np.float32)})


def test_random_source_parsing():
  cfg, seed = parse_random_source("random:llama3-8b-shape:layers=2:seed=7")
  assert cfg == config.LLAMA3_8B.replace(num_layers=2) and seed == 7
  for bad in ("random:", "random:nope", "random:tiny-test:layers=0",
              "random:tiny-test:depth=3", "random:tiny-test:seed=4294967296"):
    with pytest.raises(ValueError):
      parse_random_source(bad)
  with pytest.raises(ValueError, match="neither"):
    load_model("no/such/model")


def test_checkpoint_writes_only_where_nothing_else_lives(tmp_path, np_rng):
  """A checkpoint goes into a new or empty directory, or replaces one of
  ours with overwrite; a directory of other files is never written into or
  deleted from, even with overwrite (its `state/` could be anyone's)."""
  model = make_model(config.TINY, np_rng)
  save = functools.partial(checkpoint.save_checkpoint, model=model,
                           weights_id="w", tokenizer_gguf=None)
  other = tmp_path / "project"
  (other / "state").mkdir(parents=True)
  (other / "state" / "notes.txt").write_text("keep me")
  for overwrite in (False, True):
    with pytest.raises(ValueError, match="directory of other files"):
      save(other, overwrite=overwrite)
  assert (other / "state" / "notes.txt").read_text() == "keep me"
  assert sorted(p.name for p in other.iterdir()) == ["state"]
  a_file = tmp_path / "file.json"
  a_file.write_text("{}")
  with pytest.raises(ValueError, match="not a directory"):
    save(a_file)
  with pytest.raises(ValueError, match="empty path"):
    save("")
  with pytest.raises(ValueError, match="cannot create the folder"):
    save(a_file / "ckpt")  # under a file: refused before any conversion
  empty = tmp_path / "empty"
  empty.mkdir()
  save(empty)
  save(empty, overwrite=True, weights_id="w2")  # ours: replaced
  assert checkpoint.read_metadata(empty)["weights_id"] == "w2"


def _write_then_fail(error):
  """A stand-in for `checkpoint._write` that writes the state's first files
  and then fails with `error`, as a Ctrl-C or a full disk would."""
  def write(directory, model, **_):
    (directory / checkpoint.STATE_DIR).mkdir()
    (directory / checkpoint.STATE_DIR / "half").write_bytes(b"\0" * 64)
    raise error
  return write


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk full")],
                         ids=["ctrl_c", "disk_full"])
def test_an_interrupted_checkpoint_write_leaves_the_directory_as_it_was(
    tmp_path, np_rng, monkeypatch, error):
  """Before, Orbax's force=True deleted the old weights before writing the
  new ones, and a Ctrl-C in between lost both; a new checkpoint's directory
  was left holding Orbax's temporary folder, which `convert` then refused
  as a directory of other files. Now the write goes to a hidden sibling
  and is renamed into place only when whole."""
  model = make_model(config.TINY, np_rng)
  old = tmp_path / "old"
  checkpoint.save_checkpoint(old, model, weights_id="w1", tokenizer_gguf=None)
  want = params_of(load_model(str(old)).model)
  monkeypatch.setattr(checkpoint, "_write", _write_then_fail(error))
  new = tmp_path / "new"
  for target, overwrite in ((old, True), (new, False)):
    with pytest.raises(type(error)):
      checkpoint.save_checkpoint(target, model, weights_id="w2",
                                 tokenizer_gguf=None, overwrite=overwrite)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no sibling
  assert checkpoint.read_metadata(old)["weights_id"] == "w1"
  got = params_of(load_model(str(old)).model)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  checkpoint.save_checkpoint(new, model, weights_id="w3", tokenizer_gguf=None)
  assert load_model(str(new)).weights_id == "w3"  # the path is usable


def test_ctrl_c_during_a_checkpoint_save_waits_for_the_save_to_end(
    tmp_path, np_rng, monkeypatch):
  """Orbax writes on in background threads past an interrupt of the
  caller; a Ctrl-C during the save is held until the save has ended (and
  then raised), so the staging folder is not removed under Orbax's feet."""
  assert threading.current_thread() is threading.main_thread()
  # What the save must put back: Python's default, or SIG_IGN where the
  # suite was started in the background of a non-interactive shell.
  handler_before = signal.getsignal(signal.SIGINT)
  model = make_model(config.TINY, np_rng)
  real_save = checkpoint.ocp.StandardCheckpointer.save
  saved = []

  def save_with_ctrl_c(self, path, state, **kw):
    os.kill(os.getpid(), signal.SIGINT)  # arrives while the save runs
    real_save(self, path, state, **kw)
    saved.append(path)
  monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save",
                      save_with_ctrl_c)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, weights_id="w",
                               tokenizer_gguf=None)
  assert saved  # the save ran to its end before the interrupt was raised
  assert list(tmp_path.iterdir()) == []  # and nothing was published
  assert signal.getsignal(signal.SIGINT) is handler_before


def _dead_pid() -> int:
  """The pid of a process that has ended."""
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(done.stdout)


def test_checkpoint_publish_puts_the_old_one_back_if_the_swap_fails(
    tmp_path, np_rng, monkeypatch):
  """Replacing a checkpoint is two renames (the old one aside, the new one
  in); if the second fails the first is undone. Partial directories left
  by dead processes are removed by the next save."""
  model = make_model(config.TINY, np_rng)
  target = tmp_path / "ckpt"
  checkpoint.save_checkpoint(target, model, weights_id="w1",
                             tokenizer_gguf=None)
  leftover = tmp_path / f".ckpt.partial-{_dead_pid()}"
  (leftover / "state").mkdir(parents=True)
  real_rename, renames = os.rename, []

  def rename(src, dst):
    renames.append((pathlib.Path(src).name, pathlib.Path(dst).name))
    if pathlib.Path(src).name.startswith(".ckpt.partial-"):  # moving in
      raise OSError("injected: rename failed")
    real_rename(src, dst)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="injected"):
    checkpoint.save_checkpoint(target, model, weights_id="w2",
                               tokenizer_gguf=None, overwrite=True)
  monkeypatch.undo()
  old_aside = f".ckpt.old-{os.getpid()}"
  assert renames[-3:] == [("ckpt", old_aside),  # the old one aside,
                          (f".ckpt.partial-{os.getpid()}", "ckpt"),  # fails,
                          (old_aside, "ckpt")]  # the old one back
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert checkpoint.read_metadata(target)["weights_id"] == "w1"
  checkpoint.save_checkpoint(target, model, weights_id="w2",
                             tokenizer_gguf=None, overwrite=True)
  assert load_model(str(target)).weights_id == "w2"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_replacement_killed_between_its_renames_is_undone(tmp_path, np_rng):
  """kill -9 between `_publish`'s renames leaves no checkpoint at the path,
  the old one aside and the new one staged: the next load, output check or
  save puts the old one back and removes the staged one (the path as it
  was, as after any interrupted write). A live process's siblings are left
  alone; so is a path no replacement touched."""
  model = make_model(config.TINY, np_rng)
  target = tmp_path / "ckpt"
  checkpoint.save_checkpoint(target, model, weights_id="old",
                             tokenizer_gguf=None)
  for recover in ("load", "check", "save"):
    pid = _dead_pid()
    # The state a kill between the two renames leaves.
    os.rename(target, tmp_path / f".ckpt.old-{pid}")
    staged = tmp_path / f".ckpt.partial-{pid}"
    checkpoint.save_checkpoint(staged, model, weights_id="new",
                               tokenizer_gguf=None)
    if recover == "load":
      assert load_model(str(target)).weights_id == "old"
    elif recover == "check":
      with pytest.raises(FileExistsError, match="holds a checkpoint"):
        checkpoint.check_output_directory(target)
    else:
      checkpoint.save_checkpoint(target, model, weights_id="saved",
                                 tokenizer_gguf=None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    expected = "saved" if recover == "save" else "old"
    assert checkpoint.read_metadata(target)["weights_id"] == expected
  # A live process's sibling is its own: nothing is moved.
  live = tmp_path / f".ckpt.old-{os.getpid()}"
  os.rename(target, live)
  assert not checkpoint_layout.recover_interrupted_replace(target)
  assert live.is_dir() and not target.exists()


def test_a_replacement_killed_while_removing_the_old_one_is_finished(
    tmp_path, np_rng):
  """kill -9 while `_publish` removes the old checkpoint: the new one is in
  place and what is left of the old one aside is removed, never put back."""
  model = make_model(config.TINY, np_rng)
  target = tmp_path / "ckpt"
  checkpoint.save_checkpoint(target, model, weights_id="new",
                             tokenizer_gguf=None)
  leftover = tmp_path / f".ckpt.old-{_dead_pid()}"
  (leftover / "state").mkdir(parents=True)
  (leftover / checkpoint.METADATA_FILE).write_text("{}")
  assert not checkpoint_layout.recover_interrupted_replace(target)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert load_model(str(target)).weights_id == "new"


@pytest.mark.parametrize("args,msg", [
    # `--out=` used to write a checkpoint into the working directory.
    (["--out="], "convert: the checkpoint directory is an empty path"),
    (["--out=new", "--gguf=/no/such.gguf"],
     "convert: no GGUF file at /no/such.gguf"),
    # Any model source used to be converted, into a checkpoint whose
    # tokenizer names no GGUF file.
    (["--out=new", "--gguf=random:tiny-test"],
     "convert: --gguf must name a .gguf file; got 'random:tiny-test'"),
])
def test_convert_cli_refuses_bad_flags_and_writes_nothing(tmp_path, args,
                                                          msg):
  result = run_recording_imports(
      ["-m", "launch.convert", *args], timeout=300, cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(
          pathlib.Path(__file__).resolve().parents[1])))
  assert result.returncode != 0
  assert msg in without_import_times(result.stderr)
  assert list(tmp_path.iterdir()) == []
  assert not imported_jax(result.stderr)  # before the slow part starts


def test_convert_cli_keeps_a_checkpoint_given_as_its_own_source(tmp_path):
  """`--gguf=<the checkpoint> --out=<the checkpoint> --overwrite` used to
  replace a good checkpoint with one that cannot load: refused, untouched."""
  good = tmp_path / "ckpt"
  good.mkdir()
  (good / checkpoint.METADATA_FILE).write_text('{"keep": 1}')
  result = run_recording_imports(
      ["-m", "launch.convert", f"--out={good}", f"--gguf={good}",
       "--overwrite"], timeout=300, cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(
          pathlib.Path(__file__).resolve().parents[1])))
  assert result.returncode != 0
  assert "--gguf must name a .gguf file" in result.stderr
  assert [p.name for p in good.iterdir()] == [checkpoint.METADATA_FILE]
  assert (good / checkpoint.METADATA_FILE).read_text() == '{"keep": 1}'


def test_convert_cli_keeps_a_gguf_that_lies_inside_the_checkpoint(tmp_path):
  """`--out=<ckpt> --overwrite` replaces the folder as a whole, so a GGUF
  kept inside it went with the old checkpoint: refused, both untouched."""
  good = tmp_path / "ckpt"
  good.mkdir()
  (good / checkpoint.METADATA_FILE).write_text('{"keep": 1}')
  (good / "model.gguf").write_bytes(b"GGUF-bytes")
  result = run_recording_imports(
      ["-m", "launch.convert", f"--out={good}",
       f"--gguf={good / 'model.gguf'}", "--overwrite"], timeout=300,
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(
          pathlib.Path(__file__).resolve().parents[1])))
  assert result.returncode != 0
  assert "lies inside --out" in result.stderr, result.stderr[-2000:]
  assert sorted(p.name for p in good.iterdir()) == sorted(
      [checkpoint.METADATA_FILE, "model.gguf"])
  assert (good / "model.gguf").read_bytes() == b"GGUF-bytes"


def test_random_load_is_deterministic_per_seed():
  a = load_model("random:tiny-test:layers=1:seed=3")
  b = load_model("random:tiny-test:layers=1:seed=3")
  c = load_model("random:tiny-test:layers=1:seed=4")
  assert a.tokenizer is None and a.config.num_layers == 1
  assert a.weights_id == b.weights_id != c.weights_id
  pa, pb, pc = (jax.tree.leaves(params_of(x.model)) for x in (a, b, c))
  assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
  assert not np.array_equal(pa[0], pc[0])


def test_random_llama_draws_the_op_by_op_initializers_weights(np_rng):
  """`random_llama`'s one compiled initializer draws from a seed what
  `Llama(cfg, rngs=nnx.Rngs(seed))`, run op by op, draws (up to float
  rounding), in float32 and bfloat16, tied head or not; other seeds reuse
  its compiled program and draw other weights."""
  from dualpath_jax.model import llama  # pylint: disable=g-import-not-at-top
  for cfg, tol in ((config.TINY, 1e-6),
                   (config.TINY.replace(dtype="bfloat16", num_layers=3,
                                        tie_embeddings=True), 2**-7)):
    seeds = [0, int(np_rng.integers(1 << 32))]
    drawn = []
    for seed in seeds:
      got = params_of(random_llama(cfg, seed))
      want = params_of(Llama(cfg, rngs=nnx.Rngs(seed)))
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.dtype == y.dtype == jnp.dtype(cfg.dtype)
        np.testing.assert_allclose(np.asarray(x, np.float32),
                                   np.asarray(y, np.float32),
                                   rtol=tol, atol=tol)
      drawn.append(got)
    assert not np.array_equal(drawn[0]["embed_tokens"],
                              drawn[1]["embed_tokens"])
    _, init = llama._jitted_initializer(cfg)  # pylint: disable=protected-access
    assert init._cache_size() == 1  # pylint: disable=protected-access


def test_checkpoint_round_trip(tmp_path, np_rng):
  cfg = config.TINY.replace(tie_embeddings=True)
  model = make_model(cfg, np_rng)
  checkpoint.save_checkpoint(tmp_path / "ckpt", model, weights_id="abc123",
                             tokenizer_gguf=None, source="test")
  with pytest.raises(FileExistsError):
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, weights_id="x",
                               tokenizer_gguf=None)
  loaded = load_model(str(tmp_path / "ckpt"))
  assert loaded.config == cfg and loaded.weights_id == "abc123"
  assert loaded.tokenizer is None and loaded.model.lm_head is None
  want, got = params_of(model), params_of(loaded.model)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="convert again"):
    load_model(str(tmp_path / "ckpt"), dtype="bfloat16")
  # The same config, tokenizer and refusal without reading the weights.
  assert describe_model(str(tmp_path / "ckpt")) == (cfg, None)
  with pytest.raises(ValueError, match="convert again"):
    describe_model(str(tmp_path / "ckpt"), dtype="bfloat16")


def test_describe_model_is_load_model_without_the_weights(tmp_path):
  for source, dtype in (("random:tiny-test:layers=1:seed=3", None),
                        ("random:tiny-test", "bfloat16")):
    loaded = load_model(source, dtype=dtype)
    assert describe_model(source, dtype=dtype) == (loaded.config, None)
  for bad, err in (("random:nope", ValueError), ("random:tiny-test:layers=0",
                                                 ValueError),
                   (str(tmp_path / "no.gguf"), FileNotFoundError),
                   (str(tmp_path / "nothing"), ValueError)):
    with pytest.raises(err):
      describe_model(bad)
  with pytest.raises(ValueError, match="dtype must be one of"):
    describe_model("random:tiny-test", dtype="int4")


def test_sample_token(np_rng):
  sample_token = generate.sample_token
  logits = np_rng.standard_normal(50).astype(np.float32)
  assert sample_token(logits, 0.0, 1.0, np_rng) == int(logits.argmax())
  # A tiny nucleus keeps only the most likely token.
  assert {sample_token(logits, 1.0, 1e-6, np_rng) for _ in range(20)} == {
      int(logits.argmax())}
  # top_p = 0.5 never samples outside the smallest set reaching 50%.
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  allowed = set(order[:np.searchsorted(np.cumsum(probs[order]), 0.5) + 1])
  drawn = {sample_token(logits, 1.0, 0.5, np_rng) for _ in range(200)}
  assert len(allowed) > 1  # 50 normal logits: the 50% nucleus holds several
  assert drawn <= allowed
  assert len(drawn) > 1  # it does sample, not argmax
  with pytest.raises(ValueError):
    sample_token(logits, -1.0, 1.0, np_rng)


@pytest.mark.parametrize("args,msg", [
    (["--prompt=hi", "--temperature=-1"], "need --temperature >= 0"),
    (["--prompt_ids=1,x"], "--prompt_ids: give non-negative integers"),
    (["--prompt_ids=1,9999999"], "generate: prompt ids must lie in the "
     "model's vocabulary of 256 ids"),
    (["--prompt=hi", "--model=random:nope"], "generate: unknown preset"),
    (["--prompt_ids=1", "--attention_impl=flash"],
     "generate: unknown paged-attention implementation 'flash'"),
    (["--prompt_ids=1", "--max_new_tokens=9000"], "exceed max_position"),
    # --chat and --system were ignored with ids; --system without --chat too
    (["--prompt_ids=1", "--chat", "--system=x"],
     "generate: --chat and --system template a --prompt's text"),
    (["--prompt=hi", "--system=x"], "generate: --system is a chat message"),
    (["--prompt=hi"], "generate: random:tiny-test has no tokenizer: use "
     "--prompt_ids"),
])
def test_generate_cli_refuses_bad_input_with_the_reason(args, msg):
  result = run_recording_imports(
      ["-m", "launch.generate", "--model=random:tiny-test", *args],
      timeout=300, cwd=str(pathlib.Path(__file__).resolve().parents[1]))
  assert result.returncode != 0
  error = without_import_times(result.stderr)
  assert msg in error and "Traceback" not in error, error[-2000:]
  assert "python -m launch.generate" not in error  # no docstring dump
  # Refused from the flags and the model's config, before JAX's import.
  assert not imported_jax(result.stderr)


@pytest.mark.parametrize("prompt,kw,msg", [
    ([], {}, "the prompt is empty"),
    ([1, -2], {}, "vocabulary of 256 ids"),
    ([1, 256], {}, "vocabulary of 256 ids"),
    ([1] * 8000, dict(max_new_tokens=193), "8193 tokens exceed max_position"),
    ([1], dict(prefill_chunk=0), "must be >= 1"),
    ([1], dict(attention_impl="flash"), "unknown paged-attention"),
])
def test_check_request_names_what_cannot_run(prompt, kw, msg):
  request = dict(max_new_tokens=4, prefill_chunk=8, attention_impl="xla")
  with pytest.raises(ValueError, match=msg):
    generate.check_request(config.TINY, prompt, **{**request, **kw})
  generate.check_request(config.TINY, [0, 255] * 4, **request)  # fits


def test_generate_cli_refuses_a_bad_request_before_loading_weights(tmp_path):
  """A checkpoint of tiny-test's metadata without its weights: a request
  past max_position is refused for that reason (so nothing read the
  weights), a good request reaches the load and fails there, cleanly."""
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / checkpoint.METADATA_FILE).write_text(json.dumps({
      "format_version": checkpoint.FORMAT_VERSION,
      "config": dataclasses.asdict(config.TINY), "weights_id": "w",
      "tokenizer": {"gguf": None, "embedded": False}, "source": "test"}))
  runs, errors = {}, {}
  for name, extra in (("bad", ["--max_new_tokens=9000"]), ("good", [])):
    runs[name] = run_recording_imports(
        ["-m", "launch.generate", f"--model={ckpt}", "--prompt_ids=1,2,3",
         *extra], timeout=300,
        cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    errors[name] = without_import_times(runs[name].stderr)
    assert runs[name].returncode != 0
    assert "Traceback" not in errors[name], errors[name][-2000:]
  assert "generate: 9003 tokens exceed max_position" in errors["bad"]
  assert "not found" not in errors["bad"]
  assert not imported_jax(runs["bad"].stderr)  # the metadata file alone
  assert (f"generate: checkpoint {ckpt} could not be read: Checkpoint at "
          f"{ckpt / 'state'} not found; it is damaged or incomplete") in (
              errors["good"]), errors["good"][-2000:]


def test_generate_ctrl_c_while_loading_ends_quietly():
  """Ctrl-C during the load (JAX's import and the weights') ends generate
  with one line and exit 130, not a KeyboardInterrupt traceback (also when
  it was started with SIGINT ignored, as interrupt_after starts it)."""
  done = interrupt_after(
      ["launch.generate", "--model=random:tiny-test", "--prompt_ids=1,2,3"],
      "loading random:tiny-test ...", stream="stderr",
      cwd=str(pathlib.Path(__file__).resolve().parents[1]), timeout=120)
  assert done.returncode == 130, done.stderr[-3000:]
  assert "generate: interrupted" in done.stderr
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stdout == ""


def test_generate_cli_json_matches_in_process_generation():
  prompt = [5, 17, 99, 3, 250, 42, 7]
  result = subprocess.run(
      [sys.executable, "-m", "launch.generate", "--model=random:tiny-test",
       "--prompt_ids=" + ",".join(map(str, prompt)), "--max_new_tokens=6",
       "--prefill_chunk=4", "--json"],
      capture_output=True, text=True, check=True, timeout=300,
      cwd=str(pathlib.Path(__file__).resolve().parents[1]))
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["prompt_token_ids"] == prompt and report["text"] == ""
  loaded = load_model("random:tiny-test")
  ids, _ = generate.generate(loaded.model, prompt, max_new_tokens=6,
                             eos_ids=loaded.config.eos_token_ids,
                             prefill_chunk=4)
  assert report["generated_token_ids"] == ids
  assert report["weights_id"] == loaded.weights_id


def test_damaged_checkpoints_are_refused_naming_what(tmp_path, np_rng,
                                                     caplog):
  """Orbax's files carry no checksums: a flipped byte in an array's data
  loaded as a wrong weight without a word. The CRC-32s recorded at save
  time name the damaged array; unreadable files and metadata are
  ValueErrors that name the checkpoint; one written before the CRC-32s
  were recorded still loads, with a warning."""
  model = make_model(config.TINY, np_rng)
  ckpt = tmp_path / "ckpt"
  checkpoint.save_checkpoint(ckpt, model, weights_id="w", tokenizer_gguf=None)
  metadata = json.loads((ckpt / checkpoint.METADATA_FILE).read_text())
  assert set(metadata["state_crc32"]) >= {"embed_tokens",
                                          "layers/attn/q_proj/kernel"}

  def damaged(name):
    copy = tmp_path / name
    shutil.copytree(ckpt, copy)
    return copy

  # One byte in the middle of embed_tokens' stored (zstd, no checksum) chunk,
  # found in Orbax's OCDBT data files by its bytes.
  flipped = damaged("flipped")
  kvstore = ts.KvStore.open({"driver": "ocdbt", "base": {
      "driver": "file", "path": str(flipped / checkpoint.STATE_DIR) + "/"}}
                            ).result()
  chunk = kvstore.read(b"embed_tokens/0.0").result().value
  del kvstore
  hits = [(f, f.read_bytes().find(chunk))
          for f in (flipped / checkpoint.STATE_DIR).rglob("*") if f.is_file()]
  (f, at), = [(f, at) for f, at in hits if at >= 0]
  raw = bytearray(f.read_bytes())
  raw[at + len(chunk) // 2] ^= 0x40
  f.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"is damaged: embed_tokens differ "
                     r"from what was saved \(CRC-32\)"):
    load_model(str(flipped))

  broken = damaged("broken")
  orbax_metadata = broken / checkpoint.STATE_DIR / "_METADATA"
  orbax_metadata.write_bytes(orbax_metadata.read_bytes()[:100])
  with pytest.raises(ValueError, match=f"checkpoint {broken} could not be "
                     "read: .*it is damaged or incomplete"):
    load_model(str(broken))

  ours = damaged("bad_json") / checkpoint.METADATA_FILE
  ours.write_text(ours.read_text()[:50])
  with pytest.raises(ValueError, match="is damaged: not JSON"):
    load_model(str(ours.parent))

  def rewrite(path, changed, checksum=True):
    """The metadata with `changed`, its own CRC-32 recomputed (a writer's
    bug) or not (damage)."""
    changed = {k: v for k, v in changed.items() if k != "metadata_crc32"}
    if checksum:
      changed["metadata_crc32"] = checkpoint.metadata_checksum(changed)
    path.write_text(json.dumps(changed))

  cfg = metadata["config"]
  # One flipped bit in the config (rms_norm_eps 1e-05 -> 1e-01) loaded a
  # different model: the file's own CRC-32 refuses it.
  ours.write_text(json.dumps(dict(metadata, config=dict(cfg,
                                                       rms_norm_eps=0.1))))
  with pytest.raises(ValueError, match="is damaged: its CRC-32 differs"):
    load_model(str(ours.parent))
  rewrite(ours, dict(metadata, config={"vocab_size": 3}))
  with pytest.raises(ValueError, match="holds no whole model config"):
    load_model(str(ours.parent))
  # Fields of the wrong type used to fail later with a traceback.
  for change, what in [
      (dict(weights_id=7), "weights_id must be a string"),
      (dict(tokenizer="x"), "tokenizer must be"),
      (dict(state_crc32=[]), "state_crc32 must map"),
      (dict(config=dict(cfg, num_layers="2")), "config.num_layers = '2'"),
      (dict(config=dict(cfg, dtype=5)), "config.dtype = 5"),
      (dict(config=dict(cfg, eos_token_ids=[10**6])), "token ids [1, 1000000]")]:
    rewrite(ours, dict(metadata, **change))
    with pytest.raises(ValueError, match=f"is damaged: {re.escape(what)}"):
      load_model(str(ours.parent))

  old = damaged("old") / checkpoint.METADATA_FILE
  old.write_text(json.dumps({k: v for k, v in metadata.items()
                             if k not in ("state_crc32", "metadata_crc32")}))
  with caplog.at_level("WARNING"):
    loaded = load_model(str(old.parent))
  assert "records no checksums" in caplog.text
  assert "records no checksum of itself" in caplog.text
  np.testing.assert_array_equal(
      np.asarray(params_of(loaded.model)["embed_tokens"]),
      np.asarray(params_of(model)["embed_tokens"]))


def test_a_checkpoint_records_its_tokenizer_gguf_absolute_and_refuses_a_gguf_name(
    tmp_path, np_rng, monkeypatch):
  """`convert --gguf=model.gguf` recorded the relative path, read later
  against the loader's working directory (another file, or none); an
  output named `*.gguf` wrote a checkpoint no `--model=` could load."""
  model = make_model(config.TINY, np_rng)
  monkeypatch.chdir(tmp_path)
  checkpoint.save_checkpoint(tmp_path / "ckpt", model, weights_id="w",
                             tokenizer_gguf="model.gguf")
  metadata = json.loads((tmp_path / "ckpt" /
                         checkpoint.METADATA_FILE).read_text())
  assert metadata["tokenizer"]["gguf"] == str(tmp_path / "model.gguf")
  with pytest.raises(ValueError, match="named .gguf could not be loaded"):
    checkpoint.check_output_directory(tmp_path / "smol.GGUF")


@pytest.mark.parametrize("source,msg", [
    ("", "the model source is empty"),  # was the working directory
    ("/no/such/ckpt", r"\(no file or directory at /no/such/ckpt\)"),
    ("random:tiny-test:layers=²", "bad option 'layers=²'"),  # was int()'s
    ("random:tiny-test:layers=2:layers=5", "layers given twice"),  # 5 won
])
def test_model_sources_that_name_nothing_say_why(source, msg):
  from dualpath_jax.model import describe_model  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=msg):
    describe_model(source)
