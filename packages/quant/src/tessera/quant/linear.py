"""Quantized drop-in replacements for `nn.Linear`: same call signature, same qualified names.

Each module keeps its packed weight as buffers (so `state_dict()` carries them) and a float `bias`
when the original had one; `forward` flattens the leading dimensions and dispatches to the
registry op, so a faster backend (Triton, CUDA) is picked up wherever its `supports` allows.

    Int8Linear  weight int8 [N, K], weight_scale float32 [N]              -> matmul.int8_weight_only
    Int4Linear  qweight uint8 [N, K/2], scales/zeros float32 [N, K/G]     -> matmul.int4_awq
    FP8Linear   weight float8_e4m3fn [N, K], weight_scale float32 [1]/[N] -> matmul.fp8

Projections of one input (q/k/v, gate/up) fuse like float ones (`tessera.model.fuse_projections`):
`QuantLinear.fuse_parts` concatenates the parts' row buffers into one module of the same class and
makes the parts' buffers views of it, so one launch (and, for FP8, one quantization of x) serves all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tessera.kernels import reference, registry
from tessera.model.fusion import FusedProjections
from tessera.quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from tessera.quant.int8 import dequantize_int8, quantize_int8
from tessera.quant.rtn import quantize_int4


class QuantLinear(nn.Module, ABC):
    """Shared shape bookkeeping and the flatten -> op -> bias -> reshape path."""

    op: str
    #: The op of silu_mul(gate, up) and then `op` on a fused gate/up output (None: silu_mul, then `op`).
    gated_op: str | None = None
    #: The op of rms_norm_residual and then `op` (None: the two ops).
    normed_op: str | None = None
    #: The op of `op` with a fused gate/up weight and then silu_mul of the halves (None: the two ops).
    swiglu_op: str | None = None
    #: The op of `op` with a fused q/k/v weight, then rope and the cache write (None: the three ops).
    rope_op: str | None = None
    #: Buffers whose first dim is `out_features` (one row per output): concatenated when fusing.
    row_buffers: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)

    @abstractmethod
    def _op_args(self) -> tuple:
        """The op's arguments after x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        lead = x.shape[:-1]
        y = registry(self.op, x.reshape(-1, self.in_features), *self._op_args())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def forward_gated(self, gu: torch.Tensor) -> torch.Tensor:
        """`forward(silu_mul(gate, up))` of a fused gate/up output gu [..., 2 * in_features] (SwiGLU's down
        projection, called by `MLP`): one op where the class has a gated one, whose decode GEMV applies
        silu_mul as it loads x."""
        k = self.in_features
        gu2 = gu.reshape(-1, 2 * k)
        if self.gated_op is None:
            return self.forward(registry("silu_mul", gu2[:, :k], gu2[:, k:]).view(*gu.shape[:-1], k))
        y = registry(self.gated_op, gu2, *self._op_args())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*gu.shape[:-1], self.out_features)

    def has_swiglu(self) -> bool:
        """Whether `forward_swiglu` can run: the class has a SwiGLU op, and the module has no bias (it would
        enter before silu) and an even row count."""
        return self.swiglu_op is not None and self.bias is None and self.out_features % 2 == 0

    def forward_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu_mul of the two halves of `forward(x)`, for a module that is a fused gate/up projection (gate rows
        first): one op, whose decode GEMV stores silu_mul itself. Raises ValueError where not `has_swiglu()`."""
        if not self.has_swiglu():
            raise ValueError(f"{type(self).__name__}(out_features={self.out_features}, bias="
                             f"{self.bias is not None}) has no SwiGLU op: needs swiglu_op, no bias, even out_features")
        a = registry(self.swiglu_op, x.reshape(-1, self.in_features), *self._op_args())
        return a.reshape(*x.shape[:-1], self.out_features // 2)

    def forward_qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int,
                         n_kv_heads: int) -> torch.Tensor:
        """For a module that is a fused q/k/v projection without bias: the rotated q [N, Hq, D] of x [N, in], with k
        rotated and v written to the caches at `slot_mapping`, as one op (`rope_op`). Raises ValueError where the
        class has no such op or the module has a bias."""
        if self.rope_op is None or self.bias is not None:
            raise ValueError(f"{type(self).__name__}(bias={self.bias is not None}) has no q/k/v rope op: needs rope_op "
                             "and no bias")
        return registry(self.rope_op, x, *self._op_args(), cos, sin, k_cache, v_cache, slot_mapping, n_q_heads,
                        n_kv_heads)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(forward(y), h)` for `y, h = rms_norm_residual(x, residual, weight, eps)` (a decoder layer's norm
        before its fused q/k/v or gate/up projection): one op where the class has a normalised one, whose
        one-row decode GEMV normalises x + residual as it loads x."""
        if self.normed_op is None:
            y, h = registry("rms_norm_residual", x, residual, weight, eps)
            return self.forward(y), h
        k = self.in_features
        y, h = registry(self.normed_op, x.reshape(-1, k), residual.reshape(-1, k), weight, *self._op_args(), eps)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features), h.view(x.shape)

    @abstractmethod
    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, [out_features, in_features] float32."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def settings(self) -> dict[str, Any]:
        """Constructor keywords beyond the shapes (group size, scale granularity)."""
        return {}

    def fusable(self) -> bool:
        """Whether every per-output quantity lives in `row_buffers` (so parts can be concatenated)."""
        return True

    def _fuse_key(self) -> tuple:
        bufs = tuple((getattr(self, n).dtype, getattr(self, n).device, tuple(getattr(self, n).shape[1:]),
                      getattr(self, n).is_contiguous()) for n in self.row_buffers)
        bias = None if self.bias is None else (self.bias.dtype, self.bias.device)
        return type(self), self.in_features, tuple(sorted(self.settings().items())), bufs, bias

    @classmethod
    def fuse_parts(cls, parts: tuple[QuantLinear, ...]) -> FusedQuantLinear | None:
        """One module of `parts`' class whose rows are theirs in order; the parts' buffers (and biases)
        become views of its buffers, so `state_dict()` and in-place loads see one memory. None when the
        parts differ in class, input size, settings, buffer layout or bias presence."""
        first = parts[0]
        if not all(p.fusable() for p in parts) or len({p._fuse_key() for p in parts}) != 1:
            return None
        sizes = tuple(p.out_features for p in parts)
        dtype = first.bias.dtype if first.bias is not None else torch.float32
        fused = cls(first.in_features, sum(sizes), first.bias is not None, dtype=dtype, device="meta",
                    **first.settings())
        with torch.no_grad():
            names = list(first.row_buffers) + ([] if first.bias is None else ["bias"])
            for name in names:
                whole = torch.cat([getattr(p, name).detach() for p in parts])
                if name == "bias":
                    fused.bias = nn.Parameter(whole, requires_grad=False)
                else:
                    fused._buffers[name] = whole
                offset = 0
                for part, size in zip(parts, sizes):
                    view = whole[offset: offset + size]
                    if name == "bias":
                        part.bias = nn.Parameter(view, requires_grad=False)
                    else:
                        part._buffers[name] = view
                    offset += size
        return FusedQuantLinear(fused=fused, parts=parts, sizes=sizes)

    @staticmethod
    def _copy_bias(dst: QuantLinear, linear: nn.Linear) -> None:
        if linear.bias is not None:
            dst.bias.data.copy_(linear.bias.detach())


