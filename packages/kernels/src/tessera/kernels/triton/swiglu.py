"""SwiGLU as one GEMM: gate and up projections share each x tile, SiLU(gate) * up is the epilogue.

y = silu(x @ w_gate.T) * (x @ w_up.T) never writes the two [M, N] intermediates to memory.
Forward only: inputs that need gradients fall back to the reference.

`silu_mul` is the gating alone, for when gate and up come out of one fused GEMM (decode, where a
GEMV per projection beats a tiled GEMM): one launch instead of torch's two (silu, then the product),
rounding as they do, so it is bitwise-stable against the unfused model up to exp's last float32 bit.
Its backward is the closed form in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.custom_ops import eager_bypass
from tessera.kernels.support import FLOATS, dtype_reasons, no_grad_reasons, same_dtype_reasons, triton_device_reasons
from tessera.kernels.triton import pdl
from tessera.kernels.triton.tiles import grouped_tile, silu_mul_f32
from tessera.kernels.triton.tuning import autotune, bucket, dot_precision
from tessera.specs import KernelRegistry

_INTERPRET = triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 8}, num_warps=4, num_stages=2)
_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 64, "BK": 128, "GROUP_M": 8}, num_warps=4, num_stages=3),
]


@autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "PREC"], interpret=_INTERPRET)
@triton.jit
def _swiglu_kernel(X, WG, WU, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                   M_BUCKET, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_off = offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & (offs_n[None, :] < N)
        wg = tl.load(WG + w_off, mask=w_mask, other=0.0)
        wu = tl.load(WU + w_off, mask=w_mask, other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(x, wu, acc_u, input_precision=PREC)
        x_ptrs += BK * stride_xk
        w_off += BK * stride_wk
    y = acc_g * tl.sigmoid(acc_g) * acc_u
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@torch.library.custom_op("tessera::swiglu", mutates_args=())
def _swiglu_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w_gate.shape[0]
    if w_up.stride() != w_gate.stride():
        w_up = w_up.contiguous()
        w_gate = w_gate.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _swiglu_kernel[grid](x, w_gate, w_up, y, m, n, k, x.stride(0), x.stride(1), w_gate.stride(0),
                             w_gate.stride(1), y.stride(0), y.stride(1), bucket(m), PREC=dot_precision(x.dtype))
    return y


@_swiglu_op.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w_gate.shape[0]))


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return _swiglu_op(x, w_gate, w_up)


def supports(x: torch.Tensor | None = None, w_gate: torch.Tensor | None = None,
             w_up: torch.Tensor | None = None) -> list[str]:
    if x is None or w_gate is None or w_up is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(x, w_gate, w_up) + dtype_reasons("x", x, FLOATS)
    reasons += same_dtype_reasons(x=x, w_gate=w_gate, w_up=w_up)
    if x.dim() != 2 or w_gate.dim() != 2 or w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[-1]:
        reasons.append(f"shapes x={tuple(x.shape)} w_gate={tuple(w_gate.shape)} w_up={tuple(w_up.shape)} "
                       "are not [M, K], [N, K], [N, K]")
    return reasons + no_grad_reasons(x, w_gate, w_up)


_GATE_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(G, U, Y, stride_g, stride_u, stride_y, F, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul_f32(g, u, Y.dtype.element_ty)  # F.silu's rounding, then the product's (`tiles`)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # The kernel walks a row's columns at unit stride; a strided half (the halves of a transposed fused
    # gate/up output) is copied first rather than read wrongly. The registry refuses such inputs
    # (`supports_silu_mul`), but the gated matmuls' unfused path calls this function directly.
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    up = up if up.stride(-1) == 1 else up.contiguous()
    m, f = gate.shape
    y = torch.empty((m, f), dtype=gate.dtype, device=gate.device)
    if m and f:
        _silu_mul_kernel[(m, triton.cdiv(f, _GATE_BLOCK))](gate, up, y, gate.stride(0), up.stride(0), y.stride(0), f,
                                                           BLOCK=_GATE_BLOCK, num_warps=4,
                                                           **pdl.launch_options(gate.device))
    return y


_silu_mul_op = torch.library.custom_op("tessera::silu_mul", _silu_mul, mutates_args=())


@_silu_mul_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


def _silu_mul_setup(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx: object, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = ctx.saved_tensors
    g, dyf = gate.float(), dy.float()
    sig = torch.sigmoid(g)
    act = (g * sig).to(gate.dtype).float()
    d_gate = dyf * up.float() * sig * (1 + g * (1 - sig))
    return d_gate.to(gate.dtype), (dyf * act).to(up.dtype)


_silu_mul_op.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)


_silu_mul_call = eager_bypass(_silu_mul_op, _silu_mul)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.silu_mul`."""
    return _silu_mul_call(gate, up)


def supports_silu_mul(gate: torch.Tensor | None = None, up: torch.Tensor | None = None) -> list[str]:
    if gate is None or up is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(gate, up) + dtype_reasons("gate", gate, FLOATS)
    reasons += same_dtype_reasons(gate=gate, up=up)
    if gate.dim() != 2 or gate.shape != up.shape:
        reasons.append(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} are not one [M, F] shape")
    for name, t in (("gate", gate), ("up", up)):
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            reasons.append(f"{name}.stride()={t.stride()}: its last dim is not contiguous")
    return reasons


def register(reg: KernelRegistry) -> None:
    reg.register("swiglu", "triton", swiglu, supports=supports, priority=20)
    reg.register("silu_mul", "triton", silu_mul, supports=supports_silu_mul, priority=20)
