"""tessera.quant: post-training quantization of a `tessera.model.Transformer` (or any module of linears).

    from tessera.quant import quantize, save_quantized, load_quantized
    model = quantize(model, QuantConfig(method="awq"), calib_token_ids)   # int8 | int4_rtn | awq | fp8
    save_quantized(model, "out/", tokenizer=tok); model = load_quantized("out/")

Quantized layers dispatch to the registry ops `matmul.int8_weight_only`, `matmul.int4_awq` and
`matmul.fp8`, so the fastest backend that supports the inputs runs (the torch reference on CPU).
"""

from tessera.quant.api import (
    QuantConfigMismatch,
    as_quant_config,
    load_quantized,
    plan_layers,
    quantize,
    read_quant_card,
    save_quantized,
)
from tessera.quant.linear import FP8Linear, Int4Linear, Int8Linear, QuantLinear

__all__ = [
    "FP8Linear",
    "Int4Linear",
    "Int8Linear",
    "QuantConfigMismatch",
    "QuantLinear",
    "as_quant_config",
    "load_quantized",
    "plan_layers",
    "quantize",
    "read_quant_card",
    "save_quantized",
]
