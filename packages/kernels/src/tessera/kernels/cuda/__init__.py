"""CUDA C++ backends (pybind11): `rms_norm`, `rms_norm_residual` and `attention.prefill` (forward only).

Registered whenever torch sees a CUDA device and a CUDA toolkit is present; the extension compiles on
first use (cached) or ahead of time with `python -m tessera.kernels.cuda.build`. Priority sits below
Triton, so these run when forced (`backend="cuda"`, `TESSERA_KERNELS=rms_norm=cuda`) or when Triton
is missing.
"""

from __future__ import annotations

import torch

from tessera.kernels.cuda.build import load, nvcc_path
from tessera.kernels.support import FLOATS, device_reasons, dtype_reasons, no_grad_reasons
from tessera.specs import KernelRegistry

MAX_HEAD_DIM = 128


def _base_reasons(*tensors: torch.Tensor) -> list[str]:
    reasons = device_reasons(tensors)
    if nvcc_path() is None:
        reasons.append("no nvcc to build the CUDA extension (set CUDA_HOME)")
    return reasons


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return load().rms_norm(x, weight, float(eps))


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return load().rms_norm_residual(x, residual, weight, float(eps))


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None = None, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return load().attention_prefill(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), scale)


def supports_rms_norm(x: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> list[str]:
    if x is None or weight is None:
        return _base_reasons()
    reasons = _base_reasons(x, weight) + dtype_reasons("x", x, FLOATS) + dtype_reasons("weight", weight, FLOATS)
    if weight.shape != x.shape[-1:]:
        reasons.append(f"weight.shape={tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return reasons + no_grad_reasons(x, weight)


def supports_rms_norm_residual(x: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                               weight: torch.Tensor | None = None, eps: float = 1e-6) -> list[str]:
    if x is None or residual is None or weight is None:
        return _base_reasons()
    reasons = supports_rms_norm(x, weight) + device_reasons([residual, x])
    if residual.shape != x.shape or residual.dtype != x.dtype:
        reasons.append(f"residual {tuple(residual.shape)}/{residual.dtype} differs from x {tuple(x.shape)}/{x.dtype}")
    return reasons + no_grad_reasons(residual)


def supports_attention(q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, causal: bool = True,
                       scale: float | None = None) -> list[str]:
    if q is None or k is None or v is None or cu_seqlens is None:
        return _base_reasons()
    reasons = _base_reasons(q, k, v, cu_seqlens) + dtype_reasons("q", q, FLOATS)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        reasons.append(f"shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} are not [N, H, D]")
    elif q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    elif k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        reasons.append(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"dtypes differ: q={q.dtype} k={k.dtype} v={v.dtype}")
    return reasons + no_grad_reasons(q, k, v)


def register(reg: KernelRegistry) -> None:
    reg.register("rms_norm", "cuda", rms_norm, supports=supports_rms_norm, priority=10)
    reg.register("rms_norm_residual", "cuda", rms_norm_residual, supports=supports_rms_norm_residual, priority=10)
    reg.register("attention.prefill", "cuda", attention_prefill, supports=supports_attention, priority=10)
