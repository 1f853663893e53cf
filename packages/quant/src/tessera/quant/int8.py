"""Symmetric int8 weight-only quantization, one scale per output channel.

    w_q = clamp(round(w / scale), -127, 127),  scale[n] = max_k |w[n, k]| / 127

Nothing is clipped (the row's largest magnitude maps to +-127 exactly), so every weight is within
half a step of its dequantized value: |w - w_q * scale| <= scale / 2 (up to float32 rounding).
-128 is left unused so the grid is symmetric about zero.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (w_q [N, K] int8, scale [N] float32) with weight ~= w_q * scale[:, None].

    An all-zero row gets scale 1 (its codes are all zero). Raises ValueError for a non-2-D weight.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    w_q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return w_q, scale


def dequantize_int8(w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(w_q [N, K] int8, scale [N]) -> weight [N, K] float32."""
    return w_q.float() * scale.float()[:, None]
