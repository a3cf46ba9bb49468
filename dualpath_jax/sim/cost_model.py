"""What each simulated action costs: a roofline model of one engine.

The simulator (`sim.simulator`) charges time for three things an engine
does, from the model's shape and the GPU's datasheet numbers:

* **prefill** of a batch of chunks, each `new` tokens attending to `past`
  cached tokens before it: matmul FLOPs `2 * P * new` (P: the weights a
  token passes through; the LM head only for the last token of a chunk)
  plus attention FLOPs `4 * L * H * D * (new * past + new * (new + 1) / 2)`
  (QK^T and PV, causal inside the chunk), at `prefill_mfu` of the engine's
  peak bf16 FLOP/s;
* **one decode step** of a batch: the larger of reading the weights once
  plus every sequence's KV cache at `decode_bw_efficiency` of the HBM
  bandwidth, and its FLOPs at `prefill_mfu` of peak (large batches turn
  compute-bound);
* `step_overhead_s` per forward (launches, sampling, the host loop).

An engine is `tp` GPUs (tensor parallel): FLOP/s, HBM bandwidth and HBM
capacity scale by `tp`; its pool holds the HBM left after the weights and
an activation reserve, in blocks of `block_size` tokens of every layer.

These are estimates, not measurements: `prefill_mfu` and
`decode_bw_efficiency` default to values typical of tuned serving stacks
on Hopper (docs/simulator.md), and every one of them is a flag of
`launch.simulate`. What the simulator is for is comparing policies on the
same costs, not predicting a deployment's absolute latency.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from dualpath_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """Datasheet numbers of one accelerator.

  Attributes:
    name: for reports.
    bf16_tflops: dense bf16 peak, TFLOP/s.
    hbm_gb_s: HBM bandwidth, GB/s (1e9 bytes).
    hbm_gib: HBM capacity, GiB.
  """

  name: str
  bf16_tflops: float
  hbm_gb_s: float
  hbm_gib: float

  def __post_init__(self):
    for field in ("bf16_tflops", "hbm_gb_s", "hbm_gib"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and math.isfinite(value)
              and value > 0):
        raise ValueError(f"{self.name}: {field} must be a finite number > 0, "
                         f"got {value!r}")


# SXM parts, dense bf16 (no sparsity).
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100-sxm", bf16_tflops=989.0, hbm_gb_s=3350.0,
                    hbm_gib=80.0),
    "h200": GpuSpec("h200-sxm", bf16_tflops=989.0, hbm_gb_s=4800.0,
                    hbm_gib=141.0),
}


def get_gpu(name: str) -> GpuSpec:
  """The preset called `name` (a key of `GPUS`)."""
  try:
    return GPUS[name]
  except KeyError:
    raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(GPUS)}"
                     ) from None


def _check_fraction(name: str, value: float) -> None:
  if not (isinstance(value, (int, float)) and 0 < value <= 1):
    raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Seconds and bytes of one engine's actions (see the module docstring).

  Attributes:
    model: the served model's shape.
    gpu: the accelerator.
    tp: GPUs per engine.
    block_size: tokens per KV block (the unit stored, loaded and handed off).
    kv_bytes: bytes per KV element (2: bf16; 1: int8).
    weight_bytes_per_param: bytes per weight (2: bf16).
    prefill_mfu: fraction of peak FLOP/s a prefill (and a compute-bound
      decode step) reaches.
    decode_bw_efficiency: fraction of HBM bandwidth a decode step reaches.
    step_overhead_s: fixed seconds per forward.
    activation_reserve: fraction of HBM kept out of the KV pool.
    kv_pool_blocks: the pool's size in blocks, overriding what HBM holds
      (to study capacity, or to match a runtime's configured pool).
  """

  model: ModelConfig
  gpu: GpuSpec
  tp: int = 1
  block_size: int = 64
  kv_bytes: int = 2
  weight_bytes_per_param: int = 2
  prefill_mfu: float = 0.5
  decode_bw_efficiency: float = 0.7
  step_overhead_s: float = 0.002
  activation_reserve: float = 0.1
  kv_pool_blocks: int | None = None

  def __post_init__(self):
    for field in ("tp", "block_size", "kv_bytes", "weight_bytes_per_param"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be an int >= 1, got {value!r}")
    if self.model.num_kv_heads % self.tp:
      raise ValueError(f"tp={self.tp} does not divide the "
                       f"{self.model.num_kv_heads} KV heads of "
                       f"{self.model.name} (the pool is split by KV head)")
    _check_fraction("prefill_mfu", self.prefill_mfu)
    _check_fraction("decode_bw_efficiency", self.decode_bw_efficiency)
    if not (0 <= self.activation_reserve < 1):
      raise ValueError("activation_reserve must be in [0, 1), got "
                       f"{self.activation_reserve!r}")
    if not (isinstance(self.step_overhead_s, (int, float))
            and math.isfinite(self.step_overhead_s)
            and self.step_overhead_s >= 0):
      raise ValueError("step_overhead_s must be a finite number >= 0, got "
                       f"{self.step_overhead_s!r}")
    if self.kv_pool_blocks is not None and (
        isinstance(self.kv_pool_blocks, bool) or
        not isinstance(self.kv_pool_blocks, int) or self.kv_pool_blocks < 1):
      raise ValueError("kv_pool_blocks must be an int >= 1 (or None), got "
                       f"{self.kv_pool_blocks!r}")
    if self.pool_blocks < 1:
      raise ValueError(
          f"{self.model.name} ({self.weight_bytes / 2**30:.1f} GiB of weights) "
          f"leaves no room for one KV block on {self.tp} x {self.gpu.name}")

  # ---- shapes ----
  @property
  def layer_params(self) -> int:
    """Weights one token passes through in every layer (attention + MLP)."""
    m = self.model
    attn = m.hidden_size * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    mlp = 3 * m.hidden_size * m.intermediate_size
    return m.num_layers * (attn + mlp)

  @property
  def head_params(self) -> int:
    return self.model.vocab_size * self.model.hidden_size

  @property
  def weight_bytes(self) -> int:
    """All weights of the model (embedding and head counted once if tied)."""
    embed = self.head_params * (1 if self.model.tie_embeddings else 2)
    return (self.layer_params + embed) * self.weight_bytes_per_param

  @property
  def kv_bytes_per_token(self) -> int:
    m = self.model
    return m.num_layers * 2 * m.num_kv_heads * m.head_dim * self.kv_bytes

  @property
  def block_bytes(self) -> int:
    """Bytes of one block: `block_size` tokens of K and V in every layer."""
    return self.block_size * self.kv_bytes_per_token

  @property
  def pool_blocks(self) -> int:
    """KV blocks an engine's HBM holds beside the weights and the reserve."""
    if self.kv_pool_blocks is not None:
      return self.kv_pool_blocks
    hbm = self.tp * self.gpu.hbm_gib * 2**30 * (1 - self.activation_reserve)
    return int((hbm - self.weight_bytes) // self.block_bytes)

  # ---- rates ----
  @property
  def _flops_per_s(self) -> float:
    return self.tp * self.gpu.bf16_tflops * 1e12 * self.prefill_mfu

  @property
  def _bytes_per_s(self) -> float:
    return self.tp * self.gpu.hbm_gb_s * 1e9 * self.decode_bw_efficiency

  def _attention_flops(self, new: int, past: int) -> float:
    m = self.model
    pairs = new * past + new * (new + 1) / 2
    return 4.0 * m.num_layers * m.num_heads * m.head_dim * pairs

  def prefill_flops(self, chunks: Sequence[tuple[int, int]]) -> float:
    """FLOPs of prefilling `chunks`, each `(new_tokens, past_tokens)`."""
    flops = 0.0
    for new, past in chunks:
      if new <= 0:
        continue
      flops += 2.0 * self.layer_params * new + 2.0 * self.head_params
      flops += self._attention_flops(new, past)
    return flops

  def prefill_s(self, chunks: Sequence[tuple[int, int]]) -> float:
    """Seconds of one prefill forward over `chunks` (`(new, past)` each)."""
    return self.prefill_flops(chunks) / self._flops_per_s + self.step_overhead_s

  def decode_step_s(self, contexts: Sequence[int]) -> float:
    """Seconds of one decode step for sequences holding `contexts` tokens."""
    if not contexts:
      return 0.0
    kv = sum(contexts)
    read = self.weight_bytes + kv * self.kv_bytes_per_token
    flops = (len(contexts) * 2.0 * (self.layer_params + self.head_params) +
             4.0 * self.model.num_layers * self.model.num_heads *
             self.model.head_dim * kv)
    return (max(read / self._bytes_per_s, flops / self._flops_per_s) +
            self.step_overhead_s)

  def prefill_tokens_per_s(self) -> float:
    """The scheduler's estimate of prefill throughput: matmul FLOPs only.

    Attention's share grows with the context; the scheduler's cost model
    (`scheduler.policies`) takes one rate per engine, and the simulator
    charges the full cost. The gap is deliberate: a runtime would feed
    the scheduler an estimate too.
    """
    return self._flops_per_s / (2.0 * self.layer_params)

  def describe(self) -> dict:
    """The derived numbers a report records beside the inputs."""
    return {
        "model": self.model.name, "gpu": dataclasses.asdict(self.gpu),
        "tp": self.tp, "block_size": self.block_size,
        "kv_bytes": self.kv_bytes,
        "weight_bytes_per_param": self.weight_bytes_per_param,
        "prefill_mfu": self.prefill_mfu,
        "decode_bw_efficiency": self.decode_bw_efficiency,
        "step_overhead_s": self.step_overhead_s,
        "activation_reserve": self.activation_reserve,
        "kv_pool_blocks": self.kv_pool_blocks,
        "weight_bytes": self.weight_bytes,
        "kv_bytes_per_token": self.kv_bytes_per_token,
        "block_bytes": self.block_bytes, "pool_blocks": self.pool_blocks,
        "prefill_tokens_per_s_estimate": self.prefill_tokens_per_s(),
    }
