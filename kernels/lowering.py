"""Exporting the kernels for hardware this host lacks.

`jax.export` lowers a jitted function for a platform other than the host's.
For CUDA, the Pallas Triton lowering asks (from jax 0.11) for the device's
compute capability and, with no GPU attached, takes it from an abstract
device: `abstract_cuda_target` lends it an H100. `triton_modules` also keeps
the Triton IR the lowering produced on the way, as text, for a compiler to
take further (`launch.kernel_sass` compiles it for sm_90 and reads the
machine code).

The tests use this to check that the kernels lower (tests/
test_kernels_lowering.py); nothing here runs a kernel.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import jax
from jax import export

# The custom calls the GPU and TPU kernels lower to.
CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call")
HOPPER_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


def abstract_cuda_target():
  """A context in which CUDA lowering sees an abstract H100 (sm_90).

  jax 0.10 does not ask for the device and takes the same context
  unchanged."""
  device = jax.sharding.AbstractDevice(device_kind=HOPPER_DEVICE_KIND,
                                       num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def export_mlir(fn: Callable[..., Any], args: Sequence[Any],
                platform: str) -> str:
  """The StableHLO text of `jax.jit(fn)` exported for `platform` ("cuda" or
  "tpu") on `args` (arrays or `jax.ShapeDtypeStruct`s)."""
  checks = [export.DisabledSafetyCheck.custom_call(n) for n in CUSTOM_CALLS]
  target = (abstract_cuda_target() if platform == "cuda"
            else contextlib.nullcontext())
  with target:
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=checks)(*args)
  return exported.mlir_module()


@contextlib.contextmanager
def _capturing_triton_modules() -> Iterator[list[str]]:
  """Collects the text of every Triton module the Pallas lowering builds
  while the context is open. This hooks a private function of JAX (for the
  whole process, so not while other threads lower kernels); a JAX without
  it gets a RuntimeError that says so."""
  try:
    from jax._src.pallas.triton import lowering as triton_lowering
  except ImportError as e:
    raise RuntimeError(f"this JAX has no Pallas Triton lowering: {e}") from e
  name = "lower_jaxpr_to_triton_module"
  original = getattr(triton_lowering, name, None)
  if original is None:
    raise RuntimeError(f"jax {jax.__version__}: the Pallas Triton lowering "
                       f"has no {name} to read the Triton IR from")
  modules: list[str] = []

  def lower_and_keep(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  setattr(triton_lowering, name, lower_and_keep)
  try:
    yield modules
  finally:
    setattr(triton_lowering, name, original)


def triton_modules(fn: Callable[..., Any], args: Sequence[Any]) -> list[str]:
  """The Triton IR (MLIR text, `tt` dialect) of every Pallas Triton kernel
  in `jax.jit(fn)(*args)`, lowered for an H100, in call order."""
  with _capturing_triton_modules() as modules:
    export_mlir(fn, args, "cuda")
  if not modules:
    raise ValueError("the function lowers no Pallas Triton kernel")
  return list(modules)
