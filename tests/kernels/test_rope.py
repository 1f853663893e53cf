"""The fused `rope` / `rope_qk_norm` ops beyond the generic parity test: second-order gradients under the
interpreter (the backward's transposed rotation, cos/sin gradients included), and reasons for inputs
the Triton backend refuses."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels import reference
from tessera.kernels.triton import rope as rope_kernels
from tessera.kernels.triton.rope import supports_rope, supports_rope_qk_norm


def test_second_order_gradients_match_reference(run_check) -> None:
    run_check("rope_check.py", "rope-ok", interpret="always", timeout=300)


def test_reference_is_a_rotation_of_each_frequency_pair() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    angles = torch.randn(6, 8)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q_rot, k_rot = reference.rope(q, k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    as_complex = torch.complex(q[..., :8], q[..., 8:]) * torch.polar(torch.ones_like(angles), angles)[:, None]
    torch.testing.assert_close(q_rot, torch.cat((as_complex.real, as_complex.imag), -1))
    torch.testing.assert_close(reference.rope(k_rot, k_rot, cos, -sin)[0], k, atol=1e-5, rtol=1e-5)


def test_supports_names_what_is_wrong() -> None:
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos = sin = torch.randn(3, 16)
    assert any("cos.shape=(2, 16)" in r for r in supports_rope(q, k, cos[:2], sin))
    assert any("head dim D=15" in r for r in supports_rope(q[..., :15], k[..., :15], cos[:, :15], sin[:, :15]))
    assert any("dtypes differ" in r for r in supports_rope(q, k.half(), cos, sin))
    assert any("q_weight.shape=(8,)" in r for r in supports_rope_qk_norm(q, k, cos, sin, torch.ones(8),
                                                                          torch.ones(16)))


@pytest.mark.parametrize(("norm", "transpose"), [(False, False), (False, True), (True, False)])
def test_kernel_compiles_for_sm90(norm: bool, transpose: bool, compile_sm90) -> None:
    """The compiled frontend (not the interpreter) accepts every variant: Qwen3-0.6B's 16/8 heads of 128, bf16."""
    ptrs = {"Q": "bf16", "K": "bf16", "COS": "bf16", "SIN": "bf16", "QW": "bf16", "KW": "bf16", "QO": "bf16",
            "KO": "bf16"}
    meta = {"HALF": 64, "BLOCK_H": 16, "BLOCK_D": 64, "NORM": norm, "TRANSPOSE": transpose}
    compiled = compile_sm90(rope_kernels._rope_kernel, ptrs, meta)
    assert compiled.asm["cubin"]
