"""The engine's hot tier in `pinned_host` memory on a CUDA GPU: blocks of a
served model's shape moved between the pinned tier and the device pool by
`kernels.block_copy` (the gather is the one Pallas kernel there), compared
page by page with numpy; and an engine whose evicted prefix comes back from
a pinned tier generating the tokens of one that recomputes it.

scripts/gpu_check.sh runs it in the gather's own pytest process (a crash in
how XLA hands a pinned operand to a kernel loses nothing else), beside
tests/test_hot_tier_memory.py and tests/test_hot_tier.py, the CPU cases,
which run on the GPU as they are.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dualpath_jax.cache.hot_tier import HotTier
from dualpath_jax.config import CacheConfig, EngineConfig
from dualpath_jax.engine.factory import make_engine
from dualpath_jax.engine.request import TurnRequest
from dualpath_jax.model import load_model
from kernels import block_copy

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a CUDA GPU; tests/test_hot_tier_memory.py runs the same "
    "operations on CPU")

# Llama-3-8B's KV heads and head_dim, 16-token pages, 4 layers (512 KiB a
# block in bf16): the Triton gather's tiles.
BLOCK = (4, 2, 8, 16, 128)


@pytest.mark.parametrize("memory", ["pageable", "pinned_host"])
def test_model_shaped_blocks_move_exactly(memory):
  import ml_dtypes
  dtype = np.dtype(ml_dtypes.bfloat16)
  rng = np.random.default_rng(0)
  n, pages = 100, 256
  tier = HotTier(160, BLOCK, dtype, memory=memory)
  if memory == "pinned_host":
    assert block_copy.resolve_gather("auto", (160, *BLOCK)) == "pallas_triton"
  blocks = rng.standard_normal((n, *BLOCK)).astype(dtype)
  ids = [b"b%d" % i for i in range(n)]
  filler = [b"f%d" % i for i in range(60)]
  tier.put(filler, blocks[:60])  # the timed blocks' slots scattered
  tier.discard(filler[::2])
  assert tier.put(ids, blocks) == n
  pool = jax.device_put(rng.standard_normal(
      (BLOCK[0], pages, *BLOCK[1:])).astype(dtype), jax.devices()[0])
  want = np.asarray(pool).copy()
  dst = rng.permutation(pages)[:n].tolist()
  want[:, dst] = np.swapaxes(blocks, 0, 1)
  pool, moved = tier.read_run_to_pool(ids, pool, dst)
  assert moved == n
  np.testing.assert_array_equal(np.asarray(pool), want)
  # Back from other pages into new ids, read out through the host.
  src = rng.permutation(pages)[:n].tolist()
  back = [b"w%d" % i for i in range(n)]
  tier.discard(ids)
  assert tier.put_from_pool(back, pool, src) == n
  out = np.empty((n, *BLOCK), dtype)
  assert tier.read_run(back, out) == n
  np.testing.assert_array_equal(out, np.swapaxes(want[:, src], 0, 1))
  if memory == "pinned_host":
    assert tier._blocks._data.sharding.memory_kind == "pinned_host"


def test_engine_serves_an_evicted_prefix_from_a_pinned_tier_exactly():
  tiny = load_model("random:tiny-test")
  bs = 4
  c = tiny.config
  block_bytes = c.num_layers * 2 * c.num_kv_heads * bs * c.head_dim * 4
  prompt = np.random.default_rng(1).integers(3, 256, size=41).tolist()

  def serve(memory):
    engine = make_engine(
        tiny, CacheConfig(block_size=bs, num_blocks=16),
        EngineConfig(max_batch_size=2, max_prefill_chunk=16, max_context=128),
        hot_tier_bytes=64 * block_bytes if memory else 0,
        hot_tier_memory=memory or "pageable")
    outs = []
    for rid, p in [("a", prompt)] + [
        (f"x{k}", np.random.default_rng(10 + k).integers(3, 256, 45).tolist())
        for k in range(3)] + [("b", prompt + [5, 6, 7])]:
      engine.submit(TurnRequest(rid, p, 4, stop_on_eos=False))
      while engine.has_work():
        outs += engine.step()
    engine.close()
    return outs[-1]

  plain, pinned = serve(None), serve("pinned_host")
  assert plain.cached_prompt_tokens == 0  # the pool forgot the prefix
  assert pinned.cached_prompt_tokens == 40
  assert pinned.generated_tokens == plain.generated_tokens
