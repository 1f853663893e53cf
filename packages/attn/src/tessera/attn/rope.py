"""Rotary position embeddings with Hugging Face conventions.

Layout is "rotate_half": a head vector of size D is split into halves `[x1, x2]` and rotated as
`[x1 cos - x2 sin, x2 cos + x1 sin]`, with frequency `i` shared by dims `i` and `i + D/2`
(the Llama/Qwen layout, not the interleaved GPT-J one). Frequency scaling follows
`transformers`' `rope_type` "linear" and "llama3".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tessera.specs import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` float32: `theta ** (-2i / head_dim)`, then scaled.

    `linear` divides every frequency by `factor` (positions stretched `factor` times). `llama3`
    divides low frequencies (wavelength above `original_max_position_embeddings / low_freq_factor`)
    by `factor`, keeps high frequencies, and blends linearly in between. Raises ValueError for an
    odd `head_dim`.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Maps positions `[B, T]` (int64) to `(cos, sin)`, each `[B, T, head_dim]` in `dtype`.

    The angles `position * inv_freq` (float32 frequencies, as `transformers` defines them) are formed
    and turned into cos/sin in float64 from the positions on the device, then rounded once to `dtype`,
    so any position works and nothing syncs with the host. `inv_freq` is a non-persistent buffer
    (absent from `state_dict`), computed on the CPU whatever the device, that stays float32 when the
    module is cast to a lower precision.
    """

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        # On the CPU, then moved: a GPU's float32 `pow` may round theta ** (2i / D) an ulp away from
        # the CPU's (and from what `_apply` and checkpoint loading compute), up to 3e-5 rad of rotation
        # by position 511.
        inv_freq = rope_inv_freq(head_dim, theta, scaling, device="cpu").to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        # A `.to(bfloat16)` would round the frequencies; recompute them in float32 on the new device.
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device="cpu").to(device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # A float32 angle is off by up to half an ulp: 1.5e-5 rad at position 511, 4e-3 at 131071, which
        # was the largest float32 error of a Llama-3.2-1B forward at 512 tokens. Exact angles (an integer
        # below 2**29 times a float32 fits a float64) and float64 cos/sin leave one rounding. Apple's MPS
        # has no float64: there the angles stay float32.
        wide = torch.float32 if positions.device.type == "mps" else torch.float64
        freqs = positions[..., None].to(wide) * self.inv_freq.to(wide)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, H, D]` by `cos`/`sin` `[B, T, D]` (broadcast over heads), in `x`'s dtype.

    The plain-torch form. The model calls registry op `rope` instead, which rotates q and k of
    `[B*T, H, D]` token rows in one launch with float32 math (`rope_qk_norm` with QK-norm first)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
