"""The process-wide kernel registry: the catalogue from tessera-specs, the references, and every
backend that can be imported in this environment.

Priorities (highest first): scaled_mm (30, `matmul.fp8` on cuBLASLt), triton (20), cuda (10), sdpa (5),
reference (last resort). Each backend's `supports(...)` decides per call; on CPU tensors only the
reference and sdpa run, unless TRITON_INTERPRET=1 was set before triton was imported.
"""

from __future__ import annotations

import importlib.util

from tessera.kernels import reference, scaled_mm, sdpa
from tessera.specs import CATALOGUE, KernelRegistry


def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _build() -> KernelRegistry:
    reg = KernelRegistry(catalogue={spec.name: spec for spec in CATALOGUE})
    for op, fn in reference.REFERENCES.items():
        reg.register(op, "reference", fn)
    sdpa.register(reg)
    scaled_mm.register(reg)
    if _triton_importable():
        from tessera.kernels import triton as triton_backends

        triton_backends.register(reg)
    from tessera.kernels import cuda

    cuda.register(reg)
    return reg


registry = _build()
