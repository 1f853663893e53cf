"""Round-to-nearest int4 with one scale and zero per group of `group_size` input channels.

Per group g of row n (asymmetric, `zero_point=True`), with the range widened to include 0:

    hi = max(w, 0), lo = min(w, 0),  scale = (hi - lo) / 15,  zero = round(-lo / scale)  (in [0, 15])
    q = clamp(round(w / scale) + zero, 0, 15),  dequant = (q - zero) * scale

Symmetric (`zero_point=False`): scale = max|w| / 7 and zero = 8, so codes 1..15 carry -7..7.
Either way the grid spans the group's values to within half a step, so |w - dequant| <= scale / 2.
Including 0 in the range keeps `zero` a 4-bit integer (as packed-zero kernels expect) at no cost
for real weights, whose groups straddle zero anyway.

Storage follows `matmul.int4_awq`: qweight [N, K // 2] uint8 (even k in the low nibble, via
`reference.pack_int4`), scales and zeros [N, K // group_size] float32.
"""

from __future__ import annotations

import torch

from tessera.kernels import reference

INT4_MAX = 15


def int4_shape_problem(weight_shape: tuple[int, ...] | torch.Size, group_size: int) -> str | None:
    """Why a weight of this shape cannot be int4-quantized at `group_size`, or None when it can."""
    if len(weight_shape) != 2:
        return f"weight must be 2-D [out, in], got shape {tuple(weight_shape)}"
    in_features = weight_shape[1]
    if in_features % group_size:
        return f"in_features={in_features} is not divisible by group_size={group_size}"
    return None


def int4_params(weight: torch.Tensor, group_size: int, zero_point: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales and zeros of `weight` [N, K] -> (scales, zeros), each [N, K // group_size] float32."""
    _check(weight, group_size)
    g = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    if zero_point:
        hi = g.amax(dim=-1).clamp(min=0)
        lo = g.amin(dim=-1).clamp(max=0)
        span = hi - lo
        scales = torch.where(span > 0, span / INT4_MAX, torch.ones_like(span))
        zeros = torch.round(-lo / scales).clamp(0, INT4_MAX)
    else:
        amax = g.abs().amax(dim=-1)
        scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
        zeros = torch.full_like(scales, 8.0)
    return scales, zeros


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Integer codes in [0, 15] of `weight` [N, K] for the given group parameters -> [N, K] float32."""
    n, k = weight.shape
    g = weight.detach().float().reshape(n, -1, group_size)
    q = torch.round(g / scales[..., None]) + zeros[..., None]
    return q.clamp(0, INT4_MAX).reshape(n, k)


def quantize_int4(weight: torch.Tensor, group_size: int = 128, zero_point: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (qweight [N, K // 2] uint8, scales [N, K // G] float32, zeros [N, K // G] float32).

    Raises ValueError when the weight is not 2-D or K is not divisible by `group_size`.
    """
    scales, zeros = int4_params(weight, group_size, zero_point)
    q = int4_codes(weight, scales, zeros, group_size)
    return reference.pack_int4(q.to(torch.uint8)), scales, zeros


def fake_quantize_int4(weight: torch.Tensor, group_size: int = 128, zero_point: bool = True) -> torch.Tensor:
    """Quantize then dequantize without packing: weight [N, K] -> float32 [N, K] on the int4 grid."""
    scales, zeros = int4_params(weight, group_size, zero_point)
    q = int4_codes(weight, scales, zeros, group_size)
    n, k = weight.shape
    return ((q.reshape(n, -1, group_size) - zeros[..., None]) * scales[..., None]).reshape(n, k)


def _check(weight: torch.Tensor, group_size: int) -> None:
    problem = int4_shape_problem(weight.shape, group_size)
    if problem:
        raise ValueError(f"cannot quantize to int4: {problem}")
