"""The process-wide kernel registry: the catalogue from tessera-specs, the references, and every
backend module that imports cleanly in this environment."""

from __future__ import annotations

from tessera.kernels import reference
from tessera.specs import CATALOGUE, KernelRegistry


def _build() -> KernelRegistry:
    reg = KernelRegistry(catalogue={spec.name: spec for spec in CATALOGUE})
    for op, fn in reference.REFERENCES.items():
        reg.register(op, "reference", fn)
    return reg


registry = _build()
