"""`matmul.fp8` on `torch._scaled_mm`: cuBLASLt's FP8 GEMM on Ada and Hopper tensor cores.

x is quantized per row exactly as the reference does (scale = amax / 448, IEEE division, clamp, round
to nearest even): by Triton's one-launch row quantizer when Triton is importable, else by the
reference's torch ops. `_scaled_mm` then multiplies the E4M3 operands with float32 accumulation
(`use_fast_accum=False`: fast accumulation skips the promotions that keep a long K exact enough) and
applies both scales in its epilogue, in row-wise mode: scale_a [M, 1], scale_b [1, N]. It does not mix
tensor-wise and row-wise scales, so a per-tensor weight scale is broadcast to [1, N] (one tiny copy).

`supports` checks, without reading any value, what `_scaled_mm` enforces: a CUDA device of compute
capability 8.9 or newer; x bfloat16 (float16 too from torch 2.10, where row-wise scaling gained a
float16 output); K and N multiples of 16; w_q [N, K] contiguous (its transpose is the column-major
operand cuBLASLt takes) and 16-byte aligned; w_scale float32 of shape [1] or [N].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.torch_version import TorchVersion

from tessera.kernels import reference
from tessera.kernels.custom_ops import matmul_custom_op
from tessera.kernels.support import device_reasons, dtype_reasons, no_grad_reasons
from tessera.specs import KernelRegistry

#: Output dtypes of row-wise `_scaled_mm` in this torch.
X_DTYPES = (torch.bfloat16, torch.float16) if TorchVersion(torch.__version__) >= "2.10" else (torch.bfloat16,)


@functools.cache
def _row_quantizer() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    try:
        from tessera.kernels.triton.fp8_matmul import quantize_rows
    except ImportError:
        return reference.quantize_fp8_rows
    return quantize_rows


def _fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    m, n = x.shape[0], w_q.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    xq, xs = _row_quantizer()(x)
    scale_b = w_scale.expand(n).contiguous() if w_scale.numel() == 1 else w_scale.contiguous()
    return torch._scaled_mm(xq, w_q.t(), scale_a=xs.view(m, 1), scale_b=scale_b.view(1, n), out_dtype=x.dtype,
                            use_fast_accum=False)


_fp8_op = matmul_custom_op("matmul_fp8_scaled_mm", _fp8)


def matmul_fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.matmul_fp8`, for inputs `supports` accepts."""
    return _fp8_op(x, w_q, w_scale)


@functools.cache
def _capability_reasons(index: int) -> tuple[str, ...]:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= (8, 9):
        return ()
    return (f"{torch.cuda.get_device_name(index)} is sm_{major}{minor}; torch._scaled_mm needs FP8 tensor cores "
            "(sm_89+)",)


def _shape_reasons(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> list[str]:
    if x.dim() != 2 or w_q.dim() != 2 or x.shape[1] != w_q.shape[1]:
        return [f"shapes x={tuple(x.shape)} w_q={tuple(w_q.shape)} are not [M, K], [N, K]"]
    (n, k), reasons = w_q.shape, []
    if w_scale.shape not in ((1,), (n,)):
        reasons.append(f"w_scale.shape={tuple(w_scale.shape)} is neither [1] nor [N={n}]")
    if k % 16 or n % 16:
        reasons.append(f"K={k} and N={n} must be multiples of 16 (torch._scaled_mm)")
    if w_q.stride() != (k, 1):
        reasons.append(f"w_q.stride()={w_q.stride()} is not contiguous (its transpose must be column-major)")
    # Pointers are not traceable; under torch.compile, weights are whole (512-byte aligned) allocations.
    if not torch.compiler.is_compiling() and w_q.data_ptr() % 16:
        reasons.append("w_q's data is not 16-byte aligned (cuBLASLt)")
    return reasons


def supports(x: torch.Tensor | None = None, w_q: torch.Tensor | None = None,
             w_scale: torch.Tensor | None = None) -> list[str]:
    if x is None or w_q is None or w_scale is None:
        reasons = device_reasons(())
        return reasons or list(_capability_reasons(torch.cuda.current_device()))
    reasons = device_reasons((x, w_q, w_scale))
    if not reasons:
        reasons += _capability_reasons(x.device.index)
    reasons += dtype_reasons("x", x, X_DTYPES) + dtype_reasons("w_q", w_q, (torch.float8_e4m3fn,))
    reasons += dtype_reasons("w_scale", w_scale, (torch.float32,))
    return reasons + _shape_reasons(x, w_q, w_scale) + no_grad_reasons(x)


def register(reg: KernelRegistry) -> None:
    # Above Triton's fp8 GEMM (20): cuBLASLt's kernels are faster wherever they accept the inputs.
    reg.register("matmul.fp8", "scaled_mm", matmul_fp8, supports=supports, priority=30)
