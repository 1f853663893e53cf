"""Float32 data gets correctly rounded divisions and square roots in the normalisations (`triton/tiles.py`):
compiled offline for sm_90, the float32 kernels hold `div.rn` / `sqrt.rn` and none of the fast
approximations, while the bf16 ones keep the fast forms."""

from __future__ import annotations

import re

import pytest

from tessera.kernels.triton import flash_attention as fa
from tessera.kernels.triton import gemv, norm, rope, swiglu
from tessera.kernels.triton import paged_attention as pa

_ROPE = ("Q", "K", "COS", "SIN", "QW", "KW", "QO", "KO")
# name -> (kernel, pointer names, float32 constexprs, bf16 constexprs)
_CASES = {
    "rms_norm": (norm._rms_norm_kernel, "XRWYH", {"HAS_RESIDUAL": True, "BLOCK": 2048, "PRECISE": True},
                 {"HAS_RESIDUAL": True, "BLOCK": 2048}),
    "rope_qk_norm": (rope._rope_kernel, _ROPE, {"HALF": 64, "BLOCK_H": 4, "BLOCK_D": 64, "NORM": True,
                                                "TRANSPOSE": False, "PRECISE": True},
                     {"HALF": 64, "BLOCK_H": 4, "BLOCK_D": 64, "NORM": True, "TRANSPOSE": False}),
    "flash_fwd": (fa._fwd_kernel, ("Q", "K", "V", "O"), {"N_REP": 2, "HEAD_DIM": 64, "CAUSAL": True, "PREC": "ieee",
                                                         "BLOCK_M": 32, "BLOCK_N": 32},
                  {"N_REP": 2, "HEAD_DIM": 64, "CAUSAL": True, "PREC": "tf32", "BLOCK_M": 64, "BLOCK_N": 64}),
    "paged_decode": (pa._decode_kernel, ("Q", "K", "V", "O"), {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16,
                                                               "SPLITS": 1, "PREC": "ieee", "BLOCK_N": 64},
                     {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16, "SPLITS": 1, "PREC": "tf32", "BLOCK_N": 64}),
    # The rotary prologue's QK-norm (`rope.rotate_halves`) inside the paged decode kernel.
    "paged_decode_rope": (pa._decode_kernel, ("Q", "K", "V", "O", "K_NEW", "V_NEW", "COS", "SIN", "QW", "KW"),
                          {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16, "SPLITS": 1, "PREC": "ieee",
                           "BLOCK_N": 64, "WRITE": True, "ROPE": 2},
                          {"N_REP": 2, "G": 16, "HEAD_DIM": 128, "PAGE": 16, "SPLITS": 1, "PREC": "tf32",
                           "BLOCK_N": 64, "WRITE": True, "ROPE": 2}),
    "merge": (pa._merge_kernel, ("O",), {"HEAD_DIM": 128, "SPLITS": 4, "S_BLOCK": 4, "PRECISE": True},
              {"HEAD_DIM": 128, "SPLITS": 4, "S_BLOCK": 4}),
    "silu_mul": (swiglu._silu_mul_kernel, "GUY", {"BLOCK": 1024}, {"BLOCK": 1024}),
    # The gated GEMV forms silu_mul's values itself, rounded (and divided) as silu_mul does.
    "gated_gemv": (gemv.dense_gemv_kernel, ("X", "W", "Y"), {"PREC": "ieee", "BM": 1, "BN": 8, "BK": 256,
                                                             "SPLIT_K": 2, "EVEN": True, "GATED": True},
                   {"PREC": "tf32", "BM": 1, "BN": 8, "BK": 256, "SPLIT_K": 2, "EVEN": True, "GATED": True}),
}
_EXTRA_PTRS = {"flash_fwd": {"LSE": "fp32", "CU": "i32"}, "merge": {"O_PART": "fp32", "ML_PART": "fp32"},
               "gated_gemv": {"WS": "fp32", "CNT": "i32"},
               "paged_decode": {"O_PART": "fp32", "ML_PART": "fp32", "TABLES": "i32", "CTX": "i32"},
               "paged_decode_rope": {"O_PART": "fp32", "ML_PART": "fp32", "TABLES": "i32", "CTX": "i32",
                                     "SLOTS": "i64"}}
_FAST = re.compile(r"\b(div\.full|div\.approx|sqrt\.approx|rsqrt\.approx)\.")
_EXACT = re.compile(r"\b(div\.rn|sqrt\.rn)\.f32")


@pytest.mark.parametrize("name", sorted(_CASES))
def test_float32_normalisations_are_correctly_rounded(name: str, compile_sm90) -> None:
    fn, ptrs, fp32_consts, bf16_consts = _CASES[name]
    extra = _EXTRA_PTRS.get(name, {})
    fp32 = compile_sm90(fn, {**{p: "fp32" for p in ptrs}, **extra}, fp32_consts).asm["ptx"]
    assert _EXACT.search(fp32) and not _FAST.search(fp32), sorted(set(_FAST.findall(fp32)))
    bf16 = compile_sm90(fn, {**{p: "bf16" for p in ptrs}, **extra}, bf16_consts).asm["ptx"]
    assert _FAST.search(bf16) and not _EXACT.search(bf16)
