"""Version shims for the Pallas APIs used by the kernels.

The kernels must run on jax 0.10.x (CPU CI image) and 0.11.x (GPU image).
Names that moved between releases are resolved here, once, so kernel code
never branches on the jax version.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# The Pallas GPU (Triton lowering) module is `pallas.triton`; releases before
# it existed called it `pallas.gpu`. Its compiler-params class was called
# `TritonCompilerParams` before jax 0.6.
try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.pallas import gpu as plgpu

_TritonParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_TpuParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def triton_params(num_warps: int, num_stages: int):
    """Triton compiler parameters (class renamed across jax releases)."""
    return _TritonParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics, vmem_limit_bytes=None):
    """Mosaic TPU compiler parameters (class renamed across jax releases).

    vmem_limit_bytes None keeps Mosaic's default scoped-VMEM limit.
    """
    extra = {} if vmem_limit_bytes is None else dict(vmem_limit_bytes=int(vmem_limit_bytes))
    return _TpuParams(dimension_semantics=tuple(dimension_semantics), **extra)


def tpu_interpret():
    """The `interpret=` value that runs a Mosaic TPU kernel on CPU.

    Since jax 0.5 TPU kernels are interpreted by a TPU-semantics interpreter
    (DMAs, semaphores, SMEM/VMEM) selected by passing `pltpu.InterpretParams()`;
    plain `interpret=True` would use the generic interpreter, which ignores
    TPU memory spaces. Older releases only had the generic one.
    """
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def vmem(shape, dtype):
    """A VMEM scratch buffer spec (`pltpu.VMEM` became a MemorySpace member)."""
    space = getattr(pltpu, "VMEM", None)
    if space is None:
        space = pltpu.MemorySpace.VMEM
    return space(shape, dtype)


def backend() -> str:
    """'gpu', 'tpu' or 'cpu' for the default JAX backend."""
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


__all__ = ["pl", "plgpu", "pltpu", "triton_params", "tpu_params", "tpu_interpret", "vmem", "backend"]
