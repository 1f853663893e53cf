"""Prefill-shape (M > 64) weight-only quantized matmuls: dequantize the weight, then cuBLAS.

At large M a weight-only matmul is compute-bound, and a GEMM that dequantizes inside its K loop
competes with cuBLAS's tuned bf16/fp16 GEMM while doing extra work per tile. Serving stacks do prefill
the other way: one kernel expands the weight to the activation dtype (reading 1 or 0.5 bytes per weight
and writing 2), then `torch.mm`. Against a GEMM over M >= 65 rows that is a small, fixed cost.

The dequantized weight is exactly the reference's float32 value rounded once to x's dtype:
int8 `w_q * scale`, int4 `(q - zero) * scale` with each k's own group (k // group_size), so a partial
last group or any group size is handled per element. No host sync: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.support import HALF, triton_interpreting

#: Largest M the fused (dequantize-in-the-K-loop) kernels keep; above it, dequantize + torch.mm.
FUSED_MAX_M = 64


def serves(m: int, dtype: torch.dtype) -> bool:
    """Whether a call takes this path: M > FUSED_MAX_M and a half-precision x. float32 x stays on the
    fused kernels, whose IEEE dots keep float32 exactness whatever torch's matmul precision setting."""
    return m > FUSED_MAX_M and dtype in HALF


@triton.jit
def _dequant_int8_kernel(W, S, OUT, N, K, stride_wn, BN: tl.constexpr, BK: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    n64 = offs_n.to(tl.int64)[:, None]
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(W + n64 * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(S + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(OUT + n64 * K + offs_k[None, :], (w * s[:, None]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_int4_kernel(QW, S, Z, OUT, N, K, stride_qn, stride_sn, stride_zn, GROUP: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    n64 = offs_n.to(tl.int64)[:, None]
    mask = (offs_n < N)[:, None] & (ks < K)[None, :]
    # Both nibbles of a byte are read by neighbouring lanes: one memory transaction serves both.
    packed = tl.load(QW + n64 * stride_qn + (ks // 2)[None, :], mask=mask, other=0)
    q = ((packed >> ((ks % 2) * 4)[None, :].to(tl.uint8)) & 0xF).to(tl.float32)
    g = (ks // GROUP)[None, :]
    s = tl.load(S + n64 * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + n64 * stride_zn + g, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + n64 * K + ks[None, :], ((q - z) * s).to(OUT.dtype.element_ty), mask=mask)


def _tiles() -> tuple[int, int]:
    return (16, 32) if triton_interpreting() else (32, 128)


def dequantize_int8(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] `dtype` weight of int8 `w_q` [N, K] (last dim contiguous) and per-row `scale` [N] (contiguous)."""
    n, k = w_q.shape
    out = torch.empty((n, k), dtype=dtype, device=w_q.device)
    bn, bk = _tiles()
    if n and k:
        _dequant_int8_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](w_q, scale, out, n, k, w_q.stride(0), BN=bn,
                                                                       BK=bk, num_warps=4)
    return out


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """[N, K] `dtype` weight of packed int4 `qweight` [N, K / 2] with group `scales`/`zeros` [N, ceil(K / G)]
    (last dims contiguous); the same values as `reference.dequantize_int4`, rounded once to `dtype`."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    bn, bk = _tiles()
    if n and k:
        _dequant_int4_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
            qweight, scales, zeros, out, n, k, qweight.stride(0), scales.stride(0), zeros.stride(0), GROUP=group_size,
            BN=bn, BK=bk, num_warps=4)
    return out


def int8_mm(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (w_q * scale[:, None]).T in x's dtype via one dequantize kernel and torch.mm."""
    return torch.mm(x, dequantize_int8(w_q, scale, x.dtype).T)


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x [M, K] @ W.T for AWQ int4 W, in x's dtype via one dequantize kernel and torch.mm."""
    return torch.mm(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype).T)
