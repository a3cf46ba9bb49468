"""One of two JAX processes: cross-process KV hand-offs and a P -> D model turn.

Not a pytest file: tests/test_multiprocess.py starts it twice on localhost,
2 CPU devices per process (XLA_FLAGS), and checks that both exit 0 after
printing `MULTIPROCESS_WORKER_OK process=<id>`. Process 0 gets the launcher
flags (--coordinator_address, --num_processes, --process_id), process 1 the
environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID):
both go through launch/distributed_flags.py.

Both processes run the same program (multi-controller SPMD): every hand-off
is one collective both join, in the same order; model steps run only on the
process that owns the engine's devices. With `--mesh=1P1D --tp=2`:

    P0 = process 0's two CPU devices      D0 = process 1's two CPU devices

1. KV blocks `[n, 2, Hkv, P, D]` (random, same seed on both processes) go
   P0 -> D0 by the ppermute hand-off; process 1 checks them bit for bit.
   Then D0 -> P0 (process 0 checks), then whole blocks `[L, n, 2, Hkv, P, D]`
   (head_axis=3), in float32 and bfloat16, twice per handoff (scratch reuse).
2. A tiny random Llama: process 0 prefills a prefix on P0, its pages go to
   D0 (one hand-off), process 1 writes them into other pages of a garbage
   pool and prefills a suffix + decodes greedily. Its logits must equal,
   bitwise, a reference that process 1 runs entirely on D0.
"""

from __future__ import annotations

import sys
import time

import ml_dtypes
import numpy as np

from dualpath_jax import distributed

T0 = time.perf_counter()
RANK = None


def log(msg: str) -> None:
  print(f"[worker {RANK} {time.perf_counter() - T0:6.2f}s] {msg}", flush=True)


def placed(host: np.ndarray, sharding):
  """`host` as a global array on `sharding`; only local shards are built."""
  import jax
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index],
                                      dtype=host.dtype)


def local(x) -> np.ndarray:
  """A fully addressable array's value on the host."""
  assert x.is_fully_addressable, "not all of x lives on this process"
  return np.asarray(x)


def same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
  assert got.shape == want.shape and got.dtype == want.dtype, (
      what, got.shape, got.dtype, want.shape, want.dtype)
  np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8),
                                err_msg=what)


def check_handoffs(cluster) -> int:
  """Step 1 of the module docstring; returns how many hand-offs ran."""
  from dualpath_jax.transfer import Handoff
  from dualpath_jax.transfer.handoff import head_spec
  p0, d0 = cluster.engine("P0"), cluster.engine("D0")
  owner = {p0.name: 0, d0.name: 1}
  cases = [  # (src, dst, shape, head_axis)
      (p0, d0, (5, 2, 4, 8, 16), 2),     # one layer's blocks [n, 2, Hkv, P, D]
      (d0, p0, (3, 2, 4, 8, 16), 2),     # the way back
      (p0, d0, (2, 6, 2, 4, 8, 16), 3),  # whole blocks [L, n, 2, Hkv, P, D]
  ]
  count = 0
  for seed, (src, dst, shape, head_axis) in enumerate(cases):
    for d, dtype in enumerate((np.float32, ml_dtypes.bfloat16)):
      for m, method in enumerate(("auto", "ppermute")):
        handoff = Handoff(src, dst, method, head_axis=head_axis)
        assert handoff.method == "ppermute", handoff.method
        for repeat in range(2):
          rng = np.random.default_rng([seed, d, m, repeat])
          host = rng.standard_normal(shape).astype(dtype)
          x = placed(host, src.sharding(head_spec(len(shape), head_axis)))
          y = handoff(x)
          count += 1
          what = (f"{src.name}->{dst.name} {shape} {np.dtype(dtype).name} "
                  f"{method} #{repeat}")
          assert y.shape == host.shape and y.dtype == host.dtype, what
          assert y.sharding.is_equivalent_to(
              dst.sharding(head_spec(len(shape), head_axis)), len(shape)), what
          if RANK == owner[dst.name]:
            same_bits(local(y), host, what)
            assert {d.id for d in y.devices()} == {d.id for d in dst.devices}
          else:
            assert not y.addressable_shards, what
  log(f"{count} cross-process hand-offs bit-exact")
  return count


