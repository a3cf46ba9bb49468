"""Configuration dataclasses: the one place where defaults live.

Every capacity the system has (device pages, batch sizes, chunk lengths) is an
explicit field here; launchers only parse flags into these dataclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from dualpath_jax.utils import is_integer


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU)."""

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_position: int = 8192
  tie_embeddings: bool = True
  dtype: str = "float32"  # activation and weight dtype
  bos_token_id: int = 1
  eos_token_ids: tuple[int, ...] = (2,)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads}")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def fingerprint(self) -> str:
    """Stable hex digest of the architecture; part of every block identity."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


SMOLLM2_135M = ModelConfig(
    name="smollm2-135m-instruct",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position=8192,
    tie_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
)

# Random-initialised shapes of larger models, for throughput work. Use
# `.replace(num_layers=...)` to shrink them to what a machine holds.
LLAMA3_8B = ModelConfig(
    name="llama3-8b-shape",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position=131072,
    tie_embeddings=False,
    dtype="bfloat16",
    bos_token_id=128000,
    eos_token_ids=(128001, 128009),
)

QWEN25_32B = ModelConfig(
    name="qwen2.5-32b-shape",
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=27648,
    num_layers=64,
    num_heads=40,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position=32768,
    tie_embeddings=False,
    dtype="bfloat16",
    bos_token_id=151643,
    eos_token_ids=(151645, 151643),
)

TINY = ModelConfig(
    name="tiny-test",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position=1024,
    tie_embeddings=False,
    bos_token_id=1,
    eos_token_ids=(2,),
)

MODEL_PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SMOLLM2_135M, LLAMA3_8B, QWEN25_32B, TINY)
}


# The dtypes a KV pool (and the model computing into it) may have.
KV_DTYPES = ("float32", "bfloat16", "float16")

# The names `kernels.paged_attention` registers (its IMPLEMENTATIONS; a test
# keeps the two equal), so that a config refuses an unknown one without
# importing the kernels and JAX.
ATTENTION_IMPLEMENTATIONS = ("pallas_mosaic_gpu", "pallas_mosaic_tpu",
                             "pallas_triton", "xla", "xla_chunked")


def check_attention_impl(name: str) -> None:
  """ValueError unless `name` is a registered paged-attention
  implementation or "auto" (the one message for configs, the runner and the
  launchers)."""
  if name != "auto" and name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown paged-attention implementation {name!r}; "
                     f"available: {sorted(ATTENTION_IMPLEMENTATIONS)} or "
                     "'auto'")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Paged KV cache in device memory.

  A block (= page) holds `block_size` tokens of K and V for one layer; the pool
  for all layers is one array `[num_layers, num_blocks, 2, num_kv_heads,
  block_size, head_dim]` so a block of one layer is one contiguous region.
  """

  block_size: int = 16
  num_blocks: int = 2048  # device pages per layer
  dtype: str = "float32"

  def __post_init__(self):
    if self.block_size <= 0 or self.num_blocks <= 0:
      raise ValueError("block_size and num_blocks must be positive")
    if self.dtype not in KV_DTYPES:
      raise ValueError(f"cache dtype must be one of {KV_DTYPES}; got "
                       f"{self.dtype!r}")

  def bytes_per_block(self, model: ModelConfig) -> int:
    """Bytes of one block across all layers (K and V)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import numpy as np
    itemsize = np.dtype(self.dtype).itemsize
    return (model.num_layers * 2 * model.num_kv_heads * self.block_size *
            model.head_dim * itemsize)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Batching limits of one engine."""

  max_batch_size: int = 8  # sequences decoded together
  max_prefill_chunk: int = 512  # new tokens per prefill step and sequence
  max_context: int = 8192  # longest context one sequence may reach
  attention_impl: str = "auto"  # see kernels.paged_attention
  greedy: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  # Turns admitted together pick up the blocks of a shared prompt prefix
  # that the turns ahead of them computed (n samples of one prompt prefill
  # it once; on the P/D cluster a turn waits to be placed while another
  # prefills its next block). False: each computes it (a baseline).
  share_prefill: bool = True
  # One engine over a cold tier reads a returning turn's prefix on a
  # reader thread while it serves its other turns (it waits only when it
  # has nothing else to do). False: the read stalls every turn (a
  # baseline). The P/D cluster's loads are asynchronous either way.
  async_cold_loads: bool = True
  # While the turn heading the queue waits for its cold read, the turns
  # behind it that need none (their prefix is in the pool or the hot tier)
  # may take a free batch slot ahead of it. False: strict arrival order (a
  # baseline).
  admit_while_reading: bool = True

  def __post_init__(self):
    for name in ("share_prefill", "async_cold_loads", "admit_while_reading"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool; got "
                         f"{getattr(self, name)!r}")
    # A zero here would not fail: an engine that may batch no sequence, or
    # prefill no token a step, waits forever.
    for name in ("max_batch_size", "max_prefill_chunk", "max_context"):
      value = getattr(self, name)
      if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
      # A NumPy integer (from a config file or a sweep) is taken, stored
      # as a Python int: reports and fingerprints serialise it as JSON.
      object.__setattr__(self, name, int(value))
    check_attention_impl(self.attention_impl)
    check_sampling(self.temperature, self.top_p)


def check_max_context(max_context: int, model: ModelConfig) -> None:
  """ValueError if an engine's `max_context` is past the model's context
  (`max_position`): the engine factory's check, which the launchers run
  before the weights load."""
  if max_context > model.max_position:
    raise ValueError(f"max_context {max_context} exceeds the model's "
                     f"context {model.max_position}")


def check_sampling(temperature: float, top_p: float) -> None:
  """ValueError unless 0 <= temperature < inf and 0 < top_p <= 1 (NaN
  fails): the one check of sampling settings, for configs, the sampler and
  the launchers."""
  if not 0 <= temperature < float("inf") or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got "
                     f"{temperature}, {top_p}")


def to_dict(obj: Any) -> dict:
  """JSON-ready dict of a config dataclass (for reports)."""
  return dataclasses.asdict(obj)
