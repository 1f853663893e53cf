"""Tessera kernels: one registry, a torch reference for every catalogued op, faster backends beside it.

    from tessera.kernels import registry
    y = registry("rms_norm", x, weight, 1e-6)          # dispatch on the inputs
    impl = registry.get("rms_norm", backend="triton")  # force a backend (raises with reasons)

    with static_weights():                              # a forward whose GEMV weights are parameters:
        logits = model(ids)                             # decode GEMVs fetch weights before the PDL wait
"""

from tessera.kernels.registry import registry
from tessera.kernels.support import static_weights, weights_static

__all__ = ["registry", "static_weights", "weights_static"]