def check_model_turn(cluster) -> None:
  """Step 2 of the module docstring."""
  import jax
  from flax import nnx

  from dualpath_jax import config
  from dualpath_jax.model.llama import random_llama
  from dualpath_jax.model.runner import ModelRunner
  from dualpath_jax.transfer import Handoff
  from dualpath_jax.transfer.handoff import head_spec

  block = 8
  cfg = config.TINY
  cache = config.CacheConfig(block_size=block, num_blocks=16)
  rng = np.random.default_rng(20261126)  # same draws on both processes
  weights_seed = int(rng.integers(1 << 30))
  prefix = rng.integers(3, cfg.vocab_size, 3 * block).tolist()
  suffix = rng.integers(3, cfg.vocab_size, 5).tolist()
  kv_shape = (cfg.num_layers, cache.num_blocks, 2, cfg.num_kv_heads, block,
              cfg.head_dim)
  garbage = rng.standard_normal(kv_shape).astype(np.float32)
  p_pages, d_pages = [3, 7, 1], [10, 2, 12, 4, 0]  # d: prefix, then suffix
  p0, d0 = cluster.engine("P0"), cluster.engine("D0")
  mine = p0 if RANK == 0 else d0

  # The engine's runner, as PDCluster builds it: weights replicated on its
  # sub-mesh, the pool split over the KV heads.
  graphdef, state = nnx.split(random_llama(cfg, weights_seed))
  runner = ModelRunner(
      nnx.merge(graphdef, jax.device_put(state, mine.sharding())), cache)

  def pool():
    return jax.device_put(garbage, mine.kv_pool_sharding())

  def step(kv, tokens, pages, start):
    n = len(tokens)
    table = np.full((1, 8), pages[0], np.int32)
    table[0, :len(pages)] = pages
    pos = np.arange(start, start + n)
    slots = (table[0, pos // block] * block + pos % block)[None]
    logits, kv = runner.step(kv, np.asarray([tokens], np.int32), table,
                             np.array([start + n], np.int32),
                             np.array([n], np.int32), slots.astype(np.int32))
    return np.asarray(logits[0]), kv

  def finish(kv, pages):
    """Suffix prefill then 3 greedy steps on `pages`; every step's logits."""
    out = []
    logits, kv = step(kv, suffix, pages, len(prefix))
    out.append(logits)
    pos = len(prefix) + len(suffix)
    for _ in range(3):
      logits, kv = step(kv, [int(np.argmax(out[-1]))], pages, pos)
      out.append(logits)
      pos += 1
    return out

  take = jax.jit(lambda kv, pages: kv[:, pages])  # -> [L, n, 2, Hkv, P, D]
  blocks_shape = (kv_shape[0], len(p_pages)) + kv_shape[2:]
  handoff = Handoff(p0, d0, head_axis=3)  # "auto": ppermute across processes
  if RANK == 0:
    _, kv = step(pool(), prefix, p_pages, 0)
    blocks = take(kv, np.asarray(p_pages, np.int32))
    blocks = jax.device_put(blocks, p0.sharding(head_spec(6, 3)))
  else:  # owns none of P0: an array with no local shards joins the collective
    blocks = jax.make_array_from_callback(
        blocks_shape, p0.sharding(head_spec(6, 3)), lambda index: None,
        dtype=np.float32)
  moved = handoff(blocks)
  if RANK == 0:
    assert not moved.addressable_shards
    log("model: prefix prefilled on P0 and handed to D0")
    return
  put = jax.jit(lambda kv, pages, b: kv.at[:, pages].set(b),
                donate_argnums=(0,))
  kv = put(pool(), np.asarray(d_pages[:len(p_pages)], np.int32), moved)
  got = finish(kv, d_pages)

  ref_pages = [5, 6, 9, 11, 13]
  _, kv = step(pool(), prefix, ref_pages, 0)
  want = finish(kv, ref_pages)
  assert len(got) == len(want) == 4
  for i, (g, w) in enumerate(zip(got, want)):
    same_bits(g, w, f"logits of step {i}")
  log("model: decode on D0 after the cross-process move == D0 alone, bitwise")


def main(argv: list[str]) -> None:
  global RANK
  from absl import flags

  from launch import distributed_flags
  flags.FLAGS(argv)
  config = distributed_flags.config_from_flags()
  assert config.num_processes == 2, config
  assert distributed_flags.initialize_from_flags()
  assert distributed.initialize(config), "a second call must be a no-op"
  import jax
  RANK = jax.process_index()
  assert RANK == config.process_id
  log(distributed.describe())
  assert jax.process_count() == 2
  assert jax.local_device_count() == 2, jax.local_devices()
  assert jax.device_count() == 4, jax.devices()

  from dualpath_jax.transfer import MeshConfig, build_cluster_mesh
  # jax.devices() lists process 0's devices first (jax_sort_devices_by_
  # process_index, on by default); sort anyway so P0 = process 0.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  cluster = build_cluster_mesh(MeshConfig.parse("1P1D", tp=2), devices)
  for name, process in (("P0", 0), ("D0", 1)):
    owners = {d.process_index for d in cluster.engine(name).devices}
    assert owners == {process}, (name, owners)
  assert not cluster.shared

  check_handoffs(cluster)
  check_model_turn(cluster)
  print(f"MULTIPROCESS_WORKER_OK process={RANK}", flush=True)


if __name__ == "__main__":
  try:
    main(sys.argv)
  except BaseException:  # show it, then leave without waiting for the peer
    import traceback
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    import os
    os._exit(1)
