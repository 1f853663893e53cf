"""Triton backends, one module per op family. Imported (and registered) only when `import triton` works.

On CUDA tensors they run compiled; on CPU tensors they run only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is imported), which the CPU parity tests use.
"""

from __future__ import annotations

from tessera.kernels.support import triton_interpreting
from tessera.specs import KernelRegistry


def register(reg: KernelRegistry) -> None:
    if triton_interpreting():  # also freezes the mode the kernels below are decorated in
        from tessera.kernels.triton import interpreter_compat

        interpreter_compat.install()
    from tessera.kernels.triton import (
        flash_attention,
        fp8_matmul,
        gemv,
        kv_cache,
        norm,
        paged_attention,
        quant_matmul,
        rope,
        swiglu,
    )

    for module in (norm, rope, swiglu, flash_attention, paged_attention, kv_cache, quant_matmul, fp8_matmul,
                   gemv):
        module.register(reg)
