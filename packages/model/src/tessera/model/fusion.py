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

import types
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from tessera.kernels import reference, registry
from tessera.kernels.dense import gated_linear, linear, normed_linear
from tessera.model.layers import MLP, Attention, silu_mul


def storage(module: nn.Module) -> tuple[int, ...]:
    """Addresses of a module's own parameters and buffers: what fusing makes views of."""
    return tuple(t.data_ptr() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


@dataclass(eq=False, kw_only=True)
class FusedProjections(ABC):
    """Projections of one input (`parts`, `sizes` output columns each) run as one matmul whose weight the
    parts' tensors are views of; `views` holds their addresses at fusing (`storage`). Subclasses give
    the matmul: `FusedLinear` here, the quantized linears' own in `tessera.quant`."""

    parts: tuple[nn.Module, ...]
    sizes: tuple[int, ...]
    views: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        self.views = tuple(storage(p) for p in self.parts)

    def is_current(self) -> bool:
        """The parts' tensors are still the views made at fusing (none replaced or re-allocated)."""
        return all(storage(p) == v for p, v in zip(self.parts, self.views))

    def active(self, *modules: nn.Module) -> bool:
        """True when `modules` are still the fused parts, still views of the fused weight, and no grad
        is wanted."""
        if torch.is_grad_enabled() and any(t.requires_grad for p in self.parts for t in p.parameters(recurse=False)):
            return False
        return modules == self.parts and self.is_current()

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in]` -> `[..., sum(sizes)]`: the one matmul of all parts."""

    def matmul_normed(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(matmul(y), h)` for `y, h = rms_norm_residual(x, residual, weight, eps)`: the norm before the
        projections and the matmul, which a subclass may run as one launch; here the two ops."""
        y, h = registry("rms_norm_residual", x, residual, weight, eps)
        return self.matmul(y), h

    def has_swiglu(self) -> bool:
        """Whether `swiglu` runs as one op (a subclass's: the int4 linears, whose decode GEMV stores silu_mul and
        saves its launch); here it is `matmul` and then silu_mul, which callers may as well run themselves."""
        return False

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in]` -> silu_mul(gate, up) `[..., size]` of two equal parts' outputs (gate, up): here `matmul`,
        then the silu_mul op. Raises ValueError for other parts."""
        if len(self.sizes) != 2 or self.sizes[0] != self.sizes[1]:
            raise ValueError(f"swiglu takes two equal parts (gate, up), got sizes={self.sizes}")
        gate, up = self.matmul(x).split(self.sizes, dim=-1)
        return silu_mul(gate, up)

    def has_qkv_rope(self) -> bool:
        """Whether `qkv_rope` runs as one op (a subclass's: the int8 and int4 linears, whose decode GEMVs do the rope
        and the cache write in their epilogue); here it is `matmul`, the rope op and the cache write, as `Attention`
        runs them itself."""
        return False

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> torch.Tensor:
        """x [N, in] -> the rotated q [N, Hq, D] of three parts (q, k, v), with k rotated and v written to the caches
        at `slot_mapping` (the contract of `matmul.int4_awq_qkv_rope`): here `matmul`, then the `rope` and
        `kv_cache.write` ops."""
        q, k, v = reference.qkv_heads(self.matmul(x), n_q_heads, n_kv_heads)
        q, k = registry("rope", q, k, cos, sin)
        registry("kv_cache.write", k, v, k_cache, v_cache, slot_mapping)
        return q

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`x [..., in]` -> one `[..., size_i]` view per part (column slices of one matmul's output)."""
        return self.matmul(x).split(self.sizes, dim=-1)


@dataclass(eq=False, kw_only=True)
class FusedLinear(FusedProjections):
    """Several `nn.Linear` of one input whose weights (and biases) are row blocks of `weight` (`bias`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def matmul_normed(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return normed_linear(x, residual, weight, eps, self.weight, self.bias)


def _fusable(parts: tuple[nn.Module, ...]) -> bool:
    if not all(type(p) is nn.Linear for p in parts):  # subclasses (quantized, tensor-parallel) keep their forward
        return False
    weights = [p.weight for p in parts]
    has_bias = {p.bias is not None for p in parts}
    same = len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
    return same and len(has_bias) == 1 and all(w.is_contiguous() for w in weights)


def fuse_linears(parts: tuple[nn.Module, ...],
                 current: FusedProjections | None = None) -> FusedProjections | None:
    """Concatenate `parts`' weights (and biases) into one tensor and make their Parameters views of it.

    Returns `current` unchanged when it is still valid for `parts` (idempotence), and None when the
    parts cannot be fused (not all plain `nn.Linear`; mixed dtype, device, input size or bias presence).
    Parts of one other module class that offers `fuse_parts(parts)` (the quantized linears) are fused by
    it instead, into its own `FusedProjections` (or None).
    """
    if current is not None and current.parts == parts and current.is_current():
        return current
    kind = type(parts[0])
    if kind is not nn.Linear and hasattr(kind, "fuse_parts") and all(type(p) is kind for p in parts):
        return kind.fuse_parts(parts)
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
    return FusedLinear(weight=weight, bias=bias, parts=parts, sizes=sizes)


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


def _decode_aware_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _decode_aware_gated(self: nn.Linear, gu: torch.Tensor) -> torch.Tensor:
    return gated_linear(gu, self.weight, self.bias)


def route_decode_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` in `model` (o and down projections, the LM head, unfused q/k/v)
    compute through `tessera.kernels.dense.linear`: `F.linear` as before, except that decode-shaped
    calls (at most 16 rows, CUDA, half dtype, no autograd) take the faster of cuBLAS and the GEMV
    kernel for their shape. The fused projections already do. An MLP's down projection also gets
    `forward_gated(gu)` (`dense.gated_linear`), which `MLP` calls with its fused gate/up output, so a
    decode step may apply silu_mul(gate, up) inside the down projection's GEMV. For inference; returns
    how many modules were routed. Hooks still run (only `forward` is replaced, per instance; `MLP` takes
    no gated path past a hook on the down projection); idempotent.
    """
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_decode_aware_forward, module)
            routed += 1
        if isinstance(module, MLP) and type(module.down_proj) is nn.Linear:
            module.down_proj.forward_gated = types.MethodType(_decode_aware_gated, module.down_proj)
    return routed
