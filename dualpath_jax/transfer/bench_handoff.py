"""Times the two hand-off methods (device_put vs ppermute) between two engines.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m dualpath_jax.transfer.bench_handoff --tp=1,2 --blocks=16,64

Prints one JSON line per (tp, blocks, method): median seconds and GB/s of
moving one layer's blocks `[n, 2, Hkv, P, D]` from engine D0 to engine P0.
The XLA_FLAGS line must be set before JAX starts (it creates the CPU devices).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from dualpath_jax.transfer.config import MeshConfig
from dualpath_jax.transfer.handoff import Handoff, head_spec
from dualpath_jax.transfer.mesh import build_cluster_mesh

_TP = flags.DEFINE_list("tp", ["1", "2"], "tensor-parallel sizes to try")
_BLOCKS = flags.DEFINE_list("blocks", ["16", "64"], "blocks per layer moved")
_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads")
_PAGE = flags.DEFINE_integer("block_size", 16, "tokens per block")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed repeats")


def main(argv):
  del argv
  for tp in map(int, _TP.value):
    cluster = build_cluster_mesh(MeshConfig(1, 1, tp, tp,
                                            allow_shared_devices=False))
    pe, de = cluster.prefill[0], cluster.decode[0]
    for n in map(int, _BLOCKS.value):
      shape = (n, 2, _HEADS.value, _PAGE.value, _HEAD_DIM.value)
      x = jax.device_put(
          np.random.default_rng(0).standard_normal(shape, np.float32),
          de.sharding(head_spec(5, 2)))
      for method in ("device_put", "ppermute"):
        move = Handoff(de, pe, method)
        move(x).block_until_ready()  # compile / warm
        times = []
        for _ in range(_REPEATS.value):
          t0 = time.perf_counter()
          move(x).block_until_ready()
          times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(json.dumps({
            "backend": jax.default_backend(), "tp": tp, "blocks": n,
            "bytes": x.nbytes, "method": method, "median_s": med,
            "GB_per_s": x.nbytes / med / 1e9}))


if __name__ == "__main__":
  app.run(main)
