"""Tessera kernels: one registry, a torch reference for every catalogued op, faster backends beside it.

    from tessera.kernels import registry
    y = registry("rms_norm", x, weight, 1e-6)          # dispatch on the inputs
    impl = registry.get("rms_norm", backend="triton")  # force a backend (raises with reasons)
"""

from tessera.kernels.registry import registry

__all__ = ["registry"]
