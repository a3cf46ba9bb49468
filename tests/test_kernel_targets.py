"""launch.kernel_targets on made-up report rows: which targets each row is
judged on, the ratio judged, and the verdict at the issue's thresholds."""

from __future__ import annotations

import pytest

from launch.kernel_targets import GATHER_KERNEL, MOSAIC_WS, check_targets

TRITON, MOSAIC = "pallas_triton (ours)", "pallas_mosaic_gpu (ours)"


def _decode(batch, ctx, dtype="bfloat16"):
  return dict(batch=batch, heads=32, kv_heads=8, head_dim=128, page=16,
              ctx=ctx, dtype=dtype)


def _row(kind, impl, shape, **values):
  return dict(kind=kind, impl=impl, shape=shape, **values)


def _by_target(checks, target):
  return [c for c in checks if c["target"] == target]


def test_decode_bandwidth_and_jax_op_thresholds():
  big = _decode(64, 4096)
  rows = [
      _row("decode", TRITON, big, time_us=100.0, gbps=2430.0, kv_mib=512),
      _row("decode", MOSAIC, big, time_us=90.0, gbps=2370.0, kv_mib=512),
      _row("decode", "jax pallas op", big, time_us=124.0, gbps=1900.0,
           kv_mib=512),
  ]
  checks = check_targets(rows, copy_gbps=3000.0)
  bw = _by_target(checks, "decode >= 80% of copy BW")
  assert [c["ok"] for c in bw] == [True, False]  # 81% and 79%
  assert bw[0]["value"] == pytest.approx(0.81)
  assert bw[0]["shape"].startswith("[pallas_triton] batch=64")
  jax_op = _by_target(checks, "decode >= 1.25x JAX's op")
  assert [round(c["value"], 3) for c in jax_op] == [1.24, round(124 / 90, 3)]
  assert [c["ok"] for c in jax_op] == [False, True]


def test_small_batch_long_context_is_held_to_60_percent():
  small = _decode(1, 32768)
  rows = [_row("decode", MOSAIC, small, time_us=50.0, gbps=1850.0,
               kv_mib=128),
          _row("decode", "jax pallas op", small, time_us=80.0, gbps=1.0,
               kv_mib=128)]
  checks = check_targets(rows, copy_gbps=3000.0)
  assert [(c["target"], c["ok"]) for c in checks] == [
      ("decode >= 60% of copy BW", True)]  # 62%; < 256 MiB: no JAX-op check
  # Short contexts and small calls are not judged; nor without a copy BW.
  short = _decode(64, 2048)
  assert check_targets([_row("decode", TRITON, short, time_us=1.0,
                             gbps=1.0, kv_mib=512)], 3000.0) == []
  assert check_targets(rows, copy_gbps=None) == []


def test_int8_against_its_bf16_twin_and_the_fastest_bf16_kernel():
  bf16, int8 = _decode(64, 4096), _decode(64, 4096, "int8")
  rows = [
      _row("decode", TRITON, bf16, time_us=200.0, gbps=1.0, kv_mib=512),
      _row("decode", MOSAIC, bf16, time_us=120.0, gbps=1.0, kv_mib=512),
      _row("decode", MOSAIC_WS, bf16, error="boom"),  # failed: ignored
      _row("decode", TRITON, int8, time_us=100.0, gbps=1.0, kv_mib=256),
  ]
  checks = check_targets(rows, copy_gbps=None)
  twin = _by_target(checks, "int8 decode >= 1.6x bf16 tokens/s")
  best = _by_target(checks, "int8 decode >= 1.6x best bf16 tokens/s")
  assert [(c["value"], c["ok"]) for c in twin] == [(2.0, True)]
  assert [(c["value"], c["ok"]) for c in best] == [(1.2, False)]


def test_prefill_against_cudnn_and_gathers_against_the_plain_transfer():
  pre = dict(batch=1, heads=32, kv_heads=8, head_dim=128, page=16,
             prefix=16384, new=512, dtype="bfloat16")
  copy = dict(layers=2, blocks=64, run_lengths=[1, 4])
  rows = [
      _row("prefill", TRITON, pre, time_us=1.0, tflops=240.0),
      _row("prefill", "cudnn dense (full ctx)", pre, time_us=1.0,
           tflops=500.0),
      _row("copy", "plain pinned->device", copy, time_us=1.0, gbps=50.0),
      _row("copy", "gather host->device (ours)", copy, time_us=1.0,
           gbps=44.0),
      _row("copy", "gather runs of 4 (ours)", copy, time_us=1.0, gbps=40.0),
      _row("copy", GATHER_KERNEL, copy, time_us=1.0, gbps=43.0),
      _row("copy", "scatter device->host (ours)", copy, time_us=1.0,
           gbps=10.0),  # no target
  ]
  checks = check_targets(rows, copy_gbps=3000.0)
  assert [(c["value"], c["ok"]) for c in _by_target(
      checks, "prefill >= 50% of cuDNN TFLOP/s")] == [(0.48, False)]
  gathers = _by_target(checks, "block gather >= 85% of pinned->device")
  assert [(round(c["value"], 2), c["ok"]) for c in gathers] == [
      (0.88, True), (0.8, False), (0.86, True)]
  assert all("run_lengths" not in c["shape"] for c in gathers)
  assert len(checks) == 4
