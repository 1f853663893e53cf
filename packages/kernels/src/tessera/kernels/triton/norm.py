"""RMSNorm and residual-add + RMSNorm in Triton: one program per row, one read and one write per tensor.

Backwards are the closed form in torch (recomputing 1/rms from the normalised input), so training can
dispatch here too; `rms_norm_residual` passes the gradient of h plus that of the norm to x and residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.kernels.custom_ops import eager_bypass
from tessera.kernels.support import FLOATS, dtype_reasons, triton_device_reasons
from tessera.kernels.triton import pdl
from tessera.kernels.triton.tiles import divide, inv_sqrt
from tessera.specs import KernelRegistry

MAX_D = 65536


@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0,
                     PRECISE: tl.constexpr = False):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # h is rounded to the input dtype before normalising, exactly as the reference adds in that dtype.
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    # The mean, the square root and the reciprocal correctly rounded for float32 data (`tiles`).
    rstd = inv_sqrt(divide(tl.sum(xf * xf, axis=0), D, PRECISE) + eps, PRECISE)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)


def _launch(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float,
            h2: torch.Tensor | None) -> torch.Tensor:
    rows, d = x2.shape
    y = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2 if r2 is not None else x2, weight, y, h2 if h2 is not None else y,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), h2.stride(0) if h2 is not None else 0,
            d, eps, HAS_RESIDUAL=r2 is not None, BLOCK=block, PRECISE=x2.dtype == torch.float32, num_warps=warps,
            **pdl.launch_options(x2.device))
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(_rows(x), None, weight.contiguous(), eps, None).view(x.shape)


_rms_norm_op = torch.library.custom_op("tessera::rms_norm", _rms_norm, mutates_args=())


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


def _rms_norm_setup(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def norm_grads(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm's closed-form backward over the last dim: (dx float32, dweight, y float32) of
    y = rms_norm(x, weight) for the output gradient dy (y itself, unrounded, for callers that need it)."""
    xf, dyf = x.float(), dy.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = dyf * weight.float()
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx, dw.to(weight.dtype), xhat * weight.float()


def _rms_norm_backward(ctx: object, dy: torch.Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    dx, dw, _ = norm_grads(dy, x, weight, ctx.eps)
    return dx.to(x.dtype), dw, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2, r2 = _rows(x), _rows(residual)
    h = torch.empty_like(x2)
    y = _launch(x2, r2, weight.contiguous(), eps, h)
    return y.view(x.shape), h.view(x.shape)


_rms_norm_residual_op = torch.library.custom_op("tessera::rms_norm_residual", _rms_norm_residual, mutates_args=())


@_rms_norm_residual_op.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _rms_norm_residual_setup(ctx: object, inputs: tuple, output: tuple) -> None:
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _rms_norm_residual_backward(ctx: object, dy: torch.Tensor, dh: torch.Tensor) -> tuple:
    h, weight = ctx.saved_tensors
    dx, dw, _ = norm_grads(dy, h, weight, ctx.eps)
    dh_total = (dx + dh.float()).to(h.dtype)
    return dh_total, dh_total, dw, None


_rms_norm_residual_op.register_autograd(_rms_norm_residual_backward, setup_context=_rms_norm_residual_setup)


_rms_norm_call = eager_bypass(_rms_norm_op, _rms_norm)
_rms_norm_residual_call = eager_bypass(_rms_norm_residual_op, _rms_norm_residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _rms_norm_call(x, weight, float(eps))


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_residual_call(x, residual, weight, float(eps))


def _shape_reasons(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    reasons = dtype_reasons("x", x, FLOATS) + dtype_reasons("weight", weight, FLOATS)
    if weight.shape != x.shape[-1:]:
        reasons.append(f"weight.shape={tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if x.shape[-1] > MAX_D:
        reasons.append(f"last dim {x.shape[-1]} > {MAX_D} (one row per program)")
    return reasons


def supports_rms_norm(x: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> list[str]:
    if x is None or weight is None:
        return triton_device_reasons()
    return triton_device_reasons(x, weight) + _shape_reasons(x, weight)


def supports_rms_norm_residual(x: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                               weight: torch.Tensor | None = None, eps: float = 1e-6) -> list[str]:
    if x is None or residual is None or weight is None:
        return triton_device_reasons()
    reasons = triton_device_reasons(x, residual, weight) + _shape_reasons(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        reasons.append(f"residual {tuple(residual.shape)}/{residual.dtype} differs from x {tuple(x.shape)}/{x.dtype}")
    return reasons


def register(reg: KernelRegistry) -> None:
    reg.register("rms_norm", "triton", rms_norm, supports=supports_rms_norm, priority=20)
    reg.register("rms_norm_residual", "triton", rms_norm_residual, supports=supports_rms_norm_residual, priority=20)
