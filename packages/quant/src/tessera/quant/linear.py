"""Quantized drop-in replacements for `nn.Linear`: same call signature, same qualified names.

Each module keeps its packed weight as buffers (so `state_dict()` carries them) and a float `bias`
when the original had one; `forward` flattens the leading dimensions and dispatches to the
registry op, so a faster backend (Triton, CUDA) is picked up wherever its `supports` allows.

    Int8Linear  weight int8 [N, K], weight_scale float32 [N]              -> matmul.int8_weight_only
    Int4Linear  qweight uint8 [N, K/2], scales/zeros float32 [N, K/G]     -> matmul.int4_awq
    FP8Linear   weight float8_e4m3fn [N, K], weight_scale float32 [1]/[N] -> matmul.fp8
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import nn

from tessera.kernels import reference, registry
from tessera.quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from tessera.quant.int8 import dequantize_int8, quantize_int8
from tessera.quant.rtn import quantize_int4


class QuantLinear(nn.Module, ABC):
    """Shared shape bookkeeping and the flatten -> op -> bias -> reshape path."""

    op: str

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

    @abstractmethod
    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module multiplies by, [out_features, in_features] float32."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @staticmethod
    def _copy_bias(dst: QuantLinear, linear: nn.Linear) -> None:
        if linear.bias is not None:
            dst.bias.data.copy_(linear.bias.detach())


class Int8Linear(QuantLinear):
    op = "matmul.int8_weight_only"

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class FP8Linear(QuantLinear):
    op = "matmul.fp8"

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_scale={self.granularity}"
