"""Fused input projections for inference: q/k/v (and gate/up) as one GEMM instead of three (two).

At batch 1 each projection is a separate GEMV launch whose cost is mostly launch gaps, so one
concatenated weight saves 3 of a layer's 7 matmul launches. The original Parameters become views
into the concatenated weight: `state_dict()` keys, values and memory stay as they were, checkpoints
and HF export see nothing different, and `load_state_dict` (which copies in place) updates both.

    fuse_projections(model)   # after the model's final .to(device, dtype); idempotent

Fusing is for inference. A fused module runs its single GEMM only while no gradient is wanted
(`torch.no_grad`/`inference_mode`, or weights that do not require grad) and only while the
projections are still the views it made: anything that replaces one (a quantizer swapping in its
own module, a `.to()` that re-allocates Parameters) makes the module fall back to its separate
projections, which stay correct. Call `fuse_projections` again after such a change to re-fuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.layers import MLP, Attention


@dataclass(eq=False)
class FusedLinear:
    """Several `nn.Linear` of one input whose weights (and biases) are row blocks of `weight` (`bias`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    parts: tuple[nn.Linear, ...]
    sizes: tuple[int, ...]

    def active(self, *modules: nn.Module) -> bool:
        """True when `modules` are still the fused parts, still views of `weight`, and no grad is wanted."""
        if torch.is_grad_enabled() and any(p.weight.requires_grad for p in self.parts):
            return False
        offset = 0
        for module, part, size in zip(modules, self.parts, self.sizes, strict=True):
            if module is not part or part.weight.data_ptr() != self.weight[offset].data_ptr():
                return False
            offset += size
        return True

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`x [..., in]` -> one `[..., size_i]` view per part (column slices of one GEMM's output)."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _fusable(parts: tuple[nn.Module, ...]) -> bool:
    if not all(type(p) is nn.Linear for p in parts):  # subclasses (quantized, tensor-parallel) keep their forward
        return False
    weights = [p.weight for p in parts]
    has_bias = {p.bias is not None for p in parts}
    same = len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
    return same and len(has_bias) == 1 and all(w.is_contiguous() for w in weights)


def fuse_linears(parts: tuple[nn.Linear, ...], current: FusedLinear | None = None) -> FusedLinear | None:
    """Concatenate `parts`' weights (and biases) into one tensor and make their Parameters views of it.

    Returns `current` unchanged when it is still valid for `parts` (idempotence), and None when the
    parts cannot be fused (not all plain `nn.Linear`; mixed dtype, device, input size or bias presence).
    """
    if current is not None and current.parts == parts and _is_fused(current):
        return current
    if not _fusable(parts):
        return None
    sizes = tuple(p.out_features for p in parts)
    with torch.no_grad():
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    offset = 0
    for part, size in zip(parts, sizes):
        part.weight = nn.Parameter(weight[offset : offset + size], requires_grad=part.weight.requires_grad)
        if bias is not None:
            part.bias = nn.Parameter(bias[offset : offset + size], requires_grad=part.bias.requires_grad)
        offset += size
    return FusedLinear(weight, bias, parts, sizes)


def _is_fused(fused: FusedLinear) -> bool:
    offset = 0
    for part, size in zip(fused.parts, fused.sizes):
        if part.weight.data_ptr() != fused.weight[offset].data_ptr():
            return False
        if fused.bias is not None and (part.bias is None or part.bias.data_ptr() != fused.bias[offset].data_ptr()):
            return False
        offset += size
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v of every `Attention` and gate/up of every `MLP` in `model`.

    Returns how many modules run fused afterwards. Idempotent: a module already fused is left as
    it is; one whose projections were replaced or re-allocated since is fused anew.
    """
    fused = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.qkv = fuse_linears((module.q_proj, module.k_proj, module.v_proj), module.qkv)
            fused += module.qkv is not None
        elif isinstance(module, MLP):
            module.gate_up = fuse_linears((module.gate_proj, module.up_proj), module.gate_up)
            fused += module.gate_up is not None
    return fused
