"""FP8 E4M3 weights with a per-tensor or per-row scale.

    w_q = fp8(w / scale),  scale = amax / 448  (amax over the tensor or over each row)

E4M3 keeps 3 mantissa bits, so a weight whose scaled value is a normal number (|w / scale| >= 2^-6)
is within 2^-4 of itself relatively, and one in the subnormal range is within half the subnormal
step, 2^-10 * scale: |w - dequant| <= max(2^-4 |w|, 2^-10 scale). Activations are quantized per row
at run time inside the `matmul.fp8` op (dynamic scaling), so there is nothing to calibrate.
"""

from __future__ import annotations

from typing import Literal

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def quantize_fp8(weight: torch.Tensor, granularity: Literal["per_tensor", "per_row"] = "per_row"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (w_q [N, K] float8_e4m3fn, w_scale float32 of shape [1] or [N]).

    Raises ValueError for a non-2-D weight or an unknown granularity.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8 expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if granularity == "per_row":
        amax = w.abs().amax(dim=1)
    elif granularity == "per_tensor":
        amax = w.abs().amax().reshape(1)
    else:
        raise ValueError(f"granularity must be 'per_tensor' or 'per_row', got {granularity!r}")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w_q = (w / _rows(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w_q, scale


def dequantize_fp8(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(w_q [N, K] float8_e4m3fn, w_scale [1] or [N]) -> weight [N, K] float32."""
    return w_q.float() * _rows(w_scale.float())


def _rows(scale: torch.Tensor) -> torch.Tensor:
    return scale[:, None] if scale.numel() > 1 else scale