class Int8Linear(QuantLinear):
    op = "matmul.int8_weight_only"
    gated_op = "matmul.int8_weight_only_gated"
    normed_op = "matmul.int8_weight_only_normed"
    rope_op = "matmul.int8_weight_only_qkv_rope"
    row_buffers = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype,
                  device=linear.weight.device)
        w_q, scale = quantize_int8(linear.weight)
        mod.weight.copy_(w_q)
        mod.weight_scale.copy_(scale)
        cls._copy_bias(mod, linear)
        return mod

    def _op_args(self) -> tuple:
        return (self.weight, self.weight_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale)


class Int4Linear(QuantLinear):
    op = "matmul.int4_awq"
    gated_op = "matmul.int4_awq_gated"
    normed_op = "matmul.int4_awq_normed"
    swiglu_op = "matmul.int4_awq_swiglu"
    rope_op = "matmul.int4_awq_qkv_rope"
    row_buffers = ("qweight", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if in_features % group_size or in_features % 2:
            raise ValueError(f"Int4Linear: in_features={in_features} is not divisible by group_size={group_size}")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, zero_point: bool = True) -> Int4Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  dtype=linear.weight.dtype, device=linear.weight.device)
        qweight, scales, zeros = quantize_int4(linear.weight, group_size, zero_point)
        mod.qweight.copy_(qweight)
        mod.scales.copy_(scales)
        mod.zeros.copy_(zeros)
        cls._copy_bias(mod, linear)
        return mod

    def _op_args(self) -> tuple:
        return (self.qweight, self.scales, self.zeros, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        return reference.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)

    def settings(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class FP8Linear(QuantLinear):
    op = "matmul.fp8"
    row_buffers = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 weight_scale: Literal["per_tensor", "per_row"] = "per_row",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.granularity = weight_scale
        n_scales = out_features if weight_scale == "per_row" else 1
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_scale: Literal["per_tensor", "per_row"] = "per_row"
                    ) -> FP8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_scale=weight_scale,
                  dtype=linear.weight.dtype, device=linear.weight.device)
        w_q, scale = quantize_fp8(linear.weight, weight_scale)
        mod.weight.copy_(w_q)
        mod.weight_scale.copy_(scale)
        cls._copy_bias(mod, linear)
        return mod

    def _op_args(self) -> tuple:
        return (self.weight, self.weight_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale)

    def settings(self) -> dict[str, Any]:
        return {"weight_scale": self.granularity}

    def fusable(self) -> bool:
        # A per-tensor scale is one number per part, not a row buffer: such parts stay separate.
        return self.granularity == "per_row"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_scale={self.granularity}"


@dataclass(eq=False, kw_only=True)
class FusedQuantLinear(FusedProjections):
    """Quantized projections of one input run as one module (`fused`) of their class, whose buffers the
    parts' buffers are views of."""

    fused: QuantLinear

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)

    def matmul_normed(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fused.forward_normed(x, residual, weight, eps)

    def has_swiglu(self) -> bool:
        return len(self.sizes) == 2 and self.sizes[0] == self.sizes[1] and self.fused.has_swiglu()

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.forward_swiglu(x)

    def has_qkv_rope(self) -> bool:
        return (len(self.sizes) == 3 and self.sizes[1] == self.sizes[2] and self.fused.rope_op is not None
                and self.fused.bias is None)

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_q_heads: int, n_kv_heads: int) -> torch.Tensor:
        return self.fused.forward_qkv_rope(x, cos, sin, k_cache, v_cache, slot_mapping, n_q_heads, n_kv_heads)
