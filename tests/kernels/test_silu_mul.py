"""The `silu_mul` op beyond the generic parity test: it computes exactly what the unfused model computed,
the Triton kernel compiles for sm_90, and the Triton backend names inputs it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.kernels import reference
from tessera.kernels.triton import swiglu
from tessera.kernels.triton.swiglu import supports_silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_unfused_expression(dtype: torch.dtype) -> None:
    fused = (torch.randn(5, 2 * 37) * 3).to(dtype)
    gate, up = fused[:, :37], fused[:, 37:]
    assert torch.equal(reference.silu_mul(gate, up), F.silu(gate) * up)


def test_supports_names_what_is_wrong() -> None:
    g = torch.randn(4, 8)
    assert any("[M, F]" in r for r in supports_silu_mul(g, torch.randn(4, 9)))
    assert any("dtypes differ" in r for r in supports_silu_mul(g, g.half()))
    assert any("gate.stride()" in r for r in supports_silu_mul(torch.randn(8, 4).T, g))


def test_the_mlp_runs_one_gating_op() -> None:
    from tessera.model import Transformer
    from tessera.specs import ModelConfig

    cfg = ModelConfig(vocab_size=31, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=16)
    mlp = Transformer(cfg).model.layers[0].mlp
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernel_compiles_for_sm90(dtype: str, compile_sm90) -> None:
    compiled = compile_sm90(swiglu._silu_mul_kernel, {"G": dtype, "U": dtype, "Y": dtype},
                            {"BLOCK": swiglu._GATE_BLOCK})
    assert compiled.asm["cubin"]


def test_interpreter_rounds_to_bfloat16_as_the_gpu_does(run_check) -> None:
    run_check("interpreter_check.py", "interp-ok", interpret="always")


def test_triton_silu_mul_reads_strided_halves(run_check) -> None:
    run_check("strided_silu_mul_check.py", "strided-ok", interpret="always")
